"""Scenario files: the shipped ones load and check against the thing models and rule ids; bad ones are refused
naming the file, line and field; the judge decides expectations from synthetic incidents; the player's
messages are what the thing models accept, with device time and seq rising per device."""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devices import THING_MODELS
from devices.model import STATUS_ADAPTER
from rules.loader import DEFAULT_RULES_DIR, load_rules
from simulators.behaviour import Message
from simulators.scenario import (
    MARGIN_MS,
    Check,
    JudgeContext,
    Plan,
    Player,
    Runner,
    RunnerError,
    RunOptions,
    ScenarioError,
    Seen,
    Target,
    judge,
    load_scenario,
    main,
    parse_duration,
    parse_scenario,
    shipped_scenarios,
)

SHIPPED = shipped_scenarios()

BASE = """\
name: sample
title: 样例 / Sample
community:
  name: 样例社区
  community: "199"
  slug: s199
  buildings: 2
  detectors: 4
  doors: 4
  bays: 2
  bay_kinds: [normal, fire_lane]
roles:
  D1: {type: smoke_detector, building: 1, index: 1}
  D2: {type: smoke_detector, building: 1, index: 2}
  DOOR: {type: access_control, building: 1}
  LANE: {type: parking_sensor, bay_kind: fire_lane}
  NORMAL: {type: parking_sensor, bay_kind: normal}
timeline:
  - name: alarm
    at: 0s
    devices: D1
    event: smoke_alarm
    telemetry: {alarm: true, temperature_c: 30}
  - name: second
    at: 20s
    devices: D2
    event: smoke_alarm
expect:
  - rule: smoke_detector.smoke_alarm
    devices: [D1]
    urgency: P1
    after: alarm
    within_s: 10
forbid:
  - rule: smoke_detector.fire_confirmed_heat
"""


def _parse(text: str) -> Plan:
    return parse_scenario(text, "bad.yaml")


def _error(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        _parse(text)
    return info.value


# ---- the shipped scenarios ------------------------------------------------------------------------------


def test_there_are_the_eight_shipped_scenarios() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "fire_in_building",
        "storm_flooding",
        "manhole_stolen",
        "streetlight_circuit_fails",
        "fire_lane_blocked",
        "door_break_in",
        "detector_removed",
        "offline_block",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_shipped_scenario_loads_and_checks_itself(path: Path) -> None:
    plan = load_scenario(path)
    s = plan.scenario
    assert s.name == path.stem
    # positive and negative expectations, each resolved to devices or a group
    assert s.expect and s.forbid
    kinds = {t.kind for t in plan.targets}
    assert kinds == {"expect", "forbid"}
    rules = load_rules([DEFAULT_RULES_DIR]).by_id
    for t in plan.targets:
        if t.kind == "expect":
            assert t.rule in rules and not rules[t.rule].silent
            assert t.device_ids or t.group_key
    # every action sends to devices of the community; a scenario fits the e2e budget
    ids = {str(r["device_id"]) for r in plan.rows}
    assert all(set(a.device_ids) <= ids for a in plan.actions)
    assert s.wall_estimate_s <= 40


def test_shipped_scenarios_can_share_one_gateway() -> None:
    """Distinct community names, codes and device id prefixes (the e2e test runs them on one gateway)."""
    plans = [load_scenario(p) for p in SHIPPED]
    for key in ("name", "community", "slug"):
        values = [getattr(p.scenario.community, key) for p in plans]
        assert len(set(values)) == len(values), key


# ---- bad files -----------------------------------------------------------------------------------------


def _sub(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


#: (case, what to replace in BASE, by what, what the error says, on which line)
EDITS: list[tuple[str, str, str, str, int]] = [
    ("unknown top-level key", "forbid:\n", "colour: red\nforbid:\n", "colour: unknown key", 34),
    ("missing community", "community:\n  name", "communityx:\n  name", "communityx: unknown key", 4),
    (
        "unknown telemetry field",
        "{alarm: true, temperature_c: 30}",
        "{alarmm: true}",
        "timeline[0].telemetry.alarmm: smoke_detector declares no telemetry field 'alarmm'",
        23,
    ),
    (
        "value out of range",
        "temperature_c: 30",
        "temperature_c: 300",
        "timeline[0].telemetry.temperature_c: smoke_detector: temperature_c = 300 is outside its "
        "plausible range -40 – 125 °C",
        23,
    ),
    ("bool for a number", "temperature_c: 30", "temperature_c: true", "temperature_c is a number", 23),
    (
        "unknown event",
        "event: smoke_alarm\n    telemetry",
        "event: smoke_alrm\n    telemetry",
        "timeline[0].event: smoke_detector declares no event 'smoke_alrm'",
        22,
    ),
    (
        "event without its required field",
        "devices: D2\n    event: smoke_alarm",
        "devices: DOOR\n    event: {name: access_denied, method: card}",
        "timeline[1].event: access_control event access_denied needs 'reason'",
        27,
    ),
    ("unknown role", "devices: D2", "devices: D9", "timeline[1].devices[0]: unknown role 'D9'", 26),
    (
        "role selecting nothing",
        "building: 1, index: 2",
        "building: 7, index: 1",
        "roles.D2: selects no device of the community",
        14,
    ),
    (
        "index past the selection",
        "building: 1, index: 2",
        "building: 1, index: 5",
        "roles.D2: index 5, but the selection has 2 device(s)",
        14,
    ),
    (
        "unknown rule",
        "rule: smoke_detector.smoke_alarm",
        "rule: smoke_detector.smoke",
        "expect[0].rule: unknown rule 'smoke_detector.smoke' (rules of that type:",
        29,
    ),
    (
        "silent rule",
        "rule: smoke_detector.smoke_alarm",
        "rule: smoke_detector.heat",
        "smoke_detector.heat is silent",
        29,
    ),
    (
        "disabled rule",
        "rule: smoke_detector.smoke_alarm\n    devices: [D1]",
        "rule: manhole_cover.water_rising",
        "manhole_cover.water_rising is disabled",
        29,
    ),
    (
        "rule of another type",
        "devices: [D1]\n    urgency",
        "devices: [DOOR]\n    urgency",
        "expect[0].devices: smoke_detector.smoke_alarm is a smoke_detector rule; s199-ac-0003 is",
        30,
    ),
    (
        "rule not for this bay",
        "rule: smoke_detector.smoke_alarm\n    devices: [D1]\n    urgency: P1",
        "rule: parking_sensor.fire_lane_occupied\n    devices: [NORMAL]\n    urgency: P2",
        "parking_sensor.fire_lane_occupied applies only where bay_kind is fire_lane",
        30,
    ),
    (
        "group by the wrong key",
        "rule: smoke_detector.smoke_alarm\n    devices: [D1]",
        "rule: smoke_detector.fire_confirmed_building\n    group: {by: grid, of: D1}",
        "expect[0].group.by: smoke_detector.fire_confirmed_building groups by building, not grid",
        30,
    ),
    (
        "group of a device rule",
        "devices: [D1]\n    urgency: P1",
        "group: {by: building, of: D1}\n    urgency: P1",
        "smoke_detector.smoke_alarm is not a group rule",
        30,
    ),
    ("after an unknown action", "after: alarm", "after: alarms", "expect[0].after: no action is named", 32),
    ("bad duration", "at: 20s", "at: 20 minutes", "timeline[1].at: '20 minutes' is not a duration", 25),
    ("negative time", "at: 20s", "at: -1s", "timeline[1].at: '-1s' is not a duration", 25),
    (
        "backwards",
        "at: 0s",
        "at: 30s",
        "timeline[1].at: actions are in order of `at`: 20 s comes after 30",
        25,
    ),
    (
        "ramp without repeats",
        "telemetry: {alarm: true, temperature_c: 30}",
        "ramp: {temperature_c: [30, 70]}",
        "timeline[0]: ramp needs repeat >= 2",
        19,
    ),
    (
        "bay kinds of the wrong length",
        "bay_kinds: [normal, fire_lane]",
        "bay_kinds: [normal]",
        "community: bay_kinds names 1 kinds for 2 bays",
        4,
    ),
    (
        "a bad rule override",
        "forbid:\n",
        "rules:\n  smoke_detector.offline: {interval: 3}\nforbid:\n",
        "rules.smoke_detector.offline: unknown parameter 'interval' for kind 'absence'",
        35,
    ),
    (
        "an override of an unknown rule",
        "forbid:\n",
        "rules:\n  smoke_detector.ofline: {k: 1}\nforbid:\n",
        "rules.smoke_detector.ofline: override of an unknown rule",
        35,
    ),
    (
        "members without a group",
        "within_s: 10",
        "within_s: 10\n    members: [D2]",
        "expect[0]: members needs a group",
        29,
    ),
    (
        "pattern matching no rule",
        "rule: smoke_detector.fire_confirmed_heat",
        "rule: smoke_detector.nothing_*",
        "forbid[0].rule: the pattern 'smoke_detector.nothing_*' matches no rule",
        35,
    ),
]


@pytest.mark.parametrize(("case", "old", "new", "says", "line"), EDITS, ids=[e[0] for e in EDITS])
def test_a_bad_file_is_refused_naming_the_file_the_line_and_the_field(
    case: str, old: str, new: str, says: str, line: int
) -> None:
    message = str(_error(_sub(old, new)))
    assert says in message, message
    assert message.startswith("bad.yaml") and f"bad.yaml:{line}: " in message, message


def test_not_yaml_and_not_a_mapping_are_refused() -> None:
    assert "not valid YAML" in str(_error("name: [unclosed\n"))
    assert "a scenario is a mapping" in str(_error("- just\n- a list\n"))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"nope\.yaml: cannot read"):
        load_scenario(tmp_path / "nope.yaml")


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    text = _sub("devices: D2", "devices: D9").replace("after: alarm", "after: alarms")
    err = _error(text)
    assert len(err.problems) == 2 and {p.where for p in err.problems} == {
        "timeline[1].devices[0]",
        "expect[0].after",
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (1.5, 1.5), ("90s", 90.0), ("2m", 120.0), ("1h30m", 5400.0), ("500ms", 0.5), ("10", 10.0)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2 minutes", "m", "-5", True, "5x"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# ---- roles and runs ------------------------------------------------------------------------------------


def test_roles_resolve_to_devices_of_the_generated_community() -> None:
    plan = _parse(BASE)
    rows = {str(r["device_id"]): r for r in plan.rows}
    (d1,) = plan.roles["D1"]
    assert rows[d1]["device_type"] == "smoke_detector" and rows[d1]["building"] == "1号楼"
    (lane,) = plan.roles["LANE"]
    assert rows[lane]["attributes"]["bay_kind"] == "fire_lane"


def test_a_run_renames_the_community_and_the_devices() -> None:
    plan = load_scenario(next(p for p in SHIPPED if p.stem == "streetlight_circuit_fails"))
    run = plan.for_run("abc123")
    assert run.community == f"{plan.scenario.community.name}-abc123"
    assert all(str(r["device_id"]).startswith("s104abc123-") for r in run.rows)
    assert {r["community"] for r in run.rows} == {run.community}
    assert {r["attributes"]["circuit"] for r in run.rows} == {"1号回路", "2号回路"}
    # the gateway scopes a circuit by its community (rules.model.group_key)
    group = next(t for t in plan.targets if t.group_key)
    assert run.target(group).group_key == f"circuit:{run.community}/1号回路"
    with pytest.raises(ValueError):
        plan.for_run("Bad-Id")


def test_rule_overrides_are_a_rules_file_scoped_to_the_run_community(tmp_path: Path) -> None:
    plan = load_scenario(next(p for p in SHIPPED if p.stem == "offline_block"))
    run = plan.for_run("r1")
    written = run.write_rules(tmp_path)
    assert written is not None
    path, changed = written
    assert changed and run.write_rules(tmp_path) == (path, False)
    rules = load_rules([DEFAULT_RULES_DIR, path]).by_id
    variant = rules["smoke_detector.offline"].community_overrides[run.community]
    assert variant.params.limit_ms == 8000  # type: ignore[union-attr]
    assert plan.for_run("r2").rules_yaml() != run.rules_yaml()
    assert _parse(BASE).for_run("x").rules_yaml() is None


# ---- the judge -----------------------------------------------------------------------------------------

T0 = 1_800_000_000.0


def _ctx(now: float, **kw: Any) -> JudgeContext:
    base: dict[str, Any] = {
        "run_start": T0 - 5,
        "action_starts": {"alarm": T0, "later": T0 + 30},
        "first_action": T0,
        "last_action": T0 + 30,
        "now": now,
        "grace_s": 5.0,
        "required_endpoints": ("cases",),
        "receivers": (),
    }
    return JudgeContext(**(base | kw))


def _seen(
    rule: str = "smoke_detector.smoke_alarm",
    device: str | None = "d1",
    at: float = T0 + 1,
    **kw: Any,
) -> Seen:
    fields: dict[str, Any] = {
        "incident_id": f"INC-20270115-{abs(hash((rule, device, at))) % 999999:06d}",
        "rule_id": rule,
        "dedup_key": f"{device}:{rule}",
        "device_id": device,
        "urgency": "P1",
        "opened_at": at,
        "deliveries": {"cases": "delivered", "mqtt": "delivered"},
    }
    return Seen(**(fields | kw))


EXPECT = Target(
    "expect",
    0,
    "smoke_detector.smoke_alarm",
    "smoke alarm for D1",
    device_ids=("d1",),
    device_labels={"d1": "D1"},
    urgency="P1",
    after="alarm",
    within_s=10,
)


def _judge(t: Target, seen: Sequence[Seen], now: float, **kw: Any) -> Check:
    return judge(t, seen, _ctx(now, **kw))


def test_an_expected_incident_raised_in_time_and_delivered_passes() -> None:
    c = _judge(EXPECT, [_seen(at=T0 + 2.5)], now=T0 + 3)
    assert c.status == "pass" and c.final and c.ok
    assert c.latency_s == pytest.approx(2.5)
    assert "delivered to cases, mqtt" in c.found and c.incidents


def test_nothing_yet_is_pending_until_the_deadline_and_grace_then_missing() -> None:
    assert _judge(EXPECT, [], now=T0 + 14).status == "pending"
    c = _judge(EXPECT, [], now=T0 + 15.1)
    assert c.status == "missing" and not c.ok and "nothing raised" in c.found


def test_an_incident_after_the_deadline_is_late_with_how_late() -> None:
    c = _judge(EXPECT, [_seen(at=T0 + 12.5)], now=T0 + 13)
    assert c.status == "late" and c.final
    assert "2.5 s late" in c.found and c.latency_s == pytest.approx(12.5)


def test_the_earliest_matching_incident_counts_and_others_are_ignored() -> None:
    seen = [
        _seen(at=T0 + 20),
        _seen(at=T0 + 3),
        _seen(device="d2", at=T0 + 1),  # another device
        _seen(rule="smoke_detector.fault", at=T0 + 1),  # another rule
    ]
    c = _judge(EXPECT, seen, now=T0 + 21)
    assert c.status == "pass" and c.latency_s == pytest.approx(3)


def test_a_wrong_urgency_waits_for_a_level_then_fails() -> None:
    t = replace(EXPECT, urgency="P3")
    assert _judge(t, [_seen(urgency="P4")], now=T0 + 5).status == "pending"
    c = _judge(t, [_seen(urgency="P4")], now=T0 + 16)
    assert c.status == "fail" and "urgency P4, expected P3" in c.found
    assert _judge(t, [_seen(urgency="P3")], now=T0 + 5).status == "pass"


def test_delivery_is_part_of_an_expectation() -> None:
    pending = _seen(deliveries={"cases": "pending", "mqtt": "delivered"})
    assert _judge(EXPECT, [pending], now=T0 + 5).status == "pending"
    c = _judge(EXPECT, [pending], now=T0 + 16)
    assert c.status == "fail" and "not delivered: cases pending" in c.found
    only_mqtt = _seen(deliveries={"mqtt": "delivered"})
    assert "no delivery to cases" in _judge(EXPECT, [only_mqtt], now=T0 + 16).found
    kept = _seen(commissioning=True, deliveries={})
    assert "commissioning" in _judge(EXPECT, [kept], now=T0 + 16).found
    assert "not queued" in _judge(EXPECT, [_seen(deliveries={})], now=T0 + 16, required_endpoints=()).found
    # a receiver that must have got it
    unheard = _judge(EXPECT, [_seen()], now=T0 + 16, receivers=("webhook",))
    assert unheard.status == "fail" and "receiver webhook did not get it" in unheard.found
    heard = _seen(received_by=frozenset({"webhook"}))
    assert _judge(EXPECT, [heard], now=T0 + 3, receivers=("webhook",)).status == "pass"
    # delivered: false does not look
    assert _judge(replace(EXPECT, delivered=False), [kept], now=T0 + 3).status == "pass"


def test_every_device_of_an_expectation_needs_its_own_incident() -> None:
    t = replace(EXPECT, device_ids=("d1", "d2"), device_labels={"d1": "R#1", "d2": "R#2"})
    c = _judge(t, [_seen(at=T0 + 1)], now=T0 + 16)
    assert c.status == "missing"
    assert "R#1 (d1): INC-" in c.found and "R#2 (d2): nothing raised" in c.found
    c = _judge(t, [_seen(at=T0 + 1), _seen(device="d2", at=T0 + 4)], now=T0 + 5)
    assert c.status == "pass" and c.latency_s == pytest.approx(4)


def test_a_group_expectation_matches_the_group_key_members_and_escalation() -> None:
    rule = "smoke_detector.fire_confirmed_building"
    key = "building:c/1号楼"
    t = Target(
        "expect",
        1,
        rule,
        "fire confirmed",
        group_key=key,
        members=("d1", "d2"),
        device_labels={"d1": "D1", "d2": "D2"},
        urgency="P1",
        within_s=10,
        escalated=True,
    )
    group = _seen(rule=rule, device=None, dedup_key=f"{key}:{rule}", members=("d1",), at=T0 + 2)
    other = _seen(rule=rule, device=None, dedup_key=f"building:c/2号楼:{rule}", members=("d1", "d2"))
    c = _judge(t, [group, other], now=T0 + 16)
    assert c.status == "fail" and "members lack D2" in c.found and "not escalated" in c.found
    ok = replace(group, members=("d1", "d2"), escalation_level=1)
    assert _judge(t, [ok], now=T0 + 3).status == "pass"
    assert "escalated" in _judge(replace(t, escalated=False), [ok], now=T0 + 16).found


def test_an_expectation_without_devices_or_group_takes_any_incident_of_the_rule() -> None:
    t = replace(EXPECT, device_ids=None)
    assert _judge(t, [_seen(device="anything", at=T0 + 1)], now=T0 + 2).status == "pass"


FORBID = Target(
    "forbid",
    0,
    "smoke_detector.fire_confirmed_*",
    "no confirmed fire for D3",
    device_ids=("d3",),
    device_labels={"d3": "D3"},
    window_s=8,
)


def test_a_forbidden_incident_raised_fails_at_once_naming_it() -> None:
    bad = _seen(rule="smoke_detector.fire_confirmed_heat", device="d3", at=T0 + 1)
    c = _judge(FORBID, [bad], now=T0 + 2)
    assert c.status == "raised" and c.final and not c.ok
    assert bad.incident_id in c.found and "D3 (d3)" in c.found


def test_a_forbidden_incident_is_pending_until_the_window_ends_then_passes() -> None:
    assert _judge(FORBID, [], now=T0 + 37).status == "pending"  # last action + 8 s = T0 + 38
    assert _judge(FORBID, [], now=T0 + 38).status == "pass"


def test_a_forbid_looks_at_its_rules_devices_members_and_window_only() -> None:
    rule = "smoke_detector.fire_confirmed_building"
    harmless = [
        _seen(rule="smoke_detector.smoke_alarm", device="d3"),  # another rule
        _seen(rule="smoke_detector.fire_confirmed_heat", device="d1"),  # another device
        _seen(rule="smoke_detector.fire_confirmed_heat", device="d3", at=T0 - 10),  # before the run
        _seen(rule="smoke_detector.fire_confirmed_heat", device="d3", at=T0 + 40),  # after the window
    ]
    assert _judge(FORBID, harmless, now=T0 + 50).status == "pass"
    # a group incident listing the device concerns it
    group = _seen(rule=rule, device=None, dedup_key=f"building:c/2号楼:{rule}", members=("d2", "d3"))
    assert _judge(FORBID, [group], now=T0 + 50).status == "raised"
    # `after` starts the window at that action
    later = replace(FORBID, after="later")
    early = _seen(rule="smoke_detector.fire_confirmed_heat", device="d3", at=T0 + 10)
    assert _judge(later, [early], now=T0 + 50).status == "pass"


def test_a_forbid_of_a_group_matches_its_key_with_any_rule_of_the_pattern() -> None:
    t = Target("forbid", 2, "streetlight.circuit_*", "no dark circuit 2", group_key="circuit:c/2号回路")
    other = _seen(
        rule="streetlight.circuit_dark", device=None, dedup_key="circuit:c/1号回路:streetlight.circuit_dark"
    )
    assert _judge(t, [other], now=T0 + 50).status == "pass"
    mine = replace(
        other,
        dedup_key="circuit:c/2号回路:streetlight.circuit_offline",
        rule_id="streetlight.circuit_offline",
    )
    c = _judge(t, [mine], now=T0 + 1)
    assert c.status == "raised" and "circuit:c/2号回路" in c.found


# ---- the player ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Collect:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, Message]] = []

    def send(self, messages: Sequence[Message]) -> None:
        self.sent += [(self.clock.t, m) for m in messages]
        self.clock.t += 0.05


def _play(plan: Plan, *, wait_s: float = 0.0) -> tuple[Player, Collect]:
    clock = FakeClock()
    pub = Collect(clock)
    player = Player(plan.for_run("t1"), pub, clock=clock)
    player.heartbeat()
    for action in plan.actions:
        player.play(action)
        clock.t += wait_s
        if plan.scenario.background is not None:
            player.heartbeat()
    return player, pub


def _valid(m: Message) -> None:
    model = THING_MODELS[m.device_type]
    if m.kind == "telemetry":
        model.telemetry_adapter.validate_json(m.encode())
    elif m.kind == "event":
        assert model.event_adapter is not None
        model.event_adapter.validate_json(m.encode())
    else:
        STATUS_ADAPTER.validate_json(m.encode())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_shipped_timeline_plays_as_valid_payloads_with_rising_time_and_seq(path: Path) -> None:
    plan = load_scenario(path)
    player, pub = _play(plan, wait_s=1.0)
    assert pub.sent
    last: dict[str, tuple[int, int]] = {}
    for wall, m in pub.sent:
        _valid(m)
        assert m.topic == f"sc/v1/{m.device_type}/{m.device_id}/{m.kind}"
        ts, seq = m.payload["ts"], m.payload["seq"]
        assert isinstance(ts, int) and ts <= wall * 1000 - MARGIN_MS + 1  # device time is never ahead
        if m.device_id in last:
            assert ts > last[m.device_id][0] and seq == last[m.device_id][1] + 1
        last[m.device_id] = (ts, seq)
    assert player.sent == len(pub.sent)


def test_device_time_follows_at_and_every_while_the_wall_clock_barely_moves() -> None:
    plan = load_scenario(next(p for p in SHIPPED if p.stem == "fire_lane_blocked"))
    _player, pub = _play(plan)
    lane = plan.for_run("t1").device_ids(plan.roles["LANE"])[0]
    readings = [m for _, m in pub.sent if m.device_id == lane and m.kind == "telemetry"]
    ts = [m.payload["ts"] for m in readings]
    occupied = [m.payload["occupied"] for m in readings]
    # the prime report, then 0, 5 and 10 minutes, then cleared at 10 min 30 s
    assert occupied == [False, True, True, True, False]
    assert [b - a for a, b in itertools.pairwise(ts[1:4])] == [300_000, 300_000]
    assert ts[4] - ts[1] == pytest.approx(630_000, abs=5)
    walls = [w for w, m in pub.sent if m.device_id == lane]
    assert walls[-1] - walls[0] < 1.0


def test_an_action_is_stamped_at_its_at_or_moved_whole_after_a_later_report() -> None:
    text = _sub(
        "    devices: D2\n    event: smoke_alarm\n",
        "    devices: D1\n    telemetry: {temperature_c: 40}\n    repeat: 3\n    every: 20s\n",
    )
    plan = _parse(text)
    run = plan.for_run("t1")
    d1 = run.device_ids(plan.roles["D1"])[0]
    clock = FakeClock()
    pub = Collect(clock)
    player = Player(run, pub, clock=clock)
    player.play(plan.actions[0])
    # at 0 s, the scenario's origin: the event, then the reading a millisecond later (one device's
    # messages never share a time)
    assert [m.payload["ts"] - player.base_ms for _, m in pub.sent] == [0, 1]
    clock.t += 45  # a real wait with background reports: D1 reports at ~45 s of device time
    player.heartbeat()
    (beat,) = [m.payload["ts"] for _, m in pub.sent[2:] if m.device_id == d1]
    assert beat > player.base_ms + 20_000
    n = len(pub.sent)
    player.play(plan.actions[1])  # at 20 s, 3 repeats 20 s apart
    ts = [m.payload["ts"] for _, m in pub.sent[n:] if m.device_id == d1 and m.kind == "telemetry"]
    assert ts[0] == beat + 1 and [b - a for a, b in itertools.pairwise(ts)] == [20_000, 20_000]


def test_what_an_action_sets_sticks_and_a_silenced_device_sends_nothing_more() -> None:
    text = _sub(
        "  - name: second\n    at: 20s\n    devices: D2\n    event: smoke_alarm\n",
        "  - name: second\n    at: 20s\n    devices: D2\n    status: {online: false}\n    silence: true\n",
    )
    plan = _parse(text + "background: {every_s: 2}\n")
    run = plan.for_run("t1")
    clock = FakeClock()
    pub = Collect(clock)
    player = Player(run, pub, clock=clock)
    for action in plan.actions:
        player.play(action)
    d1, d2 = run.device_ids(plan.roles["D1"])[0], run.device_ids(plan.roles["D2"])[0]
    status = [m for _, m in pub.sent if m.device_id == d2]
    assert [m.kind for m in status] == ["status"] and status[0].payload["online"] is False
    before = len(pub.sent)
    player.heartbeat()
    beats = {m.device_id: m for _, m in pub.sent[before:]}
    assert d2 not in beats and len(beats) == len(run.rows) - 1
    assert beats[d1].payload["alarm"] is True and beats[d1].payload["temperature_c"] == 30.0
    # devices are healthy in the background: no low battery
    assert all(m.payload.get("battery_pct", 100) >= 50 for m in beats.values())


def test_a_ramp_goes_from_its_first_to_its_last_value() -> None:
    plan = load_scenario(next(p for p in SHIPPED if p.stem == "storm_flooding"))
    _player, pub = _play(plan)
    cover = plan.for_run("t1").device_ids(plan.roles["FLOODED"])[0]
    levels = [m.payload["water_level_cm"] for _, m in pub.sent if m.device_id == cover][1:]
    assert levels == [90.0, 72.0, 54.0, 36.0, 18.0]


def test_a_scenario_with_rule_overrides_needs_a_rules_dir_before_anything_is_registered() -> None:
    from sqlalchemy import create_engine

    plan = load_scenario(next(p for p in SHIPPED if p.stem == "offline_block"))
    clock = FakeClock()
    pub = Collect(clock)
    runner = Runner(create_engine("sqlite://"), pub, RunOptions(), clock=clock, sleep=lambda _s: None)
    with pytest.raises(RunnerError, match="--rules-dir"):
        runner.run(plan, "x1")
    assert pub.sent == []


# ---- the command line ----------------------------------------------------------------------------------


def test_list_and_validate_the_shipped_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(p.stem in out for p in SHIPPED) and "needs --rules-dir" in out
    assert main(["validate"]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(SHIPPED)


def test_validate_names_the_problems_of_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(_sub("devices: D2", "devices: D9"), encoding="utf-8")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:26: timeline[1].devices[0]: unknown role 'D9'" in err


def test_run_refuses_a_bad_file_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("name: x\n"), encoding="utf-8")
    assert main(["run", str(bad), "--mqtt-port", "1"]) == 2
    assert "community: required" in capsys.readouterr().err
