"""Rule kind `rate_of_change`: a numeric field that rose by at least `rise` (or fell by at least `fall`)
within `window_s` (device time), e.g. water coming up towards a manhole cover.

The change is the newest value against the lowest (rise) or highest (fall) value seen in the window,
so a slow drift does not fire and a step does. It clears when the change over the window is back under
`limit - clear_margin` (after `clear_hold_s`, if given).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rules import timer
from rules.model import Observation, Signal, fmt_num
from rules.timer import BAD, GOOD, NEUTRAL, NO_SIGNALS, TimerState


class RateOfChangeParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["rate_of_change"]
    field: str
    window_s: float = Field(gt=0)
    rise: float | None = Field(default=None, gt=0)
    fall: float | None = Field(default=None, gt=0)
    clear_margin: float = Field(default=0, ge=0)
    clear_hold_s: float = Field(default=0, ge=0)
    #: at most this many samples are kept per device (the window is thinned beyond it)
    max_samples: int = Field(default=64, ge=2, le=10000)

    @model_validator(mode="after")
    def _direction(self) -> RateOfChangeParams:
        if self.rise is None and self.fall is None:
            raise ValueError("give rise and/or fall")
        return self

    def reads_fields(self) -> dict[str, str]:
        return {self.field: "number"}

    def reads_events(self) -> tuple[str, ...]:
        return ()

    def reads_attrs(self) -> set[str]:
        return set()

    @cached_property
    def window_ms(self) -> int:
        return int(self.window_s * 1000)

    @cached_property
    def text(self) -> str:
        parts = []
        if self.rise is not None:
            parts.append(f"rise >= {fmt_num(self.rise)}")
        if self.fall is not None:
            parts.append(f"fall >= {fmt_num(self.fall)}")
        return " or ".join(parts) + f" within {fmt_num(self.window_s)} s"


class RateState(NamedTuple):
    #: (device time, value) in the window, in time order
    samples: tuple[tuple[int, float], ...] = ()
    timer: TimerState | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": [[t, v] for t, v in self.samples],
            "timer": None if self.timer is None else self.timer.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RateState:
        t = data.get("timer")
        return cls(
            tuple((int(a), float(b)) for a, b in data["samples"]),
            None if t is None else TimerState.from_json(t),
        )


State = RateState


def evaluate(
    p: RateOfChangeParams, obs: Observation, state: State | None, now_ms: int
) -> tuple[tuple[Signal, ...], State | None]:
    v = obs.values.get(p.field)
    if v is None or obs.kind != "telemetry":
        return NO_SIGNALS, state
    ts = obs.ts_ms
    samples = [] if state is None else [s for s in state.samples if s[0] >= ts - p.window_ms]
    samples.append((ts, float(v)))
    if len(samples) > p.max_samples:
        samples = samples[:1] + samples[-(p.max_samples - 1) :]  # keep the window's oldest
    lo = min(x for _, x in samples)
    hi = max(x for _, x in samples)
    rose, fell = v - lo, hi - v
    bad = (p.rise is not None and rose >= p.rise) or (p.fall is not None and fell >= p.fall)
    if bad:
        cond = BAD
    else:
        m = p.clear_margin
        good = (p.rise is None or rose < p.rise - m) and (p.fall is None or fell < p.fall - m)
        cond = GOOD if good else NEUTRAL
    tstate = None if state is None else state.timer
    values = {p.field: v, "change": rose if (p.rise is not None and rose >= fell) else -fell}
    sigs, tnew = timer.step(
        tstate,
        obs.device_id,
        cond,
        ts,
        obs.received_ms,
        hold_ms=int(p.clear_hold_s * 1000),
        values=values,
        threshold=p.text,
    )
    return sigs, RateState(tuple(samples), tnew)


def tick(
    p: RateOfChangeParams, state: State | None, now_ms: int, key: str
) -> tuple[tuple[Signal, ...], State | None]:
    if state is None:
        return NO_SIGNALS, state
    if state.timer is not None and state.timer.due_ms >= 0:
        sigs, t = timer.tick(state.timer, key, now_ms)
        return sigs, state._replace(timer=t)
    # nothing pending: forget samples that have left the window (memory)
    return NO_SIGNALS, None if state.timer is None else state._replace(samples=())


def due(p: RateOfChangeParams, state: State | None) -> int | None:
    if state is None:
        return None
    d = timer.due(state.timer)
    if d is not None:
        return d
    if not state.samples:
        return None
    return None if state.timer is not None else state.samples[-1][0] + p.window_ms + 60_000


def describe(p: RateOfChangeParams) -> str:
    return f"{p.field}: {p.text}"
