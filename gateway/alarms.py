"""The alarms table: what the rules stage has said, one row per alarm from open to clear (SQL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from gateway.db import alarms, write_transaction
from rules.model import Verdict


def _dt(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _values(v: Verdict, now: dt.datetime) -> dict[str, Any]:
    """The columns a verdict sets on its alarm's row."""
    evidence = v.evidence.to_json()
    if v.grouped_into:
        evidence["grouped_into"] = v.grouped_into
    cleared = v.state == "cleared"
    return {
        "state": "cleared" if cleared else "open",
        "urgency": v.urgency,
        "change": v.change,
        "occurrences": v.occurrences,
        "flapping": v.flapping,
        "updated_at": now,
        "cleared_at": now if cleared else None,
        "evidence": evidence,
        "message_zh": v.message_zh,
        "message_en": v.message_en,
        "members": list(v.members),
    }


@dataclass(frozen=True, slots=True)
class AlarmRow:
    """One row of the alarms table."""

    id: int
    rule_id: str
    alarm_key: str
    device_id: str | None
    device_type: str
    community: str | None
    grid_code: str | None
    state: str
    urgency: str
    change: str
    occurrences: int
    flapping: bool
    opened_at: dt.datetime
    updated_at: dt.datetime
    cleared_at: dt.datetime | None
    evidence: dict[str, Any]
    message_zh: str
    message_en: str
    members: list[str]
    commissioning_noise: bool

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, dt.datetime) else value
        return out


class AlarmStore:
    """Upserts the open alarm of a (rule, key) on opened / escalated / repeated / flapping verdicts and
    closes it on cleared. The rules process is its only writer; readers use `list`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def apply(
        self,
        verdicts: Sequence[Verdict],
        lifecycles: Mapping[str, str] | None = None,
        now_ms: int = 0,
        *,
        conn: Connection | None = None,
    ) -> int:
        """Write the verdicts (in order) in one transaction; returns the rows written. `lifecycles` maps a
        device id to its lifecycle as last seen (not in service at open time: commissioning noise).

        The verdicts of one (rule, key) are coalesced first: the open row's last values win, and an alarm
        that opened and cleared within the batch is inserted once, already cleared. Statements go out as
        executemany (one per kind), so an alarm storm costs little per verdict. With `conn`, inside the
        caller's transaction (the rules process writes incidents in the same one)."""
        if not verdicts:
            return 0
        if conn is None:
            with write_transaction(self.engine) as own:
                return self.apply(verdicts, lifecycles, now_ms, conn=own)
        lifecycles = lifecycles or {}
        segments: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for v in verdicts:
            now = _dt(now_ms or v.evidence.ts_ms)
            segs = segments.setdefault((v.rule_id, v.key), [])
            last = segs[-1] if segs else None
            values = _values(v, now)
            if v.change == "opened" or (last is not None and last["state"] == "cleared"):
                if v.state == "cleared":
                    continue  # a clear of a row already closed in this batch
                if last is not None and last["state"] == "open":
                    last.update(state="cleared", cleared_at=now, change="cleared", updated_at=now)
                lifecycle = lifecycles.get(v.device_id or "", "in_service")
                segs.append(
                    {
                        **values,
                        "new": True,
                        "rule_id": v.rule_id,
                        "alarm_key": v.key,
                        "device_id": v.device_id,
                        "device_type": v.device_type,
                        "community": v.community,
                        "grid_code": v.grid_code,
                        "opened_at": _dt(v.since_ms),
                        "commissioning_noise": v.device_id is not None and lifecycle != "in_service",
                    }
                )
            elif last is None:
                segs.append({**values, "new": False, "b_rule": v.rule_id, "b_key": v.key})
            else:
                last.update(values)
        existing, stale, inserts = [], [], []
        for (rule_id, key), segs in segments.items():
            first_new = segs[0]["new"]
            for seg in segs:
                if seg.pop("new"):
                    inserts.append(seg)
                else:
                    existing.append(seg)
            if first_new:
                # an open row left from before (state lost in a crash): it ends where the new one begins
                stale.append({"b_rule": rule_id, "b_key": key, "cleared_at": segs[0]["opened_at"]})
        open_row = (
            alarms.c.rule_id == bindparam("b_rule"),
            alarms.c.alarm_key == bindparam("b_key"),
            alarms.c.state == "open",
        )
        if existing:
            conn.execute(update(alarms).where(*open_row), existing)
        if stale:
            conn.execute(update(alarms).where(*open_row).values(state="cleared", change="cleared"), stale)
        if inserts:
            conn.execute(insert(alarms), inserts)
        return len(existing) + len(inserts)

    def list(
        self,
        *,
        open_only: bool = False,
        community: str | None = None,
        rule_id: str | None = None,
        limit: int = 100,
    ) -> list[AlarmRow]:
        """Alarms, the most recently changed first."""
        q = select(alarms)
        if open_only:
            q = q.where(alarms.c.state == "open")
        if community is not None:
            q = q.where(alarms.c.community == community)
        if rule_id is not None:
            q = q.where(alarms.c.rule_id == rule_id)
        q = q.order_by(alarms.c.updated_at.desc(), alarms.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [AlarmRow(**dict(r._mapping)) for r in conn.execute(q)]
