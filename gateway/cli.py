"""Command line `sc-gateway`: database migrations, the installers' device registry (with broker
credentials), places and responsible units, commissioning, dead-letter inspection.

Commands come from the registrar functions listed in COMMANDS; a module that adds commands (the
gateway's `run`, say) writes a `def add_xxx_commands(sub: SubParsers) -> None` using add_group and
add_command, and is listed there. Each command is a handler `(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import getpass
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol, TextIO, TypeAlias, TypeVar

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
from gateway.installers import (
    CredentialIssuer,
    CredentialsRefusedError,
    CredentialsUnavailableError,
    DeviceCredentials,
    Installers,
    InstallerSettings,
)
from gateway.registry import (
    DEVICE_TYPES,
    PLACE_FIELDS,
    Change,
    CsvFormatError,
    ImportReport,
    PlaceRecord,
    Places,
    Registry,
    RegistryError,
    ResponsibleUnitRecord,
    ResponsibleUnits,
    describe_validation_error,
    parse_csv,
)

ENV_DATABASE_URL: Final = "SC_DATABASE_URL"
DEFAULT_DATABASE_URL: Final = "sqlite:///./.var/registry.db"

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = Callable[[argparse.Namespace], int]
Registrar: TypeAlias = Callable[[SubParsers], None]

# A progress line is printed for imports of at least this many rows (fewer when credentials are
# issued: each batch is a broker round trip).
PROGRESS_MIN_ROWS: Final = 5000
PROGRESS_MIN_ROWS_CREDENTIALS: Final = 500


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


def installer_settings() -> InstallerSettings:
    try:
        return InstallerSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SC_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise CommandError(f"bad settings: {problems}") from None


def make_issuer(settings: InstallerSettings) -> CredentialIssuer:
    """The broker's account administration for the installers' commands (tests replace it)."""
    from gateway.installers import BrokerIssuer

    return BrokerIssuer(settings)


def actor() -> str:
    """How the registry's history names what a CLI user did."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


@contextlib.contextmanager
def open_installers(args: argparse.Namespace, *, broker: bool) -> Iterator[Installers]:
    """The installers' operations on the command's database, with the broker unless `broker` is False."""
    settings = installer_settings()
    issuer = make_issuer(settings) if broker else None
    try:
        with open_engine(args) as engine:
            yield Installers(Registry(engine, code_scheme=settings.code_scheme), issuer)
    finally:
        close = getattr(issuer, "close", None)
        if callable(close):
            close()


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


class _JsonItem(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


_Item = TypeVar("_Item", bound=_JsonItem)


def _print_items(
    args: argparse.Namespace,
    items: Sequence[_Item],
    headers: Sequence[str],
    row: Callable[[_Item], Sequence[Any]],
    *,
    empty: str | None = None,
    footer: str | None = None,
) -> int:
    """A listing command's output: with --json each item's as_dict(), else a table of `row` of each
    item (`empty` instead when there is none and it is given), then `footer` if given."""
    if args.json:
        print_json([item.as_dict() for item in items])
        return 0
    if not items and empty is not None:
        print(empty)
        return 0
    print(format_table(headers, [row(item) for item in items]))
    if footer is not None:
        print(footer)
    return 0


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


def _place_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--community", required=required)
    p.add_argument("--grid-code", required=required, help="unit grid code, 15 digits (14 accepted)")
    p.add_argument("--district")
    p.add_argument("--street")
    p.add_argument("--building")
    p.add_argument("--address")
    p.add_argument("--lat", type=float)
    p.add_argument("--lon", type=float)


def _record_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--responsible-unit")
    p.add_argument("--component-code", help="component identification code, 16 digits")
    p.add_argument("--install-date", help="YYYY-MM-DD")
    p.add_argument("--firmware")
    p.add_argument("--batch", help="installation batch (commissioning shows a batch at once)")


def _broker_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry-only",
        action="store_true",
        help="leave the broker alone (a device without broker account, or no broker here)",
    )


_ATTR_HELP: Final = "an attribute, e.g. --attr bay_kind=fire_lane (repeatable)"
_RECORD_OPTION_FIELDS: Final = (
    *PLACE_FIELDS,
    "responsible_unit",
    "component_code",
    "install_date",
    "firmware",
    "batch",
)


def add_device_commands(sub: SubParsers) -> None:
    devices = add_group(sub, "devices", "the device registry")

    p = add_command(devices, "add", "register one device", _devices_add)
    p.add_argument("--id", dest="device_id", required=True, help="device id: 1-64 of A-Z a-z 0-9 _ -")
    p.add_argument("--type", dest="device_type", required=True, choices=DEVICE_TYPES)
    _place_options(p, required=True)
    _record_options(p)
    p.add_argument("--attr", action="append", type=_attr, default=[], metavar="KEY=VALUE", help=_ATTR_HELP)
    p.add_argument(
        "--issue-credentials",
        action="store_true",
        help="also create its broker account and print its MQTT password (once)",
    )

    p = add_command(devices, "import", "register or update devices from a CSV file", _devices_import)
    p.add_argument(
        "file", help="CSV: header device_id,device_type,community,grid_code[,...][,attr.<name>...]"
    )
    p.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    p.add_argument(
        "--issue-credentials",
        metavar="OUT.csv",
        help="create broker accounts for the devices created and write device_id,username,password,"
        "client_id to this new file (mode 0600; it must not exist)",
    )
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)

    p = add_command(devices, "list", "list devices", _devices_list)
    p.add_argument("--type", dest="device_type", choices=DEVICE_TYPES)
    p.add_argument("--community")
    p.add_argument("--grid-code")
    p.add_argument("--lifecycle", choices=LIFECYCLES)
    p.add_argument("--batch")
    p.add_argument("--limit", type=int, help="at most this many")

    p = add_command(devices, "show", "show one device with its liveness", _devices_show)
    p.add_argument("device_id")

    p = add_command(devices, "history", "what happened to a device, newest first", _devices_history)
    p.add_argument("device_id")
    p.add_argument("--limit", type=int, default=50)

    p = add_command(
        devices, "update", "change some of a device's fields (the others are kept)", _devices_update
    )
    p.add_argument("device_id")
    _place_options(p, required=False)
    _record_options(p)
    p.add_argument(
        "--attr",
        action="append",
        type=_attr,
        default=[],
        metavar="KEY=VALUE",
        help="set an attribute (repeatable); KEY= removes it",
    )
    p.add_argument(
        "--clear",
        action="append",
        default=[],
        choices=[f for f in _RECORD_OPTION_FIELDS if f not in ("community", "grid_code")],
        metavar="FIELD",
        help="clear a field, e.g. --clear building (repeatable)",
    )

    p = add_command(
        devices, "move", "put a device in another place (place fields not given are cleared)", _devices_move
    )
    p.add_argument("device_id")
    _place_options(p, required=True)

    for name, text, handler in (
        ("disable", "cut a device off: disconnected at once, logins refused, messages set aside", _disable),
        ("enable", "re-enable a disabled device", _enable),
        ("retire", "retire a device for good (its broker account is deleted)", _retire),
    ):
        p = add_command(devices, name, text, handler)
        p.add_argument("device_id")
        _broker_option(p)

    p = add_command(devices, "confirm", "confirm devices work where they are: in service", _devices_confirm)
    p.add_argument("device_ids", nargs="+", metavar="device_id")

    p = add_command(
        devices,
        "rotate-credentials",
        "a new MQTT password (printed once); the old one stops working (issues one if it has none)",
        _devices_rotate,
    )
    p.add_argument("device_id")

    p = add_command(devices, "export", "every device as CSV (the import format) or JSON", _devices_export)
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")

    p = add_command(devices, "set-lifecycle", "move a device to another lifecycle state", _devices_lifecycle)
    p.add_argument("device_id")
    p.add_argument("lifecycle", choices=LIFECYCLES)


def _invalid(exc: ValidationError) -> CommandError:
    return CommandError(f"invalid device: {describe_validation_error(exc)}")


def _devices_add(args: argparse.Namespace) -> int:
    fields = ("device_id", "device_type", *_RECORD_OPTION_FIELDS)
    data: dict[str, Any] = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    data["attributes"] = dict(args.attr)
    with open_installers(args, broker=args.issue_credentials) as installers:
        try:
            record = installers.registry.validate(data)
        except ValidationError as exc:
            raise _invalid(exc) from None
        device, credentials = installers.register(
            record, actor=actor(), issue_credentials=args.issue_credentials
        )
    if args.json:
        print_json({**device.as_dict(), "credentials": credentials and credentials.as_dict()})
        return 0
    print(f"registered {device.device_type} {device.device_id} (lifecycle {device.lifecycle})")
    if credentials is not None:
        _print_credentials(credentials)
    return 0


def _print_credentials(credentials: DeviceCredentials) -> None:
    print(f"MQTT username {credentials.username}, client id {credentials.client_id}, password:")
    print(f"\n  {credentials.password}\n")
    print("Shown once: only the broker's hash of it is kept.")


def _progress_printer(out: TextIO, min_rows: int = PROGRESS_MIN_ROWS) -> Callable[[int, int], None]:
    tty = out.isatty()
    step = {"next": 0.0}

    def show(done: int, total: int) -> None:
        if total < min_rows:
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


class CredentialsFile:
    """A new CSV file (mode 0600, refused if it exists) that credentials are appended to batch by batch,
    each batch flushed to disk, so an interrupted import keeps those of the devices it registered."""

    HEADER: Final = "device_id,username,password,client_id\n"

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CommandError(
                f"{path} exists: credentials go to a new file (move the old one away)"
            ) from None
        except OSError as exc:
            raise CommandError(f"{path}: {exc.strerror}") from None
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._file.write(self.HEADER)
        self.count = 0

    def write(self, batch: Mapping[str, DeviceCredentials]) -> None:
        for device_id, c in sorted(batch.items()):
            self._writer.writerow([device_id, c.username, c.password, c.client_id])
        self._file.flush()
        os.fsync(self._file.fileno())
        self.count += len(batch)

    def close(self) -> None:
        self._file.close()


def _devices_import(args: argparse.Namespace) -> int:
    issue = args.issue_credentials is not None and not args.dry_run
    settings = installer_settings()
    batch_size = args.batch_size or (settings.import_batch_size if issue else 1000)
    sink = CredentialsFile(args.issue_credentials) if issue else None
    try:
        with open_installers(args, broker=issue) as installers:
            try:
                parsed = parse_csv(args.file, scheme=installers.registry.code_scheme)
            except (CsvFormatError, OSError) as exc:
                raise CommandError(f"{args.file}: {exc}") from None
            result = installers.import_records(
                parsed,
                actor=actor(),
                dry_run=args.dry_run,
                issue_credentials=issue,
                batch_size=batch_size,
                progress=_progress_printer(
                    sys.stderr, PROGRESS_MIN_ROWS_CREDENTIALS if issue else PROGRESS_MIN_ROWS
                ),
                on_credentials=None if sink is None else sink.write,
            )
    finally:
        if sink is not None:
            sink.close()
    report = result.report
    if args.json:
        print_json(
            {
                **_report_json(args.file, report),
                "credentials_file": sink and sink.path,
                "credentials": sink and sink.count,
            }
        )
    else:
        _print_report(args.file, report)
        if sink is not None:
            print(f"credentials of {sink.count} new device(s) written to {sink.path} (mode 0600)")
    return 0 if report.ok else 1


def _report_json(file: str, report: ImportReport) -> dict[str, Any]:
    return {
        "file": file,
        "dry_run": report.dry_run,
        "version": report.version,
        "counts": report.counts,
        "aborted": report.aborted,
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
    if report.aborted:
        print(f"stopped early: {report.aborted}")
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
            batch=args.batch,
            limit=args.limit,
        )
    return _print_items(
        args,
        found,
        ["device_id", "type", "community", "grid_code", "building", "lifecycle", "updated"],
        lambda d: (
            d.device_id,
            d.device_type,
            d.community,
            d.grid_code,
            d.building,
            d.lifecycle,
            _short_time(d.updated_at),
        ),
        footer=f"({len(found)} device{'s' if len(found) != 1 else ''})",
    )


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
            ("last_topic", state.last_topic),
            (
                "last_payload",
                state.last_payload and _payload_preview(state.last_payload, len(state.last_payload)),
            ),
            ("seen_fields", ", ".join(state.seen_fields or ()) or None),
        ]
    print(format_table(["field", "value"], rows))
    return 0


def _devices_history(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        registry = Registry(engine)
        if registry.describe(args.device_id) is None:
            raise CommandError(f"device {args.device_id!r} is not registered")
        events = registry.history(args.device_id, limit=args.limit)
    return _print_items(
        args,
        events,
        ["at (UTC)", "action", "by", "version", "detail"],
        lambda e: (
            _short_time(e.at),
            e.action,
            e.actor,
            e.version,
            json.dumps(dict(e.detail), ensure_ascii=False)[:100],
        ),
    )


def _print_change(args: argparse.Namespace, change: Change, done: str) -> int:
    device = change.device
    if args.json:
        print_json({**device.as_dict(), "changed": change.changed})
    elif change.changed:
        print(f"{device.device_id}: {done} (lifecycle {device.lifecycle}, version {device.version})")
    else:
        print(f"{device.device_id}: nothing to change (lifecycle {device.lifecycle})")
    return 0


def _devices_update(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {
        name: getattr(args, name) for name in _RECORD_OPTION_FIELDS if getattr(args, name) is not None
    }
    clash = sorted(set(changes) & set(args.clear))
    if clash:
        raise CommandError(f"--clear {clash[0]} and a new value for it at once")
    changes.update(dict.fromkeys(args.clear))
    if args.attr:
        changes["attributes"] = {k: (v if v != "" else None) for k, v in args.attr}
    if not changes:
        raise CommandError(
            "nothing to change: give the fields to change, e.g. --building 5 or --clear address"
        )
    with open_installers(args, broker=False) as installers:
        try:
            change = installers.update(args.device_id, changes, actor=actor())
        except ValidationError as exc:
            raise _invalid(exc) from None
    return _print_change(args, change, "updated")


def _devices_move(args: argparse.Namespace) -> int:
    place = {name: getattr(args, name) for name in PLACE_FIELDS if getattr(args, name) is not None}
    with open_installers(args, broker=False) as installers:
        try:
            change = installers.move(args.device_id, place, actor=actor())
        except ValidationError as exc:
            raise _invalid(exc) from None
    return _print_change(args, change, f"moved to {change.device.community} {change.device.grid_code}")


def _disable(args: argparse.Namespace) -> int:
    with open_installers(args, broker=not args.registry_only) as installers:
        change = installers.disable(args.device_id, actor=actor())
    return _print_change(args, change, "disabled" + ("" if args.registry_only else ", cut off at the broker"))


def _enable(args: argparse.Namespace) -> int:
    with open_installers(args, broker=not args.registry_only) as installers:
        change = installers.enable(args.device_id, actor=actor())
    return _print_change(args, change, "enabled")


def _retire(args: argparse.Namespace) -> int:
    with open_installers(args, broker=not args.registry_only) as installers:
        change = installers.retire(args.device_id, actor=actor())
    return _print_change(args, change, "retired" + ("" if args.registry_only else ", broker account deleted"))


def _devices_confirm(args: argparse.Namespace) -> int:
    changes = []
    with open_installers(args, broker=False) as installers:
        for device_id in args.device_ids:
            changes.append(installers.confirm(device_id, actor=actor()))
    if args.json:
        print_json([{**c.device.as_dict(), "changed": c.changed} for c in changes])
        return 0
    for c in changes:
        print(f"{c.device.device_id}: " + ("in service" if c.changed else "already in service"))
    return 0


def _devices_rotate(args: argparse.Namespace) -> int:
    with open_installers(args, broker=True) as installers:
        device, credentials = installers.rotate_credentials(args.device_id, actor=actor())
    if args.json:
        print_json({"device_id": device.device_id, "credentials": credentials.as_dict()})
        return 0
    print(f"{device.device_id}: new credentials; the old password no longer works")
    _print_credentials(credentials)
    return 0


def _devices_export(args: argparse.Namespace) -> int:
    with open_engine(args) as engine, _output(args.output) as out:
        registry = Registry(engine)
        if args.format == "csv":
            n = registry.export_csv(out)
        else:
            out.write("[")
            n = 0
            for n, device in enumerate(registry.iter_devices(), start=1):
                out.write(("," if n > 1 else "") + "\n" + json.dumps(device.as_dict(), ensure_ascii=False))
            out.write("\n]\n")
    if args.output:
        print(f"{n} device(s) written to {args.output}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    try:
        f = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror}") from None
    with f:
        yield f


def _devices_lifecycle(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        changed = Registry(engine).set_lifecycle(args.device_id, args.lifecycle, actor=actor())
    if args.json:
        print_json({"device_id": args.device_id, "lifecycle": args.lifecycle, "changed": changed})
    else:
        print(f"{args.device_id}: {args.lifecycle}" + ("" if changed else " (already)"))
    return 0


# ---------------------------------------------------------------------------------------------
# places and responsible units


def add_place_commands(sub: SubParsers) -> None:
    group = add_group(sub, "places", "the place hierarchy: district → street → community → grid")
    p = add_command(group, "add", "register a place (its parent first)", _places_add)
    p.add_argument("--code", required=True, help="district 6 digits, street 9, community 12, grid 15 (or 14)")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--level", choices=("district", "street", "community", "grid"), help="checked against the code"
    )
    p = add_command(group, "list", "places by code", _places_list)
    p.add_argument("--level", choices=("district", "street", "community", "grid"))
    p.add_argument("--parent", help="only the children of this place")

    group = add_group(sub, "units", "responsible units (权属/养护单位)")
    p = add_command(group, "add", "register a responsible unit", _units_add)
    p.add_argument("--id", dest="unit_id", required=True, help="1-64 of A-Z a-z 0-9 _ . -")
    p.add_argument("--name", required=True, help="what devices name in responsible_unit")
    p.add_argument("--kind", help="e.g. water, drainage, gas, power, telecom, lighting, property, street")
    p.add_argument("--contact")
    p = add_command(group, "list", "responsible units", _units_list)
    p.add_argument("--kind")


def _places_add(args: argparse.Namespace) -> int:
    try:
        record = PlaceRecord.model_validate({"code": args.code, "name": args.name, "level": args.level})
    except ValidationError as exc:
        raise CommandError(f"invalid place: {describe_validation_error(exc)}") from None
    with open_engine(args) as engine:
        place = Places(engine).add(record)
    if args.json:
        print_json(place.as_dict())
    else:
        parent = f" in {place.parent_code}" if place.parent_code else ""
        print(f"registered {place.level} {place.code} {place.name}{parent}")
    return 0


def _places_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        found = Places(engine).list(level=args.level, parent_code=args.parent)
    headers = ["code", "level", "name", "parent"]
    return _print_items(args, found, headers, lambda p: (p.code, p.level, p.name, p.parent_code))


def _units_add(args: argparse.Namespace) -> int:
    try:
        record = ResponsibleUnitRecord.model_validate(
            {"unit_id": args.unit_id, "name": args.name, "kind": args.kind, "contact": args.contact}
        )
    except ValidationError as exc:
        raise CommandError(f"invalid unit: {describe_validation_error(exc)}") from None
    with open_engine(args) as engine:
        unit = ResponsibleUnits(engine).add(record)
    if args.json:
        print_json(unit.as_dict())
    else:
        print(f"registered responsible unit {unit.unit_id} {unit.name}")
    return 0


def _units_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        found = ResponsibleUnits(engine).list(kind=args.kind)
    headers = ["unit_id", "name", "kind", "contact"]
    return _print_items(args, found, headers, lambda u: (u.unit_id, u.name, u.kind, u.contact))


# ---------------------------------------------------------------------------------------------
# commissioning


def add_commissioning_commands(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "commissioning",
        "a site's or batch's devices: heard from or not, what they last sent",
        _commissioning,
    )
    p.add_argument("--community")
    p.add_argument("--batch")
    p.add_argument("--grid-code")
    p.add_argument("--type", dest="device_type", choices=DEVICE_TYPES)
    p.add_argument("--limit", type=int, default=1000)


def _commissioning(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        result = Registry(engine).commissioning(
            community=args.community,
            batch=args.batch,
            grid_code=args.grid_code,
            device_type=args.device_type,
            limit=args.limit,
        )
    if args.json:
        print_json(
            {
                "total": result.total,
                "counts": dict(result.counts),
                "not_heard_from": result.not_heard_from,
                "devices": [
                    {
                        "device_id": p.device_id,
                        "device_type": p.device_type,
                        "lifecycle": p.lifecycle,
                        "community": p.community,
                        "grid_code": p.grid_code,
                        "building": p.building,
                        "batch": p.batch,
                        "online": p.online,
                        "last_seen": p.last_seen and p.last_seen.isoformat(),
                        "last_topic": p.last_topic,
                        "last_payload": p.last_payload and p.last_payload.decode("utf-8", "replace"),
                        "seen_fields": list(p.seen_fields),
                        "missing_fields": list(p.missing_fields),
                    }
                    for p in result.devices
                ],
            }
        )
        return 0
    c = result.counts
    print(
        f"{result.total} devices: {c['registered']} registered, {c['online']} online, "
        f"{c['in_service']} in service, {c['disabled']} disabled, {c['retired']} retired; "
        f"{result.not_heard_from} never heard from"
    )
    if result.devices:
        rows = [
            (
                p.device_id,
                p.device_type,
                p.lifecycle,
                p.building,
                _short_time(p.last_seen) or "never",
                ", ".join(p.missing_fields) or "-",
                p.last_payload and _payload_preview(p.last_payload, len(p.last_payload), 50),
            )
            for p in result.devices
        ]
        print()
        print(
            format_table(
                [
                    "device_id",
                    "type",
                    "lifecycle",
                    "building",
                    "last seen (UTC)",
                    "still to report",
                    "last payload",
                ],
                rows,
            )
        )
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
    return _print_items(
        args,
        letters,
        ["received (UTC)", "reason", "device_id", "topic", "detail", "bytes"],
        lambda d: (_short_time(d.received_at), d.reason, d.device_id, d.topic, d.detail[:80], d.payload_size),
        empty="no dead letters",
    )


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
    return _print_items(
        args,
        found,
        ["device_id", "type", "messages", "last seen (UTC)", "last payload"],
        lambda u: (
            u.device_id,
            u.device_type,
            u.count,
            _short_time(u.last_seen),
            _payload_preview(u.last_payload, u.last_payload_size),
        ),
        empty="no unregistered device has published",
    )


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


def add_api_commands(sub: SubParsers) -> None:
    from api.cli import add_api_commands as add

    add(sub)


COMMANDS: list[Registrar] = [
    add_db_commands,
    add_device_commands,
    add_place_commands,
    add_commissioning_commands,
    add_deadletter_commands,
    add_run_commands,
    add_api_commands,
    lambda sub: __import__("gateway.alarmcmd", fromlist=["_"]).add_alarm_commands(sub),
    lambda sub: __import__("gateway.deliverycmd", fromlist=["_"]).add_delivery_commands(sub),
    lambda sub: __import__("gateway.incidentcmd", fromlist=["_"]).add_incident_commands(sub),
    lambda sub: __import__("gateway.adaptorcmd", fromlist=["_"]).add_adaptor_commands(sub),
    lambda sub: __import__("gateway.usercmd", fromlist=["_"]).add_user_commands(sub),
]


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
    except (RegistryError, CredentialsUnavailableError, CredentialsRefusedError) as exc:
        print(f"sc-gateway: {exc}", file=sys.stderr)
        return 1
    except (OperationalError, SqlProgrammingError) as exc:
        print(f"sc-gateway: database error: {exc.orig or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
