"""Rule kind `state_duration`: a boolean or enumerated state held for at least `for_s` (door open, bay
occupied, detector off its base).

The state comes from a telemetry field (`field` equal to one of `equals`) and/or from events
(`on_events` enter it, `off_events` leave it). `for_s` may reference an attribute, e.g. a time-limited
bay's `{attr: time_limit_min, times: 60}`; it is resolved when the state is entered. `fire_on_events`
fire at once (the device itself says the limit is passed, e.g. `door_held_open`). Clears when the state
is left (after `clear_hold_s` out of it, if given).
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rules import timer
from rules.model import AttrRef, Num, Observation, Signal, fmt_num, num_attrs, resolve
from rules.timer import BAD, GOOD, NO_SIGNALS, TimerState

State = TimerState


class StateDurationParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["state_duration"]
    field: str | None = None
    #: the value(s) of `field` that mean "in the state"
    equals: tuple[bool | str, ...] = (True,)
    for_s: Num = 0.0
    on_events: tuple[str, ...] = ()
    off_events: tuple[str, ...] = ()
    fire_on_events: tuple[str, ...] = ()
    clear_hold_s: float = Field(default=0, ge=0)

    @field_validator("equals", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return (v,) if isinstance(v, bool | str) else v

    @model_validator(mode="after")
    def _source(self) -> StateDurationParams:
        if self.field is None and not (self.on_events or self.fire_on_events):
            raise ValueError("a state_duration needs a field or on_events")
        if self.field is not None and not self.equals:
            raise ValueError("equals needs at least one value")
        if not isinstance(self.for_s, AttrRef) and self.for_s < 0:
            raise ValueError("for_s must be >= 0")
        return self

    def reads_fields(self) -> dict[str, str]:
        return {self.field: "state"} if self.field else {}

    def reads_events(self) -> tuple[str, ...]:
        return self.on_events + self.off_events + self.fire_on_events

    def reads_attrs(self) -> set[str]:
        return num_attrs(self.for_s)

    @cached_property
    def equals_set(self) -> frozenset[bool | str]:
        return frozenset(self.equals)

    @cached_property
    def hold_ms(self) -> int:
        return int(self.clear_hold_s * 1000)

    @cached_property
    def static_for_ms(self) -> int | None:
        return None if isinstance(self.for_s, AttrRef) else int(self.for_s * 1000)

    @cached_property
    def _texts(self) -> dict[int, str]:
        return {}

    def text(self, for_ms: int) -> str:
        t = self._texts.get(for_ms)
        if t is None:
            what = (
                self.field + " = " + "|".join(str(e).lower() for e in self.equals) if self.field else "state"
            )
            t = f"{what} for >= {fmt_num(for_ms / 1000)} s"
            if len(self._texts) < 1000:
                self._texts[for_ms] = t
        return t


def evaluate(
    p: StateDurationParams, obs: Observation, state: State | None, now_ms: int
) -> tuple[tuple[Signal, ...], State | None]:
    force = False
    if obs.kind == "event":
        ev = obs.event
        if ev in p.fire_on_events:
            cond, force = BAD, True
        elif ev in p.on_events:
            cond = BAD
        elif ev in p.off_events:
            cond = GOOD
        else:
            return NO_SIGNALS, state
        values: dict[str, object] = {"event": ev}
    else:
        if p.field is None:
            return NO_SIGNALS, state
        v = obs.values.get(p.field)
        if v is None:
            return NO_SIGNALS, state
        if v in p.equals_set:
            cond = BAD
        elif state is None:
            return NO_SIGNALS, state
        else:
            cond = GOOD
        values = {p.field: v}
    for_ms = p.static_for_ms
    if for_ms is None:
        limit = resolve(p.for_s, obs.attributes)
        if limit is None:
            return NO_SIGNALS, state
        for_ms = int(limit * 1000)
    return timer.step(
        state,
        obs.device_id,
        cond,
        obs.ts_ms,
        obs.received_ms,
        for_ms=for_ms,
        hold_ms=p.hold_ms,
        values=values,
        threshold=p.text(for_ms),
        force=force,
    )


def tick(
    p: StateDurationParams, state: State | None, now_ms: int, key: str
) -> tuple[tuple[Signal, ...], State | None]:
    return timer.tick(state, key, now_ms)


def due(p: StateDurationParams, state: State | None) -> int | None:
    return timer.due(state)


def describe(p: StateDurationParams) -> str:
    src = []
    if p.field:
        src.append(f"{p.field} = {'|'.join(str(e).lower() for e in p.equals)}")
    if p.on_events:
        src.append("after event " + "|".join(p.on_events))
    s = " or ".join(src)
    f = p.for_s.text() + " s" if isinstance(p.for_s, AttrRef) else f"{fmt_num(p.for_s)} s"
    if p.for_s != 0:
        s += f" held >= {f}"
    if p.fire_on_events:
        s += "; or event " + "|".join(p.fire_on_events)
    return s
