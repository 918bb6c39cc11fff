"""Request and response bodies of the API (what the OpenAPI document shows)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from gateway.deadletter import DeviceState, StoredDeadLetter, UnknownDevice
from gateway.installers import DeviceCredentials
from gateway.registry import (
    Change,
    DeviceEvent,
    DeviceProgress,
    Place,
    RegisteredDevice,
    ResponsibleUnit,
)

AttributeValue = str | int | float | bool | None
Lifecycle = Literal["registered", "online", "in_service", "disabled", "retired"]
DeviceType = Literal["manhole_cover", "streetlight", "access_control", "parking_sensor", "smoke_detector"]

_EXAMPLE_DEVICE: dict[str, Any] = {
    "device_id": "mh-0001",
    "device_type": "manhole_cover",
    "community": "东华门社区",
    "grid_code": "110101001001001",
    "district": "东城区",
    "street": "东华门街道",
    "building": "3",
    "address": "东华门大街 1 号",
    "lat": 39.91,
    "lon": 116.40,
    "responsible_unit": "市自来水集团",
    "component_code": "1101010101000001",
    "install_date": "2026-11-20",
    "firmware": "1.4.2",
    "batch": "2026-11-dhm-1",
    "attributes": {"owner_class": "0101", "tilt_baseline_deg": 1.5, "depth_cm": 180},
}


_Out = TypeVar("_Out", bound=BaseModel)


def _from_attributes(model: type[_Out], source: object, **computed: Any) -> _Out:
    """`model` with every field not in `computed` taken from the same-named attribute of `source`."""
    copied = {name: getattr(source, name) for name in model.model_fields if name not in computed}
    return model(**copied, **computed)


def _base64(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def payload_value(payload: bytes | None) -> Any:
    """A stored payload as JSON when it is JSON, else as text when it is UTF-8, else None."""
    if payload is None:
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


class ErrorOut(BaseModel):
    """Every error answer: what is wrong, in one sentence; for 422 also each field's problem."""

    detail: str
    errors: list[FieldErrorOut] | None = None


class FieldErrorOut(BaseModel):
    field: str = Field(description="where: body.grid_code, query.limit, body.3.device_id (row 3) ...")
    message: str
    input: Any = None


ErrorOut.model_rebuild()

# ---------------------------------------------------------------------------------------------
# Devices


class DeviceIn(BaseModel):
    """A device to register. Codes are checked as api/README.md says (grid code 15 or 14 digits;
    component code 16 digits whose class fits the type); attributes are the type's declared ones."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE_DEVICE]})

    device_id: str = Field(description="1-64 of A-Z a-z 0-9 _ -; also the MQTT username and client id")
    device_type: str = Field(description="manhole_cover, streetlight, access_control, parking_sensor, ...")
    community: str
    grid_code: str = Field(description="unit grid code, 15 digits (14 accepted)")
    district: str | None = None
    street: str | None = None
    building: str | None = None
    address: str | None = None
    lat: float | None = None
    lon: float | None = None
    responsible_unit: str | None = None
    component_code: str | None = Field(None, description="component identification code, 16 digits")
    install_date: dt.date | None = None
    firmware: str | None = None
    batch: str | None = Field(None, description="installation batch, for commissioning a batch at once")
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)


class DevicePatch(BaseModel):
    """Fields to change (JSON merge patch): a field given as null is cleared, an absent one is kept; in
    `attributes`, a key given as null is removed. The id and the type cannot change."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"building": "5", "firmware": "1.5.0"}]}
    )

    device_type: str | None = Field(None, description="cannot change: 409 if it differs")
    community: str | None = None
    grid_code: str | None = None
    district: str | None = None
    street: str | None = None
    building: str | None = None
    address: str | None = None
    lat: float | None = None
    lon: float | None = None
    responsible_unit: str | None = None
    component_code: str | None = None
    install_date: dt.date | None = None
    firmware: str | None = None
    batch: str | None = None
    attributes: dict[str, AttributeValue] | None = None


class MoveIn(BaseModel):
    """The device's new place. Place fields not given are cleared (the old building, address and
    coordinates are wrong at the new place)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"community": "西华门社区", "grid_code": "110101001002003", "building": "7"}]
        },
    )

    community: str
    grid_code: str
    district: str | None = None
    street: str | None = None
    building: str | None = None
    address: str | None = None
    lat: float | None = None
    lon: float | None = None


class DeviceOut(BaseModel):
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
    component_code: str | None
    install_date: dt.date | None
    firmware: str | None
    batch: str | None
    attributes: dict[str, AttributeValue]
    in_service_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int = Field(description="registry version of the device's last change")

    @classmethod
    def of(cls, device: RegisteredDevice) -> DeviceOut:
        return cls.model_validate(device.as_dict())


class DeviceStateOut(BaseModel):
    """What the gateway has seen of the device."""

    online: bool | None = Field(description="what its last status said (None: no status yet)")
    last_seen: dt.datetime | None
    last_status_at: dt.datetime | None
    fw: str | None = Field(description="firmware its status reported")
    last_seq: int | None
    last_topic: str | None
    last_payload: Any = Field(None, description="the last message it sent: JSON, or text")
    seen_fields: list[str]
    missing_fields: list[str] = Field(description="commissioning fields it has not reported yet")

    @classmethod
    def of(cls, state: DeviceState, required: tuple[str, ...]) -> DeviceStateOut:
        seen = sorted(state.seen_fields or ())
        return _from_attributes(
            cls,
            state,
            last_payload=payload_value(state.last_payload),
            seen_fields=seen,
            missing_fields=[f for f in required if f not in seen],
        )


class DeviceDetail(DeviceOut):
    state: DeviceStateOut | None = Field(description="None: never heard from")


class CredentialsOut(BaseModel):
    """The device's MQTT login. Shown once: the password is stored nowhere but in the broker's hash."""

    username: str
    password: str
    client_id: str

    @classmethod
    def of(cls, credentials: DeviceCredentials) -> CredentialsOut:
        return cls(**credentials.as_dict())


class DeviceCreated(BaseModel):
    device: DeviceOut
    credentials: CredentialsOut | None = Field(description="None when issue_credentials=false")


class ChangeOut(BaseModel):
    device: DeviceOut
    changed: bool = Field(description="false: it already was so (nothing written)")

    @classmethod
    def of(cls, change: Change) -> ChangeOut:
        return cls(device=DeviceOut.of(change.device), changed=change.changed)


class RotatedOut(BaseModel):
    device: DeviceOut
    credentials: CredentialsOut


class DevicePage(BaseModel):
    items: list[DeviceOut]
    total: int = Field(description="devices matching the filters")
    limit: int
    offset: int


class DeviceEventOut(BaseModel):
    id: int
    at: dt.datetime
    action: str = Field(
        description="created, updated, moved, disabled, enabled, retired, confirmed, online, ..."
    )
    actor: str | None
    version: int | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, event: DeviceEvent) -> DeviceEventOut:
        return cls.model_validate(event.as_dict())


# ---------------------------------------------------------------------------------------------
# Import


class ImportRowOut(BaseModel):
    row: int = Field(description="CSV: the spreadsheet row (header = 1); JSON: the 1-based position")
    device_id: str | None
    outcome: Literal["created", "updated", "unchanged", "error"]
    error: str | None = None
    credentials: CredentialsOut | None = Field(None, description="for created devices, shown once")


class ImportOut(BaseModel):
    dry_run: bool
    version: int | None = Field(description="registry version after the import (None for a dry run)")
    counts: dict[str, int]
    aborted: str | None = Field(None, description="why the import stopped before the end (rows after: error)")
    rows: list[ImportRowOut]


# ---------------------------------------------------------------------------------------------
# Commissioning and dead letters


class DeviceProgressOut(BaseModel):
    device_id: str
    device_type: str
    lifecycle: Lifecycle
    community: str | None
    grid_code: str | None
    building: str | None
    batch: str | None
    heard_from: bool
    online: bool | None
    last_seen: dt.datetime | None
    fw: str | None
    last_topic: str | None
    last_payload: Any = Field(None, description="the last message it sent: JSON, or text")
    seen_fields: list[str]
    missing_fields: list[str] = Field(description="commissioning fields it has not reported yet")

    @classmethod
    def of(cls, p: DeviceProgress) -> DeviceProgressOut:
        return _from_attributes(
            cls,
            p,
            last_payload=payload_value(p.last_payload),
            seen_fields=list(p.seen_fields),
            missing_fields=list(p.missing_fields),
        )


class CommissioningOut(BaseModel):
    filter: dict[str, str]
    total: int
    counts: dict[str, int] = Field(description="devices per lifecycle")
    not_heard_from: int = Field(description="devices that never sent a message")
    devices: list[DeviceProgressOut] = Field(
        description="not yet in service first, never heard from before heard from, then by id"
    )


class UnknownDeviceOut(BaseModel):
    device_id: str
    device_type: str | None
    topic: str
    count: int
    first_seen: dt.datetime
    last_seen: dt.datetime
    last_payload: Any = Field(None, description="JSON, or text")
    last_payload_base64: str
    last_payload_size: int

    @classmethod
    def of(cls, u: UnknownDevice) -> UnknownDeviceOut:
        return _from_attributes(
            cls,
            u,
            last_payload=payload_value(u.last_payload),
            last_payload_base64=_base64(u.last_payload),
        )


class DeadLetterOut(BaseModel):
    id: int
    received_at: dt.datetime
    topic: str
    device_id: str | None
    device_type: str | None
    reason: str
    detail: str
    payload: Any = Field(None, description="JSON, or text")
    payload_base64: str
    payload_size: int
    truncated: bool

    @classmethod
    def of(cls, d: StoredDeadLetter) -> DeadLetterOut:
        return _from_attributes(cls, d, payload=payload_value(d.payload), payload_base64=_base64(d.payload))


# ---------------------------------------------------------------------------------------------
# Places and responsible units


class PlaceOut(BaseModel):
    code: str
    level: Literal["district", "street", "community", "grid"]
    name: str
    parent_code: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, place: Place) -> PlaceOut:
        return cls.model_validate(place.as_dict())


class UnitOut(BaseModel):
    unit_id: str
    name: str
    kind: str | None
    contact: str | None
    created_at: dt.datetime

    @classmethod
    def of(cls, unit: ResponsibleUnit) -> UnitOut:
        return cls.model_validate(unit.as_dict())
