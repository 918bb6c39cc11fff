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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import ColumnElement, Connection, Engine, and_, case, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway.db import (
    REPORT_STATUSES,
    alarm_resolutions,
    delivery_endpoints,
    false_alarms,
    incident_counters,
    incident_history,
    incident_reports,
    incidents,
    outbox,
    write_transaction,
)
from gateway.settings import MQTT_ENDPOINT
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
    "cases" gets every delivered change, "escalation" those of escalated incidents only, "local" (the MQTT
    publication) every change, the incident system's own reports included."""

    name: str
    role: Literal["cases", "escalation", "local"] = "cases"


def _target(e: Any) -> Target:
    if isinstance(e, Target):
        return e
    if isinstance(e, str):
        return Target(e, "local" if e == MQTT_ENDPOINT else "cases")
    return Target(e.name, e.role)


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
    #: set by a re-send: the retry window runs from here (else from created_at)
    retry_from: dt.datetime | None = None


def _change(old: Incident | None, new: Incident) -> dict[str, Any]:
    """The whole incident when opened, else the fields that changed as {field: [old, new]}."""
    after = new.to_json()
    if old is None:
        return after
    before = old.to_json()
    return {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}


def _copy(incident: Incident, **changes: Any) -> Incident:
    return Incident.model_validate({**incident.model_dump(), **changes})


def _escalation_due(incident: Incident, now: dt.datetime) -> str | None:
    """Whom an open, unacknowledged, not yet escalated incident escalates to, if it is due now."""
    if not incident.is_open or incident.acknowledged_at is not None or incident.escalation_level > 0:
        return None
    hint = incident.escalation
    if hint is not None and now >= incident.opened_at + dt.timedelta(seconds=hint.after_s):
        return hint.to
    if incident.urgency == "P1" and incident.respond_by is not None and now >= incident.respond_by:
        return hint.to if hint is not None else "command_centre"
    return None


def _reminder_due(incident: Incident, after_h: Mapping[str, float], now: dt.datetime) -> bool:
    hours = after_h.get(incident.urgency)
    if hours is None or not incident.is_open:
        return False
    return now >= incident.opened_at + dt.timedelta(hours=hours * (incident.reminders + 1))


class IncidentNotFoundError(LookupError):
    def __init__(self, incident_id: str) -> None:
        self.incident_id = incident_id
        super().__init__(f"no incident {incident_id}")


@dataclass(frozen=True, slots=True)
class FalseAlarmCount:
    rule_id: str
    device_id: str
    count: int
    last_at: dt.datetime
    last_incident_id: str


class IncidentResolvedError(ValueError):
    """The incident is resolved: it cannot be assigned any more."""

    def __init__(self, incident_id: str) -> None:
        self.incident_id = incident_id
        super().__init__(f"incident {incident_id} is resolved")


@dataclass(frozen=True, slots=True)
class IncidentChange:
    """One history row of an incident with the incident as it is now (what a live view shows)."""

    history: HistoryRow
    incident: Incident


@dataclass(frozen=True, slots=True)
class HistoryScan:
    """What one `changes_since` read saw: every history id it read (in scope or not, so a reader can tell
    an id that is not there yet from one that is not for it), and the changes in scope among them."""

    ids: tuple[int, ...]
    changes: tuple[IncidentChange, ...]


#: what incidents can be counted and filtered by: the place and the device type (indexed columns copied
#: from the incident's JSON, migration 0008)
INCIDENT_GROUP_KEYS: Final = ("community", "grid_code", "building", "device_type")


def _group_column(key: str) -> ColumnElement[Any]:
    if key in INCIDENT_GROUP_KEYS:
        column: ColumnElement[Any] = incidents.c[key]
        return column
    raise ValueError(f"cannot group incidents by {key!r}; one of {', '.join(INCIDENT_GROUP_KEYS)}")


def incident_row(incident: Incident) -> dict[str, Any]:
    """The `incidents` row of an incident, every column but its id."""
    place, device = incident.location, incident.device
    return {
        "dedup_key": incident.dedup_key,
        "rule_id": incident.rule_id,
        "status": "open" if incident.is_open else "resolved",
        "urgency": incident.urgency,
        "commissioning": incident.commissioning,
        "community": place.community,
        "district": place.district,
        "street": place.street,
        "grid_code": place.grid_code,
        "building": place.building,
        "device_id": device.id,
        "device_type": device.type,
        "acknowledged_at": incident.acknowledged_at,
        "data": incident.to_json(),
        "opened_at": incident.opened_at,
        "updated_at": incident.updated_at,
        "resolved_at": incident.resolved_at,
    }


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

    @classmethod
    def configured(cls, engine: Engine, settings: Any) -> IncidentStore:
        """The store with the endpoints of `settings` (gateway or API settings: SC_INCIDENT_ENDPOINTS,
        SC_INCIDENT_MQTT, SC_INSTANCE), so every writer of incident changes delivers them alike."""
        targets: list[Any] = list(settings.incident_endpoints)
        if settings.incident_mqtt:
            targets.append(MQTT_ENDPOINT)
        return cls(engine, targets, instance=settings.instance)

    # -- incident changes ------------------------------------------------------------------------------

    def apply(
        self, verdict: Verdict, device: DeviceLike | None, now: dt.datetime, actor: str | None = None
    ) -> tuple[Incident, EventType] | None:
        """Apply a verdict to the open incident of its dedup key, in one transaction with its history and
        outbox rows; None when it changes nothing (a clear with nothing open). `actor` defaults to
        `rule:<rule id>`."""
        with write_transaction(self.engine) as conn:
            return self.apply_in(conn, verdict, device, now, actor)

    def apply_many(
        self,
        conn: Connection,
        verdicts: Sequence[Verdict],
        devices: Mapping[str, DeviceLike],
        now: dt.datetime,
    ) -> list[tuple[Incident, EventType]]:
        """The verdicts of one rules round, in order, inside the caller's transaction (the rules process
        writes alarms and incidents together). `devices` by id: a verdict's device, or for a group alarm
        its first member, gives the place, the routing and the commissioning flag."""
        out = []
        for v in verdicts:
            device = devices.get(v.device_id or (v.members[0] if v.members else ""))
            change = self.apply_in(conn, v, device, now)
            if change is not None:
                out.append(change)
        return out

    def apply_in(
        self,
        conn: Connection,
        verdict: Verdict,
        device: DeviceLike | None,
        now: dt.datetime,
        actor: str | None = None,
    ) -> tuple[Incident, EventType] | None:
        """`apply` inside the caller's transaction."""
        key = dedup_key(verdict.key, verdict.rule_id)
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
        self._save(conn, existing, incident, event_type, now, actor or f"rule:{verdict.rule_id}")
        return incident, event_type

    def _save(
        self,
        conn: Connection,
        existing: Incident | None,
        incident: Incident,
        event_type: EventType,
        now: dt.datetime,
        actor: str,
        *,
        history_type: str | None = None,
        deliver_to: Sequence[str] = ("cases", "escalation", "local"),
    ) -> None:
        """Write the incident's row, its history row and (unless commissioning) its outbox rows for the
        targets whose role is in `deliver_to`."""
        values = incident_row(incident)
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
                event_type=history_type or event_type.rsplit(".", 1)[-1],
                actor=actor,
                change=_change(existing, incident),
            )
        )
        if not incident.commissioning:
            self._enqueue(conn, incident, event_type, now, deliver_to)

    def _locked(self, conn: Connection, incident_id: str) -> Incident:
        data = conn.execute(
            select(incidents.c.data).where(incidents.c.incident_id == incident_id).with_for_update()
        ).scalar()
        if data is None:
            raise IncidentNotFoundError(incident_id)
        return Incident.model_validate(data)

    # -- acknowledgement, escalation, reminders --------------------------------------------------------

    def acknowledge(self, incident_id: str, actor: str, now: dt.datetime | None = None) -> Incident:
        """A person (or the case system) has taken the incident on: no escalation from now on. The first
        acknowledgement is recorded and sent as `updated`; later ones change nothing."""
        now = now or _utcnow()
        with write_transaction(self.engine) as conn:
            existing = self._locked(conn, incident_id)
            if existing.acknowledged_at is not None or not existing.is_open:
                return existing
            incident = _copy(existing, acknowledged_at=now, acknowledged_by=actor, updated_at=now)
            self._save(
                conn, existing, incident, "sc.incident.updated", now, actor, history_type="acknowledged"
            )
            return incident

    def comment(self, incident_id: str, text: str, actor: str, now: dt.datetime | None = None) -> HistoryRow:
        """A person's note on an incident (open or resolved), kept in its history as `comment` with
        {"text": ...}. The incident itself does not change (nor its updated_at) and nothing is delivered:
        comments are the managers' own; the case system keeps its notes in its reports.
        IncidentNotFoundError."""
        now = now or _utcnow()
        with write_transaction(self.engine) as conn:
            self._locked(conn, incident_id)
            values: dict[str, Any] = {
                "incident_id": incident_id,
                "at": now,
                "event_type": "comment",
                "actor": actor,
                "change": {"text": text},
            }
            new_id = conn.execute(insert(incident_history).values(**values)).inserted_primary_key
            assert new_id is not None
            return HistoryRow(id=int(new_id[0]), **values)

    def assign(
        self, incident_id: str, assignee: str | None, actor: str, now: dt.datetime | None = None
    ) -> tuple[Incident, bool]:
        """Give an open incident to `assignee` (a person or team; None takes it back). Recorded in the
        history as `assigned` / `unassigned` and published as `updated` to local subscribers only (the
        MQTT topic), not to the case system, which dispatches by itself. Assigning does not acknowledge.
        Returns the incident and whether it changed (the same assignee again changes nothing).
        IncidentNotFoundError; IncidentResolvedError for a resolved incident."""
        now = now or _utcnow()
        with write_transaction(self.engine) as conn:
            existing = self._locked(conn, incident_id)
            if not existing.is_open:
                raise IncidentResolvedError(incident_id)
            if existing.assigned_to == assignee:
                return existing, False
            incident = _copy(
                existing,
                assigned_to=assignee,
                assigned_at=None if assignee is None else now,
                assigned_by=None if assignee is None else actor,
                updated_at=now,
            )
            self._save(
                conn,
                existing,
                incident,
                "sc.incident.updated",
                now,
                actor,
                history_type="assigned" if assignee is not None else "unassigned",
                deliver_to=("local",),
            )
            return incident, True

    def escalate_due(self, now: dt.datetime | None = None) -> list[Incident]:
        """Escalate every open, unacknowledged incident whose escalation is due: a P1 past its respond-by
        time, or one whose route names an escalation (`escalation.after_s` after opening, e.g. a smoke
        alarm to 119 after 5 min). `escalation_level` becomes 1; the change goes to every endpoint,
        the escalation endpoints included."""
        now = now or _utcnow()
        q = select(incidents.c.incident_id, incidents.c.data).where(
            incidents.c.status == "open", incidents.c.commissioning.is_(False)
        )
        with self.engine.connect() as conn:
            due = [
                iid
                for iid, data in conn.execute(q)
                if _escalation_due(Incident.model_validate(data), now) is not None
            ]
        done = []
        for iid in due:
            with write_transaction(self.engine) as conn:
                existing = self._locked(conn, iid)
                to = _escalation_due(existing, now)
                if to is None or not existing.is_open:
                    continue
                incident = _copy(
                    existing, escalation_level=existing.escalation_level + 1, escalated_at=now, updated_at=now
                )
                change_actor = f"gateway:escalation:{to}"
                self._save(
                    conn,
                    existing,
                    incident,
                    "sc.incident.updated",
                    now,
                    change_actor,
                    history_type="escalated",
                )
                done.append(incident)
        return done

    def remind_due(self, after_h: Mapping[str, float], now: dt.datetime | None = None) -> list[Incident]:
        """An `updated` reminder for each open incident of an urgency in `after_h` that has been open that
        many hours (and again every such period): `reminders` counts them."""
        now = now or _utcnow()
        if not after_h:
            return []
        oldest = now - dt.timedelta(hours=min(after_h.values()))
        q = select(incidents.c.incident_id, incidents.c.data).where(
            incidents.c.status == "open",
            incidents.c.commissioning.is_(False),
            incidents.c.urgency.in_(list(after_h)),
            incidents.c.opened_at <= oldest,
        )
        with self.engine.connect() as conn:
            due = [
                iid
                for iid, data in conn.execute(q)
                if _reminder_due(Incident.model_validate(data), after_h, now)
            ]
        done = []
        for iid in due:
            with write_transaction(self.engine) as conn:
                existing = self._locked(conn, iid)
                if not existing.is_open or not _reminder_due(existing, after_h, now):
                    continue
                incident = _copy(existing, reminders=existing.reminders + 1, updated_at=now)
                self._save(
                    conn,
                    existing,
                    incident,
                    "sc.incident.updated",
                    now,
                    "gateway:reminder",
                    history_type="reminder",
                )
                done.append(incident)
        return done

    # -- the back-channel ------------------------------------------------------------------------------

    def report(
        self,
        incident_id: str,
        status: str,
        *,
        report_id: str | None = None,
        case_id: str | None = None,
        note: str | None = None,
        reported_at: dt.datetime | None = None,
        actor: str = INCIDENT_SYSTEM,
        now: dt.datetime | None = None,
    ) -> tuple[Incident, bool]:
        """The incident system's progress on a case: `dispatched` / `in_progress` acknowledge it, `closed`
        resolves it, `false_alarm` resolves it and counts a false alarm against its rule and device. A
        report with a `report_id` already seen changes nothing. Returns the incident and whether this
        report was new. The change is not echoed to the reporting ("cases") endpoints; local subscribers
        and escalation endpoints get it.

        IncidentNotFoundError for an unknown incident; ValueError for an unknown status."""
        if status not in REPORT_STATUSES:
            raise ValueError(f"status {status!r}: expected one of {', '.join(REPORT_STATUSES)}")
        now = now or _utcnow()
        with write_transaction(self.engine) as conn:
            existing = self._locked(conn, incident_id)
            if (
                report_id is not None
                and conn.execute(
                    select(incident_reports.c.id).where(incident_reports.c.report_id == report_id)
                ).first()
            ):
                return existing, False
            conn.execute(
                insert(incident_reports).values(
                    incident_id=incident_id,
                    report_id=report_id,
                    status=status,
                    case_id=case_id,
                    note=note,
                    actor=actor,
                    reported_at=reported_at or now,
                    received_at=now,
                )
            )
            changes: dict[str, Any] = {"status": status, "updated_at": now}
            if case_id:
                changes["case_id"] = case_id
            if existing.acknowledged_at is None:
                changes.update(acknowledged_at=now, acknowledged_by=actor)
            event_type: EventType = "sc.incident.updated"
            if status in ("closed", "false_alarm") and existing.is_open:
                changes.update(resolved_at=now, resolution=status)
                event_type = "sc.incident.resolved"
                conn.execute(
                    insert(alarm_resolutions).values(
                        rule_id=existing.rule_id,
                        alarm_key=existing.dedup_key[: -len(existing.rule_id) - 1],
                        reason=status,
                        requested_at=now,
                    )
                )
            elif not existing.is_open:
                changes = {"status": status, "updated_at": now, **({"case_id": case_id} if case_id else {})}
            if status == "false_alarm":
                self._count_false_alarm(conn, existing, now)
            incident = _copy(existing, **changes)
            self._save(
                conn,
                existing,
                incident,
                event_type,
                now,
                actor,
                history_type=f"reported:{status}",
                deliver_to=("escalation", "local"),
            )
            return incident, True

    def _count_false_alarm(self, conn: Connection, incident: Incident, now: dt.datetime) -> None:
        ins: Any = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        conn.execute(
            ins(false_alarms)
            .values(
                rule_id=incident.rule_id,
                device_id=incident.device.id or "",
                count=1,
                last_at=now,
                last_incident_id=incident.incident_id,
            )
            .on_conflict_do_update(
                index_elements=[false_alarms.c.rule_id, false_alarms.c.device_id],
                set_={
                    "count": false_alarms.c.count + 1,
                    "last_at": now,
                    "last_incident_id": incident.incident_id,
                },
            )
        )

    def false_alarm_counts(self, *, rule_id: str | None = None, limit: int = 100) -> list[FalseAlarmCount]:
        """False alarms per rule and device, the most frequent first (for whoever tunes the rules)."""
        q = select(false_alarms)
        if rule_id is not None:
            q = q.where(false_alarms.c.rule_id == rule_id)
        q = q.order_by(false_alarms.c.count.desc(), false_alarms.c.rule_id, false_alarms.c.device_id).limit(
            limit
        )
        with self.engine.connect() as conn:
            return [FalseAlarmCount(**dict(r._mapping)) for r in conn.execute(q)]

    def reports(self, incident_id: str) -> list[dict[str, Any]]:
        """What the incident system reported of an incident, oldest first."""
        q = select(incident_reports).where(incident_reports.c.incident_id == incident_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(incident_reports.c.id))]

    def take_alarm_resolutions(self, now: dt.datetime | None = None) -> list[tuple[str, str]]:
        """(rule id, alarm key) of alarms closed from outside since the last call, marked done (the rules
        process resolves them in its engine)."""
        now = now or _utcnow()
        with write_transaction(self.engine) as conn:
            rows = conn.execute(
                select(alarm_resolutions.c.id, alarm_resolutions.c.rule_id, alarm_resolutions.c.alarm_key)
                .where(alarm_resolutions.c.done_at.is_(None))
                .order_by(alarm_resolutions.c.id)
            ).all()
            if rows:
                conn.execute(
                    update(alarm_resolutions)
                    .where(alarm_resolutions.c.id.in_([r.id for r in rows]))
                    .values(done_at=now)
                )
        return [(r.rule_id, r.alarm_key) for r in rows]

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

    def _enqueue(
        self,
        conn: Connection,
        incident: Incident,
        event_type: EventType,
        now: dt.datetime,
        roles: Sequence[str] = ("cases", "escalation", "local"),
    ) -> None:
        """One outbox row per target of this change whose role is in `roles`; rows for an endpoint disabled
        by a 410 are written `disabled` (re-sent, in order, when an operator enables it again)."""
        names = [
            t.name
            for t in self.targets
            if t.role in roles and (t.role != "escalation" or incident.escalation_level > 0)
        ]
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

    def find(
        self,
        *,
        status: str | None = "open",
        urgency: str | None = None,
        rule_id: str | None = None,
        communities: Sequence[str] | None = None,
        include_commissioning: bool = False,
        since: dt.datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        until: dt.datetime | None = None,
        opened_since: dt.datetime | None = None,
        opened_until: dt.datetime | None = None,
        grid_code: str | None = None,
        building: str | None = None,
        device_type: str | None = None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> tuple[list[Incident], int]:
        """Incidents (status "open", "resolved" or None for both), the most urgent first, then the newest;
        `communities` limits them to those (a manager's scope). `since` / `until` bound the last change
        (updated_at, until exclusive), `opened_since` / `opened_until` the opening. Returns a page and the
        total count."""
        conds: list[Any] = []
        if until is not None:
            conds.append(incidents.c.updated_at < until)
        if opened_since is not None:
            conds.append(incidents.c.opened_at >= opened_since)
        if opened_until is not None:
            conds.append(incidents.c.opened_at < opened_until)
        for key, value in (("grid_code", grid_code), ("building", building), ("device_type", device_type)):
            if value is not None:
                conds.append(_group_column(key) == value)
        if status is not None:
            conds.append(incidents.c.status == status)
        if urgency is not None:
            conds.append(incidents.c.urgency == urgency)
        if rule_id is not None:
            conds.append(incidents.c.rule_id == rule_id)
        if communities is not None:
            conds.append(incidents.c.community.in_(list(communities)))
        conds.extend(where)  # more conditions, such as a caller's scope (api.auth.Scope.incidents_where)
        if not include_commissioning:
            conds.append(incidents.c.commissioning.is_(False))
        if since is not None:
            conds.append(incidents.c.updated_at >= since)
        q = (
            select(incidents.c.data)
            .where(*conds)
            .order_by(incidents.c.urgency, incidents.c.opened_at.desc(), incidents.c.incident_id)
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as conn:
            total = int(conn.execute(select(func.count()).select_from(incidents).where(*conds)).scalar_one())
            return [Incident.model_validate(d) for d in conn.execute(q).scalars()], total

    def open_counts(
        self,
        keys: Sequence[str],
        *,
        communities: Sequence[str] | None = None,
        matching: Mapping[str, str] | None = None,
        where: Sequence[ColumnElement[bool]] = (),
        include_commissioning: bool = False,
    ) -> list[tuple[tuple[str | None, ...], str, int]]:
        """Open incidents counted per value of `keys` (names in INCIDENT_GROUP_KEYS) and urgency:
        [(key values, urgency, count)]. `communities` limits them (a scope), `matching` narrows by key
        values ({"community": ..., "grid_code": ...}), `where` adds conditions on `incidents`."""
        columns = [_group_column(k) for k in keys]
        conds: list[Any] = [incidents.c.status == "open", *where]
        if communities is not None:
            conds.append(incidents.c.community.in_(list(communities)))
        if not include_commissioning:
            conds.append(incidents.c.commissioning.is_(False))
        for key, value in (matching or {}).items():
            conds.append(_group_column(key) == value)
        q = (
            select(*columns, incidents.c.urgency, func.count())
            .where(*conds)
            .group_by(*columns, incidents.c.urgency)
        )
        with self.engine.connect() as conn:
            return [(tuple(r[: len(keys)]), str(r[-2]), int(r[-1])) for r in conn.execute(q)]

    def status_counts(
        self,
        keys: Sequence[str],
        *,
        resolved_since: dt.datetime,
        matching: Mapping[str, str] | None = None,
        where: Sequence[ColumnElement[bool]] = (),
        include_commissioning: bool = False,
    ) -> list[tuple[tuple[str | None, ...], str, int]]:
        """Incidents counted per value of `keys` and status: "unacknowledged" and "acknowledged" (open
        ones), "resolved" (resolved since `resolved_since`): [(key values, status, count)]."""
        columns = [_group_column(k) for k in keys]
        state = case(
            (incidents.c.status == "resolved", "resolved"),
            (incidents.c.acknowledged_at.is_not(None), "acknowledged"),
            else_="unacknowledged",
        )
        # written so that SQLite can take both sides from the (status, resolved_at) index
        conds: list[Any] = [
            or_(
                incidents.c.status == "open",
                and_(incidents.c.status == "resolved", incidents.c.resolved_at >= resolved_since),
            ),
            *where,
        ]
        if not include_commissioning:
            conds.append(incidents.c.commissioning.is_(False))
        for key, value in (matching or {}).items():
            conds.append(_group_column(key) == value)
        q = select(*columns, state, func.count()).where(*conds).group_by(*columns, state)
        with self.engine.connect() as conn:
            return [(tuple(r[: len(keys)]), str(r[-2]), int(r[-1])) for r in conn.execute(q)]

    def open_per_device(self, device_ids: Sequence[str]) -> dict[str, int]:
        """How many open incidents each of `device_ids` has (group incidents, which have no device id, are
        not counted); devices without any are left out."""
        if not device_ids:
            return {}
        device = incidents.c.device_id
        q = (
            select(device, func.count())
            .where(incidents.c.status == "open", device.in_(list(device_ids)))
            .group_by(device)
        )
        with self.engine.connect() as conn:
            return {str(d): int(n) for d, n in conn.execute(q)}

    # -- following changes (a live view) -----------------------------------------------------------------

    def last_history_id(self) -> int:
        """The id of the newest history row (0 when there is none): where a live view starts."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(incident_history.c.id))).scalar() or 0)

    def changes_since(
        self,
        after: int,
        *,
        also: Sequence[int] = (),
        visible: Callable[[Incident], bool] | None = None,
        include_commissioning: bool = False,
        limit: int = 500,
    ) -> HistoryScan:
        """History rows with an id above `after` (and those of `also`: ids a reader found missing, which a
        transaction that took its id earlier may have committed since), oldest first, at most `limit`;
        the changes among them of incidents `visible` says the reader may see (None: all), each with the
        incident as it is now. History ids grow with every change, by whichever process makes it, so
        polling this is how another process follows incidents."""
        h, i = incident_history, incidents
        wanted: Any = h.c.id > after
        if also:
            wanted = or_(wanted, h.c.id.in_(list(also)))
        q = (
            select(h, i.c.data.label("incident"), i.c.commissioning)
            .select_from(h.outerjoin(i, i.c.incident_id == h.c.incident_id))
            .where(wanted)
            .order_by(h.c.id)
            .limit(limit)
        )
        ids, changes = [], []
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                ids.append(int(r.id))
                if r.incident is None or (r.commissioning and not include_commissioning):
                    continue
                incident = Incident.model_validate(r.incident)
                if visible is not None and not visible(incident):
                    continue
                row = HistoryRow(
                    id=r.id,
                    incident_id=r.incident_id,
                    at=r.at,
                    event_type=r.event_type,
                    actor=r.actor,
                    change=r.change,
                )
                changes.append(IncidentChange(row, incident))
        return HistoryScan(tuple(ids), tuple(changes))

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

    def _mark(self, outbox_id: int, *, only_pending: bool = False, **values: Any) -> bool:
        q = update(outbox).where(outbox.c.id == outbox_id)
        if only_pending:
            # an attempt that ends after a 410 (or an operator) took the row elsewhere does not bring it back
            q = q.where(outbox.c.state == "pending")
        with write_transaction(self.engine) as conn:
            res = conn.execute(q.values(**values))
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
            only_pending=True,
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
        return self._mark(outbox_id, only_pending=True, **values)

    def disable_endpoint(
        self, endpoint: str, reason: str | None = None, now: dt.datetime | None = None
    ) -> int:
        """The endpoint answered 410: it is recorded as disabled (`delivery_endpoints`, so the rows written
        for it from now on are `disabled` too) and its undelivered rows become `disabled`, in one
        transaction; returns how many rows."""
        now = now or _utcnow()
        with write_transaction(self.engine) as conn:
            self._set_endpoint(conn, endpoint, now, reason or "disabled")
            res = conn.execute(
                update(outbox)
                .where(outbox.c.endpoint == endpoint, outbox.c.state.in_(("pending", "held", "failed")))
                .values(state="disabled")
            )
            return int(res.rowcount)

    def _set_endpoint(self, conn: Connection, endpoint: str, now: dt.datetime, reason: str | None) -> None:
        """Upsert the endpoint's `delivery_endpoints` row: disabled with `reason`, or enabled (None)."""
        ins: Any = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        values = {
            "disabled_at": now if reason is not None else None,
            "disabled_reason": reason,
            "updated_at": now,
        }
        conn.execute(
            ins(delivery_endpoints)
            .values(name=endpoint, **values)
            .on_conflict_do_update(index_elements=[delivery_endpoints.c.name], set_=values)
        )

    def enable_endpoint(self, endpoint: str, now: dt.datetime | None = None) -> int:
        """An operator enables an endpoint again: its `disabled` rows become pending, due now (they go in
        order per incident, as ever); returns how many."""
        now = now or _utcnow()
        with write_transaction(self.engine) as conn:
            self._set_endpoint(conn, endpoint, now, None)
            res = conn.execute(
                update(outbox)
                .where(outbox.c.endpoint == endpoint, outbox.c.state == "disabled")
                .values(state="pending", next_attempt_at=now, retry_from=now)
            )
            return int(res.rowcount)

    def disabled_endpoints(self) -> list[DisabledEndpoint]:
        """The endpoints disabled by a 410 (or an operator), by name."""
        q = (
            select(delivery_endpoints)
            .where(delivery_endpoints.c.disabled_at.is_not(None))
            .order_by(delivery_endpoints.c.name)
        )
        with self.engine.connect() as conn:
            return [DisabledEndpoint(r.name, r.disabled_at, r.disabled_reason) for r in conn.execute(q)]

    def claim_outbox(
        self, endpoint: str, limit: int, lease_s: float, now: dt.datetime | None = None
    ) -> list[OutboxRow]:
        """`pending_outbox`, taken for `lease_s` by moving the rows' next_attempt_at past the attempt: a
        second delivery process does not take them meanwhile, and if this one dies mid-attempt they are
        due again when the lease ends. One short write, and only when something is due."""
        now = now or _utcnow()
        heads = self.pending_outbox(endpoint, limit, now)
        if not heads:
            return []
        until = now + dt.timedelta(seconds=lease_s)
        with write_transaction(self.engine) as conn:
            taken = set(
                conn.execute(
                    update(outbox)
                    .where(
                        outbox.c.id.in_([r.id for r in heads]),
                        outbox.c.state == "pending",
                        outbox.c.next_attempt_at <= now,
                    )
                    .values(next_attempt_at=until)
                    .returning(outbox.c.id)
                ).scalars()
            )
        from dataclasses import replace

        return [replace(r, next_attempt_at=until) for r in heads if r.id in taken]

    def release(self, outbox_ids: Sequence[int], now: dt.datetime | None = None) -> int:
        """Give claimed rows back, due now (an attempt cut short at shutdown)."""
        if not outbox_ids:
            return 0
        with write_transaction(self.engine) as conn:
            res = conn.execute(
                update(outbox)
                .where(outbox.c.id.in_(list(outbox_ids)), outbox.c.state == "pending")
                .values(next_attempt_at=now or _utcnow())
            )
            return int(res.rowcount)

    def resend(
        self, ids: Sequence[int] | None = None, endpoint: str | None = None, now: dt.datetime | None = None
    ) -> int:
        """Operators re-send `failed` deliveries (and `disabled` ones of an endpoint enabled since): they
        become pending, due now, attempts kept; `ids` and `endpoint` narrow the choice (neither: all).
        Rows of an endpoint that is disabled stay as they are: `enable_endpoint` re-sends those."""
        now = now or _utcnow()
        disabled = select(delivery_endpoints.c.name).where(delivery_endpoints.c.disabled_at.is_not(None))
        q = update(outbox).where(
            outbox.c.state.in_(("failed", "disabled")), outbox.c.endpoint.not_in(disabled)
        )
        if ids is not None:
            q = q.where(outbox.c.id.in_(list(ids)))
        if endpoint is not None:
            q = q.where(outbox.c.endpoint == endpoint)
        with write_transaction(self.engine) as conn:
            return int(conn.execute(q.values(state="pending", next_attempt_at=now, retry_from=now)).rowcount)

    def deliveries(
        self,
        state: str | None = None,
        endpoint: str | None = None,
        incident_id: str | None = None,
        limit: int = 100,
        ids: Sequence[int] | None = None,
    ) -> list[OutboxRow]:
        """Outbox rows, the newest first, optionally of one state, endpoint, incident or of given ids."""
        q = select(outbox)
        if state is not None:
            q = q.where(outbox.c.state == state)
        if endpoint is not None:
            q = q.where(outbox.c.endpoint == endpoint)
        if incident_id is not None:
            q = q.where(outbox.c.incident_id == incident_id)
        if ids is not None:
            q = q.where(outbox.c.id.in_(list(ids)))
        q = q.order_by(outbox.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [OutboxRow(**dict(r._mapping)) for r in conn.execute(q)]

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """{endpoint: {state: rows}} over the whole outbox."""
        q = select(outbox.c.endpoint, outbox.c.state, func.count()).group_by(
            outbox.c.endpoint, outbox.c.state
        )
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for endpoint, state, n in conn.execute(q):
                out.setdefault(endpoint, {})[state] = int(n)
        return out

    def due_count(self, endpoint: str, now: dt.datetime | None = None) -> int:
        """Pending rows of `endpoint` whose next attempt is due (the heads and the events waiting behind)."""
        q = select(func.count()).where(
            outbox.c.endpoint == endpoint,
            outbox.c.state == "pending",
            outbox.c.next_attempt_at <= (now or _utcnow()),
        )
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())


@dataclass(frozen=True, slots=True)
class DisabledEndpoint:
    """An endpoint that no delivery goes to until an operator enables it (`sc-gateway deliveries enable`)."""

    name: str
    disabled_at: dt.datetime
    reason: str | None
