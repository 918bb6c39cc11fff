"""The incident as the case system receives it (`data` of incident-delivery v1), in the spec's JSON shape.

Fields beyond the contract's table (receivers ignore what they do not know):
`commissioning` (raised while the device was not in service: kept, not delivered), `escalation` (a hint for
the escalation stage, e.g. smoke → 119 if not acknowledged in 5 min), `dispatch_to` (everyone the routing
table says must act, the responsible unit first), `members` (the devices of a group incident) and
`resolution` (`cleared`, or `grouped` when a device alarm was taken into a group incident), and
`assigned_to` / `assigned_at` / `assigned_by` (a property manager gave it to someone: local bookkeeping,
published on the local MQTT topic only, not sent to the case system, which dispatches by itself).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Protocol, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator

Urgency: TypeAlias = Literal["P1", "P2", "P3", "P4"]
CaseType: TypeAlias = Literal["component", "event"]
EventType: TypeAlias = Literal["sc.incident.opened", "sc.incident.updated", "sc.incident.resolved"]
EVENT_TYPES: Final[tuple[EventType, ...]] = get_args(EventType)
#: the local time of the case system (ids carry its date, working days are its weekdays)
LOCAL_TZ: Final = dt.timezone(dt.timedelta(hours=8))
INCIDENT_ID_RE: Final = re.compile(r"INC-[0-9]{8}-[0-9]{6,}")


def rfc3339(t: dt.datetime) -> str:
    """UTC, milliseconds, `Z` (2026-11-21T08:00:01.250Z)."""
    if t.tzinfo is None:
        raise ValueError("naive datetime: give a timezone")
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    if t is not None and t.tzinfo is None:
        raise ValueError("naive datetime: give a timezone")
    return t


Time = Annotated[dt.datetime, PlainSerializer(rfc3339, return_type=str, when_used="json")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceRef(_Frozen):
    id: str | None
    type: str
    component_code: str | None = None


class Location(_Frozen):
    district: str | None = None
    street: str | None = None
    community: str | None = None
    grid_code: str | None = None
    building: str | None = None
    address: str | None = None
    lat: float | None = None
    lon: float | None = None


class IncidentEvidence(_Frozen):
    ts: Time
    values: dict[str, Any]
    threshold: str

    _aware = field_validator("ts")(_aware)


class Escalation(_Frozen):
    """Escalate to `to` when the incident is not acknowledged within `after_s` of opening."""

    after_s: int = Field(ge=0)
    to: str


class Incident(_Frozen):
    incident_id: str = Field(pattern=INCIDENT_ID_RE.pattern)
    dedup_key: str
    rule_id: str
    title: str
    description: str
    urgency: Urgency
    case_type: CaseType
    class_code: str
    class_name: str
    status: str
    device: DeviceRef
    location: Location
    responsible_unit: str | None
    evidence: IncidentEvidence
    occurrences: int = Field(ge=1)
    opened_at: Time
    updated_at: Time
    resolved_at: Time | None = None
    respond_by: Time | None
    resolve_by: Time | None
    # extensions (see the module docstring)
    commissioning: bool = False
    escalation: Escalation | None = None
    dispatch_to: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    resolution: str | None = None
    #: the case system's id for it, once it reported one (back-channel)
    case_id: str | None = None
    #: first acknowledgement (the case system reported it dispatched / in progress, or a manager acked it)
    acknowledged_at: Time | None = None
    acknowledged_by: str | None = None
    #: 0, or 1 once escalated (a P1 not acknowledged within its respond-by time)
    escalation_level: int = Field(0, ge=0)
    escalated_at: Time | None = None
    #: reminders sent for a long-open incident
    reminders: int = Field(0, ge=0)
    #: who a manager gave it to (a person or team, free text), when and by whom (None: nobody)
    assigned_to: str | None = None
    assigned_at: Time | None = None
    assigned_by: str | None = None

    _aware = field_validator(
        "opened_at",
        "updated_at",
        "resolved_at",
        "respond_by",
        "resolve_by",
        "acknowledged_at",
        "escalated_at",
        "assigned_at",
    )(_aware)

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None

    def to_json(self) -> dict[str, Any]:
        """The `data` of a CloudEvent: plain JSON types, RFC 3339 UTC times with `Z`."""
        return self.model_dump(mode="json")


def incident_id(day: dt.date, seq: int) -> str:
    """`INC-YYYYMMDD-NNNNNN` (the local date; the sequence of that day, at least 6 digits)."""
    if seq < 1:
        raise ValueError("incident sequence numbers start at 1")
    return f"INC-{day:%Y%m%d}-{seq:06d}"


def dedup_key(key: str, rule_id: str) -> str:
    """`{device_id}:{rule_id}`, or `{group key}:{rule_id}` for a group alarm."""
    return f"{key}:{rule_id}"


class DeviceLike(Protocol):
    """What the incident stage reads of a registry device (gateway.registry.DeviceInfo or RegisteredDevice;
    `address`, `lat` and `lon` are read when present: RegisteredDevice has them, DeviceInfo does not)."""

    @property
    def device_id(self) -> str: ...
    @property
    def device_type(self) -> str: ...
    @property
    def community(self) -> str | None: ...
    @property
    def grid_code(self) -> str | None: ...
    @property
    def district(self) -> str | None: ...
    @property
    def street(self) -> str | None: ...
    @property
    def building(self) -> str | None: ...
    @property
    def responsible_unit(self) -> str | None: ...
    @property
    def lifecycle(self) -> str: ...
    @property
    def component_code(self) -> str | None: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...
