"""Commissioning: registered → online → in service by what a device sends; the installer sees it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from stack.services import InfluxService, MosquittoService, PostgresService
from tests.integration.conftest import Harness, community_rows, now_ms, topic, wait_for


def _slug() -> str:
    return f"c{uuid.uuid4().hex[:6]}"


def test_a_device_goes_in_service_once_it_has_reported_its_commissioning_fields(harness: Harness) -> None:
    (cover,) = community_rows(_slug(), covers=1)
    device_id = cover["device_id"]
    harness.register([cover])
    harness.start_gateway()
    pub = harness.publisher()
    ts = now_ms()

    # Only part of what a manhole cover must report: online, not yet in service.
    pub.send(topic(cover), {"ts": ts, "seq": 1, "tilt_deg": 0.4, "battery_pct": 91.0})
    wait_for(
        lambda: harness.registry.get(device_id).lifecycle,  # type: ignore[union-attr]
        lambda lc: lc == "online",
        what="the first valid message to make the device online",
    )
    state = wait_for(
        lambda: harness.states.get(device_id),
        lambda s: s is not None and s.seen_fields is not None,
        what="the fields seen so far to be recorded",
    )
    assert state is not None and set(state.seen_fields or ()) == {"tilt_deg", "battery_pct"}
    assert harness.registry.get(device_id).lifecycle == "online"  # type: ignore[union-attr]

    # The rest arrives in a later message: now it is in service, and what it sent last is kept.
    last = {"ts": ts + 1000, "seq": 2, "cover_open": False}
    pub.send(topic(cover), last)
    wait_for(
        lambda: harness.registry.get(device_id).lifecycle,  # type: ignore[union-attr]
        lambda lc: lc == "in_service",
        what="the device to go in service",
    )
    state = harness.states.get(device_id)
    assert state is not None
    assert state.last_topic == topic(cover)
    assert state.last_payload is not None and json.loads(state.last_payload) == last
    assert set(state.seen_fields or ()) == {"tilt_deg", "battery_pct", "cover_open"}
    pub.close()


def test_a_device_never_heard_from_stays_registered(harness: Harness) -> None:
    quiet, talking = community_rows(_slug(), detectors=2)
    harness.register([quiet, talking])
    harness.start_gateway()
    pub = harness.publisher()
    pub.send(topic(talking), {"ts": now_ms(), "seq": 1, "alarm": False, "battery_pct": 77.0})
    wait_for(
        lambda: harness.registry.get(talking["device_id"]).lifecycle,  # type: ignore[union-attr]
        lambda lc: lc == "in_service",
        what="the talking detector to go in service",
    )
    assert harness.registry.get(quiet["device_id"]).lifecycle == "registered"  # type: ignore[union-attr]
    assert harness.states.get(quiet["device_id"]) is None
    pub.close()


def test_the_gateway_keeps_its_sql_state_in_postgresql(
    make_harness: Callable[..., Harness],
    mosquitto: MosquittoService,
    influxdb: InfluxService,
    postgres: PostgresService,
) -> None:
    """Registry, dead letters, liveness and commissioning on PostgreSQL, through a real gateway process."""
    url = postgres.create_database(f"gw_{uuid.uuid4().hex[:10]}")
    harness = make_harness(mosquitto, influxdb, url)
    (detector,) = community_rows(_slug(), detectors=1)
    device_id = detector["device_id"]
    harness.register([detector])
    harness.start_gateway()
    pub = harness.publisher()
    ts = now_ms()
    pub.send(topic(detector), {"ts": ts, "seq": 1, "alarm": False, "battery_pct": 66.0})
    pub.send(topic(detector), {"ts": ts + 1, "seq": 2, "alarm": "no"})  # wrong type: dead letter
    harness.wait_points("smoke_detector", device_id, 1)
    wait_for(
        lambda: harness.registry.get(device_id).lifecycle,  # type: ignore[union-attr]
        lambda lc: lc == "in_service",
        what="the detector to go in service (state in PostgreSQL)",
    )
    letters = wait_for(
        lambda: harness.deadletters.recent(device_id=device_id),
        lambda rows: len(rows) == 1,
        what="the bad message in PostgreSQL's dead-letter table",
    )
    assert letters[0].reason == "wrong_type"
    state = harness.states.get(device_id)
    assert state is not None and state.online is True
    pub.close()


def test_old_dead_letters_are_pruned_by_the_gateway(harness: Harness) -> None:
    """Dead letters are kept for SC_DEADLETTER_RETENTION_DAYS, then the gateway deletes them."""
    import datetime as dt

    from gateway.deadletter import DeadLetter

    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    harness.deadletters.add_many(
        [DeadLetter(old, "sc/v1/streetlight/x/telemetry", "x", "streetlight", "not_json", "old", b"{")]
    )
    assert len(harness.deadletters.recent(device_id="x")) == 1
    harness.start_gateway(SC_DEADLETTER_RETENTION_DAYS="30")
    wait_for(
        lambda: harness.deadletters.recent(device_id="x"),
        lambda rows: rows == [],
        what="the 40-day-old dead letter to be pruned",
    )
