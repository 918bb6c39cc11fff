"""Rule kind `threshold`: a numeric field above / below limits, with for-duration, consecutive count,
escalation levels and hysteresis (clear margin and clear hold time).

Fires when the value is past a limit (`above`: >, `at_least`: >=, `below`: <, `at_most`: <=; a high and a
low limit together make a band, e.g. voltage outside 198-242 V), for `consecutive` readings and for
`for_s` seconds. Clears only when the value is back on the good side by `clear_margin` (strictly under
`limit - margin` for a high limit, strictly over `limit + margin` for a low one) and, with
`clear_hold_s`, stays there that long. "Tilt over 10°, clear back under 8°" is
`above: 10, clear_margin: 2`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rules import timer
from rules.model import AttrRef, Compare, Level, Num, Observation, Signal, fmt_num, num_attrs, resolve
from rules.timer import BAD, GOOD, NEUTRAL, NO_SIGNALS, TimerState

State = TimerState


class _Plan(NamedTuple):
    """Limits precomputed when no attribute references are involved."""

    static: bool
    hi: Compare | None
    lo: Compare | None
    levels: tuple[Compare, ...]
    text: str
    for_ms: int
    hold_ms: int
    #: static limits: values strictly inside (low, high) are past no limit (the engine's quick screen)
    band: tuple[float, float] | None


class ThresholdParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["threshold"]
    field: str
    above: Num | None = None
    at_least: Num | None = None
    below: Num | None = None
    at_most: Num | None = None
    #: more severe limits (most severe last); reaching one fires at once and raises the urgency
    levels: tuple[Level, ...] = ()
    for_s: float = Field(default=0, ge=0)
    consecutive: int = Field(default=1, ge=1)
    clear_margin: float = Field(default=0, ge=0)
    clear_hold_s: float = Field(default=0, ge=0)
    #: events of the device that mean the condition (e.g. a detector's own `low_battery`): fire at once
    fire_on_events: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _limits(self) -> ThresholdParams:
        if self.above is not None and self.at_least is not None:
            raise ValueError("give above or at_least, not both")
        if self.below is not None and self.at_most is not None:
            raise ValueError("give below or at_most, not both")
        if all(x is None for x in (self.above, self.at_least, self.below, self.at_most)):
            raise ValueError("a threshold needs one of above, at_least, below, at_most")
        hi, lo = self._hi(), self._lo()
        if isinstance(hi, float | int) and isinstance(lo, float | int) and hi <= lo:
            raise ValueError("the high limit must be over the low limit (fires outside the band)")
        urgencies = [lv.urgency for lv in self.levels]
        if urgencies != sorted(urgencies, reverse=True) or len(set(urgencies)) != len(urgencies):
            raise ValueError("levels go from less to more severe (e.g. P2 then P1)")
        return self

    def _hi(self) -> Num | None:
        return self.above if self.above is not None else self.at_least

    def _lo(self) -> Num | None:
        return self.below if self.below is not None else self.at_most

    def reads_fields(self) -> dict[str, str]:
        return {self.field: "number"}

    def reads_events(self) -> tuple[str, ...]:
        return self.fire_on_events

    def reads_attrs(self) -> set[str]:
        nums: list[Num | None] = [self.above, self.at_least, self.below, self.at_most]
        for lv in self.levels:
            nums += [lv.above, lv.at_least, lv.below, lv.at_most]
        return num_attrs(*nums)

    @cached_property
    def plan(self) -> _Plan:
        static = not self.reads_attrs()
        hi = lo = None
        levels: tuple[Compare, ...] = ()
        text = ""
        band = None
        if static:
            got = _compares(self, {})
            assert got is not None
            hi, lo, levels = got
            text = _text(hi, lo)
            cmps = [c for c in (hi, lo, *levels) if c is not None]
            band = (
                max([c.limit for c in cmps if c.op in ("<", "<=")], default=-math.inf),
                min([c.limit for c in cmps if c.op in (">", ">=")], default=math.inf),
            )
        for_ms, hold_ms = int(self.for_s * 1000), int(self.clear_hold_s * 1000)
        return _Plan(static, hi, lo, levels, text, for_ms, hold_ms, band)


class _NoAttribute(Exception):
    """The device lacks an attribute a limit refers to (and the reference has no default)."""


def _cmp(op: str, num: Num | None, attributes: Mapping[str, Any]) -> Compare | None:
    if num is None:
        return None
    limit = resolve(num, attributes)
    if limit is None:
        raise _NoAttribute
    return Compare(op, limit)


def _compares(
    p: ThresholdParams, attributes: Mapping[str, Any]
) -> tuple[Compare | None, Compare | None, tuple[Compare, ...]] | None:
    """The resolved limits for a device, or None if it lacks a referenced attribute."""
    try:
        hi = _cmp(">", p.above, attributes) if p.above is not None else _cmp(">=", p.at_least, attributes)
        lo = _cmp("<", p.below, attributes) if p.below is not None else _cmp("<=", p.at_most, attributes)
        levels = []
        for lv in p.levels:
            for op, num in ((">", lv.above), (">=", lv.at_least), ("<", lv.below), ("<=", lv.at_most)):
                c = _cmp(op, num, attributes)
                if c is not None:
                    levels.append(c)
    except _NoAttribute:
        return None
    return hi, lo, tuple(levels)


def _text(hi: Compare | None, lo: Compare | None) -> str:
    return " or ".join(c.text() for c in (hi, lo) if c is not None)


def evaluate(
    p: ThresholdParams, obs: Observation, state: State | None, now_ms: int
) -> tuple[tuple[Signal, ...], State | None]:
    plan = p.plan
    if obs.kind == "event":
        if obs.event in p.fire_on_events:
            text = plan.text or _limits_text(p, obs)
            values = {"event": obs.event}
            return timer.step(
                state,
                obs.device_id,
                BAD,
                obs.ts_ms,
                obs.received_ms,
                values=values,
                threshold=text,
                force=True,
            )
        return NO_SIGNALS, state
    v = obs.values.get(p.field)
    if v is None:
        return NO_SIGNALS, state
    if plan.static:
        hi, lo, levels, text = plan.hi, plan.lo, plan.levels, plan.text
    else:
        got = _compares(p, obs.attributes)
        if got is None:
            return NO_SIGNALS, state
        hi, lo, levels = got
        text = _text(hi, lo)
    if (hi is not None and hi.test(v)) or (lo is not None and lo.test(v)):
        cond = BAD
    else:
        if state is None:
            return NO_SIGNALS, state  # the hot path: nothing going on, nothing to do
        m = p.clear_margin
        good = (hi is None or v < hi.limit - m) and (lo is None or v > lo.limit + m)
        cond = GOOD if good else NEUTRAL
    level = 0
    for i, c in enumerate(levels):
        if c.test(v):
            level = i + 1
            cond = BAD
            text = c.text()
    return timer.step(
        state,
        obs.device_id,
        cond,
        obs.ts_ms,
        obs.received_ms,
        level=level,
        for_ms=plan.for_ms,
        consecutive=p.consecutive,
        hold_ms=plan.hold_ms,
        values={p.field: v},
        threshold=text,
    )


def _limits_text(p: ThresholdParams, obs: Observation) -> str:
    got = _compares(p, obs.attributes)
    return _text(got[0], got[1]) if got else ""


def tick(
    p: ThresholdParams, state: State | None, now_ms: int, key: str
) -> tuple[tuple[Signal, ...], State | None]:
    return timer.tick(state, key, now_ms)


def due(p: ThresholdParams, state: State | None) -> int | None:
    return timer.due(state)


def describe(p: ThresholdParams) -> str:
    """One line for docs and the rule table."""
    parts = []
    for name, op in (("above", ">"), ("at_least", ">="), ("below", "<"), ("at_most", "<=")):
        num = getattr(p, name)
        if num is not None:
            parts.append(f"{p.field} {op} {_num_text(num)}")
    s = " or ".join(parts)
    if p.consecutive > 1:
        s += f" for {p.consecutive} consecutive readings"
    if p.for_s:
        s += f" for {fmt_num(p.for_s)} s"
    for lv in p.levels:
        for name, op in (("above", ">"), ("at_least", ">="), ("below", "<"), ("at_most", "<=")):
            num = getattr(lv, name)
            if num is not None:
                s += f"; {op} {_num_text(num)} → {lv.urgency} at once"
    if p.fire_on_events:
        s += "; or event " + "|".join(p.fire_on_events)
    return s


def _num_text(n: Num) -> str:
    return n.text() if isinstance(n, AttrRef) else fmt_num(n)
