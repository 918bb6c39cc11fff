"""Hand-off types between pipeline stages: each stage takes one of these and emits the next."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

Kind = Literal["telemetry", "event", "status"]


class DeviceLike(Protocol):
    """What the decode stage needs of a registry entry (gateway.registry.DeviceInfo satisfies it)."""

    @property
    def device_id(self) -> str: ...
    @property
    def device_type(self) -> str: ...
    @property
    def community(self) -> str | None: ...
    @property
    def grid_code(self) -> str | None: ...
    @property
    def lifecycle(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One MQTT message as it came off the wire, with the broker's id for the deferred acknowledgement."""

    topic: str
    payload: bytes
    received_ms: int
    mid: int = 0
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Reading:
    """A validated, enriched message: what the store writes and the rules evaluate."""

    device: DeviceLike
    kind: Kind
    ts_ms: int
    values: dict[str, Any]
    seq: int | None = None
    event: str | None = None
    ts_trusted: bool = True
    received_ms: int = 0

    @property
    def device_id(self) -> str:
        return self.device.device_id

    @property
    def device_type(self) -> str:
        return self.device.device_type


class Reason(StrEnum):
    """Why a message was set aside. Values are stable machine codes (metrics labels, dead-letter rows)."""

    OVERSIZE = "oversize"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_TYPE = "unknown_type"
    UNREGISTERED_DEVICE = "unregistered_device"
    TYPE_MISMATCH = "type_mismatch"
    DEVICE_DISABLED = "device_disabled"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    BAD_VALUE = "bad_value"
    MISSING_FIELD = "missing_field"
    UNKNOWN_EVENT = "unknown_event"
    BAD_TIMESTAMP = "bad_timestamp"
    EMPTY = "empty"
    DB_REJECTED = "db_rejected"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message the gateway could not accept, with the reason; it goes to the dead-letter store."""

    raw: RawMessage
    reason: Reason
    detail: str
    device_id: str | None = None
    device_type: str | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A message already taken (QoS 1 redelivery or a device resend with the same seq).

    Counted, not stored.
    """

    raw: RawMessage
    device_id: str
    seq: int


Outcome = Reading | Rejection | Duplicate
