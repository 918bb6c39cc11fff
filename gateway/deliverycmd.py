"""`sc-gateway deliver` (the delivery stage alone, in the foreground) and `sc-gateway deliveries ...`: what
the outbox holds, re-sending failed deliveries, enabling an endpoint again after a 410."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from pydantic import ValidationError

from gateway.cli import (
    CommandError,
    SubParsers,
    add_command,
    add_group,
    format_table,
    open_engine,
    print_json,
)
from gateway.db import OUTBOX_STATES
from gateway.incident_store import IncidentStore, OutboxRow

#: states an operator can re-send from
RESENDABLE = ("failed", "disabled")


def _time(when: dt.datetime | None) -> str | None:
    return None if when is None else when.strftime("%Y-%m-%d %H:%M:%S")


def _row_json(r: OutboxRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "webhook_id": r.event_id,
        "incident_id": r.incident_id,
        "endpoint": r.endpoint,
        "seq": r.seq,
        "event_type": r.event_type,
        "state": r.state,
        "attempts": r.attempts,
        "next_attempt_at": r.next_attempt_at.isoformat(),
        "last_status": r.last_status,
        "last_error": r.last_error,
        "created_at": r.created_at.isoformat(),
        "delivered_at": r.delivered_at.isoformat() if r.delivered_at else None,
    }


# ---- deliver --------------------------------------------------------------------------------------------


def _deliver(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.delivery import run_delivery
    from gateway.settings import Settings

    overrides: dict[str, Any] = {}
    if getattr(args, "db", None):
        overrides["database_url"] = args.db
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print("sc-gateway: bad settings:", file=sys.stderr)
        for err in exc.errors(include_url=False):
            name = "SC_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"  {name or 'settings'}: {err['msg']}", file=sys.stderr)
        return 2
    if not settings.incident_endpoints and not settings.incident_mqtt:
        raise CommandError("nothing to deliver to: set SC_INCIDENT_ENDPOINTS or SC_INCIDENT_MQTT=true")
    logs.setup(settings.log_level, settings.log_json)
    run_delivery(settings, metrics_port=args.metrics_port)
    return 0


# ---- deliveries -----------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        rows = IncidentStore(engine, []).deliveries(
            state=args.state, endpoint=args.endpoint, incident_id=args.incident, limit=args.limit
        )
    if args.json:
        print_json([_row_json(r) for r in rows])
        return 0
    if not rows:
        print("no deliveries")
        return 0
    table = [
        (
            r.id,
            _time(r.created_at),
            r.endpoint,
            r.incident_id,
            r.seq,
            r.event_type.removeprefix("sc.incident."),
            r.state,
            r.attempts,
            r.last_status,
            _time(r.delivered_at) if r.state == "delivered" else _time(r.next_attempt_at),
            r.last_error,
        )
        for r in rows
    ]
    headers = [
        "id",
        "created (UTC)",
        "endpoint",
        "incident",
        "seq",
        "event",
        "state",
        "attempts",
        "status",
        "delivered / next (UTC)",
        "last error",
    ]
    print(format_table(headers, table))
    return 0


def _resend(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        store = IncidentStore(engine, [])
        disabled = {e.name for e in store.disabled_endpoints()}
        if args.endpoint in disabled:
            raise CommandError(
                f"endpoint {args.endpoint!r} is disabled (it answered 410): "
                f"`sc-gateway deliveries enable {args.endpoint}` re-sends its deliveries"
            )
        if args.ids:
            ids = sorted(set(args.ids))
            rows = {r.id: r for r in store.deliveries(ids=ids, limit=len(ids))}
            problems = []
            for i in ids:
                r = rows.get(i)
                if r is None:
                    problems.append(f"{i}: no such delivery")
                elif args.endpoint is not None and r.endpoint != args.endpoint:
                    problems.append(f"{i}: goes to {r.endpoint!r}, not {args.endpoint!r}")
                elif r.endpoint in disabled:
                    problems.append(f"{i}: its endpoint {r.endpoint!r} is disabled (deliveries enable it)")
                elif r.state not in RESENDABLE:
                    problems.append(f"{i}: is {r.state}; only failed deliveries are re-sent")
            if problems:
                raise CommandError("nothing re-sent: " + "; ".join(problems))
            count = store.resend(ids=ids, endpoint=args.endpoint)
        else:
            count = store.resend(endpoint=args.endpoint)
    if args.json:
        print_json({"resent": count})
    elif count:
        print(f"{count} deliveries queued again (the delivery stage sends them within SC_DELIVERY_POLL_S)")
    else:
        print("no failed deliveries" + (f" to {args.endpoint}" if args.endpoint else ""))
    return 0


def _enable(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        store = IncidentStore(engine, [])
        disabled = {e.name for e in store.disabled_endpoints()}
        if args.name not in disabled and not store.deliveries(state="disabled", endpoint=args.name, limit=1):
            known = ", ".join(sorted(disabled)) or "none is"
            raise CommandError(f"endpoint {args.name!r} is not disabled (disabled: {known})")
        count = store.enable_endpoint(args.name)
    if args.json:
        print_json({"endpoint": args.name, "requeued": count})
    else:
        print(f"endpoint {args.name} enabled: {count} deliveries queued again, in order per incident")
    return 0


def _status(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        store = IncidentStore(engine, [])
        counts = store.delivery_counts()
        disabled = {e.name: e for e in store.disabled_endpoints()}
    if args.json:
        print_json(
            {
                "endpoints": counts,
                "disabled": [
                    {"name": e.name, "disabled_at": e.disabled_at.isoformat(), "reason": e.reason}
                    for e in disabled.values()
                ],
            }
        )
        return 0
    names = sorted(set(counts) | set(disabled))
    if not names:
        print("the outbox is empty")
        return 0
    states = [s for s in OUTBOX_STATES if any(counts.get(n, {}).get(s) for n in names)] or ["pending"]
    table = []
    for n in names:
        e = disabled.get(n)
        note = f"disabled since {_time(e.disabled_at)} ({e.reason})" if e is not None else "enabled"
        table.append((n, *(counts.get(n, {}).get(s, 0) for s in states), note))
    print(format_table(["endpoint", *states, "endpoint state"], table))
    return 0


def add_delivery_commands(sub: SubParsers) -> None:
    p = add_command(
        sub, "deliver", "run the delivery stage alone, in the foreground (settings from SC_*)", _deliver
    )
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve /metrics on 127.0.0.1:PORT (default: none)"
    )

    group = add_group(sub, "deliveries", "incident deliveries: the outbox, re-sending, endpoints")
    p = add_command(group, "list", "deliveries, the newest first", _list)
    p.add_argument("--state", choices=OUTBOX_STATES, help="only deliveries in this state")
    p.add_argument("--endpoint", help="only those to this endpoint (mqtt: the MQTT publication)")
    p.add_argument("--incident", help="only those of this incident id")
    p.add_argument("--limit", type=int, default=100)

    p = add_command(group, "resend", "queue failed deliveries again (attempts are kept)", _resend)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id", dest="ids", type=int, action="append", metavar="N", help="this delivery (repeatable)"
    )
    which.add_argument("--failed", action="store_true", help="every failed delivery")
    p.add_argument("--endpoint", help="only those to this endpoint")

    p = add_command(group, "enable", "send to an endpoint again after it answered 410", _enable)
    p.add_argument("name", help="the endpoint's name (SC_INCIDENT_ENDPOINTS)")

    add_command(group, "status", "deliveries per endpoint and state; disabled endpoints", _status)
