"""The condition timer shared by the state-based rule kinds: pending → firing → cleared, with
for-durations, consecutive counts, immediate levels, clear hold (hysteresis in time) and tick deadlines.

A kind reduces an observation to a condition: BAD (1), NEUTRAL (0: inside the hysteresis band, or no
judgement possible) or GOOD (-1), and calls `step`. Only GOOD clears a firing alarm; NEUTRAL keeps it
firing but restarts a clear hold; anything but BAD ends a pending episode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from rules.model import Signal

BAD, NEUTRAL, GOOD = 1, 0, -1
IDLE, PENDING, FIRING = 0, 1, 2
NO_SIGNALS: tuple[Signal, ...] = ()


class TimerState(NamedTuple):
    """State of one condition timer (per rule and device). Plain data: `to_json`/`from_json`."""

    phase: int = IDLE
    #: pending: device time / gateway time of the first BAD observation; firing: when it fired
    since_ts: int = 0
    since_rx: int = 0
    #: consecutive BAD observations in this episode
    hits: int = 0
    #: highest level reached while firing (0: base)
    level: int = 0
    #: the duration this episode must last (resolved when it started: it may come from an attribute)
    for_ms: int = 0
    #: firing with a clear hold running: first GOOD observation's device / gateway time, else -1
    clear_ts: int = -1
    clear_rx: int = -1
    hold_ms: int = 0
    #: gateway time at which `tick` has something to do, or -1
    due_ms: int = -1
    #: evidence of the last transition (values seen and the threshold text)
    values: Mapping[str, Any] = {}
    threshold: str = ""

    def to_json(self) -> dict[str, Any]:
        d = self._asdict()
        d["values"] = dict(self.values)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TimerState:
        return cls(**{k: data[k] for k in cls._fields if k in data})


def step(
    s: TimerState | None,
    key: str,
    cond: int,
    ts: int,
    rx: int,
    *,
    level: int = 0,
    for_ms: int = 0,
    consecutive: int = 1,
    hold_ms: int = 0,
    values: Mapping[str, Any],
    threshold: str,
    force: bool = False,
) -> tuple[tuple[Signal, ...], TimerState | None]:
    """Advance the timer by one observation. `force` fires at once (an event that means the condition).

    A `level` > 0 fires at once too: a reading past a more severe threshold needs no confirmation.
    """
    phase = IDLE if s is None else s.phase
    if phase == IDLE:
        if cond != BAD:
            return NO_SIGNALS, s
        if force or level > 0 or (consecutive <= 1 and for_ms <= 0):
            return _fire(key, ts, rx, level, hold_ms, values, threshold)
        due = rx + for_ms if consecutive <= 1 else -1
        return NO_SIGNALS, TimerState(PENDING, ts, rx, 1, 0, for_ms, -1, -1, hold_ms, due, values, threshold)
    assert s is not None
    if phase == PENDING:
        if cond != BAD:
            return NO_SIGNALS, None
        count = s.hits + 1
        if (
            force
            or level > 0
            or (
                count >= consecutive
                and (ts - s.since_ts >= s.for_ms or rx - s.since_rx >= s.for_ms or s.for_ms <= 0)
            )
        ):
            return _fire(key, ts, rx, level, hold_ms, values, threshold)
        if s.hits >= consecutive:
            return NO_SIGNALS, s  # armed already: the deadline stands, nothing new to record
        due = s.since_rx + s.for_ms if count >= consecutive else -1
        return NO_SIGNALS, TimerState(
            PENDING,
            s.since_ts,
            s.since_rx,
            count,
            s.level,
            s.for_ms,
            -1,
            -1,
            s.hold_ms,
            due,
            s.values,
            s.threshold,
        )
    # FIRING
    if cond == BAD:
        if level > s.level:
            sig = Signal(key, True, ts, level, values, threshold)
            return (sig,), s._replace(level=level, clear_ts=-1, clear_rx=-1, due_ms=-1)
        if force:
            return (Signal(key, True, ts, s.level, values, threshold, occurrence=True),), s
        if s.clear_ts >= 0:
            return NO_SIGNALS, s._replace(clear_ts=-1, clear_rx=-1, due_ms=-1)
        return NO_SIGNALS, s
    if cond == NEUTRAL:
        if s.clear_ts >= 0:
            return NO_SIGNALS, s._replace(clear_ts=-1, clear_rx=-1, due_ms=-1)
        return NO_SIGNALS, s
    # GOOD
    if s.hold_ms <= 0:
        return (Signal(key, False, ts, 0, values, threshold),), None
    if s.clear_ts < 0:
        return NO_SIGNALS, s._replace(clear_ts=ts, clear_rx=rx, due_ms=rx + s.hold_ms)
    if ts - s.clear_ts >= s.hold_ms or rx - s.clear_rx >= s.hold_ms:
        return (Signal(key, False, ts, 0, values, threshold),), None
    return NO_SIGNALS, s


def _fire(
    key: str, ts: int, rx: int, level: int, hold_ms: int, values: Mapping[str, Any], threshold: str
) -> tuple[tuple[Signal, ...], TimerState]:
    state = TimerState(FIRING, ts, rx, 0, level, 0, -1, -1, hold_ms, -1, values, threshold)
    return (Signal(key, True, ts, level, values, threshold),), state


def tick(s: TimerState | None, key: str, now_ms: int) -> tuple[tuple[Signal, ...], TimerState | None]:
    """Time alone: a pending for-duration that has run out fires, a clear hold that has run out clears.

    The last observed value is assumed to hold until the next observation (devices report on change).
    """
    if s is None or s.due_ms < 0 or now_ms < s.due_ms:
        return NO_SIGNALS, s
    if s.phase == PENDING:
        ts = s.since_ts + s.for_ms
        return _fire(key, ts, now_ms, s.level, s.hold_ms, s.values, s.threshold)
    if s.phase == FIRING:
        ts = s.clear_ts + s.hold_ms
        return (Signal(key, False, ts, 0, s.values, s.threshold),), None
    return NO_SIGNALS, s._replace(due_ms=-1)


def due(s: TimerState | None) -> int | None:
    """When `tick` next has something to do (gateway time), or None."""
    if s is None or s.due_ms < 0:
        return None
    return s.due_ms
