"""Routing (class, who acts, escalation) for every default rule, and deadlines from the urgency tiers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from gateway.registry import MINOR_CLASSES
from incidents.model import LOCAL_TZ
from incidents.routing import DEFAULT_ROUTING, Deadlines, RoutingLoadError, default_router, load_routing
from rules.loader import load_default_rules
from tests.unit.test_incident_lifecycle import device


def local(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> dt.datetime:
    return dt.datetime(y, m, d, hh, mm, tzinfo=LOCAL_TZ)


def test_every_default_rule_gets_a_class_and_a_unit() -> None:
    router = default_router()
    rules = [r for r in load_default_rules().rules if not r.silent]
    assert {r.id for r in rules} == router.rule_ids
    for rule in rules:
        route = router.route(rule.id, device())
        names = router.spec.component_classes if route.case_type == "component" else router.spec.event_classes
        assert names[route.class_code] == route.class_name, rule.id
        assert route.responsible_unit, rule.id
        assert route.dispatch_to, rule.id
        assert router.title(rule.id)[0] == rule.title_zh


def test_component_class_names_match_the_registry() -> None:
    classes = dict(default_router().spec.component_classes)
    classes.pop("01")
    assert classes == dict(MINOR_CLASSES)


def test_manhole_cases_go_to_the_covers_owner() -> None:
    router = default_router()
    by_code = router.route("manhole_cover.tilt", device())
    assert (by_code.case_type, by_code.class_code, by_code.class_name) == ("component", "0111", "燃气井盖")
    assert by_code.responsible_unit == "北京燃气集团"
    # the owner_class attribute wins over the code; 无主井盖 goes to the street
    ownerless = router.route("manhole_cover.open", device(owner_class="0114"))
    assert (ownerless.class_code, ownerless.class_name) == ("0114", "无主井盖")
    assert ownerless.responsible_unit == "110101001" and ownerless.dispatch_to == ("110101001",)
    # nothing registered: the major class, still to the registered unit
    unknown = router.route("manhole_cover.water_near_cover", None)
    assert unknown.class_code == "01" and unknown.responsible_unit is None


def test_event_routes() -> None:
    r = default_router()
    gas = r.route("manhole_cover.combustible_gas", device())
    assert (gas.case_type, gas.class_name) == ("event", "突发事件 燃气泄漏")
    assert any("燃气公司" in p for p in gas.dispatch_to) and any("消防" in p for p in gas.dispatch_to)
    assert gas.responsible_unit == "北京燃气集团"
    duress = r.route("access_control.duress", device())
    assert duress.class_name == "扩展事件 社区安防" and any("110" in p for p in duress.dispatch_to)
    forced = r.route("access_control.forced_open", device())
    assert forced.class_name == "扩展事件 社区安防" and not any("110" in p for p in forced.dispatch_to)
    assert r.route("parking_sensor.fire_lane_occupied", device()).class_name.startswith("街面秩序")
    assert r.route("parking_sensor.abandoned_vehicle", device()).class_name.startswith("市容环境")
    assert r.route("streetlight.lamp_out", device()).class_code == "0118"
    assert r.route("streetlight.leakage", device()).class_code == "0118"
    assert r.route("streetlight.pole_tilt", device()).class_code == "0117"
    smoke = r.route("smoke_detector.smoke_alarm", device())
    assert smoke.class_name == "突发事件 火灾"
    assert smoke.escalation is not None and smoke.escalation.after_s == 300 and "119" in smoke.escalation.to
    assert r.route("manhole_cover.tilt", device()).escalation is None


def test_maintenance_work_orders_go_to_the_maintainer() -> None:
    r = default_router()
    for rule_id in ("smoke_detector.offline", "manhole_cover.low_battery", "smoke_detector.fault"):
        route = r.route(rule_id, device(maintainer="安装公司甲"))
        assert (route.class_code, route.class_name) == ("0602", "扩展事件 物联设备运维")
        assert route.responsible_unit == "安装公司甲"
    # no maintainer registered: the responsible unit
    assert r.route("smoke_detector.offline", device()).responsible_unit == "北京燃气集团"


def test_deadlines_by_tier() -> None:
    d = default_router().deadlines
    start = local(2026, 11, 18, 10)  # Wednesday
    assert d.due("P1", start) == (start + dt.timedelta(minutes=5), start + dt.timedelta(hours=2))
    assert d.due("P2", start) == (start + dt.timedelta(minutes=30), start + dt.timedelta(hours=6))
    assert d.due("P3", start) == (local(2026, 11, 19, 10), local(2026, 11, 23, 10))
    assert d.due("P4", start) == (None, None)


def test_working_days_skip_the_weekend() -> None:
    d = default_router().deadlines
    friday = local(2026, 11, 20, 17)
    assert d.due("P3", friday) == (local(2026, 11, 23, 17), local(2026, 11, 25, 17))
    # raised on a Saturday: the clock starts on Monday
    assert d.add_working_days(local(2026, 11, 21, 10), 1) == local(2026, 11, 24)
    # in UTC: Friday 23:00 UTC is already Saturday 07:00 in UTC+8
    utc = dt.datetime(2026, 11, 20, 23, tzinfo=dt.UTC)
    assert d.add_working_days(utc, 1) == local(2026, 11, 24)
    assert d.add_working_days(utc, 1).tzinfo == dt.UTC


def test_holidays_and_makeup_workdays() -> None:
    tiers = default_router().deadlines.tiers
    d = Deadlines(
        tiers, holidays=frozenset({dt.date(2026, 11, 23)}), workdays=frozenset({dt.date(2026, 11, 22)})
    )
    # Friday 17:00 → (Sat off) Sunday is a makeup working day → Sunday 17:00
    assert d.add_working_days(local(2026, 11, 20, 17), 1) == local(2026, 11, 22, 17)
    # Sunday 17:00 + 1 → Monday is a holiday → Tuesday 17:00
    assert d.add_working_days(local(2026, 11, 22, 17), 1) == local(2026, 11, 24, 17)


def _write(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFAULT_ROUTING.read_text(encoding="utf-8")
    assert old in text
    p = tmp_path / "routing.yaml"
    p.write_text(text.replace(old, new, 1), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "[manhole_cover.combustible_gas]",
            "[manhole_cover.combustable_gas]",
            r"routing.yaml:\d+: .*matches no rule",
        ),
        (
            "[manhole_cover.combustible_gas]",
            "[streetlight.leakage]",
            "rules without a route: .*combustible_gas",
        ),
        ('class: "0402"', 'class: "0499"', r"routing.yaml:\d+: unknown event class '0499'"),
        ('act: ["@maintainer"]', 'act: ["@owner"]', r"routing.yaml:\d+: unknown party '@owner'"),
        ("case_type: event", "case_type: incident", r"routing.yaml:\d+: routes\.\d+\.case_type"),
        ("P3: {respond: {working_days: 1}", "P3: {respond: {working_days: 1, hours: 2}", "exactly one"),
    ],
)
def test_bad_routing_fails_at_load(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(RoutingLoadError, match=message):
        load_routing(_write(tmp_path, old, new))
