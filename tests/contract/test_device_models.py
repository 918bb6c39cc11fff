"""Contract: every device type's thing model, its samples and its generated docs, through the real decoder."""

from __future__ import annotations

import inspect
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from devices import DEVICE_TYPES, THING_MODELS, ThingModel
from devices import docs as devdocs
from devices.samples import INVALID_CASES, InvalidCase, example_payload
from gateway.decode import Decoder, credential_hash
from gateway.messages import Duplicate, Outcome, RawMessage, Reading, Reason, Rejection

ROOT = Path(__file__).resolve().parents[2]
NOW_MS = 1_795_239_454_000  # 2026-11-21T05:37:34Z
KEY = b"contract-test-key"
CST = timezone(timedelta(hours=8))
DRAWS = 120

EVENT_TYPES = [t for t, m in THING_MODELS.items() if m.events]


@dataclass(frozen=True)
class Device:
    device_id: str
    device_type: str
    community: str | None = "c-001"
    grid_code: str | None = "g-001"
    lifecycle: str = "in_service"


def device_id(device_type: str) -> str:
    return f"{device_type}-1"


def make_decoder(lookup: Callable[[str], Device | None] | None = None) -> Decoder:
    registry = {device_id(t): Device(device_id(t), t) for t in THING_MODELS}
    return Decoder(lookup or registry.get, credential_key=KEY)


def send(dec: Decoder, device_type: str, kind: str, payload: bytes | dict[str, Any]) -> Outcome:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return dec.decode(RawMessage(f"sc/v1/{device_type}/{device_id(device_type)}/{kind}", raw, NOW_MS))


def as_reading(outcome: Outcome) -> Reading:
    assert isinstance(outcome, Reading), outcome
    return outcome


def device_time(rng: random.Random, n: int) -> tuple[int | str | None, int]:
    """A trusted device timestamp in one of the four accepted shapes, cycling with n: (ts to send, ms)."""
    ms = NOW_MS - rng.randint(0, 6 * 86400 * 1000)
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    shape = n % 4
    if shape == 0:
        return None, NOW_MS
    if shape == 1:
        return ms, ms
    if shape == 2:
        return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z"), ms
    return dt.astimezone(CST).isoformat(timespec="milliseconds"), ms


def assert_kinds(model: ThingModel, values: dict[str, Any], event: str | None = None) -> None:
    """Floats come out as floats (never ints, never bools), bools as bools, text as text."""
    fields = {f.name: f for f in model.events_by_name[event].fields} if event else model.fields_by_name
    for name, value in values.items():
        if name == "credential_hash":
            continue
        assert type(value) is fields[name].kind, (name, value)


# -- valid payloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_generated_telemetry_is_read_back_exactly(device_type: str) -> None:
    model = THING_MODELS[device_type]
    dec = make_decoder()
    rng = random.Random(f"telemetry:{device_type}")
    for n in range(DRAWS):
        ts, ts_ms = device_time(rng, n)
        payload = example_payload(model, rng, "telemetry", partial=n % 2 == 1, ts=ts, seq=n)
        reading = as_reading(send(dec, device_type, "telemetry", payload))
        sent = {k: v for k, v in payload.items() if k not in ("ts", "seq")}
        assert reading.values == sent
        assert_kinds(model, reading.values)
        assert (reading.kind, reading.seq, reading.event) == ("telemetry", n, None)
        assert reading.ts_ms == ts_ms
        assert reading.ts_trusted
        assert reading.received_ms == NOW_MS
        assert reading.device_id == device_id(device_type)
    assert dec.skewed == 0


@pytest.mark.parametrize("device_type", EVENT_TYPES)
def test_generated_events_are_read_back_exactly(device_type: str) -> None:
    model = THING_MODELS[device_type]
    dec = make_decoder()
    rng = random.Random(f"event:{device_type}")
    seen = set()
    for n in range(DRAWS):
        ts, ts_ms = device_time(rng, n)
        payload = example_payload(model, rng, "event", partial=n % 3 == 0, ts=ts, seq=n)
        reading = as_reading(send(dec, device_type, "event", payload))
        expected = {k: v for k, v in payload.items() if k not in ("ts", "seq", "event")}
        if "credential" in expected:
            expected["credential_hash"] = credential_hash(KEY, expected.pop("credential"))
        assert reading.values == expected
        assert_kinds(model, reading.values, payload["event"])
        assert (reading.kind, reading.event, reading.seq, reading.ts_ms) == (
            "event",
            payload["event"],
            n,
            ts_ms,
        )
        seen.add(payload["event"])
    assert seen == set(model.events_by_name), "every event drawn at least once"


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_generated_status_is_read_back_exactly(device_type: str) -> None:
    model = THING_MODELS[device_type]
    dec = make_decoder()
    rng = random.Random(f"status:{device_type}")
    for n in range(20):
        ts, ts_ms = device_time(rng, n)
        payload = example_payload(model, rng, "status", partial=n % 2 == 0, ts=ts, seq=n)
        reading = as_reading(send(dec, device_type, "status", payload))
        assert reading.values == {k: v for k, v in payload.items() if k not in ("ts", "seq")}
        assert reading.values["online"] is True
        assert reading.ts_ms == ts_ms
    last_will = as_reading(send(dec, device_type, "status", b'{"online": false}'))
    assert last_will.values == {"online": False}


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_range_bounds_are_inclusive(device_type: str) -> None:
    model = THING_MODELS[device_type]
    dec = make_decoder()
    for bound in ("minimum", "maximum"):
        payload = {f.name: getattr(f, bound) for f in model.telemetry if getattr(f, bound) is not None}
        # JSON integers (0, 100) are taken for float fields and come out as floats.
        assert all(isinstance(v, int) for v in payload.values())
        reading = as_reading(send(dec, device_type, "telemetry", payload))
        assert reading.values == payload
        assert_kinds(model, reading.values)


def test_example_payload_is_deterministic() -> None:
    for model in THING_MODELS.values():
        for kind in ("telemetry", "event", "status") if model.events else ("telemetry", "status"):
            a = example_payload(model, random.Random(7), kind)  # type: ignore[arg-type]
            b = example_payload(model, random.Random(7), kind)  # type: ignore[arg-type]
            assert a == b


def test_example_payload_refuses_an_event_for_a_type_without_events() -> None:
    with pytest.raises(ValueError, match="declares no events"):
        example_payload(THING_MODELS["parking_sensor"], random.Random(1), "event")


# -- invalid payloads -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", INVALID_CASES, ids=[f"{c.device_type}/{c.topic_kind}/{c.description}" for c in INVALID_CASES]
)
def test_invalid_payload_is_rejected_with_its_reason(case: InvalidCase) -> None:
    dec = make_decoder()
    outcome = send(dec, case.device_type, case.topic_kind, case.payload)
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason is Reason(case.reason), outcome.detail
    if case.field is not None:
        assert case.field in outcome.detail
    assert (outcome.device_id, outcome.device_type) == (device_id(case.device_type), case.device_type)
    assert dec.skewed == 0


def test_invalid_cases_cover_every_type() -> None:
    ids = [(c.device_type, c.topic_kind, c.description) for c in INVALID_CASES]
    assert len(ids) == len(set(ids)), "descriptions are unique per type and topic"
    for device_type, model in THING_MODELS.items():
        have = {(c.topic_kind, Reason(c.reason)) for c in INVALID_CASES if c.device_type == device_type}
        need = {
            ("telemetry", r)
            for r in (
                Reason.UNKNOWN_FIELD,
                Reason.WRONG_TYPE,
                Reason.OUT_OF_RANGE,
                Reason.BAD_TIMESTAMP,
                Reason.NOT_JSON,
                Reason.NOT_UTF8,
                Reason.NOT_OBJECT,
                Reason.OVERSIZE,
                Reason.EMPTY,
            )
        } | {("status", Reason.MISSING_FIELD), ("event", Reason.UNKNOWN_EVENT)}
        if model.events:
            need |= {("event", Reason.MISSING_FIELD), ("event", Reason.UNKNOWN_FIELD)}
        assert need <= have, (device_type, need - have)
        descriptions = " | ".join(c.description for c in INVALID_CASES if c.device_type == device_type)
        for words in (
            "string for a float",
            "number for a bool",
            "bool for a float",
            "above max",
            "below min",
            "NaN",
            "Infinity",
            "non-RFC 3339",
            "no UTC offset",
            "not UTF-8",
            "array",
            "oversize",
            "empty object",
            "only ts and seq",
        ):
            assert words in descriptions, (device_type, words)
    access = {c.description for c in INVALID_CASES if c.device_type == "access_control"}
    assert {"access_denied without `reason`", "access_denied bad choice `method`"} <= access


def test_oversize_limit_is_exclusive() -> None:
    """At most 16 KiB: exactly 16384 bytes is accepted, one more is not."""
    body = b'{"battery_pct": 50}'
    exact = body[:-1] + b" " * (16 * 1024 - len(body)) + b"}"
    assert len(exact) == 16 * 1024
    as_reading(send(make_decoder(), "smoke_detector", "telemetry", exact))


# -- the protocol's own examples and every example in the generated docs ----------------------------

# Verbatim from the upstream device-protocol.md (section "Examples", "Event payloads", "Status payloads").
SPEC_EXAMPLES = [
    (
        "sc/v1/manhole_cover/mh-0001/telemetry",
        '{"ts": 1795239454000, "seq": 17, "tilt_deg": 1.4, "cover_open": false, "water_level_cm": 182.0, '
        '"battery_pct": 87, "rssi_dbm": -91}',
    ),
    ("sc/v1/smoke_detector/sd-0420/event", '{"ts": "2026-11-21T02:14:09Z", "event": "smoke_alarm"}'),
    (
        "sc/v1/parking_sensor/pk-0077/telemetry",
        '{"occupied": true, "mag_x": 12.5, "mag_y": -40.1, "mag_z": 88.0, "battery_pct": 64}',
    ),
    (
        "sc/v1/access_control/ac-0012/event",
        '{"ts": "2026-11-21T08:00:00+08:00", "seq": 812, "event": "door_held_open", "open_s": 95}',
    ),
    ("sc/v1/access_control/ac-0012/status", '{"online": true, "fw": "2.1.7", "ts": 1795239454000}'),
]

EXAMPLE_RE = re.compile(r"^topic +(\S+)\npayload (.+)$", re.MULTILINE)


def decode_example(topic: str, payload: str) -> Reading:
    """Decode with a registry that knows whatever device the topic names, as the topic's type."""
    dtype = topic.split("/")[2]
    dec = make_decoder(lambda d: Device(d, dtype))
    return as_reading(dec.decode(RawMessage(topic, payload.encode(), NOW_MS + 60_000)))


@pytest.mark.parametrize(("topic", "payload"), SPEC_EXAMPLES)
def test_spec_examples_are_accepted(topic: str, payload: str) -> None:
    reading = decode_example(topic, payload)
    assert reading.ts_trusted
    sent = json.loads(payload)
    assert set(reading.values) == set(sent) - {"ts", "seq", "event"}
    assert f"topic   {topic}\npayload {payload}" in (ROOT / devdocs.PROTOCOL_DOC).read_text(encoding="utf-8")


def test_spec_example_values() -> None:
    mh = decode_example(*SPEC_EXAMPLES[0])
    assert (mh.ts_ms, mh.seq) == (1_795_239_454_000, 17)
    assert mh.values["battery_pct"] == 87.0 and type(mh.values["battery_pct"]) is float
    assert mh.values["cover_open"] is False
    pk = decode_example(*SPEC_EXAMPLES[2])
    assert pk.ts_ms == pk.received_ms and pk.seq is None
    held = decode_example(*SPEC_EXAMPLES[3])
    assert held.ts_ms == int(datetime(2026, 11, 21, 0, 0, tzinfo=UTC).timestamp() * 1000)
    assert (held.event, held.values) == ("door_held_open", {"open_s": 95.0})


def doc_examples() -> list[tuple[str, str, str]]:
    files = [devdocs.PROTOCOL_DOC] + [Path("devices", t, "README.md") for t in DEVICE_TYPES]
    return [
        (str(f), topic, payload)
        for f in files
        for topic, payload in EXAMPLE_RE.findall((ROOT / f).read_text(encoding="utf-8"))
    ]


@pytest.mark.parametrize(("doc", "topic", "payload"), doc_examples())
def test_every_documented_example_is_accepted(doc: str, topic: str, payload: str) -> None:
    reading = decode_example(topic, payload)
    assert reading.ts_trusted, doc


def test_every_readme_shows_every_topic_it_publishes_on() -> None:
    for device_type, model in THING_MODELS.items():
        kinds = {
            topic.rsplit("/", 1)[1]
            for doc, topic, _ in doc_examples()
            if doc.startswith(f"devices/{device_type}/")
        }
        assert kinds == ({"telemetry", "event", "status"} if model.events else {"telemetry", "status"})


# -- generated docs do not drift from the models ----------------------------------------------------


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_readme_matches_model(device_type: str) -> None:
    path = devdocs.readme_path(ROOT, device_type)
    assert path.is_file(), f"{path} missing: run `python -m devices.docs`"
    assert path.read_text(encoding="utf-8") == devdocs.render_readme(THING_MODELS[device_type]), (
        f"{path} differs from the thing model: run `python -m devices.docs`"
    )


def test_protocol_doc_matches_models() -> None:
    assert devdocs.stale(ROOT) == [], "run `python -m devices.docs`"


def test_readme_shows_the_model() -> None:
    text = devdocs.render_readme(THING_MODELS["access_control"])
    assert text.startswith("# access_control: Door / gate access controller (门禁)\n")
    assert "| `battery_pct` | % | float | 0 – 100 | battery |" in text
    assert "`sc/v1/access_control/{device_id}/status` | device → gateway | 1, retained |" in text
    assert "`reason` (required; one of unknown_credential," in text
    assert "Telemetry every 5 min (300 s)" in text
    assert "| `held_open_limit_s` | s | float | 0 – 86400 | held-open limit |" in text


def test_check_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert devdocs.main(["--check", "--root", str(tmp_path)]) == 1
    assert devdocs.main(["--root", str(tmp_path)]) == 0
    capsys.readouterr()
    assert devdocs.main(["--check", "--root", str(tmp_path)]) == 0
    readme = devdocs.readme_path(tmp_path, "streetlight")
    readme.write_text(readme.read_text(encoding="utf-8").replace("0 – 300", "0 – 250"), encoding="utf-8")
    (tmp_path / devdocs.PROTOCOL_DOC).write_text("stale\n", encoding="utf-8")
    assert devdocs.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "streetlight" in err and str(devdocs.PROTOCOL_DOC) in err
    assert "manhole_cover" not in err
    assert devdocs.write_all(tmp_path) == [readme, tmp_path / devdocs.PROTOCOL_DOC]
    assert devdocs.stale(tmp_path) == []


def test_documented_skew_tolerances_are_the_decoders() -> None:
    params = inspect.signature(Decoder.__init__).parameters
    assert params["future_tolerance_ms"].default == devdocs.FUTURE_TOLERANCE_S * 1000
    assert params["past_tolerance_ms"].default == devdocs.PAST_TOLERANCE_S * 1000


def test_duplicate_of_a_documented_example_is_detected() -> None:
    """The docs' examples carry seq and ts, so a redelivery of one is a Duplicate, not a second reading."""
    dec = make_decoder(lambda d: Device(d, "manhole_cover"))
    raw = RawMessage(SPEC_EXAMPLES[0][0], SPEC_EXAMPLES[0][1].encode(), NOW_MS)
    as_reading(dec.decode(raw))
    assert isinstance(dec.decode(raw), Duplicate)
