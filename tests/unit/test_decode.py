"""Decode stage: topic rules, registry checks, timestamp skew, duplicates and credential hashing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.decode import Decoder, credential_hash, parse_ts
from gateway.messages import Duplicate, Outcome, RawMessage, Reading, Reason, Rejection

NOW_MS = 1_795_239_454_000  # 2026-11-21T05:37:34Z
MINUTE_MS = 60_000
DAY_MS = 86_400_000
KEY = b"unit-test-key"
CARD = "CARD-0042-7781-ZHANGSAN"


@dataclass(frozen=True)
class FakeDevice:
    device_id: str
    device_type: str
    community: str | None = "c-001"
    grid_code: str | None = "g-001"
    lifecycle: str = "in_service"


REGISTRY = {
    d.device_id: d
    for d in (
        FakeDevice("mh-0001", "manhole_cover"),
        FakeDevice("mh-0002", "manhole_cover"),
        FakeDevice("sl-0001", "streetlight"),
        FakeDevice("ac-0001", "access_control"),
        FakeDevice("x" * 64, "parking_sensor"),
        FakeDevice("mh-new", "manhole_cover", lifecycle="registered"),
        FakeDevice("mh-online", "manhole_cover", lifecycle="online"),
        FakeDevice("mh-off", "manhole_cover", lifecycle="disabled"),
        FakeDevice("mh-gone", "manhole_cover", lifecycle="retired"),
    )
}

TILT = {"tilt_deg": 1.5}


@pytest.fixture
def dec() -> Decoder:
    return Decoder(REGISTRY.get, credential_key=KEY)


def raw(topic: str, payload: bytes | dict[str, Any], received_ms: int = NOW_MS) -> RawMessage:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return RawMessage(topic, body, received_ms)


def telemetry(
    dec: Decoder, payload: bytes | dict[str, Any], device_id: str = "mh-0001", **kw: Any
) -> Outcome:
    return dec.decode(raw(f"sc/v1/manhole_cover/{device_id}/telemetry", payload, **kw))


def rejected(outcome: Outcome, reason: Reason) -> Rejection:
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason is reason, outcome.detail
    return outcome


def reading(outcome: Outcome) -> Reading:
    assert isinstance(outcome, Reading), outcome
    return outcome


# -- topics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "xx/v1/manhole_cover/mh-0001/telemetry",
        "sc/v2/manhole_cover/mh-0001/telemetry",
        "/sc/v1/manhole_cover/mh-0001/telemetry",
        "sc/v1/manhole_cover/mh-0001/telemetry/",
        "sc/v1/manhole_cover/mh-0001/telemetry/extra",
        "sc/v1/manhole_cover/mh-0001",
        "sc/v1/manhole_cover/mh-0001/metrics",
        "sc/v1/manhole_cover/mh-0001/Telemetry",
        "sc/v1/manhole_cover/mh-0001/cmd",
        "",
    ],
)
def test_topic_shape_is_checked(dec: Decoder, topic: str) -> None:
    out = rejected(dec.decode(raw(topic, TILT)), Reason.BAD_TOPIC)
    assert out.device_id is None


@pytest.mark.parametrize(
    "device_id",
    ["mh.0001", "mh 0001", "mh+0001", "mh#1", "mh:1", "井盖-1", "mh-0001\n", "", "x" * 65],
)
def test_device_id_must_be_1_to_64_of_the_allowed_characters(dec: Decoder, device_id: str) -> None:
    out = rejected(telemetry(dec, TILT, device_id), Reason.BAD_TOPIC)
    assert "device id" in out.detail


def test_device_id_of_64_characters_is_allowed(dec: Decoder) -> None:
    topic = f"sc/v1/parking_sensor/{'x' * 64}/telemetry"
    assert reading(dec.decode(raw(topic, {"occupied": True}))).device_id == "x" * 64


def test_unknown_device_type(dec: Decoder) -> None:
    out = rejected(dec.decode(raw("sc/v1/fire_hydrant/mh-0001/telemetry", TILT)), Reason.UNKNOWN_TYPE)
    assert "fire_hydrant" in out.detail
    assert (out.device_id, out.device_type) == ("mh-0001", "fire_hydrant")


# -- registry ---------------------------------------------------------------------------------------


def test_unregistered_device(dec: Decoder) -> None:
    out = rejected(telemetry(dec, TILT, "mh-9999"), Reason.UNREGISTERED_DEVICE)
    assert (out.device_id, out.device_type) == ("mh-9999", "manhole_cover")


def test_type_in_topic_must_match_the_registered_type(dec: Decoder) -> None:
    out = rejected(
        dec.decode(raw("sc/v1/streetlight/mh-0001/telemetry", {"lamp_on": True})), Reason.TYPE_MISMATCH
    )
    assert "manhole_cover" in out.detail and "streetlight" in out.detail


@pytest.mark.parametrize("device_id", ["mh-off", "mh-gone"])
def test_disabled_and_retired_devices_are_rejected(dec: Decoder, device_id: str) -> None:
    out = rejected(telemetry(dec, TILT, device_id), Reason.DEVICE_DISABLED)
    assert REGISTRY[device_id].lifecycle in out.detail


@pytest.mark.parametrize("device_id", ["mh-new", "mh-online", "mh-0001"])
def test_active_lifecycles_are_accepted(dec: Decoder, device_id: str) -> None:
    assert reading(telemetry(dec, TILT, device_id)).device is REGISTRY[device_id]


def test_registry_checks_come_before_payload_checks(dec: Decoder) -> None:
    rejected(telemetry(dec, b"not json", "mh-9999"), Reason.UNREGISTERED_DEVICE)
    rejected(telemetry(dec, b"\xff\xfe{}", "mh-off"), Reason.DEVICE_DISABLED)


def test_event_on_a_type_without_events(dec: Decoder) -> None:
    rejected(dec.decode(raw("sc/v1/manhole_cover/mh-0001/event", {"event": "tamper"})), Reason.UNKNOWN_EVENT)


# -- timestamps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset_ms", "trusted"),
    [
        (6 * MINUTE_MS, False),
        (5 * MINUTE_MS + 1, False),
        (5 * MINUTE_MS, True),
        (4 * MINUTE_MS, True),
        (0, True),
        (-6 * DAY_MS, True),
        (-7 * DAY_MS, True),
        (-7 * DAY_MS - 1, False),
        (-8 * DAY_MS, False),
    ],
)
def test_skewed_timestamp_is_replaced_by_receive_time(dec: Decoder, offset_ms: int, trusted: bool) -> None:
    r = reading(telemetry(dec, {"ts": NOW_MS + offset_ms, **TILT}))
    assert r.ts_trusted is trusted
    assert r.ts_ms == (NOW_MS + offset_ms if trusted else NOW_MS)
    assert r.received_ms == NOW_MS
    assert dec.skewed == (0 if trusted else 1)


def test_skew_is_counted_per_message_and_applies_to_text_timestamps(dec: Decoder) -> None:
    telemetry(dec, {"ts": "2026-11-21T05:43:34Z", **TILT})  # 6 min ahead
    telemetry(dec, {"ts": "2026-11-13T13:37:34+08:00", **TILT})  # 8 days old
    telemetry(dec, {"ts": "2026-11-21T13:37:34+08:00", **TILT})  # exactly now
    status = dec.decode(raw("sc/v1/manhole_cover/mh-0001/status", {"online": True, "ts": 0}))
    assert reading(status).ts_ms == NOW_MS
    assert dec.skewed == 3


def test_absent_ts_means_receive_time(dec: Decoder) -> None:
    r = reading(telemetry(dec, TILT, received_ms=NOW_MS + 123))
    assert (r.ts_ms, r.ts_trusted, r.seq) == (NOW_MS + 123, True, None)
    assert dec.skewed == 0


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2026-11-21T05:37:34Z", NOW_MS),
        ("2026-11-21T13:37:34+08:00", NOW_MS),
        ("2026-11-21T00:37:34-05:00", NOW_MS),
        ("2026-11-21T05:37:34.250Z", NOW_MS + 250),
        ("2026-11-21T05:37:34.2509999Z", NOW_MS + 250),
        ("2026-11-21t05:37:34z", NOW_MS),
        ("2026-11-21 05:37:34Z", NOW_MS),
        ("2026-11-21T05:37:34-00:00", NOW_MS),
    ],
)
def test_parse_ts_takes_rfc3339(text: str, ms: int) -> None:
    assert parse_ts(text) == ms


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-21T05:37:34",
        "2026-11-21",
        "20261121T021734Z",
        "2026-W47-6T02:17:34Z",
        "2026-11-21T02:17Z",
        "2026-11-21T05:37:34+0800",
        "2026-02-30T02:17:34Z",
        "21/11/2026 02:17:34",
        "2026-11-21T05:37:34Z ",
        "２０２６-11-21T02:17:34Z",
    ],
)
def test_parse_ts_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|UTC offset"):
        parse_ts(text)


def test_epoch_milliseconds_pass_through() -> None:
    assert parse_ts(NOW_MS) == NOW_MS


# -- duplicates -------------------------------------------------------------------------------------


def test_same_seq_and_ts_is_a_duplicate(dec: Decoder) -> None:
    msg = {"ts": NOW_MS - 1000, "seq": 41, **TILT}
    reading(telemetry(dec, msg))
    dup = telemetry(dec, msg)
    assert isinstance(dup, Duplicate)
    assert (dup.device_id, dup.seq) == ("mh-0001", 41)


def test_same_seq_with_another_ts_is_a_rebooted_device(dec: Decoder) -> None:
    reading(telemetry(dec, {"ts": NOW_MS - 60_000, "seq": 1, **TILT}))
    again = reading(telemetry(dec, {"ts": NOW_MS - 1000, "seq": 1, **TILT}))
    assert (again.seq, again.ts_ms) == (1, NOW_MS - 1000)


def test_same_seq_without_ts_is_a_duplicate(dec: Decoder) -> None:
    reading(telemetry(dec, {"seq": 7, **TILT}))
    assert isinstance(telemetry(dec, {"seq": 7, **TILT}, received_ms=NOW_MS + 500), Duplicate)


def test_seq_is_per_device(dec: Decoder) -> None:
    msg = {"ts": NOW_MS, "seq": 5, **TILT}
    reading(telemetry(dec, msg, "mh-0001"))
    reading(telemetry(dec, msg, "mh-0002"))


def test_seq_is_shared_across_a_devices_topics(dec: Decoder) -> None:
    reading(telemetry(dec, {"ts": NOW_MS, "seq": 9, **TILT}))
    status = dec.decode(raw("sc/v1/manhole_cover/mh-0001/status", {"online": True, "ts": NOW_MS, "seq": 9}))
    assert isinstance(status, Duplicate)


def test_duplicate_of_a_skewed_message_is_still_a_duplicate(dec: Decoder) -> None:
    msg = {"ts": NOW_MS + DAY_MS, "seq": 3, **TILT}
    assert not reading(telemetry(dec, msg)).ts_trusted
    assert isinstance(telemetry(dec, msg, received_ms=NOW_MS + 10), Duplicate)


def test_only_a_recent_window_of_seq_is_remembered(dec: Decoder) -> None:
    first = {"ts": NOW_MS, "seq": 0, **TILT}
    reading(telemetry(dec, first))
    for seq in range(1, Decoder.SEQ_WINDOW + 1):
        reading(telemetry(dec, {"ts": NOW_MS, "seq": seq, **TILT}))
    reading(telemetry(dec, first))  # fell out of the window: taken again


def test_a_rejected_message_does_not_claim_its_seq(dec: Decoder) -> None:
    rejected(telemetry(dec, {"ts": NOW_MS, "seq": 12}), Reason.EMPTY)
    rejected(telemetry(dec, {"ts": NOW_MS, "seq": 13, "tilt_deg": 999}), Reason.OUT_OF_RANGE)
    reading(telemetry(dec, {"ts": NOW_MS, "seq": 12, **TILT}))
    reading(telemetry(dec, {"ts": NOW_MS, "seq": 13, **TILT}))


# -- access-control credentials ---------------------------------------------------------------------


def access_event(dec: Decoder, **fields: Any) -> Outcome:
    return dec.decode(raw("sc/v1/access_control/ac-0001/event", {"ts": NOW_MS, **fields}))


def test_credential_is_replaced_by_its_keyed_hash(dec: Decoder) -> None:
    r = reading(access_event(dec, seq=1, event="access_granted", method="card", credential=CARD))
    assert r.event == "access_granted"
    assert r.values == {"method": "card", "credential_hash": credential_hash(KEY, CARD)}
    assert len(r.values["credential_hash"]) == 32
    assert CARD not in repr(r)
    assert CARD not in json.dumps(r.values)


def test_credential_hash_is_stable_per_key_and_differs_across_keys() -> None:
    first, second = (Decoder(REGISTRY.get, credential_key=k) for k in (b"key-one", b"key-two"))
    msg = {"event": "access_denied", "method": "card", "reason": "expired", "credential": CARD}
    h1 = reading(access_event(first, seq=1, **msg)).values["credential_hash"]
    h1_again = reading(access_event(first, seq=2, **msg)).values["credential_hash"]
    h2 = reading(access_event(second, seq=1, **msg)).values["credential_hash"]
    assert h1 == h1_again
    assert h1 != h2
    other = reading(access_event(first, seq=3, **{**msg, "credential": CARD + "X"})).values["credential_hash"]
    assert other != h1


def test_event_without_credential_has_no_hash(dec: Decoder) -> None:
    r = reading(access_event(dec, event="access_granted", method="face"))
    assert r.values == {"method": "face"}


def test_event_name_moves_out_of_the_values(dec: Decoder) -> None:
    r = reading(access_event(dec, seq=4, event="door_held_open", open_s=95))
    assert (r.event, r.values, r.kind) == ("door_held_open", {"open_s": 95.0}, "event")
    assert type(r.values["open_s"]) is float


def test_rejected_access_event_keeps_no_raw_credential() -> None:
    """A dead-lettered access event must not keep the card id: personal data, stored only as a keyed hash."""
    from gateway.decode import Decoder
    from gateway.messages import RawMessage, Rejection
    from gateway.registry import DeviceInfo

    dev = DeviceInfo("ac-1", "access_control", "c", "110101001001001", None, None, None, None, "online")
    dec = Decoder({"ac-1": dev}.get, credential_key=b"k")
    for payload in (
        b'{"event":"access_denied","method":"telepathy","credential":"card-123456"}',
        b'{"event":"access_denied","method":"card","reason":"expired","credential":"card-123456'
        + b"9" * 300
        + b'"}',
    ):
        out = dec.decode(RawMessage("sc/v1/access_control/ac-1/event", payload, 0))
        assert isinstance(out, Rejection)
        assert b"card-123456" not in out.raw.payload and "card-123456" not in out.detail
        assert b'"credential":"hash:' in out.raw.payload


def test_the_topic_cache_is_bounded_and_still_rejects_bad_topics() -> None:
    from gateway.decode import Decoder
    from gateway.messages import RawMessage, Reason, Rejection

    dec = Decoder({}.get, credential_key=b"k")
    dec.TOPIC_CACHE = 10
    for i in range(50):  # a flood of unregistered ids: each topic is new
        out = dec.decode(RawMessage(f"sc/v1/streetlight/x-{i}/telemetry", b"{}", 0))
        assert isinstance(out, Rejection) and out.reason is Reason.UNREGISTERED_DEVICE
    assert len(dec._topics) <= 10
    out = dec.decode(RawMessage("sc/v2/streetlight/x-1/telemetry", b"{}", 0))
    assert isinstance(out, Rejection) and out.reason is Reason.BAD_TOPIC
