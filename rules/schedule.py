"""Rule kind `schedule`: a lamp expected on (or off) by its schedule or the ambient light, seen otherwise
for `for_s` — lamp out (`expect: on`) and burning by day (`expect: off`).

Expected state: when a fresh ambient reading (`lux_field`, at most `lux_max_age_s` old) says dark
(< `dark_lux`) the lamp should be on; bright (> `bright_lux`): off; in between, or without a light
sensor, the on-window decides: the device's `schedule_attr` attribute ("18:00-06:00", local time at
`utc_offset_min`, UTC+8 by default), else `schedule`. Without either there is no judgement.

Lit: `lit_field` >= `lit_at_least` (power: may reference the rated power, e.g. 10 % of it but at least
5 W), or the switch state `on_field`; `lit_by` says which to prefer when a message has both (`power` for
lamp out: a switched-on lamp that draws nothing is out; `switch` for burning by day: a dimmed lamp is
still on). The last known values hold until the next message; `tick` re-judges as the clock passes a
schedule boundary, but only on values seen within `max_age_s` (a silent lamp is the absence rule's).
A lamp-out alarm clears when the lamp is seen lit, a burning-by-day alarm when it is seen off (not when
the schedule changes: a lamp that is out is still out in the morning).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rules import timer
from rules.model import AttrRef, Num, Observation, Signal, fmt_num, num_attrs, resolve
from rules.timer import BAD, GOOD, NEUTRAL, NO_SIGNALS, TimerState

_WINDOW_RE = re.compile(r"^\s*([01]?\d|2[0-4]):([0-5]\d)\s*-\s*([01]?\d|2[0-4]):([0-5]\d)\s*$")
_windows: dict[str, tuple[int, int] | None] = {}


def parse_window(text: str) -> tuple[int, int] | None:
    """'18:00-06:00' → (1080, 360) minutes of the day; None if malformed (cached)."""
    try:
        return _windows[text]
    except KeyError:
        pass
    m = _WINDOW_RE.match(text)
    win = None
    if m:
        a, b = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
        if a <= 1440 and b <= 1440:
            win = (a, b)
    if len(_windows) < 4096:
        _windows[text] = win
    return win


def in_window(win: tuple[int, int], minute: int) -> bool:
    a, b = win
    if a <= b:
        return a <= minute < b
    return minute >= a or minute < b


class ScheduleParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["schedule"]
    expect: Literal["on", "off"]
    lit_field: str | None = "power_w"
    lit_at_least: Num = 5.0
    on_field: str | None = "lamp_on"
    lit_by: Literal["power", "switch"] = "power"
    schedule_attr: str | None = "schedule"
    schedule: str | None = None
    lux_field: str | None = "lux"
    dark_lux: float = Field(default=10, ge=0)
    bright_lux: float = Field(default=100, ge=0)
    lux_max_age_s: float = Field(default=1800, gt=0)
    for_s: float = Field(default=0, ge=0)
    clear_hold_s: float = Field(default=0, ge=0)
    max_age_s: float = Field(default=1800, gt=0)
    utc_offset_min: int = Field(default=480, ge=-720, le=840)
    #: events that mean "not lit as expected" at once (e.g. a driver's `lamp_fault`)
    fire_on_events: tuple[str, ...] = ()

    @field_validator("schedule")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is not None and parse_window(v) is None:
            raise ValueError(f"schedule must look like 18:00-06:00 (got {v!r})")
        return v

    def reads_fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.lit_field:
            out[self.lit_field] = "number"
        if self.on_field:
            out[self.on_field] = "bool"
        if self.lux_field:
            out[self.lux_field] = "number"
        return out

    def reads_events(self) -> tuple[str, ...]:
        return self.fire_on_events

    def reads_attrs(self) -> set[str]:
        return num_attrs(self.lit_at_least)

    def reads_text_attrs(self) -> set[str]:
        return {self.schedule_attr} if self.schedule_attr else set()

    @cached_property
    def ms(self) -> tuple[int, int, int, int]:
        """for, clear hold, lux max age, max age in ms."""
        return (
            int(self.for_s * 1000),
            int(self.clear_hold_s * 1000),
            int(self.lux_max_age_s * 1000),
            int(self.max_age_s * 1000),
        )

    @cached_property
    def default_window(self) -> tuple[int, int] | None:
        return parse_window(self.schedule) if self.schedule else None

    @cached_property
    def _text(self) -> str:
        what = "expected on but not lit" if self.expect == "on" else "lit while expected off"
        return f"{what} for >= {fmt_num(self.for_s)} s"

    def text(self) -> str:
        return self._text


class ScheduleState(NamedTuple):
    timer: TimerState | None = None
    #: last known lit state and the device time it was seen
    lit: bool | None = None
    lit_ts: int = 0
    lux: float | None = None
    lux_ts: int = 0
    #: the device's on-window in minutes of the day (from its attribute), if any
    window: tuple[int, int] | None = None
    #: gateway minus device clock at the last message (to judge device local time from `tick`)
    skew_ms: int = 0
    #: gateway time of the last message, and of the last judgement (message or tick)
    last_rx: int = 0
    checked_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        d = self._asdict()
        d["timer"] = None if self.timer is None else self.timer.to_json()
        d["window"] = None if self.window is None else list(self.window)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScheduleState:
        d = dict(data)
        d["timer"] = None if d.get("timer") is None else TimerState.from_json(d["timer"])
        d["window"] = None if d.get("window") is None else (int(d["window"][0]), int(d["window"][1]))
        return cls(**{k: d[k] for k in cls._fields if k in d})


State = ScheduleState
_EMPTY = ScheduleState()


def expected(
    p: ScheduleParams, lux: float | None, lux_ts: int, window: tuple[int, int] | None, t_dev: int
) -> int:
    """1: should be lit, 0: should be dark, -1: cannot tell, at device time t_dev."""
    if lux is not None and t_dev - lux_ts <= p.ms[2]:
        if lux < p.dark_lux:
            return 1
        if lux > p.bright_lux:
            return 0
    win = window or p.default_window
    if win is None:
        return -1
    minute = (t_dev // 60_000 + p.utc_offset_min) % 1440
    return 1 if in_window(win, minute) else 0


def _cond(p: ScheduleParams, s: ScheduleState, t_dev: int) -> int:
    if s.lit is None:
        return NEUTRAL
    want_lit = p.expect == "on"
    if s.lit == want_lit:
        return GOOD
    exp = expected(p, s.lux, s.lux_ts, s.window, t_dev)
    return BAD if exp == (1 if want_lit else 0) else NEUTRAL


def _values(p: ScheduleParams, s: ScheduleState, t_dev: int) -> dict[str, Any]:
    return {"lit": s.lit, "lux": s.lux, "expected_on": expected(p, s.lux, s.lux_ts, s.window, t_dev) == 1}


def evaluate(
    p: ScheduleParams, obs: Observation, state: State | None, now_ms: int
) -> tuple[tuple[Signal, ...], State | None]:
    s = state or _EMPTY
    ts, rx = obs.ts_ms, obs.received_ms
    force = False
    lit, lit_ts, lux, lux_ts, win = s.lit, s.lit_ts, s.lux, s.lux_ts, s.window
    if obs.kind == "event":
        if obs.event not in p.fire_on_events:
            return NO_SIGNALS, state
        force = True
        lit, lit_ts = p.expect != "on", ts
    else:
        vals = obs.values
        pv = vals.get(p.lit_field) if p.lit_field else None
        ov = vals.get(p.on_field) if p.on_field else None
        if pv is not None and (p.lit_by == "power" or ov is None):
            limit = resolve(p.lit_at_least, obs.attributes)
            if limit is None:
                return NO_SIGNALS, state
            lit, lit_ts = pv >= limit, ts
        elif ov is not None:
            lit, lit_ts = bool(ov), ts
        if p.lux_field:
            lv = vals.get(p.lux_field)
            if lv is not None:
                lux, lux_ts = float(lv), ts
        if p.schedule_attr:
            raw = obs.attributes.get(p.schedule_attr)
            win = parse_window(raw) if isinstance(raw, str) else None
    new = ScheduleState(s.timer, lit, lit_ts, lux, lux_ts, win, rx - ts, rx, rx)
    cond = BAD if force else _cond(p, new, ts)
    if cond != BAD and s.timer is None:
        return NO_SIGNALS, new
    for_ms, hold_ms, _, _ = p.ms
    sigs, t = timer.step(
        s.timer,
        obs.device_id,
        cond,
        ts,
        rx,
        for_ms=for_ms,
        hold_ms=hold_ms,
        values=_values(p, new, ts),
        threshold=p.text(),
        force=force,
    )
    return sigs, ScheduleState(t, lit, lit_ts, lux, lux_ts, win, rx - ts, rx, rx)


def tick(
    p: ScheduleParams, state: State | None, now_ms: int, key: str
) -> tuple[tuple[Signal, ...], State | None]:
    if state is None:
        return NO_SIGNALS, state
    for_ms, hold_ms, _, max_age = p.ms
    s = state._replace(checked_ms=now_ms)
    if now_ms - state.last_rx > max_age:
        # values too old to judge on; a running timer may still finish
        sigs, t = timer.tick(state.timer, key, now_ms)
        return sigs, s._replace(timer=t)
    t_dev = now_ms - state.skew_ms
    cond = _cond(p, s, t_dev)
    sigs, t = timer.step(
        s.timer,
        key,
        cond,
        t_dev,
        now_ms,
        for_ms=for_ms,
        hold_ms=hold_ms,
        values=_values(p, s, t_dev),
        threshold=p.text(),
    )
    if not sigs:
        sigs, t = timer.tick(t, key, now_ms)
    return sigs, s._replace(timer=t)


def due(p: ScheduleParams, state: State | None) -> int | None:
    if state is None:
        return None
    d = timer.due(state.timer)
    win = state.window or p.default_window
    if win is not None and state.checked_ms - state.last_rx <= p.ms[3]:
        b = _next_boundary(p, win, state.checked_ms - state.skew_ms) + state.skew_ms
        d = b if d is None else min(d, b)
    return d


def _next_boundary(p: ScheduleParams, win: tuple[int, int], t_dev: int) -> int:
    """Device time of the next start or end of the window strictly after t_dev."""
    minute_start = t_dev - t_dev % 60_000
    minute = (t_dev // 60_000 + p.utc_offset_min) % 1440
    best = 1440
    for b in win:
        delta = (b % 1440 - minute) % 1440 or 1440
        best = min(best, delta)
    return minute_start + best * 60_000


def describe(p: ScheduleParams) -> str:
    basis = f"dark < {fmt_num(p.dark_lux)} lx / bright > {fmt_num(p.bright_lux)} lx"
    if p.schedule_attr:
        basis += f", else attribute {p.schedule_attr}"
    if p.schedule:
        basis += f" (default {p.schedule})"
    lit = ""
    if p.lit_field:
        lim = p.lit_at_least
        lim_s = lim.text() if isinstance(lim, AttrRef) else fmt_num(lim)
        lit = f"lit = {p.lit_field} >= {lim_s}"
        if isinstance(lim, AttrRef) and lim.min is not None:
            lit += f" (at least {fmt_num(lim.min)})"
    if p.on_field:
        lit += f"{' or ' if lit else 'lit = '}{p.on_field}"
    return f"{p.text()}; expected on when {basis}; {lit}"
