"""event_count rule kind: counts in a window, levels, groups, out-of-order and duplicated events."""

from __future__ import annotations

from rules import event_count
from rules.event_count import EventCountParams
from rules.model import Signal
from rules.testing import MIN, T0, S, engine, obs, params, rule

AC = {"device_type": "access_control"}


def ep(**kw: object) -> EventCountParams:
    p = params(kind="event_count", **kw)
    assert isinstance(p, EventCountParams)
    return p


DENIED = {"events": ["access_denied"], "count": 3, "window_s": 300, "levels": [{"count": 5, "urgency": "P3"}]}


def feed(p: EventCountParams, times: list[int], device: str = "ac-1", **kw: object) -> list[Signal]:
    st = None
    out: list[Signal] = []
    for t in times:
        sigs, st = event_count.evaluate(p, obs(device, event="access_denied", t=t, **AC, **kw), st, t)  # type: ignore[arg-type]
        out += sigs
    return out


def test_count_and_level_within_the_window() -> None:
    p = ep(**DENIED)
    sigs = feed(p, [T0 + i * MIN for i in range(5)])  # 5 denials in 4 minutes
    assert [(s.firing, s.level, s.occurrence, s.values["count"]) for s in sigs] == [
        (True, 0, False, 3),
        (True, 0, True, 4),
        (True, 1, False, 5),
    ]


def test_exactly_at_the_window_edge() -> None:
    p = ep(**DENIED)
    # 3 events spanning exactly 300 s count; 300.001 s do not
    assert [s.firing for s in feed(p, [T0, T0 + 150 * S, T0 + 300 * S])] == [True]
    assert feed(p, [T0, T0 + 150 * S, T0 + 300 * S + 1]) == []


def test_events_spread_out_never_fire() -> None:
    p = ep(**DENIED)
    assert feed(p, [T0 + i * 3 * MIN for i in range(20)]) == []


def test_out_of_order_events_count_in_their_window() -> None:
    p = ep(**DENIED)
    sigs = feed(p, [T0 + 4 * MIN, T0 + 1 * MIN, T0 + 2 * MIN])
    assert [s.firing for s in sigs] == [True]
    # an old event far outside the window of the newest does not help
    assert feed(p, [T0 + 10 * MIN, T0 + 11 * MIN, T0]) == []


def test_group_by_building_lists_members() -> None:
    p = ep(events=["door_forced_open"], count=2, window_s=600, group_by="building")
    st = None
    out: list[Signal] = []
    for dev, t in (("ac-1", T0), ("ac-2", T0 + MIN)):
        o = obs(dev, event="door_forced_open", t=t, building="B7", **AC)  # type: ignore[arg-type]
        sigs, st = event_count.evaluate(p, o, st, t)
        out += sigs
    assert [(s.key, s.members) for s in out] == [("building:110101001001/B7", ("ac-1", "ac-2"))]


def test_clear_after_quiet_and_clear_events() -> None:
    p = ep(events=["door_forced_open"], clear_after_s=1800)
    o = obs("ac-1", event="door_forced_open", t=T0, **AC)  # type: ignore[arg-type]
    _, st = event_count.evaluate(p, o, None, T0)
    assert event_count.due(p, st) == T0 + 30 * MIN
    assert event_count.tick(p, st, T0 + 30 * MIN - 1, "ac-1")[0] == ()
    assert [s.firing for s in event_count.tick(p, st, T0 + 30 * MIN, "ac-1")[0]] == [False]
    f = ep(events=["fault"], clear_events=["self_test"])
    sd = {"device_type": "smoke_detector"}
    _, st = event_count.evaluate(f, obs("sd-1", event="fault", t=T0, **sd), None, T0)  # type: ignore[arg-type]
    assert event_count.due(f, st) is None  # no automatic clear
    sigs, st = event_count.evaluate(f, obs("sd-1", event="self_test", t=T0 + S, **sd), st, T0)  # type: ignore[arg-type]
    assert [s.firing for s in sigs] == [False] and st is None


def test_idle_windows_are_forgotten() -> None:
    p = ep(**DENIED)
    o = obs("ac-1", event="access_denied", t=T0, **AC)  # type: ignore[arg-type]
    _, st = event_count.evaluate(p, o, None, T0)
    assert event_count.due(p, st) == T0 + 5 * MIN
    assert event_count.tick(p, st, T0 + 5 * MIN, "ac-1") == ((), None)


def test_engine_counts_a_redelivered_event_once() -> None:
    e = engine(rule("access_control.denied", "P4", kind="event_count", **DENIED))
    verdicts = []
    for seq in (1, 2, 2, 2, 3):  # QoS 1 redeliveries of seq 2
        t = T0 + seq * S
        verdicts += e.process(obs("ac-1", event="access_denied", t=t, seq=seq, **AC))  # type: ignore[arg-type]
    assert [(v.change, v.evidence.values["count"]) for v in verdicts] == [("opened", 3)]
    assert e.stats.duplicates == 2
    # without seq: same time and same event is the same event
    e2 = engine(rule("access_control.denied", "P4", kind="event_count", **DENIED))
    for t in (T0, T0, T0 + S, T0 + S):
        e2.process(obs("ac-1", event="access_denied", t=t, **AC))  # type: ignore[arg-type]
    assert e2.stats.duplicates == 2 and e2.open_alarms() == []


def test_engine_repeats_and_escalation_on_one_alarm() -> None:
    e = engine(rule("access_control.denied", "P4", kind="event_count", **DENIED))
    verdicts = []
    for i in range(7):
        verdicts += e.process(obs("ac-1", event="access_denied", t=T0 + i * S, seq=i, **AC))  # type: ignore[arg-type]
    assert [(v.change, v.urgency, v.occurrences) for v in verdicts] == [
        ("opened", "P4", 1),
        ("repeated", "P4", 2),
        ("escalated", "P3", 2),
        ("repeated", "P3", 3),
        ("repeated", "P3", 4),
    ]
    assert len(e.open_alarms()) == 1
