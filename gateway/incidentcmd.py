"""`sc-gateway incidents ...`: governance incidents for operators: list, show (history, case reports,
deliveries), acknowledge, record a case system's report by hand, false-alarm counts."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import Engine

from gateway.cli import SubParsers, add_command, add_group, format_table, open_engine, print_json
from gateway.db import REPORT_STATUSES
from gateway.incident_store import IncidentNotFoundError, IncidentStore
from gateway.settings import Settings


def _store(engine: Engine) -> IncidentStore:
    """With the gateway's endpoints (SC_INCIDENT_ENDPOINTS): changes made here are delivered too."""
    return IncidentStore.configured(engine, Settings())


def _time(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else "-"


def _list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        found, total = _store(engine).find(
            status=None if args.status == "all" else args.status,
            urgency=args.urgency,
            rule_id=args.rule,
            communities=[args.community] if args.community else None,
            include_commissioning=args.commissioning,
            limit=args.limit,
        )
    if args.json:
        print_json({"total": total, "incidents": [i.to_json() for i in found]})
        return 0
    if not found:
        print("no incidents")
        return 0
    rows = [
        (
            i.incident_id,
            i.urgency,
            i.status + (" (commissioning)" if i.commissioning else ""),
            _time(i.opened_at),
            i.rule_id,
            i.device.id or f"{len(i.members)} devices",
            i.location.community,
            i.responsible_unit,
            "yes" if i.acknowledged_at else "",
            i.escalation_level or "",
            i.title,
        )
        for i in found
    ]
    headers = [
        "incident",
        "urg",
        "status",
        "opened (UTC)",
        "rule",
        "device",
        "community",
        "unit",
        "ack",
        "esc",
    ]
    print(format_table([*headers, "title"], rows))
    if total > len(found):
        print(f"({len(found)} of {total}; --limit for more)")
    return 0


def _show(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        store = _store(engine)
        incident = store.get(args.incident_id)
        if incident is None:
            print(f"no incident {args.incident_id}", file=sys.stderr)
            return 1
        history = store.history(args.incident_id)
        reports = store.reports(args.incident_id)
        deliveries = store.outbox_rows(args.incident_id)
    if args.json:
        print_json(
            {
                "incident": incident.to_json(),
                "history": [
                    {"at": h.at, "event_type": h.event_type, "actor": h.actor, "change": h.change}
                    for h in history
                ],
                "reports": reports,
                "deliveries": [
                    {
                        "endpoint": d.endpoint,
                        "seq": d.seq,
                        "event_type": d.event_type,
                        "webhook_id": d.event_id,
                        "state": d.state,
                        "attempts": d.attempts,
                        "last_status": d.last_status,
                        "last_error": d.last_error,
                    }
                    for d in deliveries
                ],
            }
        )
        return 0
    print_json(incident.to_json())
    print("\nhistory:")
    print(format_table(["at (UTC)", "change", "by"], [(_time(h.at), h.event_type, h.actor) for h in history]))
    if deliveries:
        print("\ndeliveries:")
        rows = [
            (d.endpoint, d.seq, d.event_type, d.state, d.attempts, d.last_status, d.last_error)
            for d in deliveries
        ]
        print(
            format_table(["endpoint", "seq", "event", "state", "attempts", "last status", "last error"], rows)
        )
    return 0


def _ack(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        try:
            incident = _store(engine).acknowledge(args.incident_id, f"user:{args.by}")
        except IncidentNotFoundError as exc:
            print(exc, file=sys.stderr)
            return 1
    when = _time(incident.acknowledged_at)
    print(f"{incident.incident_id} acknowledged by {incident.acknowledged_by} at {when}")
    return 0


def _report(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        try:
            incident, new = _store(engine).report(
                args.incident_id,
                args.status,
                case_id=args.case_id,
                note=args.note,
                report_id=args.report_id,
                actor=f"user:{args.by}",
            )
        except IncidentNotFoundError as exc:
            print(exc, file=sys.stderr)
            return 1
    if not new:
        print(f"report {args.report_id} was already recorded; nothing changed")
    else:
        print(f"{incident.incident_id}: {incident.status}" + (" (resolved)" if not incident.is_open else ""))
    return 0


def _false_alarms(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        counts = _store(engine).false_alarm_counts(rule_id=args.rule, limit=args.limit)
    if args.json:
        print_json([_fa(c) for c in counts])
        return 0
    if not counts:
        print("no false alarms reported")
        return 0
    rows = [
        (c.rule_id, c.device_id or "(group)", c.count, _time(c.last_at), c.last_incident_id) for c in counts
    ]
    print(format_table(["rule", "device", "false alarms", "last (UTC)", "last incident"], rows))
    return 0


def _fa(c: object) -> dict[str, object]:
    return {k: getattr(c, k) for k in ("rule_id", "device_id", "count", "last_at", "last_incident_id")}


def add_incident_commands(sub: SubParsers) -> None:
    group = add_group(sub, "incidents", "governance incidents: cases for the incident system")
    p = add_command(group, "list", "incidents, the most urgent first, then the newest", _list)
    p.add_argument("--status", choices=["open", "resolved", "all"], default="open")
    p.add_argument("--urgency", choices=["P1", "P2", "P3", "P4"])
    p.add_argument("--rule", help="only this rule id, e.g. manhole_cover.tilt")
    p.add_argument("--community", help="only this community")
    p.add_argument("--commissioning", action="store_true", help="include commissioning noise")
    p.add_argument("--limit", type=int, default=100)
    p = add_command(group, "show", "one incident: its data, history and deliveries", _show)
    p.add_argument("incident_id")
    p = add_command(group, "ack", "acknowledge an incident (stops its escalation)", _ack)
    p.add_argument("incident_id")
    p.add_argument("--by", required=True, help="who is taking it on")
    p = add_command(group, "report", "record the incident system's progress on a case by hand", _report)
    p.add_argument("incident_id")
    p.add_argument("--status", required=True, choices=REPORT_STATUSES)
    p.add_argument("--by", required=True, help="who records it")
    p.add_argument("--case-id")
    p.add_argument("--note")
    p.add_argument("--report-id", help="the same report id again changes nothing")
    p = add_command(
        group, "false-alarms", "false alarms per rule and device, the most frequent first", _false_alarms
    )
    p.add_argument("--rule")
    p.add_argument("--limit", type=int, default=100)
