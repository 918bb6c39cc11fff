"""The property managers' routes: their incidents (comments, assignment, a live stream), their devices with
status and last values, a device's readings from InfluxDB, and counts by place and type.

| route | roles |
|---|---|
| `GET /api/v1/incidents/stream` (server-sent events) | admin, manager, viewer |
| `POST /api/v1/incidents/{id}/comments`, `POST /api/v1/incidents/{id}/assign` | admin, manager |
| `GET /api/v1/device-status`, `GET /api/v1/device-status/{id}` | admin, manager, viewer |
| `GET /api/v1/devices/{id}/readings` | admin, manager, viewer |
| `GET /api/v1/overview?by=community\\|grid\\|building\\|type` | admin, manager, viewer |

Listing, reading and acknowledging incidents are in api/incidents.py (the same roles). A key's scope
applies everywhere: a single object outside it is a 404 (as if it did not exist), listings and counts
hold only rows inside it, and asking for a community outside it is a 403. The scope is read in one
place, `_reaches` / `_listing` below.

Comments are the managers' own notes: kept in the incident's history (`comment`, by the user), shown in
the live stream, never sent to the case system and not changing the incident. Assignment sets the
incident's `assigned_to` (free text: a person or team) and is published on the local MQTT topic only:
the case system dispatches by itself.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from functools import partial
from typing import Annotated, Any, Final, Literal, get_args

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, HTTPException, Query, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, and_, case, func, select
from sqlalchemy.sql import ColumnElement

from api.auth import Principal, check_listing_community, require_roles
from api.commissioning import SINCE_HELP, parse_since
from api.errors import ERROR_RESPONSES
from api.readings import MAX_POINTS, ReadingsQueryError, ReadingsUnavailableError, reader_fields
from api.schemas import Lifecycle, payload_value
from api.services import Services, services
from devices import THING_MODELS
from gateway.db import device_state, devices, incidents
from gateway.incident_store import (
    IncidentChange,
    IncidentNotFoundError,
    IncidentResolvedError,
    IncidentStore,
)
from incidents.model import Incident, Location, Urgency, rfc3339

router = APIRouter(prefix="/api/v1", tags=["managers"], responses=ERROR_RESPONSES)
Svc = Annotated[Services, Depends(services)]
Viewer = Annotated[Principal, Depends(require_roles("admin", "manager", "viewer"))]
Manager = Annotated[Principal, Depends(require_roles("admin", "manager"))]

_404_INCIDENT: Final[dict[int | str, dict[str, Any]]] = {
    404: {"description": "no such incident (or not in the key's scope)"}
}
_404_DEVICE: Final[dict[int | str, dict[str, Any]]] = {
    404: {"description": "no such device (or not in the key's scope)"}
}
URGENCIES: Final[tuple[str, ...]] = get_args(Urgency)


# -- scope: the only place this module reads a key's scope ------------------------------------------------


def _reaches(principal: Principal, place: Location | None) -> bool:
    """Whether the key reaches an object at `place` (one outside it is answered as not found)."""
    if place is None:
        return principal.scope.allows()
    return principal.scope.allows(district=place.district, street=place.street, community=place.community)


def _listing(principal: Principal, community: str | None = None) -> ColumnElement[bool]:
    """What a listing of devices may hold, as a condition on `devices`: the key's scope (communities,
    streets or districts), narrowed to `community` when the caller asks for one; 403 when a scope of
    communities does not hold that one. `_incidents_listing` is the same on `incidents`."""
    check_listing_community(principal, community)
    cond = principal.scope.devices_where()
    return cond if community is None else and_(cond, devices.c.community == community)


def _incidents_listing(principal: Principal, community: str | None = None) -> ColumnElement[bool]:
    check_listing_community(principal, community)
    cond = principal.scope.incidents_where()
    return cond if community is None else and_(cond, incidents.c.community == community)


def _actor(principal: Principal) -> str:
    """How an incident's history names what this caller did (as api/incidents.py's acknowledgement)."""
    return principal.person_actor


def _incident_in_scope(svc: Services, principal: Principal, incident_id: str) -> None:
    incident = svc.incidents.get(incident_id)
    if incident is None or not _reaches(principal, incident.location):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no incident {incident_id}")


# -- incidents: comments and assignment --------------------------------------------------------------------


class CommentIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "已通知保安到场查看"}]}
    )

    text: str = Field(min_length=1, max_length=2000, description="the note, kept in the incident's history")


class CommentOut(BaseModel):
    id: int = Field(description="the history row's id (the live stream's cursor)")
    incident_id: str
    at: dt.datetime
    actor: str
    text: str


class AssignIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"assignee": "保安队 王师傅"}]})

    assignee: str | None = Field(
        min_length=1, max_length=128, description="who takes it on (a person or team); null: nobody"
    )


class AssignOut(BaseModel):
    changed: bool = Field(description="false: it was assigned so already (nothing written)")
    incident: dict[str, Any]


@router.post(
    "/incidents/{incident_id}/comments",
    status_code=status.HTTP_201_CREATED,
    summary="Add a note to an incident's history (not sent to the case system)",
    responses=_404_INCIDENT,
)
def comment(incident_id: str, body: CommentIn, principal: Manager, svc: Svc) -> CommentOut:
    """Open and resolved incidents both take comments. The incident itself does not change."""
    _incident_in_scope(svc, principal, incident_id)
    text = body.text.strip()
    if not text:
        raise HTTPException(422, detail="text: must not be blank")
    try:
        row = svc.incidents.comment(incident_id, text, _actor(principal))
    except IncidentNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no incident {incident_id}") from None
    return CommentOut(id=row.id, incident_id=row.incident_id, at=row.at, actor=row.actor, text=text)


@router.post(
    "/incidents/{incident_id}/assign",
    summary="Give an open incident to someone (or null: to nobody)",
    responses={**_404_INCIDENT, 409: {"description": "the incident is resolved"}},
)
def assign(incident_id: str, body: AssignIn, principal: Manager, svc: Svc) -> AssignOut:
    """Sets `assigned_to`, `assigned_at`, `assigned_by`; history `assigned` / `unassigned`; published to
    local MQTT subscribers, not to the case system. Assigning does not acknowledge (`POST .../ack`)."""
    _incident_in_scope(svc, principal, incident_id)
    assignee = None if body.assignee is None else body.assignee.strip() or None
    try:
        incident, changed = svc.incidents.assign(incident_id, assignee, _actor(principal))
    except IncidentNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no incident {incident_id}") from None
    except IncidentResolvedError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"{exc}: it cannot be assigned") from None
    return AssignOut(changed=changed, incident=incident.to_json())


# -- incidents: the live stream ---------------------------------------------------------------------------

#: the reconnection delay browsers are told (EventSource `retry:`)
RETRY_MS: Final = 2000
#: history rows read per poll (a client far behind catches up in batches, without waiting in between)
BATCH: Final = 500
#: how long an id missing below the cursor is looked for again (PostgreSQL hands out ids at insert and
#: a transaction that took a lower one may commit after a higher one)
GAP_WAIT_S: Final = 10.0
#: at most this many missing ids are tracked (a sequence jump after a crash is not a gap to wait for)
MAX_GAPS: Final = 1000


class HistoryCursor:
    """Where a stream is in incident_history: the highest id read, and the ids below it not seen yet
    (looked for again until `GAP_WAIT_S` after they were first missed)."""

    def __init__(self, position: int) -> None:
        self.position = position
        self._gaps: dict[int, float] = {}

    def missing(self) -> tuple[int, ...]:
        return tuple(sorted(self._gaps))

    def saw(self, ids: Iterable[int], now: float, wait_s: float = GAP_WAIT_S) -> None:
        """Record the ids one read returned."""
        seen = set(ids)
        for i in seen & self._gaps.keys():
            del self._gaps[i]
        top = max((i for i in seen if i > self.position), default=self.position)
        new_gaps = [i for i in range(self.position + 1, top) if i not in seen]
        if len(self._gaps) + len(new_gaps) <= MAX_GAPS:
            self._gaps.update(dict.fromkeys(new_gaps, now + wait_s))
        self.position = top
        for i in [i for i, deadline in self._gaps.items() if deadline <= now]:
            del self._gaps[i]


def sse_event(change: IncidentChange) -> str:
    """One change as a server-sent event: `id` the history id (the cursor), `event: incident`, `data`
    the change (event_type, actor, at, the changed fields) with the incident as it is now."""
    h = change.history
    data = {
        "cursor": h.id,
        "incident_id": h.incident_id,
        "event_type": h.event_type,
        "at": rfc3339(h.at),
        "actor": h.actor,
        "change": h.change,
        "incident": change.incident.to_json(),
    }
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {h.id}\nevent: incident\ndata: {text}\n\n"


async def incident_events(
    store: IncidentStore,
    start: int,
    *,
    visible: Callable[[Incident], bool],
    include_commissioning: bool,
    poll_s: float,
    keepalive_s: float,
) -> AsyncIterator[str]:
    """The stream's text: the changes after history id `start` of `visible` incidents, read every `poll_s`
    (each read a short query in a worker thread), a keep-alive comment after `keepalive_s` of quiet."""
    cursor = HistoryCursor(start)
    yield f"retry: {RETRY_MS}\n: incident changes after {start}\n\n"
    quiet_since = time.monotonic()
    while True:
        scan = await anyio.to_thread.run_sync(
            partial(
                store.changes_since,
                cursor.position,
                also=cursor.missing(),
                visible=visible,
                include_commissioning=include_commissioning,
                limit=BATCH,
            )
        )
        now = time.monotonic()
        cursor.saw(scan.ids, now)
        for change in scan.changes:
            yield sse_event(change)
        if scan.changes:
            quiet_since = now
        elif now - quiet_since >= keepalive_s:
            yield ": keep-alive\n\n"
            quiet_since = now
        if len(scan.ids) < BATCH:
            await anyio.sleep(poll_s)


@router.get(
    "/incidents/stream",
    summary="Incident changes as they happen (server-sent events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "an endless event stream"}},
)
async def incident_stream(
    principal: Viewer,
    svc: Svc,
    last_event_id: Annotated[
        str | None, Header(description="resume after this event id (browsers send it on reconnecting)")
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, description="resume after this cursor (as Last-Event-ID)")
    ] = None,
    community: str | None = None,
    commissioning: Annotated[bool, Query(description="include commissioning noise")] = False,
) -> StreamingResponse:
    """`text/event-stream`: one `event: incident` per change of an incident in the key's scope (opened,
    updated, acknowledged, assigned, comment, reported:..., escalated, reminder, resolved), with `id:` the
    change's cursor (the history row's id, increasing). Reconnecting with `Last-Event-ID` (or `?after=`)
    resumes after that change; without either the stream starts with the changes made from now on. A
    comment line `: keep-alive` comes after ~15 s without events. Delivery is at least once: a change may
    come twice around a reconnection, `data.cursor` tells them apart."""
    start = after
    if last_event_id is not None and last_event_id.strip():
        try:
            start = int(last_event_id)
        except ValueError:
            raise HTTPException(
                422, detail=f"Last-Event-ID: {last_event_id!r} is not an event id of this stream"
            ) from None
    # the scope itself is checked per incident (`_reaches`), then the community asked for, if any
    check_listing_community(principal, community)

    def visible(incident: Incident) -> bool:
        place = incident.location
        return _reaches(principal, place) and (community is None or place.community == community)

    store = svc.incidents
    if start is None:
        start = await anyio.to_thread.run_sync(store.last_history_id)
    events = incident_events(
        store,
        start,
        visible=visible,
        include_commissioning=commissioning,
        poll_s=svc.settings.api_stream_poll_s,
        keepalive_s=svc.settings.api_stream_keepalive_s,
    )
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- devices with status ----------------------------------------------------------------------------------


class DeviceStatusOut(BaseModel):
    """A device, where it is, and what the gateway last heard from it."""

    device_id: str
    device_type: str
    lifecycle: Lifecycle
    community: str | None
    grid_code: str | None
    district: str | None
    street: str | None
    building: str | None
    address: str | None
    lat: float | None
    lon: float | None
    responsible_unit: str | None
    online: bool | None = Field(description="what its last status said (None: no status yet)")
    last_seen: dt.datetime | None = Field(description="its last message of any kind (None: never heard from)")
    fw: str | None
    last_values: dict[str, Any] | None = Field(
        description="the telemetry fields of its last message, when that was telemetry"
    )
    open_incidents: int = Field(description="open incidents raised on this device")


class DeviceStatusPage(BaseModel):
    items: list[DeviceStatusOut]
    total: int = Field(description="devices matching the filters")
    limit: int
    offset: int


_STATUS_COLUMNS: Final = (
    devices.c.device_id,
    devices.c.device_type,
    devices.c.lifecycle,
    devices.c.community,
    devices.c.grid_code,
    devices.c.district,
    devices.c.street,
    devices.c.building,
    devices.c.address,
    devices.c.lat,
    devices.c.lon,
    devices.c.responsible_unit,
    device_state.c.online,
    device_state.c.last_seen,
    device_state.c.fw,
    device_state.c.last_topic,
    device_state.c.last_payload,
)
_WITH_STATE: Final = devices.outerjoin(device_state, device_state.c.device_id == devices.c.device_id)


def _device_filters(
    scope: ColumnElement[bool],
    *,
    grid_code: str | None = None,
    building: str | None = None,
    device_type: str | None = None,
    lifecycle: str | None = None,
    online: bool | None = None,
) -> list[ColumnElement[bool]]:
    """Retired devices only when asked for by lifecycle; `online` false means not known to be online."""
    out: list[ColumnElement[bool]] = [scope]
    for column, value in (
        (devices.c.grid_code, grid_code),
        (devices.c.building, building),
        (devices.c.device_type, device_type),
    ):
        if value is not None:
            out.append(column == value)
    out.append(
        devices.c.lifecycle == lifecycle if lifecycle is not None else devices.c.lifecycle != "retired"
    )
    if online is True:
        out.append(device_state.c.online.is_(True))
    elif online is False:
        out.append(device_state.c.online.is_not(True))
    return out


def _last_values(device_type: str, topic: str | None, payload: bytes | None) -> dict[str, Any] | None:
    if topic is None or not topic.endswith("/telemetry"):
        return None
    body = payload_value(payload)
    model = THING_MODELS.get(device_type)
    if not isinstance(body, dict) or model is None:
        return None
    return {name: body[name] for name in model.fields_by_name if name in body}


def _status_out(row: Any, open_incidents: int) -> DeviceStatusOut:
    m = row._mapping
    plain = {k: m[k] for k in DeviceStatusOut.model_fields if k in m and k not in ("last_values",)}
    return DeviceStatusOut(
        **plain,
        last_values=_last_values(m["device_type"], m["last_topic"], m["last_payload"]),
        open_incidents=open_incidents,
    )


def _statuses(svc: Services, rows: Sequence[Any]) -> list[DeviceStatusOut]:
    per_device = svc.incidents.open_per_device([r.device_id for r in rows])
    return [_status_out(r, per_device.get(r.device_id, 0)) for r in rows]


@router.get("/device-status", summary="Devices with their status and last values, filtered and paged")
def device_status(
    principal: Viewer,
    svc: Svc,
    community: str | None = None,
    grid_code: str | None = None,
    building: str | None = None,
    device_type: Annotated[str | None, Query(alias="type", description="device type")] = None,
    lifecycle: Annotated[Lifecycle | None, Query(description="default: every one but retired")] = None,
    online: Annotated[bool | None, Query(description="true: online; false: offline or no status yet")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DeviceStatusPage:
    """By device id. `last_values` come from the last message the gateway kept (for a chart over time,
    `GET /devices/{id}/readings`)."""
    where = _device_filters(
        _listing(principal, community),
        grid_code=grid_code,
        building=building,
        device_type=device_type,
        lifecycle=lifecycle,
        online=online,
    )
    page = (
        select(*_STATUS_COLUMNS)
        .select_from(_WITH_STATE)
        .where(*where)
        .order_by(devices.c.device_id)
        .limit(limit)
        .offset(offset)
    )
    with svc.engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(_WITH_STATE).where(*where)).scalar_one())
        rows = conn.execute(page).all()
    return DeviceStatusPage(items=_statuses(svc, rows), total=total, limit=limit, offset=offset)


def _device_in_scope(engine: Engine, principal: Principal, device_id: str) -> Any:
    with engine.connect() as conn:
        row = conn.execute(
            select(*_STATUS_COLUMNS).select_from(_WITH_STATE).where(devices.c.device_id == device_id)
        ).first()
    if row is None or not _reaches(
        principal, Location(district=row.district, street=row.street, community=row.community)
    ):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no device {device_id!r}")
    return row


@router.get(
    "/device-status/{device_id}",
    summary="One device with its status and last values",
    responses=_404_DEVICE,
)
def one_device_status(device_id: str, principal: Viewer, svc: Svc) -> DeviceStatusOut:
    return _statuses(svc, [_device_in_scope(svc.engine, principal, device_id)])[0]


# -- readings ---------------------------------------------------------------------------------------------


class FieldOut(BaseModel):
    unit: str
    kind: Literal["float", "integer", "bool", "string"]
    aggregate: Literal["mean", "last"] = Field(description="how each bucket summarises it")


class ReadingsOut(BaseModel):
    device_id: str
    device_type: str
    since: dt.datetime
    until: dt.datetime = Field(description="exclusive")
    interval_s: float = Field(description="the length of one bucket")
    fields: dict[str, FieldOut]
    points: list[dict[str, Any]] = Field(
        description="one per bucket with data, oldest first: `time` (the bucket's start) and each field"
    )


@router.get(
    "/devices/{device_id}/readings",
    summary="A device's readings over a time range, downsampled for a chart",
    responses={
        **_404_DEVICE,
        502: {"description": "InfluxDB refused the query"},
        503: {"description": "InfluxDB cannot answer now"},
    },
)
def device_readings(
    device_id: str,
    principal: Viewer,
    svc: Svc,
    field: Annotated[
        list[str] | None,
        Query(
            description="telemetry field(s) of the device's type, repeated or comma-separated; default all"
        ),
    ] = None,
    since: Annotated[str, Query(description=SINCE_HELP)] = "24h",
    until: Annotated[str | None, Query(description=f"{SINCE_HELP}; default now")] = None,
    points: Annotated[int, Query(ge=1, le=MAX_POINTS, description="at most this many buckets")] = 300,
) -> ReadingsOut:
    """The range [since, until) is cut into `points` equal buckets (at least 1 s each); numbers are
    averaged per bucket, booleans and text give the bucket's last value. Buckets without data are left
    out. 422 for a field the type does not have, an empty or reversed range, one longer than 400 days."""
    device = _device_in_scope(svc.engine, principal, device_id)
    model = THING_MODELS.get(device.device_type)
    if model is None:
        raise HTTPException(422, detail=f"device type {device.device_type!r} has no thing model")
    names = [n.strip() for item in field or () for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in model.fields_by_name]
    if unknown:
        raise HTTPException(
            422,
            detail=f"field: {', '.join(map(repr, unknown))} is not a telemetry field of {model.type}; "
            f"its fields: {', '.join(model.fields_by_name)}",
        )
    chosen = [model.fields_by_name[n] for n in dict.fromkeys(names)] or list(model.telemetry)
    now = dt.datetime.now(dt.UTC)
    start = parse_since(since, now=now)
    end = parse_since(until, now=now, name="until") or now
    assert start is not None
    try:
        series = svc.readings.downsampled(model.type, device_id, reader_fields(chosen), start, end, points)
    except ValueError as exc:
        raise HTTPException(422, detail=f"since/until: {exc}") from None
    except ReadingsUnavailableError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc), headers={"Retry-After": "10"}
        ) from None
    except ReadingsQueryError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(exc)) from None
    return ReadingsOut(
        device_id=device_id,
        device_type=model.type,
        since=series.window.since,
        until=series.window.until,
        interval_s=series.window.interval_ms / 1000,
        fields={
            f.name: FieldOut(unit=f.unit, kind=f.type_name, aggregate=series.fields[f.name]) for f in chosen
        },
        points=[{**row, "time": rfc3339(row["time"])} for row in series.rows],
    )


# -- overview ---------------------------------------------------------------------------------------------

Grouping = Literal["community", "grid", "building", "type"]
#: the key fields of each grouping (a grid code is unique, a building name only within its grid)
GROUP_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "community": ("community",),
    "grid": ("community", "grid_code"),
    "building": ("community", "grid_code", "building"),
    "type": ("device_type",),
}
_DEVICE_KEY_COLUMNS: Final = {
    "community": devices.c.community,
    "grid_code": devices.c.grid_code,
    "building": devices.c.building,
    "device_type": devices.c.device_type,
}


class OnlineCountsOut(BaseModel):
    total: int = 0
    online: int = 0
    offline: int = 0
    unknown: int = Field(0, description="no status yet")

    def add(self, state: str, n: int) -> None:
        self.total += n
        setattr(self, state, getattr(self, state) + n)


class DeviceCountsOut(OnlineCountsOut):
    """Devices not retired (retired ones show only under by_lifecycle)."""

    by_lifecycle: dict[str, OnlineCountsOut] = Field(default_factory=dict)


INCIDENT_COUNT_STATES: Final = ("unacknowledged", "acknowledged", "resolved")


class IncidentCountsOut(BaseModel):
    open: int = Field(0, description="open incidents")
    by_urgency: dict[str, int] = Field(
        default_factory=lambda: dict.fromkeys(URGENCIES, 0), description="open incidents per urgency"
    )
    by_status: dict[str, int] = Field(
        default_factory=lambda: dict.fromkeys(INCIDENT_COUNT_STATES, 0),
        description="open ones not yet acknowledged, open ones acknowledged, and those resolved since "
        "`resolved_since`",
    )

    def add(self, urgency: str, n: int) -> None:
        self.open += n
        self.by_urgency[urgency] = self.by_urgency.get(urgency, 0) + n

    def add_status(self, state: str, n: int) -> None:
        self.by_status[state] = self.by_status.get(state, 0) + n


class OverviewRowOut(BaseModel):
    key: dict[str, str | None] = Field(description="the group: e.g. {community, grid_code} for by=grid")
    devices: DeviceCountsOut = Field(default_factory=DeviceCountsOut)
    incidents: IncidentCountsOut = Field(default_factory=IncidentCountsOut)


class OverviewOut(BaseModel):
    by: Grouping
    rows: list[OverviewRowOut]
    totals: OverviewRowOut


def _sort_key(key: tuple[str | None, ...]) -> tuple[tuple[bool, str], ...]:
    return tuple((v is None, v or "") for v in key)


@router.get("/overview", summary="Counts by community, grid, building or device type")
def overview(
    principal: Viewer,
    svc: Svc,
    by: Grouping = "community",
    community: str | None = None,
    grid_code: str | None = None,
    resolved_since: Annotated[
        str, Query(description=f"count incidents resolved since: {SINCE_HELP}")
    ] = "24h",
) -> OverviewOut:
    """Per group: devices (not retired) online / offline / no status yet, the same per lifecycle, open
    incidents per urgency, and incidents by status (open unacknowledged, open acknowledged, resolved
    since `resolved_since`, default the last 24 h), commissioning noise left out, all within the key's
    scope. `community` and `grid_code` narrow it (e.g. by=building within one community)."""
    resolved_from = parse_since(resolved_since, name="resolved_since")
    if resolved_from is None:
        raise HTTPException(422, detail="resolved_since: give a duration (24h) or a time")
    keys = GROUP_KEYS[by]
    in_scope = _listing(principal, community)
    incidents_in_scope = _incidents_listing(principal, community)
    where = {k: v for k, v in (("grid_code", grid_code),) if v is not None}
    rows: dict[tuple[str | None, ...], OverviewRowOut] = {}
    totals = OverviewRowOut(key={})

    def row(key: tuple[str | None, ...]) -> OverviewRowOut:
        if key not in rows:
            rows[key] = OverviewRowOut(key=dict(zip(keys, key, strict=True)))
        return rows[key]

    key_columns = [_DEVICE_KEY_COLUMNS[k] for k in keys]
    state = case(
        (device_state.c.online.is_(True), "online"),
        (device_state.c.online.is_(False), "offline"),
        else_="unknown",
    )
    conds = [in_scope, *(_DEVICE_KEY_COLUMNS[k] == v for k, v in where.items())]
    q = (
        select(*key_columns, devices.c.lifecycle, state, func.count())
        .select_from(_WITH_STATE)
        .where(*conds)
        .group_by(*key_columns, devices.c.lifecycle, state)
    )
    with svc.engine.connect() as conn:
        device_rows = conn.execute(q).all()
    for r in device_rows:
        key, lifecycle, online, n = tuple(r[: len(keys)]), r[-3], r[-2], int(r[-1])
        for target in (row(key).devices, totals.devices):
            target.by_lifecycle.setdefault(lifecycle, OnlineCountsOut()).add(online, n)
            if lifecycle != "retired":
                target.add(online, n)
    for key, urgency, n in svc.incidents.open_counts(keys, matching=where, where=[incidents_in_scope]):
        row(key).incidents.add(urgency, n)
        totals.incidents.add(urgency, n)
    for key, state_name, n in svc.incidents.status_counts(
        keys, resolved_since=resolved_from, matching=where, where=[incidents_in_scope]
    ):
        row(key).incidents.add_status(state_name, n)
        totals.incidents.add_status(state_name, n)
    ordered = [rows[k] for k in sorted(rows, key=_sort_key)]
    return OverviewOut(by=by, rows=ordered, totals=totals)
