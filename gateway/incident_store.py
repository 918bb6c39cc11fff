"""Incidents in SQL: the latest state, an append-only history, and the transactional delivery outbox.

`IncidentStore.apply` turns a verdict into an incident change (incidents.lifecycle.apply) and commits, in
one transaction, the incident row, its history row and one outbox row per endpoint (none for commissioning
incidents: kept, not delivered). A delivery worker reads `pending_outbox` and reports back with
`mark_delivered` / `mark_retry` / `mark_failed` / `disable_endpoint`.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, and_, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway.db import (
    delivery_endpoints,
    incident_counters,
    incident_history,
    incidents,
    outbox,
    write_transaction,
)
from incidents.cloudevents import envelope
from incidents.lifecycle import apply as lifecycle_apply
from incidents.model import DeviceLike, EventType, Incident, dedup_key
from incidents.routing import Router
from rules.model import Verdict

#: the actor of the incident system's own changes (back-channel)
INCIDENT_SYSTEM = "incident_system"
#: outbox states a delivery is finished in (a later event of the same incident may go)
_DONE = "delivered"


@dataclass(frozen=True, slots=True)
class Target:
    """Where incident changes go: an endpoint name (gateway.settings.EndpointConfig) and its role:
    "cases" gets every delivered change, "escalation" those of escalated incidents only."""

    name: str
    role: Literal["cases", "escalation"] = "cases"


def _target(e: Any) -> Target:
    return e if isinstance(e, Target) else Target(e) if isinstance(e, str) else Target(e.name, e.role)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One change of an incident: `event_type` opened / updated / resolved ..., by `actor`."""

    id: int
    incident_id: str
    at: dt.datetime
    event_type: str
    actor: str
    change: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One delivery of one incident change to one endpoint; `body` is the exact JSON to send."""

    id: int
    event_id: str
    incident_id: str
    endpoint: str
    seq: int
    event_type: str
    body: bytes
    state: str
    attempts: int
    next_attempt_at: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None


def _change(old: Incident | None, new: Incident) -> dict[str, Any]:
    """The whole incident when opened, else the fields that changed as {field: [old, new]}."""
    after = new.to_json()
    if old is None:
        return after
    before = old.to_json()
    return {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}


def _body(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


class IncidentStore:
    """Incidents, their history and the outbox. The rules/incidents process is the only writer of incident
    changes; a delivery worker (one per endpoint or one for all) owns the outbox states."""

    def __init__(
        self,
        engine: Engine,
        endpoints: Sequence[str | Target | Any],
        *,
        instance: str = "gateway",
        router: Router | None = None,
    ) -> None:
        """`endpoints`: names (role "cases"), Targets, or objects with .name and .role (EndpointConfig);
        the MQTT publication is an endpoint too (gateway.settings.MQTT_ENDPOINT)."""
        self.engine = engine
        self.targets = list({t.name: t for t in map(_target, endpoints)}.values())
        self.endpoints = [t.name for t in self.targets]
        self.instance = instance
        self.router = router

    # -- incident changes ------------------------------------------------------------------------------

    def apply(
        self, verdict: Verdict, device: DeviceLike | None, now: dt.datetime, actor: str | None = None
    ) -> tuple[Incident, EventType] | None:
        """Apply a verdict to the open incident of its dedup key, in one transaction with its history and
        outbox rows; None when it changes nothing (a clear with nothing open). `actor` defaults to
        `rule:<rule id>`."""
        actor = actor or f"rule:{verdict.rule_id}"
        key = dedup_key(verdict.key, verdict.rule_id)
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                select(incidents.c.data)
                .where(incidents.c.dedup_key == key, incidents.c.status == "open")
                .with_for_update()
            ).first()
            existing = Incident.model_validate(row.data) if row is not None else None
            out = lifecycle_apply(
                verdict, existing, device, now, lambda day: self._next_seq(conn, day), self.router
            )
            if out is None:
                return None
            incident, event_type = out
            values = {
                "dedup_key": incident.dedup_key,
                "rule_id": incident.rule_id,
                "status": "open" if incident.is_open else "resolved",
                "urgency": incident.urgency,
                "commissioning": incident.commissioning,
                "data": incident.to_json(),
                "opened_at": incident.opened_at,
                "updated_at": incident.updated_at,
                "resolved_at": incident.resolved_at,
            }
            if existing is None:
                conn.execute(insert(incidents).values(incident_id=incident.incident_id, **values))
            else:
                conn.execute(
                    update(incidents).where(incidents.c.incident_id == incident.incident_id).values(**values)
                )
            conn.execute(
                insert(incident_history).values(
                    incident_id=incident.incident_id,
                    at=now,
                    event_type=event_type.rsplit(".", 1)[-1],
                    actor=actor,
                    change=_change(existing, incident),
                )
            )
            if not incident.commissioning:
                self._enqueue(conn, incident, event_type, now)
            return incident, event_type

    def _next_seq(self, conn: Connection, day: dt.date) -> int:
        """The next incident sequence number of a local date (upsert … RETURNING: safe under concurrency)."""
        ins: Any = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        stmt = (
            ins(incident_counters)
            .values(local_date=day, last_seq=1)
            .on_conflict_do_update(
                index_elements=[incident_counters.c.local_date],
                set_={"last_seq": incident_counters.c.last_seq + 1},
            )
            .returning(incident_counters.c.last_seq)
        )
        return int(conn.execute(stmt).scalar_one())

    def _enqueue(self, conn: Connection, incident: Incident, event_type: EventType, now: dt.datetime) -> None:
        """One outbox row per target of this change; rows for an endpoint disabled by a 410 are written
        `disabled` (re-sent, in order, when an operator enables it again)."""
        names = [t.name for t in self.targets if t.role == "cases" or (incident.escalation_level > 0)]
        if not names:
            return
        disabled = set(
            conn.execute(
                select(delivery_endpoints.c.name).where(
                    delivery_endpoints.c.name.in_(names), delivery_endpoints.c.disabled_at.is_not(None)
                )
            ).scalars()
        )
        last = conn.execute(
            select(func.max(outbox.c.seq)).where(outbox.c.incident_id == incident.incident_id)
        ).scalar()
        seq = (last or 0) + 1
        rows = []
        for endpoint in names:
            event_id = str(uuid.uuid4())
            body = _body(envelope(incident, event_type, self.instance, event_id, now))
            rows.append(
                {
                    "event_id": event_id,
                    "incident_id": incident.incident_id,
                    "endpoint": endpoint,
                    "seq": seq,
                    "event_type": event_type,
                    "body": body,
                    "state": "disabled" if endpoint in disabled else "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
            )
        conn.execute(insert(outbox), rows)

    # -- reading -----------------------------------------------------------------------------------------

    def get(self, incident_id: str) -> Incident | None:
        with self.engine.connect() as conn:
            data = conn.execute(
                select(incidents.c.data).where(incidents.c.incident_id == incident_id)
            ).scalar()
        return Incident.model_validate(data) if data is not None else None

    def history(self, incident_id: str) -> list[HistoryRow]:
        """The changes of an incident, oldest first."""
        q = select(incident_history).where(incident_history.c.incident_id == incident_id)
        with self.engine.connect() as conn:
            return [HistoryRow(**dict(r._mapping)) for r in conn.execute(q.order_by(incident_history.c.id))]

    def open_incidents(
        self,
        *,
        rule_id: str | None = None,
        urgency: str | None = None,
        include_commissioning: bool = True,
        limit: int = 100,
    ) -> list[Incident]:
        """Open incidents, the most urgent first, then the oldest."""
        q = select(incidents.c.data).where(incidents.c.status == "open")
        if rule_id is not None:
            q = q.where(incidents.c.rule_id == rule_id)
        if urgency is not None:
            q = q.where(incidents.c.urgency == urgency)
        if not include_commissioning:
            q = q.where(incidents.c.commissioning.is_(False))
        q = q.order_by(incidents.c.urgency, incidents.c.opened_at, incidents.c.incident_id).limit(limit)
        with self.engine.connect() as conn:
            return [Incident.model_validate(d) for d in conn.execute(q).scalars()]

    # -- the outbox --------------------------------------------------------------------------------------

    def pending_outbox(
        self, endpoint: str, limit: int = 100, now: dt.datetime | None = None
    ) -> list[OutboxRow]:
        """Deliveries due for `endpoint`, oldest first: of each incident only its earliest undelivered event,
        and only when that one is pending and due (a failed or held head holds the incident's later events
        back, so per-incident order holds)."""
        now = now or _utcnow()
        earlier = outbox.alias("earlier")
        blocked = (
            select(earlier.c.id)
            .where(
                and_(
                    earlier.c.incident_id == outbox.c.incident_id,
                    earlier.c.endpoint == outbox.c.endpoint,
                    earlier.c.seq < outbox.c.seq,
                    earlier.c.state != _DONE,
                )
            )
            .exists()
        )
        q = (
            select(outbox)
            .where(
                outbox.c.endpoint == endpoint,
                outbox.c.state == "pending",
                outbox.c.next_attempt_at <= now,
                ~blocked,
            )
            .order_by(outbox.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [OutboxRow(**dict(r._mapping)) for r in conn.execute(q)]

    def outbox_rows(self, incident_id: str) -> list[OutboxRow]:
        """Every delivery of an incident (all endpoints), in order."""
        q = select(outbox).where(outbox.c.incident_id == incident_id).order_by(outbox.c.seq, outbox.c.id)
        with self.engine.connect() as conn:
            return [OutboxRow(**dict(r._mapping)) for r in conn.execute(q)]

    def _mark(self, outbox_id: int, **values: Any) -> bool:
        with write_transaction(self.engine) as conn:
            res = conn.execute(update(outbox).where(outbox.c.id == outbox_id).values(**values))
            return bool(res.rowcount)

    def mark_delivered(
        self, outbox_id: int, status: int | None = None, now: dt.datetime | None = None
    ) -> bool:
        """A 2xx answer: the delivery is done."""
        return self._mark(
            outbox_id,
            state=_DONE,
            attempts=outbox.c.attempts + 1,
            last_status=status,
            last_error=None,
            delivered_at=now or _utcnow(),
        )

    def mark_retry(self, outbox_id: int, next_at: dt.datetime, status: int | None, error: str | None) -> bool:
        """A failed attempt (`status` None: no answer) to be retried at `next_at`."""
        return self._mark(
            outbox_id,
            state="pending",
            attempts=outbox.c.attempts + 1,
            next_attempt_at=next_at,
            last_status=status,
            last_error=error,
        )

    def mark_failed(self, outbox_id: int, status: int | None = None, error: str | None = None) -> bool:
        """The retries are exhausted: kept as `failed`, for operators to see and re-send."""
        values: dict[str, Any] = {"state": "failed", "attempts": outbox.c.attempts + 1}
        if status is not None:
            values["last_status"] = status
        if error is not None:
            values["last_error"] = error
        return self._mark(outbox_id, **values)

    def disable_endpoint(self, endpoint: str) -> int:
        """The endpoint answered 410: its undelivered rows become `disabled`; returns how many."""
        with write_transaction(self.engine) as conn:
            res = conn.execute(
                update(outbox)
                .where(outbox.c.endpoint == endpoint, outbox.c.state.in_(("pending", "held", "failed")))
                .values(state="disabled")
            )
            return int(res.rowcount)
