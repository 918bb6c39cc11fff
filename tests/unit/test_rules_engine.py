"""The engine: ordering and duplicates, one alarm per key, escalation, flapping, restart, reload,
overrides and registry attributes."""

from __future__ import annotations

import json
from pathlib import Path

from rules.engine import Engine, FlapPolicy
from rules.loader import load_default_rules, load_rules
from rules.testing import HOUR, MIN, T0, S, engine, obs, rule

PK = {"device_type": "parking_sensor"}
FIRE_LANE = {"bay_kind": "fire_lane"}


def tilt_engine() -> Engine:
    return engine(
        rule(
            "manhole_cover.tilt",
            "P2",
            kind="threshold",
            field="tilt_deg",
            above=10,
            consecutive=2,
            clear_margin=2,
        )
    )


def test_duplicate_reading_does_not_count_twice() -> None:
    e = tilt_engine()
    assert e.process(obs("mh-1", {"tilt_deg": 15}, t=T0, seq=7)) == []
    assert e.process(obs("mh-1", {"tilt_deg": 15}, t=T0, seq=7)) == []  # QoS 1 redelivery
    assert e.process(obs("mh-1", {"tilt_deg": 15}, t=T0)) == []  # same time, no seq
    assert e.stats.duplicates == 2
    assert [v.change for v in e.process(obs("mh-1", {"tilt_deg": 15}, t=T0 + S, seq=8))] == ["opened"]


def test_same_time_is_not_always_a_duplicate() -> None:
    """Second-resolution device clocks: an event and a reading, or two different readings, at one time."""
    e = engine(
        rule("access_control.held", kind="state_duration", field="door_open", for_s=0),
        rule("access_control.forced", kind="event_count", events=["door_forced_open"]),
    )
    ac = {"device_type": "access_control"}
    assert len(e.process(obs("ac-1", event="door_forced_open", t=T0, **ac))) == 1  # type: ignore[arg-type]
    assert len(e.process(obs("ac-1", {"door_open": True}, t=T0, **ac))) == 1  # type: ignore[arg-type]
    t = tilt_engine()
    t.process(obs("mh-1", {"tilt_deg": 15}, t=T0))
    assert t.process(obs("mh-1", {"battery_pct": 80}, t=T0)) == []
    assert t.stats.duplicates == 0
    # the same values at the same time without seq are a resend; different seqs are different messages
    t2 = tilt_engine()
    t2.process(obs("mh-1", {"tilt_deg": 15}, t=T0))
    assert t2.process(obs("mh-1", {"tilt_deg": 15}, t=T0)) == []
    assert t2.stats.duplicates == 1
    t3 = tilt_engine()
    assert t3.process(obs("mh-1", {"tilt_deg": 15}, t=T0, seq=1)) == []
    assert [v.change for v in t3.process(obs("mh-1", {"tilt_deg": 15}, t=T0, seq=2))] == ["opened"]


def test_out_of_order_reading_is_not_evaluated() -> None:
    e = tilt_engine()
    e.process(obs("mh-1", {"tilt_deg": 15}, t=T0 + 2 * S, seq=3))
    # an older reading arrives late: it would have made "2 consecutive" — it must not
    assert e.process(obs("mh-1", {"tilt_deg": 15}, t=T0 + S, seq=2)) == []
    assert e.stats.stale == 1
    # and an old good reading cannot clear a firing alarm
    e.process(obs("mh-1", {"tilt_deg": 15}, t=T0 + 3 * S, seq=4))
    assert e.process(obs("mh-1", {"tilt_deg": 1}, t=T0 + 2500, seq=99)) == []
    assert len(e.open_alarms()) == 1


def test_one_alarm_per_rule_and_device_until_cleared() -> None:
    e = engine(rule("access_control.forced", "P2", kind="event_count", events=["door_forced_open"]))
    out = []
    for i in range(4):
        out += e.process(obs("ac-1", event="door_forced_open", t=T0 + i * MIN, device_type="access_control"))
    out += e.process(obs("ac-2", event="door_forced_open", t=T0, device_type="access_control"))
    assert [(v.key, v.change, v.occurrences) for v in out] == [
        ("ac-1", "opened", 1),
        ("ac-1", "repeated", 2),
        ("ac-1", "repeated", 3),
        ("ac-1", "repeated", 4),
        ("ac-2", "opened", 1),
    ]
    # resolved by the incident stage: the next occurrence opens a new alarm
    assert [v.change for v in e.resolve("access_control.forced", "ac-1", T0 + HOUR)] == ["cleared"]
    again = e.process(obs("ac-1", event="door_forced_open", t=T0 + 2 * HOUR, device_type="access_control"))
    assert [(v.change, v.occurrences) for v in again] == [("opened", 1)]


def test_gas_escalates_p2_to_p1_and_not_back() -> None:
    e = Engine(load_default_rules())
    seq = [(30, "opened", "P2"), (55, "escalated", "P1"), (30, None, None), (10, None, None)]
    t = T0
    for value, change, urgency in seq:
        t += 10 * MIN
        out = [v for v in e.process(obs("mh-1", {"ch4_lel_pct": value}, t=t)) if v.rule_id.endswith("gas")]
        if change is None:
            assert out == []
        else:
            assert [(v.change, v.urgency) for v in out] == [(change, urgency)]
    # under 20 %LEL for the 5-minute clear hold
    assert [(v.change, v.urgency) for v in e.tick(t + 5 * MIN)] == [("cleared", "P1")]


def test_flapping_is_held_open_then_cleared_after_quiet() -> None:
    e = engine(
        rule("manhole_cover.water", "P2", kind="threshold", field="water_level_cm", below=30),
        flapping=FlapPolicy(changes=4, window_s=3600, quiet_s=600),
    )
    changes = []
    for i in range(12):
        changes += e.process(obs("mh-1", {"water_level_cm": 25 if i % 2 == 0 else 35}, t=T0 + i * MIN))
    # opened, cleared, opened, cleared, opened: 5 changes; the 6th (a clear) is held back: flapping
    assert [(v.change, v.flapping) for v in changes] == [
        ("opened", False),
        ("cleared", False),
        ("opened", False),
        ("cleared", False),
        ("opened", False),
        ("flapping", True),
    ]
    assert changes[-1].state == "firing"
    last = T0 + 11 * MIN  # the last reading (good) was at 11 min
    assert e.tick(last + 599 * S) == []
    cleared = e.tick(last + 600 * S)
    assert [(v.change, v.flapping, v.state) for v in cleared] == [("cleared", True, "cleared")]
    assert e.open_alarms() == []


def test_silent_rules_are_not_handed_on() -> None:
    e = engine(rule("smoke_detector.heat", silent=True, kind="threshold", field="temperature_c", at_least=60))
    assert e.process(obs("sd-1", {"temperature_c": 70}, t=T0, device_type="smoke_detector")) == []
    assert [v.rule_id for v in e.open_alarms()] == ["smoke_detector.heat"]


def test_restart_in_the_middle_of_a_fire_lane_occupation() -> None:
    """Occupied at T0; the gateway restarts 4 minutes in; the alarm still comes at 5 minutes."""
    e = Engine(load_default_rules())
    e.process(obs("pk-1", {"occupied": True}, t=T0, attributes=FIRE_LANE, **PK))  # type: ignore[arg-type]
    assert e.tick(T0 + 4 * MIN) == []
    saved = json.dumps(e.snapshot(), ensure_ascii=False)

    e2 = Engine(load_default_rules())
    e2.restore(json.loads(saved))
    assert e2.next_due() == T0 + 5 * MIN
    assert e2.tick(T0 + 5 * MIN - 1) == []
    out = e2.tick(T0 + 5 * MIN)
    assert [(v.rule_id, v.device_id, v.change, v.urgency, v.since_ms) for v in out] == [
        ("parking_sensor.fire_lane_occupied", "pk-1", "opened", "P2", T0 + 5 * MIN)
    ]
    assert out[0].community == "110101001001"
    # a heartbeat after the restart does not restart the count, and the car leaving clears it
    assert e2.process(obs("pk-1", {"occupied": True}, t=T0 + 6 * MIN, attributes=FIRE_LANE, **PK)) == []  # type: ignore[arg-type]
    free = e2.process(obs("pk-1", {"occupied": False}, t=T0 + 7 * MIN, attributes=FIRE_LANE, **PK))  # type: ignore[arg-type]
    assert free == []  # clear hold: 30 s
    assert [v.change for v in e2.tick(T0 + 7 * MIN + 30 * S)] == ["cleared"]


def test_restore_keeps_open_alarms_and_dedup_memory() -> None:
    e = engine(rule("access_control.forced", "P2", kind="event_count", events=["door_forced_open"]))
    e.process(obs("ac-1", event="door_forced_open", t=T0, seq=5, device_type="access_control"))
    e2 = engine(rule("access_control.forced", "P2", kind="event_count", events=["door_forced_open"]))
    e2.restore(json.loads(json.dumps(e.snapshot())))
    assert e2.process(obs("ac-1", event="door_forced_open", t=T0, seq=5, device_type="access_control")) == []
    again = e2.process(obs("ac-1", event="door_forced_open", t=T0 + S, seq=6, device_type="access_control"))
    assert [(v.change, v.occurrences) for v in again] == [("repeated", 2)]
    # an out-of-order reading after the restart is still recognised as stale
    t = engine(rule("manhole_cover.tilt", kind="threshold", field="tilt_deg", above=10))
    t.process(obs("mh-1", {"tilt_deg": 1}, t=T0 + HOUR))
    t2 = engine(rule("manhole_cover.tilt", kind="threshold", field="tilt_deg", above=10))
    t2.restore(t.snapshot())
    assert t2.process(obs("mh-1", {"tilt_deg": 50}, t=T0)) == []


def test_reload_keeps_state_of_unchanged_rules_and_clears_removed_ones(tmp_path: Path) -> None:
    a = rule("parking_sensor.fire", "P2", kind="state_duration", field="occupied", for_s=300)
    b = rule("parking_sensor.batt", "P3", kind="threshold", field="battery_pct", below=20)
    e = engine(a, b)
    e.process(obs("pk-1", {"occupied": True, "battery_pct": 10}, t=T0, **PK))  # type: ignore[arg-type]
    from rules.engine import RuleSet

    changed = a.model_copy(update={"urgency": "P1"})
    out = e.swap(RuleSet((changed,)), T0 + MIN)
    assert [(v.rule_id, v.change) for v in out] == [("parking_sensor.batt", "cleared")]
    fired = e.tick(T0 + 5 * MIN)
    assert [(v.rule_id, v.urgency) for v in fired] == [("parking_sensor.fire", "P1")]


def test_bay_kind_decides_which_rule_applies() -> None:
    e = Engine(load_default_rules())
    bays = {
        "pk-fire": {"bay_kind": "fire_lane"},
        "pk-nopark": {"bay_kind": "no_parking"},
        "pk-limit": {"bay_kind": "time_limited", "time_limit_min": 10},
        "pk-normal": {"bay_kind": "normal"},
        "pk-unset": {},
    }
    for dev, attrs in bays.items():
        e.process(obs(dev, {"occupied": True}, t=T0, attributes=attrs, **PK))  # type: ignore[arg-type]
    got = {(v.device_id, v.rule_id.split(".")[1], v.urgency) for v in e.tick(T0 + 10 * MIN)}
    assert got == {
        ("pk-fire", "fire_lane_occupied", "P2"),
        ("pk-nopark", "no_parking_occupied", "P3"),
        ("pk-limit", "overstay", "P4"),
    }
    later = {
        (v.device_id, v.rule_id.split(".")[1])
        for v in e.tick(T0 + 7 * 24 * HOUR)
        if "offline" not in v.rule_id
    }
    assert later == {(d, "abandoned_vehicle") for d in bays}


def test_lifecycle_filter() -> None:
    e = Engine(load_default_rules())
    e.process(obs("mh-1", {"tilt_deg": 95}, t=T0, lifecycle="registered"))
    assert e.open_alarms() == []
    assert [v.urgency for v in e.process(obs("mh-2", {"tilt_deg": 95}, t=T0, lifecycle="online"))] == ["P1"]


OVERRIDES = """
device_type: parking_sensor
rules:
  fire_lane_occupied:
    title_zh: 消防通道被占用
    title_en: Fire lane occupied
    urgency: P2
    where: {bay_kind: fire_lane}
    kind: state_duration
    field: occupied
    for_s: 300
overrides:
  community:
    "110101001002":
      fire_lane_occupied: {for_s: 120}
  device:
    pk-quiet:
      fire_lane_occupied: {enabled: false}
    pk-urgent:
      fire_lane_occupied: {urgency: P1, for_s: 60}
"""


def test_overrides_per_community_and_device(tmp_path: Path) -> None:
    f = tmp_path / "parking.yaml"
    f.write_text(OVERRIDES, encoding="utf-8")
    e = Engine(load_rules([f]))
    for dev, comm in (("pk-a", "110101001001"), ("pk-b", "110101001002"), ("pk-quiet", "110101001002")):
        e.process(obs(dev, {"occupied": True}, t=T0, community=comm, attributes=FIRE_LANE, **PK))  # type: ignore[arg-type]
    e.process(obs("pk-urgent", {"occupied": True}, t=T0, attributes=FIRE_LANE, **PK))  # type: ignore[arg-type]
    assert [(v.device_id, v.urgency) for v in e.tick(T0 + MIN)] == [("pk-urgent", "P1")]
    assert [v.device_id for v in e.tick(T0 + 2 * MIN)] == ["pk-b"]
    assert [v.device_id for v in e.tick(T0 + 5 * MIN)] == ["pk-a"]
    assert e.tick(T0 + HOUR) == []


def test_status_messages_only_feed_absence() -> None:
    e = Engine(load_default_rules())
    assert e.process(obs("mh-1", {"online": True, "fw": "1.0"}, t=T0, kind="status")) == []
    assert e.stats.evaluations == 1


def test_forget_device() -> None:
    e = Engine(load_default_rules())
    e.process(obs("mh-1", {"tilt_deg": 95}, t=T0))
    e.forget_device("mh-1")
    assert e.open_alarms() == [] and e.snapshot()["devices"] == {}
    assert e.tick(T0 + 10 * HOUR) == []


def test_verdict_messages_are_chinese_first() -> None:
    e = Engine(load_default_rules())
    (v,) = e.process(obs("mh-1", {"tilt_deg": 95}, t=T0))
    assert v.message_zh.startswith("井盖倾斜：tilt_deg=95（条件 > 90）")
    assert v.message_en == "Manhole cover tilted: tilt_deg=95 (condition > 90)"
    assert v.message == f"{v.message_zh} / {v.message_en}"
    assert v.evidence.to_json() == {"ts_ms": T0, "values": {"tilt_deg": 95}, "threshold": "> 90"}


def test_snapshot_restore_anywhere_gives_the_same_verdicts() -> None:
    """Every kind's state through JSON: an engine restored mid-stream continues exactly like the original."""
    from bench.rules_bench import build

    stream = build(300, 6000, 5, seed=3)  # 5 msg/s: 20 minutes of device time
    rules = load_default_rules()
    a = Engine(rules)
    cut = len(stream) // 2
    for o in stream[:cut]:
        a.process(o)
    b = Engine(rules)
    b.restore(json.loads(json.dumps(a.snapshot())))
    assert b.snapshot() == a.snapshot()

    def rest(e: Engine) -> list[tuple[str, str, str, str]]:
        out = []
        for i, o in enumerate(stream[cut:]):
            out += e.process(o)
            if i % 50 == 0:
                out += e.tick(o.received_ms)
        out += e.tick(stream[-1].received_ms + 3 * 24 * HOUR)
        return [(v.rule_id, v.key, v.change, v.urgency) for v in out]

    got_a, got_b = rest(a), rest(b)
    assert got_a == got_b
    by_id = rules.by_id
    kinds = {by_id[r].params.kind for r, *_ in got_a}
    assert kinds >= {"threshold", "state_duration", "absence", "correlation"}


def test_reloading_the_same_rules_changes_nothing() -> None:
    e = Engine(load_default_rules())
    e.process(obs("pk-1", {"occupied": True}, t=T0, attributes=FIRE_LANE, **PK))  # type: ignore[arg-type]
    before = e.snapshot()
    assert e.swap(load_default_rules(), T0 + MIN) == []
    assert e.snapshot() == before
    assert [v.rule_id for v in e.tick(T0 + 5 * MIN)] == ["parking_sensor.fire_lane_occupied"]


def test_observation_of_a_gateway_reading() -> None:
    from types import MappingProxyType

    from gateway.messages import Reading
    from gateway.registry import DeviceInfo
    from rules.model import observation_of

    dev = DeviceInfo(
        device_id="pk-9",
        device_type="parking_sensor",
        community="110101001001",
        grid_code="110101001001001",
        district=None,
        street=None,
        building="3号楼",
        responsible_unit=None,
        lifecycle="in_service",
        attributes=MappingProxyType({"bay_kind": "fire_lane"}),
    )
    o = observation_of(Reading(dev, "telemetry", T0, {"occupied": True}, seq=4, received_ms=T0 + 5))
    assert (o.device_id, o.kind, o.ts_ms, o.received_ms, o.seq, o.building) == (
        "pk-9",
        "telemetry",
        T0,
        T0 + 5,
        4,
        "3号楼",
    )
    e = Engine(load_default_rules())
    e.process(o)
    assert [v.rule_id for v in e.tick(T0 + 5 * MIN + 5)] == ["parking_sensor.fire_lane_occupied"]
