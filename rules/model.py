"""Hand-off types of the rules engine: the Observation it reads, the Signal a rule kind emits, the Verdict
the engine hands on, and the attribute references and group keys rule parameters use."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeAlias

from pydantic import BaseModel, ConfigDict, model_validator

Kind: TypeAlias = Literal["telemetry", "event", "status"]
Urgency: TypeAlias = Literal["P1", "P2", "P3", "P4"]
#: P1 is the most severe; comparing the strings orders them ("P1" < "P2").
URGENCIES: tuple[Urgency, ...] = ("P1", "P2", "P3", "P4")
VerdictState: TypeAlias = Literal["firing", "cleared"]
Change: TypeAlias = Literal["opened", "escalated", "repeated", "flapping", "cleared"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Observation:
    """One accepted message of one device with the device context rules need (from the registry).

    `ts_ms` is the device's time (the receive time when the device sent none or an untrusted one);
    `received_ms` is the gateway's clock when it arrived. Durations measured between two observations
    use device time (a device clock offset cancels out); durations that only time can end (`tick`)
    use the gateway clock from when the starting observation was received.
    """

    device_id: str
    device_type: str
    kind: Kind
    ts_ms: int
    received_ms: int
    values: Mapping[str, Any]
    event: str | None = None
    seq: int | None = None
    community: str | None = None
    grid_code: str | None = None
    building: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    lifecycle: str = "in_service"


def observation_of(reading: Any) -> Observation:
    """The Observation of a gateway Reading (duck-typed: rules do not import the gateway)."""
    device = reading.device
    return Observation(
        device_id=device.device_id,
        device_type=device.device_type,
        kind=reading.kind,
        ts_ms=reading.ts_ms,
        received_ms=reading.received_ms or reading.ts_ms,
        values=reading.values,
        event=reading.event,
        seq=reading.seq,
        community=device.community,
        grid_code=device.grid_code,
        building=getattr(device, "building", None),
        attributes=getattr(device, "attributes", None) or _EMPTY,
        lifecycle=device.lifecycle,
    )


def context_json(obs: Observation) -> dict[str, Any]:
    """The device context of an observation as JSON (kept in snapshots for time-driven verdicts)."""
    return {
        "device_type": obs.device_type,
        "community": obs.community,
        "grid_code": obs.grid_code,
        "building": obs.building,
        "attributes": dict(obs.attributes),
        "lifecycle": obs.lifecycle,
    }


def context_from_json(device_id: str, data: Mapping[str, Any]) -> Observation:
    """A context-only observation (no values) rebuilt from `context_json`."""
    return Observation(
        device_id=device_id,
        device_type=data["device_type"],
        kind="status",
        ts_ms=0,
        received_ms=0,
        values=_EMPTY,
        community=data.get("community"),
        grid_code=data.get("grid_code"),
        building=data.get("building"),
        attributes=MappingProxyType(dict(data.get("attributes") or {})),
        lifecycle=data.get("lifecycle", "in_service"),
    )


class Signal(NamedTuple):
    """What a rule kind says about one key (a device id or a group key) at one moment.

    The engine turns signals into Verdicts: it adds the rule's id, urgency and message and keeps the
    alarm bookkeeping (one open alarm per key, escalation, repeats, flapping).
    """

    key: str
    firing: bool
    ts_ms: int
    #: 0: the rule's base urgency; i > 0: the params' levels[i - 1]
    level: int = 0
    values: Mapping[str, Any] = _EMPTY
    threshold: str = ""
    #: a new occurrence while already firing (another matching event, a new group member)
    occurrence: bool = False
    members: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Evidence:
    """Why a verdict was given: the time and values seen, and the threshold they were compared with."""

    ts_ms: int
    values: Mapping[str, Any]
    threshold: str

    def to_json(self) -> dict[str, Any]:
        return {"ts_ms": self.ts_ms, "values": dict(self.values), "threshold": self.threshold}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a rule says about a device or a group: firing or cleared, how urgent, why, in both languages.

    `change` tells what happened to the (rule, key) alarm: `opened`, `escalated` (urgency rose while
    firing), `repeated` (another occurrence counted on the open alarm), `flapping` (a clear held back
    because the alarm flaps), `cleared`. `grouped_into` on a cleared verdict means the alarm was taken
    into a group alarm with that key (it did not end).
    """

    rule_id: str
    key: str
    device_id: str | None
    device_type: str
    state: VerdictState
    change: Change
    urgency: Urgency
    evidence: Evidence
    message_zh: str
    message_en: str
    since_ms: int
    occurrences: int = 1
    flapping: bool = False
    members: tuple[str, ...] = ()
    grouped_into: str | None = None
    community: str | None = None
    grid_code: str | None = None

    @property
    def message(self) -> str:
        """Chinese first, then English."""
        return f"{self.message_zh} / {self.message_en}"


class AttrRef(BaseModel):
    """A number taken from a registry attribute of the device: `attr × times + plus`, clamped to min/max.

    `default` stands in for the attribute when a device does not have it; without a default such a
    device is not judged by the rule (YAML: `{attr: tilt_baseline_deg, plus: 10, default: 0}`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    attr: str
    times: float = 1.0
    plus: float = 0.0
    min: float | None = None
    max: float | None = None
    default: float | None = None

    def resolve(self, attributes: Mapping[str, Any]) -> float | None:
        raw = attributes.get(self.attr)
        if raw is None or isinstance(raw, bool) or not isinstance(raw, int | float):
            raw = self.default
            if raw is None:
                return None
        value = raw * self.times + self.plus
        if self.min is not None and value < self.min:
            value = self.min
        if self.max is not None and value > self.max:
            value = self.max
        return float(value)

    def text(self) -> str:
        s = self.attr if self.times == 1 else f"{self.attr}×{_fmt(self.times)}"
        if self.plus:
            s += f"{'+' if self.plus > 0 else '-'}{_fmt(abs(self.plus))}"
        if self.default is not None:
            s += f" (default {_fmt(self.default)})"
        return s


#: a number in rule parameters: a constant or a registry attribute reference
Num: TypeAlias = float | AttrRef


def resolve(num: Num, attributes: Mapping[str, Any]) -> float | None:
    """The value of a parameter number for a device (None: the device lacks the attribute)."""
    if isinstance(num, AttrRef):
        return num.resolve(attributes)
    return num


def num_attrs(*nums: Num | None) -> set[str]:
    """The attributes the given parameter numbers refer to."""
    return {n.attr for n in nums if isinstance(n, AttrRef)}


class AttrGroup(BaseModel):
    """Group devices by a registry attribute, e.g. `{attr: circuit}` (the supply circuit of a pole)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attr: str


#: how devices are grouped: the device itself, its building (within its community), grid, community,
#: or an attribute's value. Devices without the grouping value are not grouped.
GroupBy: TypeAlias = Literal["device", "building", "grid", "community"] | AttrGroup


def group_key(by: GroupBy, obs: Observation) -> str | None:
    """The key of the group `obs`'s device belongs to (None: the device has no such group)."""
    if by == "device":
        return obs.device_id
    if by == "building":
        return f"building:{obs.community or '-'}/{obs.building}" if obs.building else None
    if by == "grid":
        return f"grid:{obs.grid_code}" if obs.grid_code else None
    if by == "community":
        return f"community:{obs.community}" if obs.community else None
    assert isinstance(by, AttrGroup)
    value = obs.attributes.get(by.attr)
    # scoped by community like buildings: two communities' "1号回路" are different circuits
    return f"{by.attr}:{obs.community or '-'}/{value}" if value is not None and value != "" else None


class Level(BaseModel):
    """A more severe threshold inside a rule: reaching it raises the open alarm's urgency."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    urgency: Urgency
    above: Num | None = None
    at_least: Num | None = None
    below: Num | None = None
    at_most: Num | None = None

    @model_validator(mode="after")
    def _one_comparison(self) -> Level:
        given = [x for x in (self.above, self.at_least, self.below, self.at_most) if x is not None]
        if len(given) != 1:
            raise ValueError("a level has exactly one of above, at_least, below, at_most")
        return self


def _fmt(x: float) -> str:
    if math.isfinite(x) and float(x).is_integer():
        return str(int(x))
    return f"{x:g}"


def fmt_num(x: float) -> str:
    """A number as people write it (10, not 10.0)."""
    return _fmt(x)


class Compare(NamedTuple):
    """A resolved comparison: op is one of '>', '>=', '<', '<='."""

    op: str
    limit: float

    def test(self, v: float) -> bool:
        op = self.op
        if op == ">":
            return v > self.limit
        if op == ">=":
            return v >= self.limit
        if op == "<":
            return v < self.limit
        return v <= self.limit

    def text(self) -> str:
        return f"{self.op} {_fmt(self.limit)}"
