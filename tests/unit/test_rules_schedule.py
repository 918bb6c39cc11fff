"""schedule rule kind: lamp out and burning by day, by schedule attribute or ambient light."""

from __future__ import annotations

from rules import schedule
from rules.schedule import ScheduleParams, ScheduleState, in_window, parse_window
from rules.testing import MIN, at_local, obs, params

SL = {"device_type": "streetlight"}
ATTRS = {"rated_power_w": 100, "schedule": "18:00-06:00"}


def lamp_out() -> ScheduleParams:
    p = params(
        kind="schedule",
        expect="on",
        lit_at_least={"attr": "rated_power_w", "times": 0.1, "min": 5, "default": 5},
        for_s=300,
    )
    assert isinstance(p, ScheduleParams)
    return p


def by_day() -> ScheduleParams:
    p = params(kind="schedule", expect="off", lit_by="switch", for_s=900)
    assert isinstance(p, ScheduleParams)
    return p


def ev(p: ScheduleParams, values: dict[str, object], t: int, st: ScheduleState | None, attrs: object = ATTRS):  # type: ignore[no-untyped-def]
    return schedule.evaluate(p, obs("sl-1", values, t=t, attributes=attrs, **SL), st, t)  # type: ignore[arg-type]


def test_windows() -> None:
    assert parse_window("18:00-06:00") == (1080, 360)
    assert parse_window("6:30 - 18:15") == (390, 1095)
    assert parse_window("25:00-06:00") is None and parse_window("dusk") is None
    assert in_window((1080, 360), 1080) and in_window((1080, 360), 0) and not in_window((1080, 360), 360)
    assert in_window((390, 1095), 390) and not in_window((390, 1095), 1095)


def test_lamp_out_at_night_after_five_minutes() -> None:
    p = lamp_out()
    night = at_local(20)
    sigs, st = ev(p, {"lamp_on": True, "power_w": 9.9}, night, None)  # under 10 % of 100 W
    assert sigs == ()
    assert schedule.tick(p, st, night + 5 * MIN - 1, "sl-1")[0] == ()
    sigs, st = schedule.tick(p, st, night + 5 * MIN, "sl-1")
    assert [(s.firing, s.values["lit"]) for s in sigs] == [(True, False)]
    # the morning does not clear it (still out); a lit lamp does
    morning = at_local(7, day=1)
    sigs, st = ev(p, {"lamp_on": False, "power_w": 0.0}, morning, st)
    assert sigs == ()
    sigs, st = ev(p, {"lamp_on": True, "power_w": 10.0}, at_local(19, day=1), st)
    assert [s.firing for s in sigs] == [False]


def test_off_by_day_is_not_out() -> None:
    p = lamp_out()
    sigs, st = ev(p, {"lamp_on": False, "power_w": 0.0}, at_local(12), None)
    assert sigs == ()
    assert schedule.tick(p, st, at_local(12, 30), "sl-1")[0] == ()


def test_dark_afternoon_by_lux_expects_the_lamp_on() -> None:
    p = lamp_out()
    t = at_local(16)
    _, st = ev(p, {"lamp_on": False, "power_w": 0.0, "lux": 3.0}, t, None)
    sigs, _ = ev(p, {"lamp_on": False, "power_w": 0.0, "lux": 3.0}, t + 5 * MIN, st)
    assert [s.firing for s in sigs] == [True]
    # a bright evening by lux (18:05 in summer) is not a failure
    _, st = ev(p, {"lamp_on": False, "power_w": 0.0, "lux": 800.0}, at_local(18, 5), None)
    assert ev(p, {"lamp_on": False, "power_w": 0.0, "lux": 800.0}, at_local(18, 15), st)[0] == ()


def test_schedule_boundary_is_ticked_without_a_message() -> None:
    """Reported off at 17:55 (fine), silent since: at 18:00 it should be on, at 18:05 it is out."""
    p = lamp_out()
    _, st = ev(p, {"lamp_on": False, "power_w": 0.0}, at_local(17, 55), None)
    assert schedule.due(p, st) == at_local(18)
    sigs, st = schedule.tick(p, st, at_local(18), "sl-1")
    assert sigs == ()
    assert schedule.due(p, st) == at_local(18, 5)
    sigs, st = schedule.tick(p, st, at_local(18, 5), "sl-1")
    assert [s.firing for s in sigs] == [True]


def test_no_judgement_on_stale_values() -> None:
    p = lamp_out()
    _, st = ev(p, {"lamp_on": False, "power_w": 0.0}, at_local(12), None)
    # last message at noon: at 18:00 the values are 6 h old, the absence rule's business
    assert schedule.tick(p, st, at_local(18, 10), "sl-1")[0] == ()


def test_burning_by_day_and_dimmed_lamps() -> None:
    p = by_day()
    noon = at_local(12)
    _, st = ev(p, {"lamp_on": True, "power_w": 2.0, "lux": 20000.0}, noon, None)  # dimmed but on
    assert schedule.tick(p, st, noon + 15 * MIN - 1, "sl-1")[0] == ()
    sigs, st = schedule.tick(p, st, noon + 15 * MIN, "sl-1")
    assert [s.firing for s in sigs] == [True]
    sigs, _ = ev(p, {"lamp_on": False, "lux": 20000.0}, noon + 20 * MIN, st)
    assert [s.firing for s in sigs] == [False]


def test_no_schedule_and_no_lux_means_no_judgement() -> None:
    p = by_day()
    _, st = ev(p, {"lamp_on": True}, at_local(12), None, attrs={})
    assert schedule.tick(p, st, at_local(13), "sl-1")[0] == ()


def test_lamp_fault_event_fires_at_once() -> None:
    p = params(kind="schedule", expect="on", fire_on_events=["lamp_fault"], for_s=300)
    assert isinstance(p, ScheduleParams)
    sigs, _ = schedule.evaluate(p, obs("sl-1", event="lamp_fault", t=at_local(12), **SL), None, 0)  # type: ignore[arg-type]
    assert [s.firing for s in sigs] == [True]


def test_state_json_round_trip() -> None:
    p = lamp_out()
    _, st = ev(p, {"lamp_on": True, "power_w": 1.0, "lux": 2.0}, at_local(20), None)
    assert st is not None
    assert ScheduleState.from_json(st.to_json()) == st
