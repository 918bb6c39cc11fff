"""The rules stage through the real wire: readings published to Mosquitto, stored by the gateway, evaluated
by its rules process, alarms in the SQL `alarms` table (and `sc-gateway alarms list`)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.alarmcmd import add_alarm_commands
from gateway.alarms import AlarmRow, AlarmStore
from gateway.cli import main as cli_main
from gateway.deadletter import DeadLetterStore
from tests.integration.conftest import Harness, Metrics, community_rows, now_ms, topic, wait_for


def _slug() -> str:
    return f"r{uuid.uuid4().hex[:6]}"


def _alarm(harness: Harness, rule_id: str, key: str) -> AlarmRow | None:
    rows = [r for r in AlarmStore(harness.engine).list(rule_id=rule_id) if r.alarm_key == key]
    return rows[0] if rows else None


def _wait_alarm(harness: Harness, rule_id: str, key: str, state: str, timeout: float = 30.0) -> AlarmRow:
    row = wait_for(
        lambda: _alarm(harness, rule_id, key),
        lambda r: r is not None and r.state == state,
        what=f"alarm {rule_id} on {key} to be {state}",
        timeout=timeout,
    )
    assert row is not None
    return row


def _register(harness: Harness, row: dict[str, Any], lifecycle: str, **attributes: Any) -> str:
    row["attributes"] = {**row["attributes"], **attributes}
    harness.register([row])
    harness.registry.set_lifecycle(row["device_id"], lifecycle)  # type: ignore[arg-type]
    return str(row["device_id"])


def test_a_tilted_manhole_cover_opens_a_p2_alarm_and_it_clears_when_level_again(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    (cover,) = community_rows(_slug(), covers=1)
    device_id = _register(harness, cover, "in_service", tilt_baseline_deg=0.0)
    gw = harness.start_gateway()
    pub = harness.publisher()
    ts = now_ms()

    pub.send(topic(cover), {"ts": ts, "seq": 1, "tilt_deg": 15.0})
    pub.send(topic(cover), {"ts": ts + 1000, "seq": 2, "tilt_deg": 15.0})
    row = _wait_alarm(harness, "manhole_cover.tilt", device_id, "open")
    assert (row.urgency, row.device_id, row.device_type) == ("P2", device_id, "manhole_cover")
    assert row.community == cover["community"] and row.grid_code == cover["grid_code"]
    assert row.evidence["values"] == {"tilt_deg": 15.0}
    assert row.commissioning_noise is False
    assert row.message_zh and row.message_en

    assert (
        cli_main(
            ["alarms", "list", "--open", "--json", "--db", harness.db_url], commands=[add_alarm_commands]
        )
        == 0
    )
    listed = json.loads(capsys.readouterr().out)
    assert [(a["rule_id"], a["alarm_key"], a["state"]) for a in listed] == [
        ("manhole_cover.tilt", device_id, "open")
    ]

    pub.send(topic(cover), {"ts": ts + 2000, "seq": 3, "tilt_deg": 1.0})
    row = _wait_alarm(harness, "manhole_cover.tilt", device_id, "cleared")
    assert row.cleared_at is not None
    assert len(AlarmStore(harness.engine).list(rule_id="manhole_cover.tilt")) == 1  # the same row, closed

    assert cli_main(["alarms", "list", "--open", "--db", harness.db_url], commands=[add_alarm_commands]) == 0
    assert "manhole_cover.tilt" not in capsys.readouterr().out
    # the rules process did all of it in one life (logging an alarm once crashed it: a reserved log key)
    log_text = gw.log_path.read_text(errors="replace")
    assert "rules_process_died" not in log_text and "Traceback" not in log_text


def test_a_smoke_alarm_event_opens_a_p1_alarm_marked_as_commissioning_noise_while_online(
    harness: Harness,
) -> None:
    (detector,) = community_rows(_slug(), detectors=1)
    device_id = _register(harness, detector, "online")
    harness.start_gateway()
    harness.publisher().send(topic(detector, "event"), {"ts": now_ms(), "seq": 1, "event": "smoke_alarm"})
    row = _wait_alarm(harness, "smoke_detector.smoke_alarm", device_id, "open")
    assert row.urgency == "P1"
    assert row.commissioning_noise is True  # not in service when it opened


def test_a_fire_lane_duration_started_before_a_restart_fires_at_the_right_time_after_it(
    harness: Harness,
) -> None:
    rows = community_rows(_slug(), bays=1)
    bay = rows[0]
    device_id = _register(harness, bay, "in_service", bay_kind="fire_lane")
    site = harness.workdir / "site-rules"
    site.mkdir()
    # long enough for publishing, storing and a clean stop (the snapshot) to happen before it runs out
    for_s = 20
    (site / "site.yaml").write_text(
        "overrides:\n"
        "  device:\n"
        f"    {device_id}:\n"
        f"      parking_sensor.fire_lane_occupied: {{for_s: {for_s}}}\n"
    )
    state_path = harness.workdir / "rules-state.json"
    env = {"SC_RULES_DIRS": str(site), "SC_RULES_STATE_PATH": str(state_path)}
    gw = harness.start_gateway(**env)
    ts = now_ms()
    harness.publisher().send(topic(bay), {"ts": ts, "seq": 1, "occupied": True})
    harness.wait_points("parking_sensor", device_id, 1)
    assert gw.stop() == 0

    snapshot = json.loads(state_path.read_text())
    pending = snapshot["rules"]["parking_sensor.fire_lane_occupied"]["states"]
    assert device_id in pending, snapshot
    assert _alarm(harness, "parking_sensor.fire_lane_occupied", device_id) is None

    restarted = harness.start_gateway("gateway-restarted", **env)
    row = _wait_alarm(harness, "parking_sensor.fire_lane_occupied", device_id, "open", timeout=for_s + 30)
    assert row.urgency == "P2"
    # fired by time alone, for_s after the bay became occupied (device time), as the snapshot said
    assert row.evidence["ts_ms"] == ts + for_s * 1000
    assert "rules_state_restored" in restarted.log_path.read_text()


def test_a_bad_rule_file_stops_the_gateway_at_start_naming_file_and_rule(harness: Harness) -> None:
    site = harness.workdir / "bad-rules"
    site.mkdir()
    bad = site / "covers.yaml"
    bad.write_text(
        "device_type: manhole_cover\n"
        "rules:\n"
        "  sinking:\n"
        "    title_zh: 井盖下沉\n"
        "    title_en: Cover sinking\n"
        "    urgency: P3\n"
        "    kind: threshold\n"
        "    field: sink_depth_cm\n"
        "    above: 3\n"
    )
    env = harness.gateway_env(SC_RULES_DIRS=str(site))
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run"],
        env=env,
        cwd=harness.workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(bad) in done.stderr and "manhole_cover.sinking" in done.stderr
    assert "sink_depth_cm" in done.stderr
    assert not (Path(harness.workdir) / ".var" / "rules-state.json").exists()


def test_the_priority_lane_takes_urgent_events_without_counting_or_setting_them_aside_twice(
    harness: Harness,
) -> None:
    """A smoke detector's events reach two workers (the priority lane has its own share group): the alarm
    opens once, a malformed event is set aside once, and each message is counted once as stored."""
    (detector,) = community_rows(_slug(), detectors=1)
    device_id = _register(harness, detector, "in_service")
    gw = harness.start_gateway(SC_WORKERS="1")  # the priority lane (on by default) is worker 1 + 2
    # the lane subscribes on its own: what is published before it has is for the other workers only
    wait_for(
        lambda: gw._scrape(3),
        lambda t: t is not None and Metrics(t).value("sc_broker_connected") == 1,
        what="the priority lane to subscribe",
    )
    pub = harness.publisher()
    ts = now_ms()
    pub.send(topic(detector, "event"), {"ts": ts, "seq": 1, "event": "no_such_event"})
    pub.send(topic(detector, "event"), {"ts": ts + 1, "seq": 2, "event": "smoke_alarm"})
    _wait_alarm(harness, "smoke_detector.smoke_alarm", device_id, "open")

    # both lanes have taken both messages
    def taken() -> tuple[float, ...]:
        worker, lane = gw.metrics(), gw.metrics(3)
        return tuple(
            m.value("sc_messages_total", device_type="smoke_detector", outcome=outcome)
            for m, outcome in (
                (worker, "stored"),
                (worker, "rejected"),
                (lane, "priority_stored"),
                (lane, "priority_rejected"),
            )
        )

    wait_for(taken, lambda n: n == (1, 1, 1, 1), what="the worker and the priority lane to take both events")
    assert gw.metrics(3).value("sc_messages_total", outcome="stored") == 0
    letters = wait_for(
        lambda: DeadLetterStore(harness.engine).recent(device_id=device_id),
        lambda found: len(found) >= 1,
        what="the malformed event's dead letter",
    )
    assert len(letters) == 1, [(d.reason, d.received_at) for d in letters]
    assert len(AlarmStore(harness.engine).list(rule_id="smoke_detector.smoke_alarm")) == 1
