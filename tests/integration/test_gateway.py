"""The gateway as a user sees it: messages published to a real Mosquitto end up in a real InfluxDB, bad ones
in the dead-letter store, device state in the registry; one real gateway process per test."""

from __future__ import annotations

import datetime as dt
import json
import random
import socket
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from devices import THING_MODELS
from devices.model import Field
from devices.samples import INVALID_CASES, InvalidCase, example_payload
from gateway.cli import main as cli_main
from gateway.decode import credential_hash
from gateway.messages import Reason
from tests.integration.conftest import (
    CREDENTIAL_KEY,
    TIMEOUT_S,
    Harness,
    community_rows,
    now_ms,
    telemetry,
    topic,
    wait_for,
)

INFLUX_TYPES = {float: "float", bool: "boolean", int: "integer", str: "string"}


def _slug() -> str:
    return f"t{uuid.uuid4().hex[:6]}"


def _rfc3339(ms: int) -> str:
    """ms as RFC 3339 text in UTC+8 with milliseconds, as a device on local time would send it."""
    when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone(dt.timedelta(hours=8)))
    return when.isoformat(timespec="milliseconds")


def _expected_fields(
    payload: dict[str, Any], declared: tuple[Field, ...]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields (values and InfluxDB types) a valid payload becomes."""
    kinds = {f.name: f.kind for f in declared}
    values: dict[str, Any] = {}
    types: dict[str, str] = {}
    for name, value in payload.items():
        if name in ("ts", "event"):
            continue
        if name == "seq":
            values["seq"], types["seq"] = value, "integer"
        elif name == "credential":
            values["credential_hash"] = credential_hash(CREDENTIAL_KEY.encode(), value)
            types["credential_hash"] = "string"
        else:
            values[name], types[name] = value, INFLUX_TYPES[kinds[name]]
    return values, types


def _check_point(point: dict[str, Any], row: dict[str, Any], ts: int, values: dict[str, Any]) -> None:
    assert point["time"] == ts
    assert (point["device_id"], point["device_type"]) == (row["device_id"], row["device_type"])
    assert (point["community"], point["grid"]) == (row["community"], row["grid_code"])
    for name, want in values.items():
        got = point[name]
        if isinstance(want, bool | int | str):
            assert got == want and type(got) is type(want), (name, got, want)
        else:
            assert got == pytest.approx(want, rel=1e-12), (name, got, want)


def test_every_device_type_lands_with_its_tags_types_and_time(harness: Harness) -> None:
    rows = community_rows(_slug(), covers=1, poles=1, doors=1, bays=1, detectors=1)
    assert {r["device_type"] for r in rows} == set(THING_MODELS)
    harness.register(rows)
    harness.start_gateway()
    pub = harness.publisher()

    t0 = now_ms() - 60_000
    sent: list[tuple[str, dict[str, Any], int, dict[str, Any], str | None]] = []
    messages: list[tuple[str, dict[str, Any]]] = []
    telemetry_types: dict[str, dict[str, str]] = {}
    event_types: dict[str, dict[str, str]] = {}
    for i, row in enumerate(rows):
        model = THING_MODELS[row["device_type"]]
        ts = t0 + 10 * i
        payload = telemetry(row, seq=1, ts=ts)
        values, types = _expected_fields(payload, model.telemetry)
        telemetry_types.setdefault(model.type, {}).update(types)
        messages.append((topic(row), payload))
        sent.append((model.type, row, ts, values, None))
        if model.events:
            # The event with the most extra fields, every optional one included; ts as RFC 3339 text.
            ev = max(model.events, key=lambda e: len(e.fields))
            ev_ts = ts + 1
            payload = example_payload(
                model, random.Random(i), "event", event=ev.name, seq=2, ts=_rfc3339(ev_ts)
            )
            values, types = _expected_fields(payload, ev.fields)
            types["count"] = "integer"
            values["count"] = 1
            event_types.setdefault(f"{model.type}_event", {}).update(types)
            messages.append((topic(row, "event"), payload))
            sent.append((f"{model.type}_event", row, ev_ts, values, ev.name))
    pub.send_many(messages)

    for measurement, row, ts, values, event in sent:
        points = harness.wait_points(measurement, row["device_id"], 1)
        assert len(points) == 1, points
        _check_point(points[0], row, ts, values)
        if event is not None:
            assert points[0]["event"] == event
    for measurement, types in (telemetry_types | event_types).items():
        assert harness.field_types(measurement) == types, measurement
    assert set(event_types) == {f"{t}_event" for t, m in THING_MODELS.items() if m.events}


def _one_case_per_reason() -> dict[str, InvalidCase]:
    cases: dict[str, InvalidCase] = {}
    for case in INVALID_CASES:
        cases.setdefault(case.reason, case)
    return cases


def test_bad_input_is_set_aside_with_its_reason_and_good_input_around_it_lands(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    slug = _slug()
    rows = community_rows(slug, covers=1, poles=1, doors=1, bays=1, detectors=2)
    by_type: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_type.setdefault(row["device_type"], row)
    good = by_type["manhole_cover"]
    light = by_type["streetlight"]
    disabled = [r for r in rows if r["device_type"] == "smoke_detector"][1]
    harness.register(rows)

    t0 = now_ms() - 60_000
    # Someone wrote `lux` as text into the database before: InfluxDB will refuse the gateway's float.
    harness.write_lines(f'streetlight,device_id=legacy lux="bright" {t0}')
    gw = harness.start_gateway()

    # Disable a device while the gateway runs; a probe device registered afterwards shows (through
    # sc_registry_devices) when the gateway's cache has taken both changes.
    assert harness.registry.set_lifecycle(disabled["device_id"], "disabled")
    probe = community_rows(f"{slug}p", covers=1)
    harness.register(probe)
    wait_for(
        lambda: gw.metrics().value("sc_registry_devices"),
        lambda n: n == len(rows) + 1,
        what="the gateway's registry cache to refresh",
    )

    unknown_id = f"{slug}-unregistered-01"
    bad: list[tuple[str, str, bytes, str | None]] = []  # reason, topic, payload, device_id in the dead letter
    for reason, case in sorted(_one_case_per_reason().items()):
        row = by_type[case.device_type]
        bad.append((reason, topic(row, case.topic_kind), case.payload, row["device_id"]))
    valid = json.dumps(telemetry(good, seq=999, ts=t0)).encode()
    bad += [
        ("bad_topic", "sc/v1/manhole_cover/bad.id/telemetry", valid, None),
        ("unknown_type", f"sc/v1/toaster/{slug}-t1/telemetry", valid, f"{slug}-t1"),
        ("unregistered_device", f"sc/v1/manhole_cover/{unknown_id}/telemetry", valid, unknown_id),
        (
            "type_mismatch",
            f"sc/v1/streetlight/{good['device_id']}/telemetry",
            json.dumps(telemetry(light, seq=1, ts=t0)).encode(),
            good["device_id"],
        ),
        (
            "device_disabled",
            topic(disabled),
            json.dumps(telemetry(disabled, seq=1, ts=t0)).encode(),
            disabled["device_id"],
        ),
    ]
    db_rejected = telemetry(light, seq=5, ts=t0 + 5)
    assert "lux" in db_rejected
    assert {r for r, *_ in bad} | {"db_rejected"} == {r.value for r in Reason}, "a reason is not exercised"

    # good, bad, good, bad, ..., good: each bad message sits between two good ones of another device.
    rejects: list[tuple[str, bytes | dict[str, Any]]] = [(t, p) for _, t, p, _ in bad]
    rejects.append((topic(light), db_rejected))
    messages: list[tuple[str, bytes | dict[str, Any]]] = [(topic(good), telemetry(good, seq=0, ts=t0))]
    for i, reject in enumerate(rejects, start=1):
        messages.append(reject)
        messages.append((topic(good), telemetry(good, seq=i, ts=t0 + i)))
    harness.publisher().send_many(messages)
    n_good = len(bad) + 2

    expected_counts = {reason: 1 for reason in [*(r for r, *_ in bad), "db_rejected"]}
    wait_for(
        harness.deadletters.count_by_reason, lambda c: c == expected_counts, what="one dead letter per reason"
    )
    points = harness.wait_points("manhole_cover", good["device_id"], n_good)
    assert sorted(p["seq"] for p in points) == list(range(n_good))
    assert gw.is_running()

    letters = {d.reason: d for d in harness.deadletters.recent(limit=100)}
    for reason, t, payload, device_id in bad:
        d = letters[reason]
        assert (d.topic, d.device_id) == (t, device_id), reason
        credential = json.loads(payload).get("credential") if b'"credential"' in payload else None
        if credential is None:
            assert d.payload == payload[:4096] and d.payload_size == len(payload), reason
        else:  # personal data: a dead letter keeps the credential's keyed hash in its place
            assert credential.encode() not in d.payload, reason
            assert credential_hash(CREDENTIAL_KEY.encode(), credential).encode() in d.payload, reason
        assert d.detail, reason
    oversize = letters["oversize"]
    assert oversize.payload_size == 16 * 1024 + 1 and len(oversize.payload) == 4096 and oversize.truncated
    refused = letters["db_rejected"]
    assert (refused.device_id, refused.device_type) == (light["device_id"], "streetlight")
    assert refused.payload.startswith(b"streetlight,") and b"lux=" in refused.payload
    assert "conflict" in refused.detail
    assert harness.points("streetlight", light["device_id"]) == []

    wait_for(
        lambda: gw.metrics().by_label("sc_rejects_total", "reason"),
        lambda m: m == {r: float(n) for r, n in expected_counts.items()},
        what="sc_rejects_total per reason to match the dead letters",
    )

    assert cli_main(["deadletters", "counts", "--db", harness.db_url]) == 0
    table = capsys.readouterr().out
    for reason in expected_counts:
        assert any(line.split()[:2] == [reason, "1"] for line in table.splitlines()), (reason, table)
    assert cli_main(["deadletters", "unknown", "--db", harness.db_url]) == 0
    table = capsys.readouterr().out
    assert unknown_id in table
    assert good["device_id"] not in table


def test_access_credential_is_stored_only_as_its_keyed_hash(harness: Harness) -> None:
    (door,) = community_rows(_slug(), doors=1)
    harness.register([door])
    harness.start_gateway()
    ts = now_ms() - 1000
    payload = {
        "ts": ts,
        "seq": 1,
        "event": "access_denied",
        "method": "card",
        "reason": "unknown_credential",
        "credential": "card-123456",
    }
    # The same card at a reader whose firmware sends a method the protocol does not know: rejected.
    rejected = {**payload, "seq": 2, "method": "telepathy"}
    harness.publisher().send_many([(topic(door, "event"), payload), (topic(door, "event"), rejected)])

    (point,) = harness.wait_points("access_control_event", door["device_id"], 1)
    assert point["credential_hash"] == credential_hash(CREDENTIAL_KEY.encode(), "card-123456")
    assert point["event"] == "access_denied" and point["time"] == ts
    assert "credential" not in harness.field_types("access_control_event")
    everything = harness.query('SELECT * FROM "access_control_event"')
    assert all("123456" not in str(v) for row in everything for v in row.values()), everything

    (letter,) = wait_for(harness.deadletters.recent, what="the rejected access event in the dead letters")
    assert letter.reason == "bad_value"
    assert b"123456" not in letter.payload and "123456" not in letter.detail, letter


def _device_with_last_will(harness: Harness, row: dict[str, Any]) -> mqtt.Client:
    """The device's own MQTT session (its own account; client id = device id) with its last will on its
    status topic.

    No network thread: the test drives paho's loop, so it can later drop the socket under paho's feet.
    """
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=row["device_id"],
        protocol=mqtt.MQTTv5,
    )
    account = harness.device_credentials(row)
    client.username_pw_set(account.username, account.password)
    client.will_set(topic(row, "status"), b'{"online": false}', qos=1, retain=True)
    connected: list[bool] = []
    client.on_connect = lambda *_: connected.append(True)
    client.connect(harness.broker.host, harness.broker.port, keepalive=60)
    deadline = time.monotonic() + TIMEOUT_S
    while not connected:
        assert time.monotonic() < deadline, "device: no CONNACK"
        client.loop(0.05)
    return client


def test_status_and_last_will_update_device_state(harness: Harness) -> None:
    (detector,) = community_rows(_slug(), detectors=1)
    device_id = detector["device_id"]
    harness.register([detector])
    harness.start_gateway()
    assert harness.registry.get(device_id).lifecycle == "registered"  # type: ignore[union-attr]

    device = _device_with_last_will(harness, detector)
    status_topic = topic(detector, "status")
    try:
        info = device.publish(status_topic, b'{"online": true, "fw": "1.2.3"}', qos=1, retain=True)
        deadline = time.monotonic() + TIMEOUT_S
        while not info.is_published():
            assert time.monotonic() < deadline, "device: no PUBACK"
            device.loop(0.05)
        state = wait_for(
            lambda: harness.states.get(device_id),
            lambda s: s is not None and s.online is True,
            what="the device to be online",
        )
        assert state is not None and state.fw == "1.2.3"
        wait_for(
            lambda: harness.registry.get(device_id).lifecycle,
            lambda lc: lc == "online",  # type: ignore[union-attr]
            what="the lifecycle to move from registered to online",
        )

        # The device loses power: its connection ends without DISCONNECT, the broker sends its will.
        sock = device.socket()
        assert isinstance(sock, socket.socket)
        sock.close()
        state = wait_for(
            lambda: harness.states.get(device_id),
            lambda s: s is not None and s.online is False,
            what="the last will to mark the device offline",
        )
        assert state is not None
        assert state.fw == "1.2.3"
        assert state.last_seen is not None and state.last_status_at is not None
        points = harness.wait_points("device_status", device_id, 2)
        assert sorted(p["online"] for p in points) == [False, True]
    finally:
        # Leave no retained status on the shared broker for later tests' gateways.
        harness.publisher().send(status_topic, b"", retain=True)


def test_duplicates_are_stored_once_and_counted(harness: Harness) -> None:
    (cover,) = community_rows(_slug(), covers=1)
    harness.register([cover])
    gw = harness.start_gateway()
    payload = telemetry(cover, seq=42, ts=now_ms() - 5000)
    pub = harness.publisher()
    for _ in range(3):
        pub.send(topic(cover), payload)

    wait_for(
        lambda: gw.metrics().by_label("sc_messages_total", "outcome"),
        lambda m: m.get("stored") == 1 and m.get("duplicate") == 2,
        what="one message stored and two counted as duplicates",
    )
    points = harness.points("manhole_cover", cover["device_id"])
    assert [(p["seq"], p["time"]) for p in points] == [(42, payload["ts"])]


def test_untrusted_device_time_is_replaced_by_the_receive_time(harness: Harness) -> None:
    (bay,) = community_rows(_slug(), bays=1)
    harness.register([bay])
    gw = harness.start_gateway()
    before = now_ms()
    harness.publisher().send(topic(bay), telemetry(bay, seq=7, ts=before + 24 * 3600 * 1000))

    (point,) = harness.wait_points("parking_sensor", bay["device_id"], 1)
    after = now_ms()  # the worker stamps its receive time: no later than the point is found
    assert before <= point["time"] <= after
    assert point["seq"] == 7
    wait_for(
        lambda: gw.metrics().value("sc_ts_untrusted_total"),
        lambda n: n == 1,
        what="sc_ts_untrusted_total to count the message",
    )
