"""Rule kind `absence`: no message from a device for `k` × its type's report interval + `grace_s`.

Measured on the gateway's clock (`received_ms`), so a device clock that is off changes nothing. Any
accepted message is a sign of life except a status `{"online": false}` (the broker speaking for a device
that is gone: its last will). Per device; fires from `tick`, clears on the next message. Only devices
the engine has heard from (or restored from a snapshot) are watched: a device that never spoke is a
commissioning matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from rules.model import Observation, Signal, fmt_num

NO_SIGNALS: tuple[Signal, ...] = ()


class AbsenceParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["absence"]
    k: float = Field(default=2, gt=0)
    #: the type's report interval; the loader fills it in from the thing model when not given
    interval_s: float | None = Field(default=None, gt=0)
    grace_s: float = Field(default=300, ge=0)

    def reads_fields(self) -> dict[str, str]:
        return {}

    def reads_events(self) -> tuple[str, ...]:
        return ()

    def reads_attrs(self) -> set[str]:
        return set()

    @cached_property
    def limit_ms(self) -> int:
        return int((self.k * (self.interval_s or 0) + self.grace_s) * 1000)

    def text(self) -> str:
        k, interval, grace = fmt_num(self.k), fmt_num(self.interval_s or 0), fmt_num(self.grace_s)
        return f"no message for {k} × {interval} s + {grace} s"


class AbsenceState(NamedTuple):
    last_rx: int
    firing: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"last_rx": self.last_rx, "firing": self.firing}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AbsenceState:
        return cls(int(data["last_rx"]), bool(data["firing"]))


State = AbsenceState
_new = tuple.__new__  # the NamedTuple's own __new__ is several times slower; this is the hot path


def evaluate(
    p: AbsenceParams, obs: Observation, state: State | None, now_ms: int
) -> tuple[tuple[Signal, ...], State | None]:
    if obs.kind == "status" and obs.values.get("online") is False:
        return NO_SIGNALS, state
    rx = obs.received_ms
    if state is None:
        return NO_SIGNALS, _new(AbsenceState, (rx, False))
    if rx <= state.last_rx:
        return NO_SIGNALS, state
    if state.firing:
        values = {"silent_s": (rx - state.last_rx) / 1000}
        return (Signal(obs.device_id, False, obs.ts_ms, 0, values, p.text()),), AbsenceState(rx)
    return NO_SIGNALS, _new(AbsenceState, (rx, False))


def tick(
    p: AbsenceParams, state: State | None, now_ms: int, key: str
) -> tuple[tuple[Signal, ...], State | None]:
    if state is None or state.firing or now_ms - state.last_rx <= p.limit_ms:
        return NO_SIGNALS, state
    values = {"last_seen_ms": state.last_rx, "silent_s": (now_ms - state.last_rx) / 1000}
    return (Signal(key, True, now_ms, 0, values, p.text()),), state._replace(firing=True)


def due(p: AbsenceParams, state: State | None) -> int | None:
    if state is None or state.firing:
        return None
    return state.last_rx + p.limit_ms + 1


def describe(p: AbsenceParams) -> str:
    return p.text()
