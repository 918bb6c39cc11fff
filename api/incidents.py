"""Governance incidents over the API: the incident system's back-channel, reading incidents and their
history, acknowledging, and the false-alarm counts whoever tunes the rules looks at.

| route | roles |
|---|---|
| `POST /api/v1/incidents/{id}/reports` | incident_system, admin |
| `GET /api/v1/incidents`, `GET /api/v1/incidents/{id}` | admin, manager, viewer |
| `POST /api/v1/incidents/{id}/ack` | admin, manager |
| `GET /api/v1/false-alarms` | admin, installer (unscoped) |

A scoped caller reaches only the incidents of its communities, streets or districts (api.auth.Scope);
another's is a 404, as if it did not exist. The incident system reaches only its back-channel.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Principal, check_listing_community, require_roles, require_unscoped
from api.commissioning import SINCE_HELP, parse_since
from api.errors import ERROR_RESPONSES
from api.services import Services, services
from gateway.incident_store import INCIDENT_SYSTEM, IncidentNotFoundError
from incidents.model import Incident

router = APIRouter(prefix="/api/v1", tags=["incidents"], responses=ERROR_RESPONSES)
Svc = Annotated[Services, Depends(services)]
Reporter = Annotated[Principal, Depends(require_roles("incident_system", "admin"))]
Reader = Annotated[Principal, Depends(require_roles("admin", "manager", "viewer"))]
Acker = Annotated[Principal, Depends(require_roles("admin", "manager"))]
Tuner = Annotated[Principal, Depends(require_roles("admin", "installer"))]

_404: Final[dict[int | str, dict[str, Any]]] = {
    404: {"description": "no such incident (or not in the key's scope)"}
}


class ReportIn(BaseModel):
    """The incident system's progress on a case."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"status": "dispatched", "report_id": "CASE-2026-0042#1", "case_id": "CASE-2026-0042"}
            ]
        },
    )

    status: Literal["dispatched", "in_progress", "closed", "false_alarm"] = Field(
        description="dispatched / in_progress acknowledge the incident; closed resolves it; false_alarm "
        "resolves it and counts a false alarm against its rule and device"
    )
    report_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="the reporter's id of this report: the same report sent again changes nothing",
    )
    case_id: str | None = Field(None, min_length=1, max_length=128, description="the case system's case id")
    note: str | None = Field(None, max_length=2000, description="free text kept in the incident's history")
    reported_at: dt.datetime | None = Field(
        None, description="when it happened in the case system (ISO 8601)"
    )


class ReportOut(BaseModel):
    accepted: bool = Field(description="false when a report with this report_id was already received")
    incident: dict[str, Any] = Field(description="the incident after the report, as delivered")


class HistoryOut(BaseModel):
    at: dt.datetime
    event_type: str
    actor: str
    change: dict[str, Any]


class IncidentDetailOut(BaseModel):
    incident: dict[str, Any]
    history: list[HistoryOut]
    reports: list[dict[str, Any]]


class IncidentPageOut(BaseModel):
    total: int
    incidents: list[dict[str, Any]]


class FalseAlarmOut(BaseModel):
    rule_id: str
    device_id: str = Field(description="empty for a group incident")
    count: int
    last_at: dt.datetime
    last_incident_id: str


def _visible(svc: Services, principal: Principal, incident_id: str) -> Incident:
    incident = svc.incidents.get(incident_id)
    if incident is None or not principal.scope.allows(
        district=incident.location.district,
        street=incident.location.street,
        community=incident.location.community,
    ):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no incident {incident_id}")
    return incident


@router.post(
    "/incidents/{incident_id}/reports",
    summary="The incident system reports its progress on a case",
    responses=_404,
)
def report(incident_id: str, body: ReportIn, principal: Reporter, svc: Svc) -> ReportOut:
    """Recorded in the incident's history with the incident system as the actor. Not echoed back to the
    case system's endpoints (local MQTT subscribers and escalation endpoints are told)."""
    _visible(svc, principal, incident_id)
    actor = INCIDENT_SYSTEM if principal.role == "incident_system" else principal.person_actor
    try:
        incident, new = svc.incidents.report(
            incident_id,
            body.status,
            report_id=body.report_id,
            case_id=body.case_id,
            note=body.note,
            reported_at=body.reported_at,
            actor=actor,
        )
    except IncidentNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no incident {incident_id}") from None
    return ReportOut(accepted=new, incident=incident.to_json())


@router.get("/incidents", summary="Incidents, the most urgent first, then the newest")
def list_incidents(
    principal: Reader,
    svc: Svc,
    state: Annotated[Literal["open", "resolved", "all"], Query(alias="status")] = "open",
    urgency: Annotated[Literal["P1", "P2", "P3", "P4"] | None, Query()] = None,
    rule_id: str | None = None,
    community: str | None = None,
    commissioning: Annotated[bool, Query(description="include commissioning noise")] = False,
    since: Annotated[str | None, Query(description=f"changed since: {SINCE_HELP}")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    until: Annotated[str | None, Query(description=f"changed before: {SINCE_HELP}")] = None,
    opened_since: Annotated[str | None, Query(description=f"opened since: {SINCE_HELP}")] = None,
    opened_until: Annotated[str | None, Query(description=f"opened before: {SINCE_HELP}")] = None,
    grid_code: str | None = None,
    building: str | None = None,
    device_type: Annotated[str | None, Query(alias="type", description="device type")] = None,
) -> IncidentPageOut:
    """A key scoped to communities sees only theirs; asking for another community is a 403. The time
    filters bound the last change (since, until) and the opening (opened_since, opened_until); the
    `until` ones are exclusive."""
    scope = principal.scope
    check_listing_community(principal, community)
    found, total = svc.incidents.find(
        status=None if state == "all" else state,
        urgency=urgency,
        rule_id=rule_id,
        communities=None if community is None else (community,),
        where=[scope.incidents_where()],
        include_commissioning=commissioning,
        since=parse_since(since),
        limit=limit,
        offset=offset,
        until=parse_since(until, name="until"),
        opened_since=parse_since(opened_since, name="opened_since"),
        opened_until=parse_since(opened_until, name="opened_until"),
        grid_code=grid_code,
        building=building,
        device_type=device_type,
    )
    return IncidentPageOut(total=total, incidents=[i.to_json() for i in found])


@router.get(
    "/incidents/{incident_id}", summary="One incident with its history and case reports", responses=_404
)
def get_incident(incident_id: str, principal: Reader, svc: Svc) -> IncidentDetailOut:
    incident = _visible(svc, principal, incident_id)
    history = [
        HistoryOut(at=h.at, event_type=h.event_type, actor=h.actor, change=h.change)
        for h in svc.incidents.history(incident_id)
    ]
    reports = [
        {k: v for k, v in r.items() if k not in ("id", "incident_id")}
        for r in svc.incidents.reports(incident_id)
    ]
    return IncidentDetailOut(incident=incident.to_json(), history=history, reports=reports)


@router.post(
    "/incidents/{incident_id}/ack",
    summary="Acknowledge an incident: someone is on it (stops its escalation)",
    responses=_404,
)
def acknowledge(incident_id: str, principal: Acker, svc: Svc) -> dict[str, Any]:
    _visible(svc, principal, incident_id)
    return svc.incidents.acknowledge(incident_id, principal.person_actor).to_json()


@router.get("/false-alarms", summary="False alarms reported by the incident system, per rule and device")
def list_false_alarms(
    principal: Tuner,
    svc: Svc,
    rule_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[FalseAlarmOut]:
    """The most frequent first: the rules and devices to look at when tuning thresholds. For unscoped
    callers (the counts span every community)."""
    require_unscoped(principal, "the false-alarm count")
    return [
        FalseAlarmOut(
            rule_id=c.rule_id,
            device_id=c.device_id,
            count=c.count,
            last_at=c.last_at,
            last_incident_id=c.last_incident_id,
        )
        for c in svc.incidents.false_alarm_counts(rule_id=rule_id, limit=limit)
    ]
