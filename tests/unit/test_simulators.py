"""Simulators: community generation, per-type behaviour built from the thing models, the run loop."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from pydantic import TypeAdapter

from devices import DEVICE_ID_RE, THING_MODELS
from devices.model import STATUS_ADAPTER
from simulators.behaviour import (
    SIMULATORS,
    AnomalyRates,
    DeviceSim,
    Message,
    in_window,
    iter_messages,
    local_minute,
    make_simulator,
    parse_schedule,
)
from simulators.community import ROW_KEYS, generate_community, read_devices_csv, write_devices_csv
from simulators.run import RunStats, run_community

START_MS = 1_795_239_454_000  # 2026-11-21T05:37:34Z, 13:37 in Beijing
DAY_MS = 86_400_000
NAME = "和平里社区"
TYPES = set(THING_MODELS)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return generate_community(NAME, seed=1)


def simulate(
    rows: Sequence[Mapping[str, Any]],
    *,
    days: float = 2,
    seed: int = 1,
    anomalies: AnomalyRates | None = None,
) -> tuple[list[DeviceSim], list[Message]]:
    sims = [make_simulator(r, start_ms=START_MS, seed=seed, anomalies=anomalies) for r in rows]
    messages = [s.status(START_MS) for s in sims]
    messages += iter_messages(sims, START_MS + int(days * DAY_MS))
    return sims, messages


def validate(message: Message) -> dict[str, Any]:
    """Validate as the gateway does (JSON on the wire) and as Python objects; return the payload."""
    model = THING_MODELS[message.device_type]
    if message.kind == "status":
        STATUS_ADAPTER.validate_json(message.encode())
        return dict(STATUS_ADAPTER.validate_python(message.payload))
    adapter = model.telemetry_adapter if message.kind == "telemetry" else model.event_adapter
    assert adapter is not None, f"{message.device_type} has no events"
    adapter.validate_json(message.encode())
    return adapter.validate_python(message.payload)


# -- community --------------------------------------------------------------------------------------


def test_community_is_deterministic_for_a_seed(rows: list[dict[str, Any]]) -> None:
    assert generate_community(NAME, seed=1) == rows
    assert generate_community(NAME, seed=2) != rows


def test_community_has_every_type_in_the_asked_numbers(rows: list[dict[str, Any]]) -> None:
    counts = Counter(r["device_type"] for r in rows)
    assert counts == {
        "manhole_cover": 6,
        "streetlight": 8,
        "access_control": 6,
        "parking_sensor": 10,
        "smoke_detector": 12,
    }
    assert set(counts) == TYPES
    ids = [r["device_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for r in rows:
        assert set(r) == set(ROW_KEYS)
        assert DEVICE_ID_RE.match(r["device_id"])
        assert re.fullmatch(r"c001-(mh|sl|ac|pk|sd)-\d{4}", r["device_id"])
        assert r["community"] == NAME
        assert r["district"] == "东城区"
        assert r["responsible_unit"]


def test_two_communities_do_not_share_device_ids() -> None:
    a = generate_community(NAME, seed=1, community="001")
    b = generate_community("安定门社区", seed=1, community="002")
    assert not {r["device_id"] for r in a} & {r["device_id"] for r in b}


@pytest.mark.parametrize(
    ("admin", "street", "community", "grids"), [("110101", "001", "001", 3), ("320508", "012", "034", 5)]
)
def test_grid_codes_are_15_digits_of_the_place(admin: str, street: str, community: str, grids: int) -> None:
    rows = generate_community(NAME, seed=3, admin_code=admin, street=street, community=community, grids=grids)
    seen = set()
    for r in rows:
        code = r["grid_code"]
        assert re.fullmatch(r"\d{15}", code)
        assert code.startswith(admin + street + community)
        assert 1 <= int(code[-3:]) <= grids
        seen.add(code)
    assert len(seen) > 1  # devices are spread over the grids


def test_component_codes(rows: list[dict[str, Any]]) -> None:
    codes = []
    for r in rows:
        code = r["component_code"]
        if r["device_type"] == "manhole_cover":
            owner = r["attributes"]["owner_class"]
            assert owner in {"0101", "0102", "0103", "0111"}
            assert re.fullmatch(r"\d{16}", code)
            assert code[:6] == "110101" and code[6:10] == owner
        elif r["device_type"] == "streetlight":
            assert re.fullmatch(r"\d{16}", code)
            assert code[:10] == "1101010118"
        else:
            assert code is None
            continue
        codes.append(code)
    assert len(set(codes)) == len(codes)


def test_attributes_are_declared_by_the_thing_models(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        declared = {f.name: f for f in THING_MODELS[r["device_type"]].attributes}
        for key, value in r["attributes"].items():
            assert key in declared, f"{r['device_id']}: {key} is not a declared attribute"
            TypeAdapter(declared[key].annotation()).validate_python(value, strict=True)


def test_attributes_by_type(rows: list[dict[str, Any]]) -> None:
    by_type = defaultdict(list)
    for r in rows:
        by_type[r["device_type"]].append(r["attributes"])
    for a in by_type["manhole_cover"]:
        assert set(a) == {"owner_class", "tilt_baseline_deg", "depth_cm"}
    for a in by_type["streetlight"]:
        assert a["schedule"] == "18:00-06:00" and a["rated_power_w"] > 0 and a["circuit"]
    for a in by_type["access_control"]:
        assert a["door_name"] and a["held_open_limit_s"] > 0
    kinds = Counter(a["bay_kind"] for a in by_type["parking_sensor"])
    assert 1 <= kinds["fire_lane"] <= 2 and kinds["time_limited"] == 1
    assert kinds["normal"] == 10 - kinds["fire_lane"] - 1
    for a in by_type["parking_sensor"]:
        assert ("time_limit_min" in a) == (a["bay_kind"] == "time_limited")
    for a in by_type["smoke_detector"]:
        assert isinstance(a["floor"], int) and a["floor"] >= 1


def test_places_are_plausible(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        assert abs(r["lat"] - 39.91) < 0.01 and abs(r["lon"] - 116.40) < 0.01
        assert r["address"].startswith(NAME)
    units = {r["responsible_unit"] for r in rows}
    assert {"市排水集团", "和平里物业"} <= units or {"市自来水集团", "和平里物业"} <= units
    assert any("路灯管理所" in u for u in units)
    assert {r["building"] for r in rows if r["device_type"] == "smoke_detector"} <= {
        f"{k}号楼" for k in range(1, 5)
    }


def test_csv_round_trip(rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    write_devices_csv(rows, buf)
    header = buf.getvalue().splitlines()[0].split(",")
    # the registry's import format: place columns, then one attr.<name> column per attribute
    assert header[: len(ROW_KEYS) - 1] == [k for k in ROW_KEYS if k != "attributes"]
    assert "attr.bay_kind" in header and "attributes" not in header
    assert read_devices_csv(io.StringIO(buf.getvalue())) == rows


def test_bad_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="admin_code"):
        generate_community(NAME, seed=1, admin_code="1101")
    with pytest.raises(ValueError, match="street"):
        generate_community(NAME, seed=1, street="1")


# -- behaviour --------------------------------------------------------------------------------------


def test_every_device_type_has_a_simulator() -> None:
    assert set(SIMULATORS) == TYPES


def test_two_days_of_every_device_validate(rows: list[dict[str, Any]]) -> None:
    _, messages = simulate(rows)
    kinds = Counter((m.device_type, m.kind) for m in messages)
    for t in TYPES:
        assert kinds[(t, "telemetry")] >= 2, t
    for m in messages:
        validate(m)
        assert m.topic == f"sc/v1/{m.device_type}/{m.device_id}/{m.kind}"
        assert m.retain == (m.kind == "status")


def test_with_frequent_anomalies_every_declared_event_occurs_and_validates(
    rows: list[dict[str, Any]],
) -> None:
    _, messages = simulate(rows, anomalies=AnomalyRates.every(5))
    events = set()
    for m in messages:
        payload = validate(m)
        if m.kind == "event":
            events.add((m.device_type, payload["event"]))
    declared = {(t, e.name) for t, model in THING_MODELS.items() for e in model.events}
    assert declared - events == {("smoke_detector", "low_battery")}  # only with a low battery, below


def test_low_battery_is_reported_once_a_day() -> None:
    row = next(r for r in generate_community(NAME, seed=1) if r["device_type"] == "smoke_detector")
    sim = make_simulator(row, start_ms=START_MS, report_interval_s=3600, anomalies=AnomalyRates.none())
    sim.battery_pct = 19.0
    messages = sim.advance(START_MS + 2 * DAY_MS)
    low = [m for m in messages if m.payload.get("event") == "low_battery"]
    assert len(low) == 2
    for m in messages:
        validate(m)


def test_seq_increments_and_time_moves_forward(rows: list[dict[str, Any]]) -> None:
    _, messages = simulate(rows, anomalies=AnomalyRates.every(2))
    by_device: dict[str, list[Message]] = defaultdict(list)
    for m in messages:
        by_device[m.device_id].append(m)
    assert len(by_device) == len(rows)
    for device_messages in by_device.values():
        seqs = [m.payload["seq"] for m in device_messages]
        assert seqs == list(range(len(seqs)))
        stamps = [m.payload["ts"] for m in device_messages]
        assert stamps == sorted(stamps)
        assert all(isinstance(ts, int) and ts >= START_MS for ts in stamps)


def test_streetlights_are_on_at_night_and_off_by_day(rows: list[dict[str, Any]]) -> None:
    sims, messages = simulate(rows, anomalies=AnomalyRates.none())
    rated = {s.device_id: s.attributes["rated_power_w"] for s in sims if s.device_type == "streetlight"}
    on_min, off_min = parse_schedule("18:00-06:00")
    seen = Counter()
    for m in messages:
        if m.device_type != "streetlight" or m.kind != "telemetry":
            continue
        p = m.payload
        minute = local_minute(m.ts_ms)
        night = in_window(minute, on_min, off_min)
        assert p["lamp_on"] is night, (minute, p)
        if night:
            expected_dim = 50.0 if in_window(minute, 23 * 60, 5 * 60) else 100.0
            assert p["dimming_pct"] == expected_dim
            assert p["power_w"] == pytest.approx(rated[m.device_id] * expected_dim / 100, rel=0.05)
            assert p["lux"] < 50
        else:
            assert p["power_w"] < 1
        seen[night] += 1
    assert seen[True] > 100 and seen[False] > 100


def test_energy_only_grows(rows: list[dict[str, Any]]) -> None:
    _, messages = simulate(rows)
    last: dict[str, float] = {}
    for m in messages:
        if m.device_type == "streetlight" and m.kind == "telemetry":
            assert m.payload["energy_kwh"] >= last.get(m.device_id, 0.0)
            last[m.device_id] = m.payload["energy_kwh"]


def test_manhole_covers_sit_still_without_anomalies(rows: list[dict[str, Any]]) -> None:
    sims, messages = simulate(rows, anomalies=AnomalyRates.none())
    baseline = {
        s.device_id: s.attributes["tilt_baseline_deg"] for s in sims if s.device_type == "manhole_cover"
    }
    covers = [m for m in messages if m.device_type == "manhole_cover" and m.kind == "telemetry"]
    assert covers
    for m in covers:
        assert abs(m.payload["tilt_deg"] - baseline[m.device_id]) < 1
        assert m.payload["cover_open"] is False
        assert 0 < m.payload["water_level_cm"] < 2000


def test_cover_tilt_anomaly_shows_in_telemetry(rows: list[dict[str, Any]]) -> None:
    _, messages = simulate(rows, anomalies=replace(AnomalyRates.none(), cover_tilt=5))
    assert any(m.payload.get("tilt_deg", 0) > 10 for m in messages if m.device_type == "manhole_cover")


def test_parking_mag_z_jumps_when_occupied(rows: list[dict[str, Any]]) -> None:
    sims, messages = simulate(rows)
    base_z = {s.device_id: s.base[2] for s in sims if s.device_type == "parking_sensor"}  # type: ignore[attr-defined]
    states = Counter()
    for m in messages:
        if m.device_type == "parking_sensor" and m.kind == "telemetry":
            jump = m.payload["mag_z"] - base_z[m.device_id]
            assert (jump > 50) is m.payload["occupied"]
            states[m.payload["occupied"]] += 1
    assert states[True] and states[False]


def test_doors_grant_deny_and_report_door_state(rows: list[dict[str, Any]]) -> None:
    _, messages = simulate(rows, days=1)
    events = Counter(
        m.payload["event"] for m in messages if m.device_type == "access_control" and m.kind == "event"
    )
    assert events["access_granted"] > 10 * events["access_denied"] > 0
    door = [
        m.payload["door_open"]
        for m in messages
        if m.device_type == "access_control" and m.kind == "telemetry"
    ]
    assert True in door and False in door


def test_batteries_drain(rows: list[dict[str, Any]]) -> None:
    sims = [make_simulator(r, start_ms=START_MS, seed=1) for r in rows]
    before = {s.device_id: s.battery_pct for s in sims}
    list(iter_messages(sims, START_MS + 2 * DAY_MS))
    for s in sims:
        if "battery_pct" in s.model.fields_by_name:
            assert s.battery_pct < before[s.device_id]


def test_behaviour_is_deterministic_and_seeds_differ(rows: list[dict[str, Any]]) -> None:
    _, a = simulate(rows, days=0.5, seed=7)
    _, b = simulate(rows, days=0.5, seed=7)
    _, c = simulate(rows, days=0.5, seed=8)
    assert a == b
    assert [m.payload for m in a] != [m.payload for m in c]


def test_output_does_not_depend_on_how_often_it_is_advanced(rows: list[dict[str, Any]]) -> None:
    row = next(r for r in rows if r["device_type"] == "access_control")
    one = make_simulator(row, start_ms=START_MS, seed=3)
    many = make_simulator(row, start_ms=START_MS, seed=3)
    end = START_MS + DAY_MS // 4
    stepped: list[Message] = []
    for t in range(START_MS, end + 1, 7_000):
        stepped += many.advance(t)
    stepped += many.advance(end)
    assert one.advance(end) == stepped


def test_a_simulator_cannot_invent_fields_or_events(rows: list[dict[str, Any]]) -> None:
    sim = make_simulator(rows[0], start_ms=START_MS)
    with pytest.raises(KeyError, match="no telemetry field"):
        sim._telemetry(START_MS, {"bogus_pct": 1.0})
    with pytest.raises(KeyError, match="no event"):
        sim._event(START_MS, "bogus")


def test_values_are_clamped_to_the_declared_range(rows: list[dict[str, Any]]) -> None:
    sim = make_simulator(next(r for r in rows if r["device_type"] == "parking_sensor"), start_ms=START_MS)
    m = sim._telemetry(START_MS, {"mag_z": 5000.0, "battery_pct": -3.0})
    assert m.payload["mag_z"] == 2000 and m.payload["battery_pct"] == 0
    validate(m)


def test_demo_interval_overrides_the_model_interval(rows: list[dict[str, Any]]) -> None:
    sim = make_simulator(rows[0], start_ms=START_MS, report_interval_s=5)
    telemetry = [m for m in sim.advance(START_MS + 60_000) if m.kind == "telemetry"]
    assert 10 <= len(telemetry) <= 14


# -- the run loop, through an in-memory publisher -----------------------------------------------------


class MemoryPublisher:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.published: list[Message] = []
        self.stopped = False

    async def start(self, devices: Sequence[Mapping[str, Any]]) -> None:
        self.started = [d["device_id"] for d in devices]

    async def publish(self, message: Message) -> None:
        await asyncio.sleep(0)
        self.published.append(message)

    async def stop(self) -> None:
        self.stopped = True


async def test_run_community_publishes_status_then_data_then_offline(rows: list[dict[str, Any]]) -> None:
    pub = MemoryPublisher()
    acked: list[Message] = []
    stats = await run_community(
        rows,
        host="unused",
        port=0,
        speed=3600,
        interval_s=60,
        duration_s=0.5,
        publisher=pub,
        on_publish=acked.append,
        start_ms=START_MS,
    )
    assert pub.stopped and pub.started == [r["device_id"] for r in rows]
    assert stats.sent == stats.acked == len(pub.published) == len(acked) and stats.failed == 0
    first = pub.published[: len(rows)]
    assert all(m.kind == "status" and m.payload["online"] is True for m in first)
    last = pub.published[-len(rows) :]
    assert all(m.kind == "status" and m.payload["online"] is False for m in last)
    assert stats.acked_by_kind["telemetry"] > len(rows)
    for m in pub.published:
        validate(m)
        assert m.ts_ms >= START_MS


async def test_run_community_stops_on_the_event(rows: list[dict[str, Any]]) -> None:
    pub = MemoryPublisher()
    stop = asyncio.Event()
    stats = RunStats()
    task = asyncio.create_task(
        run_community(rows, host="unused", port=0, interval_s=1, publisher=pub, stop=stop, stats=stats)
    )
    await asyncio.sleep(0.3)
    stop.set()
    result = await asyncio.wait_for(task, 5)
    assert result is stats and stats.acked == len(pub.published) > 0
    assert pub.published[-1].kind == "status" and pub.published[-1].payload["online"] is False


def test_message_encoding_is_compact_utf8_json(rows: list[dict[str, Any]]) -> None:
    m = make_simulator(rows[0], start_ms=START_MS).status(START_MS)
    assert json.loads(m.encode()) == m.payload
    assert b" " not in m.encode()
