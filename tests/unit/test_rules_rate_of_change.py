"""rate_of_change rule kind: a step fires, a slow drift does not, the window slides."""

from __future__ import annotations

import json

from rules import rate_of_change
from rules.model import Signal
from rules.rate_of_change import RateOfChangeParams, RateState
from rules.testing import MIN, T0, obs, params


def rp(**kw: object) -> RateOfChangeParams:
    p = params(kind="rate_of_change", **kw)
    assert isinstance(p, RateOfChangeParams)
    return p


def feed(p: RateOfChangeParams, readings: list[tuple[int, float]]) -> tuple[list[Signal], RateState | None]:
    st = None
    out: list[Signal] = []
    for t, v in readings:
        sigs, st = rate_of_change.evaluate(p, obs(values={p.field: v}, t=t), st, t)
        out += sigs
    return out, st


def test_fall_within_the_window_fires_and_clears() -> None:
    p = rp(field="water_level_cm", window_s=3600, fall=50)
    sigs, _ = feed(p, [(T0, 200), (T0 + 20 * MIN, 180), (T0 + 40 * MIN, 150)])
    assert [(s.firing, s.values["change"]) for s in sigs] == [(True, -50.0)]
    # the high value leaves the window: the change over the last hour is under 50 again
    sigs, _ = feed(p, [(T0, 200), (T0 + 40 * MIN, 150), (T0 + 61 * MIN, 150)])
    assert [s.firing for s in sigs] == [True, False]


def test_slow_drift_does_not_fire() -> None:
    p = rp(field="water_level_cm", window_s=3600, fall=50)
    sigs, _ = feed(p, [(T0 + i * 30 * MIN, 200 - 20 * i) for i in range(8)])
    assert sigs == []


def test_rise_exactly_at_the_limit() -> None:
    p = rp(field="temperature_c", window_s=600, rise=10)
    assert [s.firing for s in feed(p, [(T0, 20), (T0 + MIN, 30)])[0]] == [True]
    assert feed(p, [(T0, 20), (T0 + MIN, 29.99)])[0] == []


def test_state_round_trips_through_json() -> None:
    p = rp(field="water_level_cm", window_s=3600, fall=50)
    _, st = feed(p, [(T0, 200), (T0 + MIN, 140)])
    assert st is not None
    again = RateState.from_json(json.loads(json.dumps(st.to_json())))
    assert again == st
