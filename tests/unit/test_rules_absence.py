"""absence rule kind: offline after k × interval + grace, on the gateway clock, per device."""

from __future__ import annotations

from rules import absence
from rules.absence import AbsenceParams
from rules.testing import HOUR, MIN, T0, engine, obs, params, rule


def ap() -> AbsenceParams:
    p = params(kind="absence", k=2, interval_s=3600, grace_s=600)
    assert isinstance(p, AbsenceParams)
    return p


def test_fires_just_after_the_limit_and_clears_on_the_next_message() -> None:
    p = ap()
    _, st = absence.evaluate(p, obs(t=T0), None, T0)
    limit = T0 + 2 * HOUR + 10 * MIN
    assert absence.due(p, st) == limit + 1
    assert absence.tick(p, st, limit, "mh-1")[0] == ()  # exactly at the limit: not yet
    sigs, st = absence.tick(p, st, limit + 1, "mh-1")
    assert [(s.firing, s.key) for s in sigs] == [(True, "mh-1")]
    assert absence.tick(p, st, limit + HOUR, "mh-1")[0] == ()  # once
    sigs, st = absence.evaluate(p, obs(t=limit + 2 * HOUR), st, 0)
    assert [s.firing for s in sigs] == [False] and st is not None and not st.firing


def test_device_clock_is_irrelevant() -> None:
    p = ap()
    _, st = absence.evaluate(p, obs(t=T0 - 5 * HOUR, rx=T0), None, T0)
    assert absence.due(p, st) == T0 + 2 * HOUR + 10 * MIN + 1


def test_last_will_is_not_a_sign_of_life() -> None:
    p = ap()
    _, st = absence.evaluate(p, obs(t=T0), None, T0)
    will = obs(kind="status", values={"online": False}, t=T0 + HOUR)
    assert absence.evaluate(p, will, st, T0 + HOUR) == ((), st)
    alive = obs(kind="status", values={"online": True}, t=T0 + HOUR)
    _, st2 = absence.evaluate(p, alive, st, T0 + HOUR)
    assert st2 is not None and st2.last_rx == T0 + HOUR


def test_engine_ticks_each_device_at_its_own_time() -> None:
    e = engine(rule("manhole_cover.offline", kind="absence", k=2, grace_s=600))
    e.process(obs("mh-1", {"battery_pct": 80}, t=T0))
    e.process(obs("mh-2", {"battery_pct": 80}, t=T0 + 30 * MIN))
    assert e.next_due() == T0 + 2 * HOUR + 10 * MIN + 1
    first = e.tick(T0 + 2 * HOUR + 10 * MIN + 1)
    assert [(v.device_id, v.change, v.urgency) for v in first] == [("mh-1", "opened", "P3")]
    assert e.tick(T0 + 2 * HOUR + 30 * MIN) == []
    second = e.tick(T0 + 2 * HOUR + 40 * MIN + 1)
    assert [v.device_id for v in second] == ["mh-2"]
    back = e.process(obs("mh-1", {"battery_pct": 80}, t=T0 + 3 * HOUR))
    assert [(v.device_id, v.change, v.state) for v in back] == [("mh-1", "cleared", "cleared")]


def test_a_stale_or_duplicate_message_still_counts_as_life_only_when_new() -> None:
    e = engine(rule("manhole_cover.offline", kind="absence", k=2, grace_s=600))
    e.process(obs("mh-1", {"battery_pct": 80}, t=T0, seq=1))
    # an old buffered reading received an hour later is a sign of life
    e.process(obs("mh-1", {"battery_pct": 81}, t=T0 - HOUR, rx=T0 + HOUR, seq=0))
    assert e.tick(T0 + 2 * HOUR + 10 * MIN + 1) == []
    assert [v.change for v in e.tick(T0 + 3 * HOUR + 10 * MIN + 1)] == ["opened"]


def test_after_a_restart_silence_counts_from_the_restart_not_from_before_the_downtime() -> None:
    e = engine(rule("manhole_cover.offline", kind="absence", k=2, grace_s=600))
    e.process(obs("mh-1", {"battery_pct": 80}, t=T0))
    e.process(obs("mh-2", {"battery_pct": 80}, t=T0))
    assert e.tick(T0 + 2 * HOUR + 10 * MIN + 1) != []  # mh-1 and mh-2 went silent while we listened
    e.process(obs("mh-2", {"battery_pct": 80}, t=T0 + 3 * HOUR))  # mh-2 is back; mh-1 still firing
    snap = e.snapshot()

    # the gateway was down for a day; the restored engine restarts the clocks of non-firing devices
    restarted = engine(rule("manhole_cover.offline", kind="absence", k=2, grace_s=600))
    restarted.restore(snap)
    back_at = T0 + 27 * HOUR
    assert restarted.restart_absence_clocks(back_at) == 1  # mh-2 (mh-1 is already offline)
    assert restarted.tick(back_at + MIN) == []  # no storm of offline cases at start
    late = restarted.tick(back_at + 2 * HOUR + 10 * MIN + 1)
    assert [(v.device_id, v.change) for v in late] == [("mh-2", "opened")]  # silent since the restart
    assert [v.device_id for v in restarted.open_alarms()] == ["mh-1", "mh-2"]
