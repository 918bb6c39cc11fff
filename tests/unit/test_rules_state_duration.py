"""state_duration rule kind: held states, attribute durations, events, clock skew and buffered uplinks."""

from __future__ import annotations

from rules import state_duration
from rules.model import Signal
from rules.state_duration import StateDurationParams
from rules.testing import MIN, T0, S, obs, params


def sp(**kw: object) -> StateDurationParams:
    p = params(kind="state_duration", **kw)
    assert isinstance(p, StateDurationParams)
    return p


FIRE_LANE = {"field": "occupied", "equals": True, "for_s": 300}
PK = {"device_type": "parking_sensor"}


def test_fires_exactly_when_the_duration_is_reached_by_tick() -> None:
    p = sp(**FIRE_LANE)
    _, st = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=T0, **PK), None, T0)  # type: ignore[arg-type]
    assert state_duration.due(p, st) == T0 + 5 * MIN
    assert state_duration.tick(p, st, T0 + 5 * MIN - 1, "pk-1")[0] == ()
    sigs, st = state_duration.tick(p, st, T0 + 5 * MIN, "pk-1")
    assert [(s.firing, s.ts_ms) for s in sigs] == [(True, T0 + 5 * MIN)]
    # a tick again does nothing more
    assert state_duration.tick(p, st, T0 + 10 * MIN, "pk-1")[0] == ()


def test_heartbeats_do_not_restart_the_timer_and_leaving_resets_it() -> None:
    p = sp(**FIRE_LANE)
    st = None
    for t in (T0, T0 + 2 * MIN, T0 + 4 * MIN):
        sigs, st = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=t, **PK), st, t)  # type: ignore[arg-type]
        assert sigs == ()
    sigs, st = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=T0 + 5 * MIN, **PK), st, 0)  # type: ignore[arg-type]
    assert [s.firing for s in sigs] == [True]
    sigs, st = state_duration.evaluate(p, obs("pk-1", {"occupied": False}, t=T0 + 6 * MIN, **PK), st, 0)  # type: ignore[arg-type]
    assert [s.firing for s in sigs] == [False] and st is None
    # left before the 5 minutes: nothing pending any more
    _, st = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=T0, **PK), None, T0)  # type: ignore[arg-type]
    _, st = state_duration.evaluate(p, obs("pk-1", {"occupied": False}, t=T0 + MIN, **PK), st, T0)  # type: ignore[arg-type]
    assert st is None


def test_duration_from_an_attribute() -> None:
    p = sp(field="occupied", equals=True, for_s={"attr": "time_limit_min", "times": 60})
    a = {"bay_kind": "time_limited", "time_limit_min": 30}
    _, st = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=T0, attributes=a, **PK), None, T0)  # type: ignore[arg-type]
    assert state_duration.due(p, st) == T0 + 30 * MIN
    # a bay without its limit is not judged
    _, st = state_duration.evaluate(p, obs("pk-2", {"occupied": True}, t=T0, **PK), None, T0)  # type: ignore[arg-type]
    assert st is None


def test_device_clock_ahead_cannot_make_it_fire_early() -> None:
    """The device clock runs 4 min ahead; the tick measures from when the gateway got the start."""
    p = sp(**FIRE_LANE)
    skew = 4 * MIN
    start = obs("pk-1", {"occupied": True}, t=T0 + skew, rx=T0, **PK)  # type: ignore[arg-type]
    _, st = state_duration.evaluate(p, start, None, T0)
    assert state_duration.tick(p, st, T0 + 2 * MIN, "pk-1")[0] == ()
    # a heartbeat 2 minutes later (device time also 2 minutes later): still 2 minutes, not 6
    hb = obs("pk-1", {"occupied": True}, t=T0 + skew + 2 * MIN, rx=T0 + 2 * MIN, **PK)  # type: ignore[arg-type]
    sigs, st = state_duration.evaluate(p, hb, st, T0 + 2 * MIN)
    assert sigs == ()
    assert [s.firing for s in state_duration.tick(p, st, T0 + 5 * MIN, "pk-1")[0]] == [True]


def test_device_clock_behind_measures_in_device_time_between_messages() -> None:
    p = sp(**FIRE_LANE)
    skew = -3 * MIN
    _, st = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=T0 + skew, rx=T0, **PK), None, T0)  # type: ignore[arg-type]
    m = obs("pk-1", {"occupied": True}, t=T0 + skew + 4 * MIN, rx=T0 + 4 * MIN, **PK)  # type: ignore[arg-type]
    assert state_duration.evaluate(p, m, st, T0 + 4 * MIN)[0] == ()


def test_buffered_uplink_reporting_a_long_occupation_fires_on_arrival() -> None:
    """A sensor that buffered its messages: both arrive together, 6 minutes apart in device time."""
    p = sp(**FIRE_LANE)
    rx = T0 + 10 * MIN
    _, st = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=T0, rx=rx, **PK), None, rx)  # type: ignore[arg-type]
    sigs, _ = state_duration.evaluate(p, obs("pk-1", {"occupied": True}, t=T0 + 6 * MIN, rx=rx, **PK), st, rx)  # type: ignore[arg-type]
    assert [(s.firing, s.ts_ms) for s in sigs] == [(True, T0 + 6 * MIN)]


def test_state_from_events_and_fire_on_events() -> None:
    p = sp(on_events=["removed"], off_events=["installed"], for_s=0)
    sd = {"device_type": "smoke_detector"}
    sigs, st = state_duration.evaluate(p, obs("sd-1", event="removed", t=T0, **sd), None, T0)  # type: ignore[arg-type]
    assert [s.firing for s in sigs] == [True]
    sigs, st = state_duration.evaluate(p, obs("sd-1", event="self_test", t=T0 + S, **sd), st, T0)  # type: ignore[arg-type]
    assert sigs == ()
    sigs, st = state_duration.evaluate(p, obs("sd-1", event="installed", t=T0 + 2 * S, **sd), st, T0)  # type: ignore[arg-type]
    assert [s.firing for s in sigs] == [False]
    held = sp(field="door_open", equals=True, for_s=60, fire_on_events=["door_held_open"])
    ac = {"device_type": "access_control"}
    sigs, _ = state_duration.evaluate(held, obs("ac-1", event="door_held_open", t=T0, **ac), None, T0)  # type: ignore[arg-type]
    assert [s.firing for s in sigs] == [True]


def test_clear_hold_rides_over_a_flicker() -> None:
    p = sp(field="occupied", equals=True, for_s=0, clear_hold_s=30)
    st = None
    out: list[Signal] = []
    for t, v in [(0, True), (10, False), (15, True), (20, False), (45, False), (50, False)]:
        sigs, st = state_duration.evaluate(p, obs("pk-1", {"occupied": v}, t=T0 + t * S, **PK), st, 0)  # type: ignore[arg-type]
        out += sigs
    assert [(s.firing, s.ts_ms) for s in out] == [(True, T0), (False, T0 + 50 * S)]


def test_enum_state_values() -> None:
    p = sp(field="occupied", equals=[True])
    assert p.equals == (True,)
    assert sp(field="occupied", equals=True).equals == (True,)
