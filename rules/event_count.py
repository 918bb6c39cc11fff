"""Rule kind `event_count`: at least `count` events of the given names within `window_s`, on one device
or on one group (building, grid, community, attribute value).

Events are counted by their device time, so a buffered uplink delivered late still counts in the window it
happened in; a redelivered event (same device and seq) is counted once (the engine drops it before it gets
here). `levels` raise the urgency at higher counts. While firing, each further matching event is a
repeated occurrence. It clears on one of `clear_events`, or when no matching event has arrived for
`clear_after_s` (gateway time); without either it stays open until the incident stage resolves it
(`Engine.resolve`).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rules.model import GroupBy, Observation, Signal, Urgency, fmt_num, group_key

NO_SIGNALS: tuple[Signal, ...] = ()


class CountLevel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int = Field(ge=1)
    urgency: Urgency


class EventCountParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["event_count"]
    events: tuple[str, ...] = Field(min_length=1)
    count: int = Field(default=1, ge=1)
    window_s: float = Field(default=0, ge=0)
    levels: tuple[CountLevel, ...] = ()
    group_by: GroupBy = "device"
    clear_after_s: float | None = Field(default=None, gt=0)
    clear_events: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _window(self) -> EventCountParams:
        if (self.count > 1 or self.levels) and self.window_s <= 0:
            raise ValueError("counting more than one event needs window_s > 0")
        counts = [self.count] + [lv.count for lv in self.levels]
        if counts != sorted(set(counts)):
            raise ValueError("level counts must rise above count")
        urgencies = [lv.urgency for lv in self.levels]
        if urgencies != sorted(urgencies, reverse=True) or len(set(urgencies)) != len(urgencies):
            raise ValueError("levels go from less to more severe (e.g. P4 then P3)")
        return self

    def reads_fields(self) -> dict[str, str]:
        return {}

    def reads_events(self) -> tuple[str, ...]:
        return self.events + self.clear_events

    def reads_attrs(self) -> set[str]:
        return set()

    @cached_property
    def window_ms(self) -> int:
        return int(self.window_s * 1000)

    @cached_property
    def keep(self) -> int:
        """How many events a state keeps at most (enough to see the highest level)."""
        return 2 * max([self.count] + [lv.count for lv in self.levels])


class EventCountState(NamedTuple):
    #: (device time, device id) of the matching events in the current window, in time order
    events: tuple[tuple[int, str], ...] = ()
    firing: bool = False
    level: int = 0
    #: gateway time of the last matching event (quiet period for `clear_after_s`)
    last_rx: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "events": [[t, d] for t, d in self.events],
            "firing": self.firing,
            "level": self.level,
            "last_rx": self.last_rx,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EventCountState:
        return cls(
            tuple((int(t), str(d)) for t, d in data["events"]), data["firing"], data["level"], data["last_rx"]
        )


State = EventCountState


def _max_in_window(times: list[int], window_ms: int) -> int:
    """The largest number of events within any span of window_ms (times sorted)."""
    best = i = 0
    for j, t in enumerate(times):
        while t - times[i] > window_ms:
            i += 1
        best = max(best, j - i + 1)
    return best


def evaluate(
    p: EventCountParams, obs: Observation, state: State | None, now_ms: int
) -> tuple[tuple[Signal, ...], State | None]:
    if obs.kind != "event":
        return NO_SIGNALS, state
    ev = obs.event
    key = group_key(p.group_by, obs)
    if key is None:
        return NO_SIGNALS, state
    if ev in p.clear_events:
        if state is not None and state.firing:
            return (Signal(key, False, obs.ts_ms, 0, {"event": ev}, f"event {ev}"),), None
        return NO_SIGNALS, state
    if ev not in p.events:
        return NO_SIGNALS, state
    s = state or EventCountState()
    events = list(s.events)
    bisect.insort(events, (obs.ts_ms, obs.device_id))
    if p.window_ms > 0:
        newest = events[-1][0]
        events = [e for e in events if e[0] >= newest - p.window_ms]
    if len(events) > p.keep:
        events = events[-p.keep :]
    n = _max_in_window([t for t, _ in events], p.window_ms) if p.window_ms > 0 else len(events)
    level = 0
    for i, lv in enumerate(p.levels):
        if n >= lv.count:
            level = i + 1
    new = EventCountState(tuple(events), s.firing, s.level, max(s.last_rx, obs.received_ms))
    if n < p.count and not s.firing:
        return NO_SIGNALS, new
    members = tuple(sorted({d for _, d in events})) if p.group_by != "device" else ()
    values: dict[str, object] = {"event": ev, "count": n}
    text = _text(p, level)
    if not s.firing:
        sig = Signal(key, True, obs.ts_ms, level, values, text, members=members)
        return (sig,), new._replace(firing=True, level=level)
    if level > s.level:
        sig = Signal(key, True, obs.ts_ms, level, values, text, members=members)
        return (sig,), new._replace(level=level)
    sig = Signal(key, True, obs.ts_ms, s.level, values, text, occurrence=True, members=members)
    return (sig,), new


def _text(p: EventCountParams, level: int) -> str:
    n = p.count if level == 0 else p.levels[level - 1].count
    s = f">= {n} × {'|'.join(p.events)}"
    if p.window_s:
        s += f" within {fmt_num(p.window_s)} s"
    return s


def tick(
    p: EventCountParams, state: State | None, now_ms: int, key: str
) -> tuple[tuple[Signal, ...], State | None]:
    """A firing count clears after `clear_after_s` without a matching event; an idle window expires."""
    if state is None:
        return NO_SIGNALS, state
    d = due(p, state)
    if d is None or now_ms < d:
        return NO_SIGNALS, state
    if state.firing:
        values = {"quiet_s": (now_ms - state.last_rx) / 1000}
        text = f"no {'|'.join(p.events)} for {fmt_num(p.clear_after_s or 0)} s"
        return (Signal(key, False, now_ms, 0, values, text),), None
    return NO_SIGNALS, None


def due(p: EventCountParams, state: State | None) -> int | None:
    if state is None:
        return None
    if state.firing:
        return None if p.clear_after_s is None else state.last_rx + int(p.clear_after_s * 1000)
    return state.last_rx + p.window_ms


def describe(p: EventCountParams) -> str:
    s = f">= {p.count} × {'|'.join(p.events)}"
    if p.window_s:
        s += f" within {fmt_num(p.window_s)} s"
    if p.group_by != "device":
        s += f" per {p.group_by if isinstance(p.group_by, str) else p.group_by.attr}"
    for lv in p.levels:
        s += f"; >= {lv.count} → {lv.urgency}"
    return s
