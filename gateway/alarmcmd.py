"""`sc-gateway alarms list`: the alarms the rules stage wrote (open and cleared)."""

from __future__ import annotations

import argparse

from gateway.alarms import AlarmStore
from gateway.cli import SubParsers, add_command, add_group, format_table, open_engine, print_json


def _time(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else "-"


def _list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        rows = AlarmStore(engine).list(
            open_only=args.open, community=args.community, rule_id=args.rule, limit=args.limit
        )
    if args.json:
        print_json([r.to_json() for r in rows])
        return 0
    if not rows:
        print("no alarms")
        return 0
    table = [
        (
            _time(r.opened_at),
            r.state + (" (flapping)" if r.flapping else ""),
            r.urgency,
            r.rule_id,
            r.alarm_key,
            r.community,
            r.occurrences,
            "yes" if r.commissioning_noise else "",
            r.message_zh,
        )
        for r in rows
    ]
    headers = ["opened (UTC)", "state", "urg", "rule", "key", "community", "n", "commissioning", "message"]
    print(format_table(headers, table))
    return 0


def add_alarm_commands(sub: SubParsers) -> None:
    group = add_group(sub, "alarms", "alarms raised by the rules stage")
    p = add_command(group, "list", "alarms, the most recently changed first", _list)
    p.add_argument("--open", action="store_true", help="only open alarms")
    p.add_argument("--community", help="only this community code")
    p.add_argument("--rule", help="only this rule id, e.g. manhole_cover.tilt")
    p.add_argument("--limit", type=int, default=100)
