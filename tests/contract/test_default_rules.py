"""Contract: the default rule files load against every thing model, and every condition of the domain's
"Default thresholds" table fires its rule with the urgency of the tiers table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from devices import THING_MODELS
from rules.engine import Engine, Verdict
from rules.kinds import KINDS
from rules.loader import DEFAULT_RULES_DIR, describe, load_default_rules, load_rules, rule_files
from rules.model import Observation
from rules.testing import HOUR, MIN, T0, S, at_local, obs

RULES = load_default_rules()
ROOT = Path(__file__).resolve().parents[2]


def test_one_rule_file_per_device_type_and_all_load() -> None:
    files = {p.stem for p in rule_files([DEFAULT_RULES_DIR])}
    assert files == set(THING_MODELS)
    by_type = {t: [r for r in RULES.rules if r.device_type == t] for t in THING_MODELS}
    assert all(by_type.values())
    for f in rule_files([DEFAULT_RULES_DIR]):  # each file on its own, too
        assert load_rules([f]).rules


def test_every_rule_is_described_and_documented() -> None:
    readme = (ROOT / "rules" / "README.md").read_text(encoding="utf-8")
    for r in RULES.rules:
        assert describe(r)
        assert f"`{r.id}`" in readme, f"{r.id} missing from rules/README.md"
        assert r.title_zh and r.title_en and r.source.startswith(str(DEFAULT_RULES_DIR))


def test_every_kind_is_used_by_a_default_rule() -> None:
    assert {r.params.kind for r in RULES.rules} == set(KINDS)


def test_every_type_has_an_offline_rule_and_battery_types_a_low_battery_rule() -> None:
    ids = {r.id for r in RULES.rules}
    for t, m in THING_MODELS.items():
        assert f"{t}.offline" in ids
        assert (f"{t}.low_battery" in ids) == ("battery_pct" in m.fields_by_name)


def run(*steps: Observation | int) -> list[Verdict]:
    """Observations (processed) and times (ticked), through the full default rule set."""
    e = Engine(RULES)
    out: list[Verdict] = []
    for s in steps:
        out += e.tick(s) if isinstance(s, int) else e.process(s)
    return out


def mh(values: dict[str, object], t: int = T0, **kw: object) -> Observation:
    return obs("mh-1", values, t=t, **kw)  # type: ignore[arg-type]


def sl(values: dict[str, object] | None = None, t: int = T0, **kw: object) -> Observation:
    attrs = {"rated_power_w": 100, "schedule": "18:00-06:00", "circuit": "C1"}
    return obs("sl-1", values, t=t, device_type="streetlight", attributes=attrs, **kw)  # type: ignore[arg-type]


def ac(values: dict[str, object] | None = None, t: int = T0, **kw: object) -> Observation:
    return obs("ac-1", values, t=t, device_type="access_control", **kw)  # type: ignore[arg-type]


def pk(values: dict[str, object], t: int = T0, kind: str = "fire_lane") -> Observation:
    attrs = {"bay_kind": kind, "time_limit_min": 120}
    return obs("pk-1", values, t=t, device_type="parking_sensor", attributes=attrs)


def sd(values: dict[str, object] | None = None, t: int = T0, dev: str = "sd-1", **kw: object) -> Observation:
    return obs(dev, values, t=t, device_type="smoke_detector", building="1号楼", **kw)  # type: ignore[arg-type]


NIGHT, NOON = at_local(21), at_local(12)

# (domain table row, steps, rule id, urgency the alarm has at the end)
SCENARIOS: list[tuple[str, Callable[[], list[Observation | int]], str, str]] = [
    (
        "manhole tilt > 10° for 2 readings",
        lambda: [mh({"tilt_deg": 11}), mh({"tilt_deg": 11}, T0 + S)],
        "manhole_cover.tilt",
        "P2",
    ),
    ("manhole flipped > 90° at once", lambda: [mh({"tilt_deg": 91})], "manhole_cover.tilt", "P1"),
    (
        "manhole tilt vs its installed position",
        lambda: [
            mh({"tilt_deg": 16}, attributes={"tilt_baseline_deg": 5}),
            mh({"tilt_deg": 16}, T0 + S, attributes={"tilt_baseline_deg": 5}),
        ],
        "manhole_cover.tilt",
        "P2",
    ),
    ("manhole cover open", lambda: [mh({"cover_open": True})], "manhole_cover.open", "P2"),
    (
        "water near the cover < 30 cm",
        lambda: [mh({"water_level_cm": 29.9})],
        "manhole_cover.water_near_cover",
        "P2",
    ),
    ("gas >= 25 %LEL", lambda: [mh({"ch4_lel_pct": 25})], "manhole_cover.combustible_gas", "P2"),
    ("gas >= 50 %LEL", lambda: [mh({"ch4_lel_pct": 50})], "manhole_cover.combustible_gas", "P1"),
    ("H2S >= 6 ppm", lambda: [mh({"h2s_ppm": 6})], "manhole_cover.h2s", "P2"),
    ("H2S >= 20 ppm", lambda: [mh({"h2s_ppm": 20})], "manhole_cover.h2s", "P1"),
    ("CO >= 24 ppm", lambda: [mh({"co_ppm": 24})], "manhole_cover.co", "P2"),
    ("CO >= 160 ppm", lambda: [mh({"co_ppm": 160})], "manhole_cover.co", "P1"),
    ("O2 < 19.5 %", lambda: [mh({"o2_pct": 19.4})], "manhole_cover.low_oxygen", "P2"),
    ("manhole low battery", lambda: [mh({"battery_pct": 19})], "manhole_cover.low_battery", "P3"),
    (
        "manhole offline",
        lambda: [mh({"battery_pct": 80}), T0 + 2 * HOUR + 10 * MIN + 1],
        "manhole_cover.offline",
        "P3",
    ),
    ("leakage >= 30 mA", lambda: [sl({"leakage_ma": 30})], "streetlight.leakage", "P2"),
    ("leakage >= 100 mA", lambda: [sl({"leakage_ma": 100})], "streetlight.leakage", "P1"),
    (
        "lamp out at night for 5 min",
        lambda: [sl({"lamp_on": True, "power_w": 4.0}, NIGHT), NIGHT + 5 * MIN],
        "streetlight.lamp_out",
        "P3",
    ),
    (
        "lamp out when dark by lux",
        lambda: [sl({"lamp_on": False, "lux": 2.0}, at_local(16, 30)), at_local(16, 35)],
        "streetlight.lamp_out",
        "P3",
    ),
    ("lamp driver fault", lambda: [sl(event="lamp_fault")], "streetlight.lamp_out", "P3"),
    (
        "burning by day for 15 min",
        lambda: [sl({"lamp_on": True, "lux": 30000.0}, NOON), NOON + 15 * MIN],
        "streetlight.burning_by_day",
        "P3",
    ),
    ("voltage > 242 V for 1 min", lambda: [sl({"voltage_v": 242.1}), T0 + MIN], "streetlight.voltage", "P3"),
    ("voltage < 198 V for 1 min", lambda: [sl({"voltage_v": 197.9}), T0 + MIN], "streetlight.voltage", "P3"),
    (
        "pole tilt >= 3°",
        lambda: [sl({"pole_tilt_deg": 3}), sl({"pole_tilt_deg": 3}, T0 + S)],
        "streetlight.pole_tilt",
        "P3",
    ),
    ("pole tilt >= 5°", lambda: [sl({"pole_tilt_deg": 5})], "streetlight.pole_tilt", "P2"),
    ("pole help call", lambda: [sl(event="emergency_call")], "streetlight.help_call", "P1"),
    ("streetlight offline", lambda: [sl({"lamp_on": True}), T0 + 25 * MIN + 1], "streetlight.offline", "P3"),
    ("door forced open", lambda: [ac(event="door_forced_open")], "access_control.forced_open", "P2"),
    ("duress", lambda: [ac(event="duress")], "access_control.duress", "P1"),
    ("tamper", lambda: [ac(event="tamper")], "access_control.tamper", "P3"),
    (
        "door held open > 60 s",
        lambda: [ac({"door_open": True}), T0 + 60 * S],
        "access_control.held_open",
        "P3",
    ),
    (
        "door held open event",
        lambda: [ac({"open_s": 95}, event="door_held_open")],
        "access_control.held_open",
        "P3",
    ),
    (
        "denied access below the alarm count",
        lambda: [ac(event="access_denied", t=T0 + i * S, seq=i) for i in range(3)],
        "access_control.denied_access",
        "P4",
    ),
    (
        "denied access >= 5 in 5 min",
        lambda: [ac(event="access_denied", t=T0 + i * MIN, seq=i) for i in range(5)],
        "access_control.denied_access",
        "P3",
    ),
    ("access battery", lambda: [ac({"battery_pct": 10})], "access_control.low_battery", "P3"),
    ("access offline", lambda: [ac({"door_open": False}), T0 + 12 * MIN + 1], "access_control.offline", "P3"),
    (
        "fire lane occupied >= 5 min",
        lambda: [pk({"occupied": True}), T0 + 5 * MIN],
        "parking_sensor.fire_lane_occupied",
        "P2",
    ),
    (
        "no-parking bay occupied >= 5 min",
        lambda: [pk({"occupied": True}, kind="no_parking"), T0 + 5 * MIN],
        "parking_sensor.no_parking_occupied",
        "P3",
    ),
    (
        "overstay in a time-limited bay",
        lambda: [pk({"occupied": True}, kind="time_limited"), T0 + 120 * MIN],
        "parking_sensor.overstay",
        "P4",
    ),
    (
        "abandoned vehicle > 7 days",
        lambda: [pk({"occupied": True}, kind="normal"), T0 + 7 * 24 * HOUR],
        "parking_sensor.abandoned_vehicle",
        "P3",
    ),
    ("parking battery", lambda: [pk({"battery_pct": 5.0})], "parking_sensor.low_battery", "P3"),
    (
        "parking offline",
        lambda: [pk({"occupied": False}), T0 + 49 * HOUR + 1],
        "parking_sensor.offline",
        "P3",
    ),
    ("smoke alarm state", lambda: [sd({"alarm": True})], "smoke_detector.smoke_alarm", "P1"),
    ("smoke_alarm event", lambda: [sd(event="smoke_alarm")], "smoke_detector.smoke_alarm", "P1"),
    (
        "fire: 2 detectors of one building in 2 min",
        lambda: [sd({"alarm": True}), sd({"alarm": True}, T0 + 2 * MIN, dev="sd-2")],
        "smoke_detector.fire_confirmed_building",
        "P1",
    ),
    (
        "fire: alarm + temperature >= 60 °C",
        lambda: [sd({"alarm": True, "temperature_c": 60.0})],
        "smoke_detector.fire_confirmed_heat",
        "P1",
    ),
    ("smoke low battery", lambda: [sd({"battery_pct": 19.0})], "smoke_detector.low_battery", "P3"),
    ("smoke low_battery event", lambda: [sd(event="low_battery")], "smoke_detector.low_battery", "P3"),
    ("detector fault", lambda: [sd(event="fault")], "smoke_detector.fault", "P3"),
    ("detector removed", lambda: [sd(event="removed")], "smoke_detector.removed", "P3"),
    ("smoke offline", lambda: [sd({"alarm": False}), T0 + 49 * HOUR + 1], "smoke_detector.offline", "P3"),
]


@pytest.mark.parametrize(("row", "steps", "rule_id", "urgency"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_domain_condition_fires_with_its_urgency(
    row: str, steps: Callable[[], list[Observation | int]], rule_id: str, urgency: str
) -> None:
    verdicts = [v for v in run(*steps()) if v.rule_id == rule_id]
    assert verdicts, f"{row}: {rule_id} did not fire"
    assert verdicts[0].change == "opened" and verdicts[-1].state == "firing"
    assert verdicts[-1].urgency == urgency


@pytest.mark.parametrize(
    ("steps", "rule_id"),
    [
        ([mh({"tilt_deg": 10}), mh({"tilt_deg": 10}, T0 + S)], "manhole_cover.tilt"),
        ([mh({"tilt_deg": 14}, attributes={"tilt_baseline_deg": 5})] * 1, "manhole_cover.tilt"),
        ([mh({"water_level_cm": 30})], "manhole_cover.water_near_cover"),
        ([mh({"ch4_lel_pct": 24.9})], "manhole_cover.combustible_gas"),
        ([mh({"o2_pct": 19.5})], "manhole_cover.low_oxygen"),
        ([sl({"voltage_v": 242.0}), T0 + HOUR], "streetlight.voltage"),
        ([sl({"voltage_v": 250.0}), T0 + 59 * S], "streetlight.voltage"),
        ([sl({"lamp_on": False, "power_w": 0.0}, NOON), NOON + HOUR], "streetlight.lamp_out"),
        ([sl({"lamp_on": True, "power_w": 90.0}, NIGHT), NIGHT + HOUR], "streetlight.burning_by_day"),
        ([ac({"door_open": True}), T0 + 59 * S], "access_control.held_open"),
        (
            [ac(event="access_denied", t=T0 + i * 3 * MIN, seq=i) for i in range(5)],
            "access_control.denied_access",
        ),
        ([pk({"occupied": True}), T0 + 5 * MIN - 1], "parking_sensor.fire_lane_occupied"),
        ([pk({"occupied": True}, kind="normal"), T0 + HOUR], "parking_sensor.fire_lane_occupied"),
        (
            [sd({"alarm": True}), sd({"alarm": True}, T0 + 121 * S, dev="sd-2")],
            "smoke_detector.fire_confirmed_building",
        ),
        ([sd({"temperature_c": 80.0})], "smoke_detector.fire_confirmed_heat"),
    ],
)
def test_just_inside_the_limits_nothing_fires(steps: list[Observation | int], rule_id: str) -> None:
    assert [v for v in run(*steps) if v.rule_id == rule_id] == []


def test_healthy_devices_give_no_verdicts() -> None:
    healthy = {
        "manhole_cover": {
            "tilt_deg": 1.0,
            "cover_open": False,
            "water_level_cm": 180.0,
            "ch4_lel_pct": 0.0,
            "h2s_ppm": 0.0,
            "co_ppm": 1.0,
            "o2_pct": 20.9,
            "battery_pct": 80.0,
        },
        "streetlight": {
            "lamp_on": True,
            "power_w": 95.0,
            "voltage_v": 221.0,
            "leakage_ma": 1.0,
            "pole_tilt_deg": 0.2,
            "lux": 1.0,
        },
        "access_control": {"door_open": False, "battery_pct": 90.0},
        "parking_sensor": {"occupied": False, "battery_pct": 90.0},
        "smoke_detector": {"alarm": False, "temperature_c": 22.0, "battery_pct": 90.0},
    }
    e = Engine(RULES)
    out: list[Verdict] = []
    for i in range(3):
        for t, values in healthy.items():
            assert set(values) <= set(THING_MODELS[t].fields_by_name)
            attrs = {"bay_kind": "fire_lane"} if t == "parking_sensor" else {"rated_power_w": 100}
            o = obs(f"{t}-1", values, t=NIGHT + i * 10 * MIN, device_type=t, attributes=attrs)
            out += e.process(o)
        out += e.tick(NIGHT + i * 10 * MIN + 5 * MIN)
    assert out == []
    json.dumps(e.snapshot())
