"""Line protocol of readings: escaping, value types, event and status lines, ms timestamps.

Lines are compared with exact expected strings, and every line is also read back by a small parser that
follows InfluxDB's line protocol reference (docs.influxdata.com/influxdb/v2/reference/syntax/line-protocol):
measurement escapes comma and space; tag keys, tag values and field keys escape comma, equals sign and
space; string field values escape double quote and backslash; a backslash before any other character is
a literal backslash.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

import pytest

from devices import THING_MODELS
from devices.samples import example_payload
from gateway.decode import Decoder
from gateway.lineproto import STATUS_MEASUREMENT, event_measurement, format_value, tags_for, to_line
from gateway.messages import Kind, RawMessage, Reading

TS = 1_795_239_454_123  # 2026-11-21T05:37:34.123Z, in ms


@dataclass(frozen=True)
class Device:
    device_id: str
    device_type: str
    community: str | None = "c-001"
    grid_code: str | None = "g-001"
    lifecycle: str = "in_service"


def reading(
    values: dict[str, Any],
    *,
    kind: Kind = "telemetry",
    device: Device | None = None,
    seq: int | None = None,
    event: str | None = None,
    ts: int = TS,
) -> Reading:
    return Reading(device or Device("mh-0001", "manhole_cover"), kind, ts, values, seq, event)


# ---- a minimal line-protocol reader -----------------------------------------------------------------


class LineProtocolError(ValueError):
    pass


def _scan(line: str, i: int, stops: str, escapable: str, forbidden: str = "") -> tuple[str, int]:
    out: list[str] = []
    while i < len(line) and line[i] not in stops:
        c = line[i]
        if c == "\\" and i + 1 < len(line) and line[i + 1] in escapable:
            out.append(line[i + 1])
            i += 2
            continue
        if c in forbidden:
            raise LineProtocolError(f"unescaped {c!r} at {i} in {line!r}")
        out.append(c)
        i += 1
    return "".join(out), i


_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _field_value(raw: str) -> Any:
    if re.fullmatch(r"-?\d+i", raw):
        return int(raw[:-1])
    if re.fullmatch(r"\d+u", raw):
        return int(raw[:-1])
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    if _FLOAT.fullmatch(raw):
        return float(raw)
    raise LineProtocolError(f"not a field value: {raw!r}")


def parse(line: str) -> tuple[str, dict[str, str], dict[str, Any], int]:
    """(measurement, tags, fields, timestamp) of one line, or LineProtocolError."""
    if "\n" in line or "\r" in line:
        raise LineProtocolError("a line holds no line break")
    measurement, i = _scan(line, 0, ", ", ", \\")
    if not measurement or measurement.startswith("#"):
        raise LineProtocolError("missing measurement")
    tags: dict[str, str] = {}
    while i < len(line) and line[i] == ",":
        key, i = _scan(line, i + 1, "=", ",= \\", forbidden=", ")
        if i >= len(line) or not key:
            raise LineProtocolError("missing tag key")
        value, i = _scan(line, i + 1, ", ", ",= \\", forbidden="=")
        if not value:
            raise LineProtocolError(f"missing tag value for {key!r}")
        tags[key] = value
    if i >= len(line) or line[i] != " ":
        raise LineProtocolError("missing fields")
    i += 1
    fields: dict[str, Any] = {}
    while True:
        key, i = _scan(line, i, "=", ",= \\", forbidden=", ")
        if i >= len(line) or not key:
            raise LineProtocolError("missing field key")
        i += 1
        if i < len(line) and line[i] == '"':
            i += 1
            out: list[str] = []
            while True:
                if i >= len(line):
                    raise LineProtocolError("unbalanced quotes")
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < len(line) and line[i + 1] in '"\\':
                    out.append(line[i + 1])
                    i += 2
                    continue
                out.append(c)
                i += 1
            fields[key] = "".join(out)
        else:
            j = i
            while j < len(line) and line[j] not in ", ":
                j += 1
            fields[key] = _field_value(line[i:j])
            i = j
        if i < len(line) and line[i] == ",":
            i += 1
            continue
        break
    if i >= len(line) or line[i] != " ":
        raise LineProtocolError("missing timestamp (we always write one)")
    ts = line[i + 1 :]
    if not re.fullmatch(r"-?\d+", ts):
        raise LineProtocolError(f"bad timestamp {ts!r}")
    return measurement, tags, fields, int(ts)


@pytest.mark.parametrize(
    "bad",
    [
        "m,k=a b v=1i 1",  # unescaped space in a tag value
        "m,k=a=b v=1i 1",  # unescaped equals sign in a tag value
        'm v="open 1',  # unbalanced quotes
        "m v=1i",  # no timestamp
        "m v=abc 1",  # not a value
        "m,k= v=1i 1",  # empty tag value
        "m v=1i 1\nm v=2i 2",  # two lines
    ],
)
def test_the_reader_rejects_what_influx_rejects(bad: str) -> None:
    with pytest.raises(LineProtocolError):
        parse(bad)


# ---- telemetry ----------------------------------------------------------------------------------------


def test_telemetry_line_exact() -> None:
    r = reading({"cover_open": False, "tilt_deg": 12.5, "water_level_cm": 87.0, "battery_pct": 93}, seq=17)
    assert to_line(r) == (
        "manhole_cover,community=c-001,device_id=mh-0001,device_type=manhole_cover,grid=g-001 "
        "cover_open=false,tilt_deg=12.5,water_level_cm=87.0,battery_pct=93i,seq=17i 1795239454123"
    )
    assert parse(to_line(r)) == (
        "manhole_cover",
        {"community": "c-001", "device_id": "mh-0001", "device_type": "manhole_cover", "grid": "g-001"},
        {"cover_open": False, "tilt_deg": 12.5, "water_level_cm": 87.0, "battery_pct": 93, "seq": 17},
        TS,
    )


def test_chinese_community_names_with_spaces_commas_and_equals_are_escaped() -> None:
    dev = Device("sl-0001", "streetlight", community="阳光 花园,二期", grid_code="A=1 区")
    line = to_line(reading({"lamp_on": True}, device=dev))
    assert line == (
        "streetlight,community=阳光\\ 花园\\,二期,device_id=sl-0001,device_type=streetlight,grid=A\\=1\\ 区 "
        "lamp_on=true 1795239454123"
    )
    _, tags, _, _ = parse(line)
    assert tags["community"] == "阳光 花园,二期" and tags["grid"] == "A=1 区"


@pytest.mark.parametrize(
    "community",
    [
        "翠湖 社区",
        "Block 3, East",
        "a=b",
        "  leading and trailing  ",
        "back\\slash",
        "ends with a backslash\\",  # must not escape the comma after it
        "\\,",
    ],
)
def test_tag_values_read_back_as_written(community: str) -> None:
    dev = Device("mh-0009", "manhole_cover", community=community, grid_code=community)
    line = to_line(reading({"tilt_deg": 1.0}, device=dev))
    _, tags, fields, _ = parse(line)
    assert tags == {
        "community": community,
        "device_id": "mh-0009",
        "device_type": "manhole_cover",
        "grid": community,
    }
    assert fields == {"tilt_deg": 1.0}


def test_a_newline_in_a_tag_value_never_splits_the_line() -> None:
    dev = Device("mh-0009", "manhole_cover", community="two\nlines")
    line = to_line(reading({"tilt_deg": 1.0}, device=dev))
    assert "\n" not in line
    parse(line)


@pytest.mark.parametrize(("community", "grid"), [(None, None), ("", ""), ("c-001", None), (None, "g-7")])
def test_missing_or_empty_community_and_grid_are_left_out(community: str | None, grid: str | None) -> None:
    dev = Device("mh-0001", "manhole_cover", community=community, grid_code=grid)
    _, tags, _, _ = parse(to_line(reading({"tilt_deg": 1.0}, device=dev)))
    expected = {"device_id": "mh-0001", "device_type": "manhole_cover"}
    if community:
        expected["community"] = community
    if grid:
        expected["grid"] = grid
    assert tags == expected


def test_tags_are_sorted_by_key() -> None:
    tags = tags_for(Device("mh-0001", "manhole_cover", community="z", grid_code="a"))
    keys = [t.split("=", 1)[0] for t in tags.split(",")]
    assert keys == sorted(keys) == ["community", "device_id", "device_type", "grid"]


# ---- field values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (87.0, "87.0"),  # stays a float: an int here would clash with earlier float points
        (0.0, "0.0"),
        (-12.25, "-12.25"),
        (0.1 + 0.2, "0.30000000000000004"),  # round-trips exactly
        (1e16, "1e+16"),
        (2.5e-05, "2.5e-05"),
        (True, "true"),  # not 1i: bool is an int subclass in Python
        (False, "false"),
        (17, "17i"),
        (0, "0i"),
        (-3, "-3i"),
        (2**63 - 1, "9223372036854775807i"),
        ("on", '"on"'),
        ("", '""'),
    ],
)
def test_format_value(value: Any, text: str) -> None:
    assert format_value(value) == text
    _, _, fields, _ = parse(f"m v={text} 1")
    assert fields["v"] == value and type(fields["v"]) is type(value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ('say "hi"', r'"say \"hi\""'),
        ("C:\\temp\\", r'"C:\\temp\\"'),  # a final backslash must not escape the closing quote
        ('\\"', r'"\\\""'),
        ("门禁 A,B=C", '"门禁 A,B=C"'),  # commas, spaces and equals need no escaping inside quotes
    ],
)
def test_string_fields_escape_quotes_and_backslashes(value: str, text: str) -> None:
    assert format_value(value) == text
    line = to_line(reading({"note": value}, device=Device("ac-0001", "access_control")))
    assert (
        line.split(" ", 1)[0]
        == "access_control,community=c-001,device_id=ac-0001,device_type=access_control,grid=g-001"
    )
    _, _, fields, _ = parse(line)
    assert fields == {"note": value}


def test_a_newline_in_a_string_field_never_splits_the_line() -> None:
    # the spool and the drain split bodies on "\n": a raw one would cut a point in two
    line = to_line(reading({"fw": "1.0\n2.0"}, kind="status"))
    assert "\n" not in line
    assert parse(line)[2]["fw"] == "1.0\\n2.0"


# ---- events and status --------------------------------------------------------------------------------


def test_event_line_has_the_event_tag_and_a_count() -> None:
    r = reading({"tilt_deg": 31.5}, kind="event", event="cover_open", seq=18)
    line = to_line(r)
    assert line == (
        "manhole_cover_event,community=c-001,device_id=mh-0001,device_type=manhole_cover,event=cover_open,"
        "grid=g-001 tilt_deg=31.5,seq=18i,count=1i 1795239454123"
    )
    measurement, tags, fields, ts = parse(line)
    assert measurement == event_measurement("manhole_cover") == "manhole_cover_event"
    assert tags["event"] == "cover_open"
    assert fields == {"tilt_deg": 31.5, "seq": 18, "count": 1}
    assert ts == TS


def test_an_event_without_values_still_has_a_field() -> None:
    r = reading({}, kind="event", event="tamper", device=Device("ac-0001", "access_control"))
    assert to_line(r) == (
        "access_control_event,community=c-001,device_id=ac-0001,device_type=access_control,event=tamper,"
        "grid=g-001 count=1i 1795239454123"
    )


def test_status_lines() -> None:
    online = reading({"online": True, "fw": "2.4.1"}, kind="status", seq=5)
    assert to_line(online) == (
        "device_status,community=c-001,device_id=mh-0001,device_type=manhole_cover,grid=g-001 "
        'online=true,fw="2.4.1",seq=5i 1795239454123'
    )
    last_will = reading({"online": False}, kind="status")
    measurement, _, fields, _ = parse(to_line(last_will))
    assert measurement == STATUS_MEASUREMENT and fields == {"online": False}


@pytest.mark.parametrize("ts", [0, 1, 1_000_000_000_000, TS, 4_102_444_800_000])
def test_timestamps_are_integer_milliseconds(ts: int) -> None:
    line = to_line(reading({"tilt_deg": 1.0}, ts=ts))
    assert line.endswith(f" {ts}")
    assert parse(line)[3] == ts


# ---- every device type, through the decoder -----------------------------------------------------------


def _decoded(rng: random.Random) -> list[Reading]:
    devices = {
        f"{t[:2]}-{i}": Device(f"{t[:2]}-{i}", t, community="幸福 里,3=区", grid_code="g 1")
        for i, t in enumerate(THING_MODELS)
    }
    by_type = {d.device_type: d for d in devices.values()}
    decoder = Decoder(devices.get, credential_key=b"k")
    out: list[Reading] = []
    for t, model in THING_MODELS.items():
        dev = by_type[t]
        payloads = [("telemetry", example_payload(model, rng, "telemetry", seq=1, ts=TS - 1000))]
        payloads += [
            ("event", example_payload(model, rng, "event", event=ev.name, seq=2 + n, ts=TS))
            for n, ev in enumerate(model.events)
        ]
        payloads += [("status", example_payload(model, rng, "status", seq=99, ts=TS))]
        for kind, payload in payloads:
            raw = RawMessage(
                f"sc/v1/{t}/{dev.device_id}/{kind}",
                json.dumps(payload, ensure_ascii=False).encode(),
                received_ms=TS,
            )
            r = decoder.decode(raw)
            assert isinstance(r, Reading), r
            out.append(r)
    return out


def test_every_reading_of_every_device_type_is_valid_line_protocol() -> None:
    readings = _decoded(random.Random(7))
    assert {r.kind for r in readings} == {"telemetry", "event", "status"}
    for r in readings:
        line = to_line(r)
        measurement, tags, fields, ts = parse(line)
        assert ts == r.ts_ms and 10**12 <= ts < 10**13  # ms, not s or ns
        assert tags["device_id"] == r.device_id and tags["community"] == "幸福 里,3=区"
        expected = dict(r.values)
        if r.seq is not None:
            expected["seq"] = r.seq
        if r.kind == "event":
            assert measurement == f"{r.device_type}_event" and tags["event"] == r.event
            expected["count"] = 1
        else:
            assert measurement == (r.device_type if r.kind == "telemetry" else STATUS_MEASUREMENT)
        assert fields == expected
        for k, v in expected.items():
            assert type(fields[k]) is type(v), (k, v, line)
