"""From verdicts to incidents (pure): opened, updated (occurrence, escalation, evidence), resolved.

`apply` is the whole lifecycle of one dedup key: the caller keeps the incidents (at most one open per
dedup key) and hands in the open one, or the last one, of the verdict's key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from incidents.model import (
    LOCAL_TZ,
    DeviceLike,
    DeviceRef,
    EventType,
    Incident,
    IncidentEvidence,
    Location,
    dedup_key,
    incident_id,
)
from incidents.routing import Router, default_router
from rules.model import Verdict

#: the sequence number for a local (UTC+8) date: 1, 2, 3 ... (the store keeps one counter per day)
NextId = Callable[[dt.date], int]
IN_SERVICE = "in_service"


def _ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _evidence(v: Verdict) -> IncidentEvidence:
    e = v.evidence
    return IncidentEvidence(ts=_ms(e.ts_ms), values=dict(e.values), threshold=e.threshold)


def _location(v: Verdict, device: DeviceLike | None) -> Location:
    if device is None:
        return Location(community=v.community, grid_code=v.grid_code)
    return Location(
        district=device.district,
        street=device.street,
        community=device.community or v.community,
        grid_code=device.grid_code or v.grid_code,
        building=device.building,
        address=getattr(device, "address", None),
        lat=getattr(device, "lat", None),
        lon=getattr(device, "lon", None),
    )


def _earlier(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    if a is None or b is None:
        return a or b
    return min(a, b)


def apply(
    verdict: Verdict,
    existing: Incident | None,
    device: DeviceLike | None,
    now: dt.datetime,
    next_id: NextId,
    router: Router | None = None,
) -> tuple[Incident, EventType] | None:
    """The incident change a verdict makes, with its event type; None when it changes nothing (a clear
    with no open incident).

    - firing, no open incident → a new incident (`next_id` numbers it), `sc.incident.opened`;
    - firing, open incident → `sc.incident.updated` with the verdict's urgency (escalation: the deadlines
      of the new tier from now, never later than the old ones), occurrences and evidence;
    - cleared, open incident → `sc.incident.resolved` (`resolution` "grouped" when the device alarm was
      taken into a group alarm: the group's incident carries on).

    `device` is the registry device of the verdict (for a group alarm: a member, for its place, or None).
    An incident opened while the device was not in service is marked `commissioning` (kept, not delivered).
    """
    if now.tzinfo is None:
        raise ValueError("naive datetime: give a timezone")
    router = router or default_router()
    key = dedup_key(verdict.key, verdict.rule_id)
    if existing is not None and existing.dedup_key != key:
        raise ValueError(f"incident {existing.incident_id} is for {existing.dedup_key}, not {key}")
    is_open = existing is not None and existing.is_open

    if verdict.state == "cleared":
        if existing is None or not is_open:
            return None
        resolved = existing.model_copy(
            update={
                "status": "resolved",
                "updated_at": now,
                "resolved_at": now,
                "evidence": _evidence(verdict),
                "description": f"{verdict.message_zh} / {verdict.message_en}",
                "resolution": "grouped" if verdict.grouped_into else "cleared",
            }
        )
        return Incident.model_validate(resolved.model_dump()), "sc.incident.resolved"

    if existing is not None and is_open:
        respond_by, resolve_by = existing.respond_by, existing.resolve_by
        if verdict.urgency < existing.urgency:  # "P1" < "P2": more severe
            new_respond, new_resolve = router.deadlines.due(verdict.urgency, now)
            respond_by, resolve_by = _earlier(respond_by, new_respond), _earlier(resolve_by, new_resolve)
        updated = existing.model_copy(
            update={
                # an open incident's urgency never drops (a calmer reading does not un-escalate a case)
                "urgency": min(existing.urgency, verdict.urgency),
                "description": f"{verdict.message_zh} / {verdict.message_en}",
                "evidence": _evidence(verdict),
                "occurrences": max(existing.occurrences, verdict.occurrences),
                "members": verdict.members or existing.members,
                "updated_at": now,
                "respond_by": respond_by,
                "resolve_by": resolve_by,
            }
        )
        return Incident.model_validate(updated.model_dump()), "sc.incident.updated"

    route = router.route(verdict.rule_id, device)
    title_zh, title_en = router.title(verdict.rule_id)
    respond_by, resolve_by = router.deadlines.due(verdict.urgency, now)
    day = now.astimezone(LOCAL_TZ).date()
    incident = Incident(
        incident_id=incident_id(day, next_id(day)),
        dedup_key=key,
        rule_id=verdict.rule_id,
        title=f"{title_zh} / {title_en}",
        description=f"{verdict.message_zh} / {verdict.message_en}",
        urgency=verdict.urgency,
        case_type=route.case_type,
        class_code=route.class_code,
        class_name=route.class_name,
        status="open",
        device=DeviceRef(
            id=verdict.device_id,
            type=verdict.device_type,
            component_code=device.component_code if device is not None and verdict.device_id else None,
        ),
        location=_location(verdict, device),
        responsible_unit=route.responsible_unit,
        evidence=_evidence(verdict),
        occurrences=max(1, verdict.occurrences),
        opened_at=now,
        updated_at=now,
        respond_by=respond_by,
        resolve_by=resolve_by,
        commissioning=verdict.device_id is not None and device is not None and device.lifecycle != IN_SERVICE,
        escalation=route.escalation,
        dispatch_to=route.dispatch_to,
        members=verdict.members,
    )
    return incident, "sc.incident.opened"
