"""correlation rule kind through the engine: fire confirmed by two detectors or by heat, a dark circuit
as one grouped alarm."""

from __future__ import annotations

from rules.engine import Engine
from rules.loader import load_default_rules
from rules.testing import MIN, T0, S, at_local, engine, obs, rule

SD = {"device_type": "smoke_detector", "building": "3号楼"}


def smoke_engine() -> Engine:
    return engine(
        rule(
            "smoke_detector.smoke_alarm",
            "P1",
            kind="state_duration",
            field="alarm",
            on_events=["smoke_alarm"],
        ),
        rule("smoke_detector.heat", "P2", silent=True, kind="threshold", field="temperature_c", at_least=60),
        rule(
            "smoke_detector.fire_building",
            "P1",
            kind="correlation",
            rules=["smoke_alarm"],
            group_by="building",
            min_count=2,
            window_s=120,
        ),
        rule(
            "smoke_detector.fire_heat",
            "P1",
            kind="correlation",
            rules=["smoke_alarm", "heat"],
            group_by="device",
            count="rules",
            min_count=2,
        ),
    )


def test_two_detectors_of_one_building_within_two_minutes() -> None:
    e = smoke_engine()
    a = e.process(obs("sd-1", {"alarm": True}, t=T0, **SD))  # type: ignore[arg-type]
    assert [v.rule_id for v in a] == ["smoke_detector.smoke_alarm"]
    b = e.process(obs("sd-2", event="smoke_alarm", t=T0 + 119 * S, **SD))  # type: ignore[arg-type]
    group = [v for v in b if v.rule_id == "smoke_detector.fire_building"]
    assert [(v.change, v.key, v.device_id, v.members, v.urgency) for v in group] == [
        ("opened", "building:110101001001/3号楼", None, ("sd-1", "sd-2"), "P1")
    ]
    # a third joins: the same group alarm, updated
    c = e.process(obs("sd-3", {"alarm": True}, t=T0 + 5 * MIN, **SD))  # type: ignore[arg-type]
    assert [(v.change, v.members) for v in c if v.rule_id.endswith("fire_building")] == [
        ("repeated", ("sd-1", "sd-2", "sd-3"))
    ]
    # clears when no detector alarms any more
    out = []
    for i, d in enumerate(("sd-1", "sd-2", "sd-3")):
        out += e.process(obs(d, {"alarm": False}, t=T0 + (10 + i) * MIN, **SD))  # type: ignore[arg-type]
    assert [v.change for v in out if v.rule_id.endswith("fire_building")] == ["cleared"]


def test_too_far_apart_or_other_buildings_do_not_confirm() -> None:
    e = smoke_engine()
    e.process(obs("sd-1", {"alarm": True}, t=T0, **SD))  # type: ignore[arg-type]
    late = e.process(obs("sd-2", {"alarm": True}, t=T0 + 121 * S, **SD))  # type: ignore[arg-type]
    assert [v.rule_id for v in late] == ["smoke_detector.smoke_alarm"]
    other = e.process(
        obs("sd-9", {"alarm": True}, t=T0 + 10 * S, device_type="smoke_detector", building="5号楼")
    )
    assert [v.rule_id for v in other] == ["smoke_detector.smoke_alarm"]
    nobuilding = e.process(obs("sd-8", {"alarm": True}, t=T0 + 10 * S, device_type="smoke_detector"))
    assert [v.rule_id for v in nobuilding] == ["smoke_detector.smoke_alarm"]


def test_alarm_and_heat_on_one_detector() -> None:
    e = smoke_engine()
    hot = e.process(obs("sd-1", {"temperature_c": 65.0}, t=T0, **SD))  # type: ignore[arg-type]
    assert hot == []  # heat alone is silent
    both = e.process(obs("sd-1", {"alarm": True, "temperature_c": 70.0}, t=T0 + 10 * MIN, **SD))  # type: ignore[arg-type]
    heat = [v for v in both if v.rule_id == "smoke_detector.fire_heat"]
    assert [(v.change, v.device_id, v.members) for v in heat] == [
        ("opened", "sd-1", ("smoke_detector.heat", "smoke_detector.smoke_alarm"))
    ]


def test_dark_circuit_is_one_case_not_one_per_lamp() -> None:
    e = Engine(load_default_rules())
    night = at_local(21)
    attrs = {"circuit": "C7", "rated_power_w": 100, "schedule": "18:00-06:00"}
    dark = {"lamp_on": True, "power_w": 1.0, "lux": 2.0}
    out = []
    for i in range(5):
        out += e.process(obs(f"sl-{i}", dark, t=night + i * S, device_type="streetlight", attributes=attrs))
    out += e.tick(night + 5 * MIN + 2 * S)  # lamps 0-2 out for 5 minutes
    grouped = [(v.rule_id, v.key, v.change, v.grouped_into) for v in out]
    key = "circuit:110101001001/C7"  # a circuit is scoped by its community
    assert ("streetlight.circuit_dark", key, "opened", None) in grouped
    for i in range(3):
        assert ("streetlight.lamp_out", f"sl-{i}", "cleared", key) in grouped
    later = e.tick(night + 6 * MIN)  # lamps 3-4: taken into the group, no case of their own
    assert [(v.rule_id, v.change, v.members) for v in later] == [
        ("streetlight.circuit_dark", "repeated", ("sl-0", "sl-1", "sl-2", "sl-3")),
        ("streetlight.circuit_dark", "repeated", ("sl-0", "sl-1", "sl-2", "sl-3", "sl-4")),
    ]
    # lamps come back one by one: nothing until the last, then the group clears
    lit = {"lamp_on": True, "power_w": 95.0, "lux": 2.0}
    back = []
    for i in range(5):
        back += e.process(
            obs(f"sl-{i}", lit, t=night + 20 * MIN + i * S, device_type="streetlight", attributes=attrs)
        )
    assert [(v.rule_id, v.change) for v in back] == [("streetlight.circuit_dark", "cleared")]


def test_one_dark_lamp_is_its_own_case() -> None:
    e = Engine(load_default_rules())
    night = at_local(21)
    attrs = {"circuit": "C7", "rated_power_w": 100}
    e.process(
        obs("sl-1", {"lamp_on": True, "power_w": 1.0}, t=night, device_type="streetlight", attributes=attrs)
    )
    out = e.tick(night + 5 * MIN)
    assert [(v.rule_id, v.change, v.urgency) for v in out] == [("streetlight.lamp_out", "opened", "P3")]


def test_circuits_of_the_same_name_in_two_communities_are_different_circuits() -> None:
    e = Engine(load_default_rules())
    night = at_local(21)
    attrs = {"circuit": "1号回路", "rated_power_w": 100, "schedule": "18:00-06:00"}
    dark = {"lamp_on": True, "power_w": 1.0, "lux": 2.0}
    out = []
    # two dark lamps in one community, one in another: no circuit has the 3 dark lamps a group needs
    for i, community in enumerate(["社区A", "社区A", "社区B"]):
        out += e.process(
            obs(
                f"sl-{i}",
                dark,
                t=night + i * S,
                device_type="streetlight",
                attributes=attrs,
                community=community,
            )
        )
    out += e.tick(night + 5 * MIN + 2 * S)
    assert [v for v in out if v.rule_id == "streetlight.circuit_dark"] == []
    assert sorted(v.device_id or "" for v in out if v.rule_id == "streetlight.lamp_out") == [
        "sl-0",
        "sl-1",
        "sl-2",
    ]
