"""Threshold rule kind: limits, exactly-at, consecutive, for-duration, hysteresis, levels, attributes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rules import threshold
from rules.model import Signal
from rules.testing import MIN, T0, S, engine, obs, params, rule
from rules.threshold import ThresholdParams


def run(p: ThresholdParams, readings: list[tuple[int, float]], **kw: object) -> list[Signal]:
    """Feed (time, value) readings of p.field; the signals in order."""
    state = None
    out: list[Signal] = []
    for t, v in readings:
        sigs, state = threshold.evaluate(p, obs(values={p.field: v}, t=t, **kw), state, t)  # type: ignore[arg-type]
        out += sigs
    return out


def tp(**kw: object) -> ThresholdParams:
    p = params(kind="threshold", **kw)
    assert isinstance(p, ThresholdParams)
    return p


def test_exactly_at_the_limit() -> None:
    above = tp(field="tilt_deg", above=10)
    assert run(above, [(T0, 10.0)]) == []
    assert [s.firing for s in run(above, [(T0, 10.0001)])] == [True]
    at_least = tp(field="ch4_lel_pct", at_least=25)
    assert [s.firing for s in run(at_least, [(T0, 25.0)])] == [True]
    assert run(at_least, [(T0, 24.999)]) == []
    below = tp(field="water_level_cm", below=30)
    assert run(below, [(T0, 30.0)]) == []
    assert [s.firing for s in run(below, [(T0, 29.9)])] == [True]


def test_consecutive_readings_are_needed_and_a_good_one_resets() -> None:
    p = tp(field="tilt_deg", above=10, consecutive=2)
    assert run(p, [(T0, 12), (T0 + S, 9), (T0 + 2 * S, 12)]) == []
    sigs = run(p, [(T0, 12), (T0 + S, 12.5)])
    assert [(s.firing, s.ts_ms, s.values) for s in sigs] == [(True, T0 + S, {"tilt_deg": 12.5})]


def test_hysteresis_tilt_back_under_8() -> None:
    """The domain's example: over 10° fires, it clears only back under 8°."""
    p = tp(field="tilt_deg", above=10, clear_margin=2)
    sigs = run(p, [(T0, 11), (T0 + S, 9), (T0 + 2 * S, 8.0), (T0 + 3 * S, 10.5), (T0 + 4 * S, 7.99)])
    assert [(s.firing, s.ts_ms) for s in sigs] == [(True, T0), (False, T0 + 4 * S)]


def test_hovering_at_the_limit_opens_once() -> None:
    p = tp(field="tilt_deg", above=10, clear_margin=2)
    hover = [(T0 + i * S, 10.2 if i % 2 else 9.8) for i in range(200)]
    assert [s.firing for s in run(p, hover)] == [True]


def test_clear_hold_time_by_reading_and_by_tick() -> None:
    p = tp(field="ch4_lel_pct", at_least=25, clear_margin=5, clear_hold_s=300)
    sigs, st = threshold.evaluate(p, obs(values={"ch4_lel_pct": 30}, t=T0), None, T0)
    assert sigs[0].firing
    # good reading starts the hold; a bad one in between restarts it
    _, st = threshold.evaluate(p, obs(values={"ch4_lel_pct": 10}, t=T0 + MIN), st, T0 + MIN)
    _, st = threshold.evaluate(p, obs(values={"ch4_lel_pct": 26}, t=T0 + 2 * MIN), st, T0 + 2 * MIN)
    _, st = threshold.evaluate(p, obs(values={"ch4_lel_pct": 10}, t=T0 + 3 * MIN), st, T0 + 3 * MIN)
    assert threshold.due(p, st) == T0 + 8 * MIN
    assert threshold.tick(p, st, T0 + 8 * MIN - 1, "dev-1")[0] == ()
    sigs, st = threshold.tick(p, st, T0 + 8 * MIN, "dev-1")
    assert [(s.firing, s.ts_ms) for s in sigs] == [(False, T0 + 8 * MIN)]
    assert st is None


def test_value_in_the_band_keeps_firing_and_restarts_the_hold() -> None:
    p = tp(field="ch4_lel_pct", at_least=25, clear_margin=5, clear_hold_s=60)
    readings = [(T0, 30), (T0 + 10 * S, 10), (T0 + 40 * S, 22), (T0 + 80 * S, 10), (T0 + 130 * S, 10)]
    assert [s.firing for s in run(p, readings)] == [True]  # 22 is in the band: hold restarts at 80 s
    assert [s.firing for s in run(p, [*readings, (T0 + 140 * S, 10)])] == [True, False]


def test_for_duration_fires_on_tick_and_a_return_resets() -> None:
    p = tp(field="voltage_v", above=242, below=198, for_s=60)
    _, st = threshold.evaluate(p, obs(values={"voltage_v": 250}, t=T0), None, T0)
    assert threshold.tick(p, st, T0 + 59_999, "sl-1")[0] == ()
    sigs, _ = threshold.tick(p, st, T0 + 60_000, "sl-1")
    assert [(s.firing, s.ts_ms, s.threshold) for s in sigs] == [(True, T0 + 60_000, "> 242 or < 198")]
    # back inside the band at 30 s: nothing pending any more
    _, st3 = threshold.evaluate(p, obs(values={"voltage_v": 220}, t=T0 + 30 * S), st, T0 + 30 * S)
    assert st3 is None
    # low side of the band, confirmed by a reading after 60 s
    sigs = run(p, [(T0, 190), (T0 + 61 * S, 191)])
    assert [s.firing for s in sigs] == [True]


def test_levels_escalate_at_once_and_never_fall_back_while_firing() -> None:
    p = tp(field="ch4_lel_pct", at_least=25, levels=[{"at_least": 50, "urgency": "P1"}])
    sigs = run(p, [(T0, 30), (T0 + S, 55), (T0 + 2 * S, 35), (T0 + 3 * S, 60), (T0 + 4 * S, 10)])
    assert [(s.firing, s.level) for s in sigs] == [(True, 0), (True, 1), (False, 0)]


def test_a_level_needs_no_confirmation() -> None:
    """Flipped cover: > 90° fires at once although the tilt rule wants 2 readings."""
    p = tp(field="tilt_deg", above=10, consecutive=2, levels=[{"above": 90, "urgency": "P1"}])
    assert [(s.firing, s.level) for s in run(p, [(T0, 120)])] == [(True, 1)]


def test_attribute_reference_with_default_and_without() -> None:
    p = tp(field="tilt_deg", above={"attr": "tilt_baseline_deg", "plus": 10})
    assert run(p, [(T0, 14)], attributes={"tilt_baseline_deg": 5}) == []
    assert [s.threshold for s in run(p, [(T0, 16)], attributes={"tilt_baseline_deg": 5})] == ["> 15"]
    assert run(p, [(T0, 50)]) == []  # no baseline, no default: not judged
    p2 = tp(field="tilt_deg", above={"attr": "tilt_baseline_deg", "plus": 10, "default": 0})
    assert [s.firing for s in run(p2, [(T0, 11)])] == [True]


def test_fire_on_event_then_clear_by_reading() -> None:
    p = tp(field="battery_pct", below=20, clear_margin=5, fire_on_events=["low_battery"])
    sigs, st = threshold.evaluate(p, obs(event="low_battery", t=T0), None, T0)
    assert [s.firing for s in sigs] == [True]
    sigs, st = threshold.evaluate(p, obs(values={"battery_pct": 22}, t=T0 + S), st, T0 + S)
    assert sigs == ()
    sigs, st = threshold.evaluate(p, obs(values={"battery_pct": 100}, t=T0 + 2 * S), st, T0 + 2 * S)
    assert [s.firing for s in sigs] == [False]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"above": 1, "at_least": 2},
        {"below": 1, "at_most": 2},
        {"above": 10, "below": 20},
        {"above": 1, "levels": [{"above": 5, "urgency": "P1"}, {"above": 9, "urgency": "P2"}]},
        {"above": 1, "levels": [{"above": 5, "below": 2, "urgency": "P1"}]},
        {"above": 1, "consecutive": 0},
        {"above": 1, "bogus": 1},
    ],
)
def test_invalid_parameters(kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        params(kind="threshold", field="x", **kw)


def test_engine_gives_one_alarm_with_repeated_hover() -> None:
    e = engine(rule("manhole_cover.tilt", "P2", kind="threshold", field="tilt_deg", above=10, clear_margin=2))
    verdicts = []
    for i in range(100):
        verdicts += e.process(obs("mh-1", {"tilt_deg": 10.5 if i % 2 else 9.5}, t=T0 + i * MIN))
    assert [v.change for v in verdicts] == ["opened"]
    assert verdicts[0].urgency == "P2" and verdicts[0].state == "firing"
    assert verdicts[0].message.startswith("manhole_cover.tilt：tilt_deg=10.5")
