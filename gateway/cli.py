"""Command line `sc-gateway`: database migrations, device registration, dead-letter inspection.

Commands come from the registrar functions listed in COMMANDS; a module that adds commands (the
gateway's `run`, say) writes a `def add_xxx_commands(sub: SubParsers) -> None` using add_group and
add_command, and is listed there. Each command is a handler `(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TextIO, TypeAlias

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import ProgrammingError as SqlProgrammingError

from gateway.db import (
    LIFECYCLES,
    SchemaNotCurrentError,
    current_revision,
    head_revision,
    make_engine,
    make_revision,
    migrate,
    require_current_schema,
)
from gateway.deadletter import DeadLetterStore, DeviceStateStore
from gateway.registry import (
    DEVICE_TYPES,
    CsvFormatError,
    DeviceExistsError,
    DeviceNotFoundError,
    DeviceRecord,
    ImportReport,
    Registry,
    describe_validation_error,
)

ENV_DATABASE_URL: Final = "SC_DATABASE_URL"
DEFAULT_DATABASE_URL: Final = "sqlite:///./.var/registry.db"

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = Callable[[argparse.Namespace], int]
Registrar: TypeAlias = Callable[[SubParsers], None]

# A progress line is printed for imports of at least this many rows.
PROGRESS_MIN_ROWS: Final = 5000


class CommandError(Exception):
    """A failure to report to the user in one line (exit code 1), not a bug."""


# ---------------------------------------------------------------------------------------------
# Parser construction, shared by every command module


def _common_options(default: Any) -> argparse.ArgumentParser:
    # The same options on the root parser and on every command, so both
    # `sc-gateway --json devices list` and `sc-gateway devices list --json` work. On commands the
    # default is SUPPRESS so an option given before the command is not reset by the command.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--db",
        metavar="URL",
        default=default,
        help=f"SQLAlchemy database URL (default: ${ENV_DATABASE_URL}, else {DEFAULT_DATABASE_URL})",
    )
    parent.add_argument(
        "--json",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="machine-readable JSON output",
    )
    return parent


_COMMAND_OPTIONS: Final = _common_options(argparse.SUPPRESS)


def add_group(subparsers: SubParsers, name: str, help: str) -> SubParsers:
    """Add a command group (`devices`, `db`) and return the subparsers to add its commands to."""
    group = subparsers.add_parser(name, help=help, description=help)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def add_command(subparsers: SubParsers, name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
    """Add a command that runs `handler(args)`; it accepts --db and --json."""
    parser = subparsers.add_parser(name, help=help, description=help, parents=[_COMMAND_OPTIONS])
    parser.set_defaults(handler=handler)
    return parser


def database_url(args: argparse.Namespace) -> str:
    """--db, else $SC_DATABASE_URL, else the development default."""
    return getattr(args, "db", None) or os.environ.get(ENV_DATABASE_URL) or DEFAULT_DATABASE_URL


@contextlib.contextmanager
def open_engine(args: argparse.Namespace, *, check_schema: bool = True) -> Iterator[Engine]:
    """An engine on the command's database, disposed afterwards; refuses an unmigrated database."""
    engine = make_engine(database_url(args))
    try:
        if check_schema:
            require_current_schema(engine)
        yield engine
    finally:
        engine.dispose()


def print_json(data: Any, out: TextIO | None = None) -> None:
    json.dump(data, out or sys.stdout, ensure_ascii=False, indent=2, default=str)
    (out or sys.stdout).write("\n")


def _width(text: str) -> int:
    # CJK characters (community and street names) take two terminal columns.
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns; None shows as '-'."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max([_width(h)] + [_width(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v + " " * (w - _width(v)) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


_DURATION_RE: Final = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> dt.datetime:
    """`30m`, `24h`, `7d`, `2w` ago, or an ISO 8601 time (UTC if it names no offset)."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 24h, 7d) nor an ISO 8601 time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _attr(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    return key.strip(), value.strip()


def _short_time(when: dt.datetime | None) -> str | None:
    return None if when is None else when.strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------------------------
# db


def add_db_commands(sub: SubParsers) -> None:
    db = add_group(sub, "db", "database schema")
    add_command(db, "migrate", "create or upgrade the schema to the latest revision", _db_migrate)
    add_command(db, "current", "show the schema revision of the database and of this code", _db_current)
    p = add_command(db, "revision", "write a new migration script (developers)", _db_revision)
    p.add_argument("-m", "--message", required=True, help="what the migration changes")
    p.add_argument("--rev-id", help="revision id, e.g. 0002_device_notes (default: random)")
    p.add_argument("--empty", action="store_true", help="do not autogenerate from the table definitions")


def _db_migrate(args: argparse.Namespace) -> int:
    migrate(database_url(args))
    with open_engine(args, check_schema=False) as engine:
        where, revision = _safe_url(engine), current_revision(engine)
    if args.json:
        print_json({"database": where, "revision": revision})
    else:
        print(f"{where} is at revision {revision}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    with open_engine(args, check_schema=False) as engine:
        where, current, head = _safe_url(engine), current_revision(engine), head_revision()
    if args.json:
        print_json({"database": where, "revision": current, "head": head, "current": current == head})
    else:
        state = "up to date" if current == head else "needs `sc-gateway db migrate`"
        print(f"{where}: revision {current or '(none)'}, code expects {head}: {state}")
    return 0 if current == head else 1


def _db_revision(args: argparse.Namespace) -> int:
    path = make_revision(database_url(args), args.message, autogenerate=not args.empty, rev_id=args.rev_id)
    print(path)
    return 0


def _safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


# ---------------------------------------------------------------------------------------------
# devices


def add_device_commands(sub: SubParsers) -> None:
    devices = add_group(sub, "devices", "the device registry")

    p = add_command(devices, "add", "register one device", _devices_add)
    p.add_argument("--id", dest="device_id", required=True, help="device id: 1-64 of A-Z a-z 0-9 _ -")
    p.add_argument("--type", dest="device_type", required=True, choices=DEVICE_TYPES)
    p.add_argument("--community", required=True)
    p.add_argument("--grid-code", required=True, help="unit grid code, 14 or 15 digits")
    p.add_argument("--district")
    p.add_argument("--street")
    p.add_argument("--building")
    p.add_argument("--address")
    p.add_argument("--lat", type=float)
    p.add_argument("--lon", type=float)
    p.add_argument("--responsible-unit")
    p.add_argument("--component-code", help="component identification code, 16 digits")
    p.add_argument(
        "--attr",
        action="append",
        type=_attr,
        default=[],
        metavar="KEY=VALUE",
        help="an attribute, e.g. --attr bay_kind=fire_lane (repeatable)",
    )

    p = add_command(devices, "import", "register or update devices from a CSV file", _devices_import)
    p.add_argument(
        "file", help="CSV: header device_id,device_type,community,grid_code[,...][,attr.<name>...]"
    )
    p.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    p.add_argument("--batch-size", type=int, default=1000, help=argparse.SUPPRESS)

    p = add_command(devices, "list", "list devices", _devices_list)
    p.add_argument("--type", dest="device_type", choices=DEVICE_TYPES)
    p.add_argument("--community")
    p.add_argument("--grid-code")
    p.add_argument("--lifecycle", choices=LIFECYCLES)
    p.add_argument("--limit", type=int, help="at most this many")

    p = add_command(devices, "show", "show one device with its liveness", _devices_show)
    p.add_argument("device_id")

    p = add_command(devices, "set-lifecycle", "move a device to another lifecycle state", _devices_lifecycle)
    p.add_argument("device_id")
    p.add_argument("lifecycle", choices=LIFECYCLES)


def _devices_add(args: argparse.Namespace) -> int:
    fields = (
        "device_id",
        "device_type",
        "community",
        "grid_code",
        "district",
        "street",
        "building",
        "address",
        "lat",
        "lon",
        "responsible_unit",
        "component_code",
    )
    data: dict[str, Any] = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    data["attributes"] = dict(args.attr)
    try:
        record = DeviceRecord.model_validate(data)
    except ValidationError as exc:
        raise CommandError(f"invalid device: {describe_validation_error(exc)}") from None
    with open_engine(args) as engine:
        registry = Registry(engine)
        try:
            registry.add(record)
        except DeviceExistsError as exc:
            raise CommandError(str(exc)) from None
        device = registry.describe(record.device_id)
    assert device is not None
    if args.json:
        print_json(device.as_dict())
    else:
        print(f"registered {device.device_type} {device.device_id} (lifecycle {device.lifecycle})")
    return 0


def _progress_printer(out: TextIO) -> Callable[[int, int], None]:
    tty = out.isatty()
    step = {"next": 0.0}

    def show(done: int, total: int) -> None:
        if total < PROGRESS_MIN_ROWS:
            return
        if tty:
            out.write(f"\r{done}/{total} rows ({100 * done // total}%)")
            if done == total:
                out.write("\n")
            out.flush()
        elif done / total >= step["next"] or done == total:
            out.write(f"{done}/{total} rows ({100 * done // total}%)\n")
            step["next"] = done / total + 0.1

    return show


def _devices_import(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        registry = Registry(engine)
        try:
            report = registry.import_csv(
                args.file,
                dry_run=args.dry_run,
                batch_size=args.batch_size,
                progress=_progress_printer(sys.stderr),
            )
        except (CsvFormatError, OSError) as exc:
            raise CommandError(f"{args.file}: {exc}") from None
    if args.json:
        print_json(_report_json(args.file, report))
    else:
        _print_report(args.file, report)
    return 0 if report.ok else 1


def _report_json(file: str, report: ImportReport) -> dict[str, Any]:
    return {
        "file": file,
        "dry_run": report.dry_run,
        "version": report.version,
        "counts": report.counts,
        "rows": [
            {"row": r.row, "device_id": r.device_id, "outcome": r.outcome, "error": r.error}
            for r in report.rows
        ],
    }


def _print_report(file: str, report: ImportReport) -> None:
    c = report.counts
    print(
        f"{file}: {len(report.rows)} rows: {c['created']} created, {c['updated']} updated, "
        f"{c['unchanged']} unchanged, {c['error']} with errors"
        + (" (dry run: nothing written)" if report.dry_run else "")
    )
    if report.errors:
        print("\nRows with errors (not imported):")
        print(
            format_table(
                ["row", "device_id", "error"], [(r.row, r.device_id, r.error) for r in report.errors]
            )
        )


def _devices_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        found = Registry(engine).list(
            device_type=args.device_type,
            community=args.community,
            grid_code=args.grid_code,
            lifecycle=args.lifecycle,
            limit=args.limit,
        )
    if args.json:
        print_json([d.as_dict() for d in found])
        return 0
    headers = ["device_id", "type", "community", "grid_code", "building", "lifecycle", "updated"]
    rows = [
        (
            d.device_id,
            d.device_type,
            d.community,
            d.grid_code,
            d.building,
            d.lifecycle,
            _short_time(d.updated_at),
        )
        for d in found
    ]
    print(format_table(headers, rows))
    print(f"({len(found)} device{'s' if len(found) != 1 else ''})")
    return 0


def _devices_show(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        device = Registry(engine).describe(args.device_id)
        state = DeviceStateStore(engine).get(args.device_id)
    if device is None:
        raise CommandError(f"device {args.device_id!r} is not registered")
    if args.json:
        print_json({**device.as_dict(), "state": None if state is None else state.as_dict()})
        return 0
    rows: list[tuple[str, Any]] = [
        (name, value) for name, value in device.as_dict().items() if name != "attributes"
    ]
    rows += [(f"attr.{k}", v) for k, v in sorted(device.attributes.items())]
    if state is None:
        rows.append(("online", "never seen"))
    else:
        rows += [
            ("online", state.online),
            ("last_seen", state.last_seen and state.last_seen.isoformat()),
            ("last_status_at", state.last_status_at and state.last_status_at.isoformat()),
            ("fw", state.fw),
            ("last_seq", state.last_seq),
        ]
    print(format_table(["field", "value"], rows))
    return 0


def _devices_lifecycle(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        try:
            changed = Registry(engine).set_lifecycle(args.device_id, args.lifecycle)
        except DeviceNotFoundError as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        print_json({"device_id": args.device_id, "lifecycle": args.lifecycle, "changed": changed})
    else:
        print(f"{args.device_id}: {args.lifecycle}" + ("" if changed else " (already)"))
    return 0


# ---------------------------------------------------------------------------------------------
# deadletters


def add_deadletter_commands(sub: SubParsers) -> None:
    group = add_group(sub, "deadletters", "messages the gateway set aside")

    p = add_command(group, "list", "the newest dead letters", _deadletters_list)
    p.add_argument("--reason", help="only this reason code, e.g. unknown_field")
    p.add_argument("--device", dest="device_id", help="only this device id")
    p.add_argument("--since", type=parse_since, help="30m, 24h, 7d or an ISO 8601 time")
    p.add_argument("--limit", type=int, default=50)

    p = add_command(group, "counts", "dead letters per reason", _deadletters_counts)
    p.add_argument("--since", type=parse_since, help="30m, 24h, 7d or an ISO 8601 time")

    p = add_command(group, "unknown", "unregistered devices that publish: the devices to register", _unknown)
    p.add_argument("--since", type=parse_since, help="30m, 24h, 7d or an ISO 8601 time")
    p.add_argument("--limit", type=int, default=1000)

    p = add_command(group, "prune", "delete old dead letters", _deadletters_prune)
    p.add_argument("--older-than", type=parse_since, required=True, metavar="AGE", help="e.g. 30d")


def _payload_preview(payload: bytes, size: int, width: int = 60) -> str:
    text = payload.decode("utf-8", "backslashreplace").replace("\n", " ")
    more = len(text) > width or size > len(payload)
    return text[:width] + ("…" if more else "")


def _deadletters_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        letters = DeadLetterStore(engine).recent(
            limit=args.limit, reason=args.reason, device_id=args.device_id, since=args.since
        )
    if args.json:
        print_json([d.as_dict() for d in letters])
        return 0
    if not letters:
        print("no dead letters")
        return 0
    rows = [
        (_short_time(d.received_at), d.reason, d.device_id, d.topic, d.detail[:80], d.payload_size)
        for d in letters
    ]
    print(format_table(["received (UTC)", "reason", "device_id", "topic", "detail", "bytes"], rows))
    return 0


def _deadletters_counts(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        counts = DeadLetterStore(engine).count_by_reason(since=args.since)
    if args.json:
        print_json(counts)
        return 0
    if not counts:
        print("no dead letters")
        return 0
    print(format_table(["reason", "count"], list(counts.items())))
    return 0


def _unknown(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        found = DeadLetterStore(engine).unknown_devices(since=args.since, limit=args.limit)
    if args.json:
        print_json([u.as_dict() for u in found])
        return 0
    if not found:
        print("no unregistered device has published")
        return 0
    rows = [
        (
            u.device_id,
            u.device_type,
            u.count,
            _short_time(u.last_seen),
            _payload_preview(u.last_payload, u.last_payload_size),
        )
        for u in found
    ]
    print(format_table(["device_id", "type", "messages", "last seen (UTC)", "last payload"], rows))
    return 0


def _deadletters_prune(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        deleted = DeadLetterStore(engine).prune(args.older_than)
    if args.json:
        print_json({"deleted": deleted, "before": args.older_than.isoformat()})
    else:
        print(f"deleted {deleted} dead letters received before {args.older_than.isoformat()}")
    return 0


# ---------------------------------------------------------------------------------------------


# The command groups of `sc-gateway`, listed explicitly. Add a module's registrar here.
def add_run_commands(sub: SubParsers) -> None:
    from gateway.runcmd import add_run_commands as add

    add(sub)


COMMANDS: list[Registrar] = [add_db_commands, add_device_commands, add_deadletter_commands, add_run_commands]


def build_parser(commands: Sequence[Registrar] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sc-gateway",
        description="Smart-community IoT gateway: registry, dead letters and the gateway itself.",
        parents=[_common_options(None)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS if commands is None else commands:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, commands: Sequence[Registrar] | None = None) -> int:
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CommandError as exc:
        print(f"sc-gateway: {exc}", file=sys.stderr)
        return 1
    except SchemaNotCurrentError as exc:
        print(f"sc-gateway: {exc}", file=sys.stderr)
        return 1
    except (OperationalError, SqlProgrammingError) as exc:
        print(f"sc-gateway: database error: {exc.orig or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
