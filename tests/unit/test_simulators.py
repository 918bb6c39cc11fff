"""Simulators: community generation, per-type behaviour built from the thing models, the run loop."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import random
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from devices import DEVICE_ID_RE, THING_MODELS
from devices.model import STATUS_ADAPTER
from gateway.decode import Decoder
from gateway.messages import Duplicate, RawMessage, Reading, Reason, Rejection
from simulators.behaviour import (
    FAULT_TAGS,
    HOUR_MS,
    MALFORMED_KINDS,
    SIMULATORS,
    AnomalyRates,
    DeviceSim,
    FaultRates,
    Message,
    Weather,
    in_window,
    iter_messages,
    local_hour,
    local_minute,
    make_simulator,
    next_hourly_poisson,
    parse_schedule,
)
from simulators.community import ROW_KEYS, generate_community, read_devices_csv, write_devices_csv
from simulators.run import (
    DeviceConnectionsPublisher,
    DeviceCredentials,
    RunStats,
    _parser,
    _rates,
    read_credentials_csv,
    run_community,
)

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
    faults: FaultRates | None = None,
    report_interval_s: float | None = None,
    status: bool = True,
) -> tuple[list[DeviceSim], list[Message]]:
    sims = [
        make_simulator(
            r,
            start_ms=START_MS,
            seed=seed,
            anomalies=anomalies,
            faults=faults,
            report_interval_s=report_interval_s,
        )
        for r in rows
    ]
    messages = [s.status(START_MS) for s in sims] if status else []
    messages += iter_messages(sims, START_MS + int(days * DAY_MS))
    return sims, messages


def only(**rates: float) -> AnomalyRates:
    """No anomalies but these."""
    return replace(AnomalyRates.none(), **rates)


def by_device(messages: Sequence[Message]) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = defaultdict(list)
    for m in messages:
        out[m.device_id].append(m)
    return out


def of_type(rows: Sequence[Mapping[str, Any]], device_type: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["device_type"] == device_type]


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
    # low_battery only with a low battery (tested below); frequent alarms may have run one down
    assert declared - events <= {("smoke_detector", "low_battery")}


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


# -- behaviour realism --------------------------------------------------------------------------------


def test_hourly_poisson_lands_only_in_hours_with_a_rate() -> None:
    rng = random.Random(1)
    per_hour = [0.0] * 24
    per_hour[8] = 30.0  # only 08:00-09:00 local
    t = START_MS
    for _ in range(200):
        t = next_hourly_poisson(rng, t, per_hour)
        assert int(local_hour(t)) == 8
    # on average 30 an hour: 200 events take about 200 / 30 such hours, i.e. about 7 days
    assert 4 * DAY_MS < t - START_MS < 10 * DAY_MS


def test_rain_is_the_same_for_every_device_of_a_community(rows: list[dict[str, Any]]) -> None:
    a, b = (make_simulator(r, start_ms=START_MS, seed=1, anomalies=only(rain=2)) for r in rows[:2])
    later_first = Weather(1, "x", 2.0)
    earlier_first = Weather(1, "x", 2.0)
    later_first.rain_mm_h(START_MS + 5 * DAY_MS)  # asking out of order changes nothing
    other = Weather(1, "another community", 2.0)
    times = [START_MS + k * 600_000 for k in range(6 * 24 * 5)]
    assert [a.weather.rain_mm_h(t) for t in times] == [b.weather.rain_mm_h(t) for t in times]
    assert [later_first.rain_mm_h(t) for t in times] == [earlier_first.rain_mm_h(t) for t in times]
    assert [later_first.rain_mm_h(t) for t in times] != [other.rain_mm_h(t) for t in times]
    rainy = sum(a.weather.rain_mm_h(t) > 0 for t in times)
    assert 0 < rainy < len(times) / 2


def _cover(rows: Sequence[Mapping[str, Any]], owner: str, n: int) -> dict[str, Any]:
    row = dict(of_type(rows, "manhole_cover")[0])
    row["device_id"] = f"c001-mh-9{n:03d}"
    row["attributes"] = {**row["attributes"], "owner_class": owner, "depth_cm": 200.0}
    return row


def test_water_rises_with_rain_and_the_covers_flood_together(rows: list[dict[str, Any]]) -> None:
    covers = [
        _cover(rows, "0103", 1),
        _cover(rows, "0103", 2),
        _cover(rows, "0102", 3),
        _cover(rows, "0101", 4),
    ]
    sims = [
        make_simulator(r, start_ms=START_MS, seed=4, anomalies=only(rain=1.5), report_interval_s=3600)
        for r in covers
    ]
    floods: list[list[float]] = [[] for _ in sims]
    messages: list[Message] = []
    for k in range(1, 6 * 24 * 20):  # 20 days, looked at every 10 minutes
        t = START_MS + k * 600_000
        for i, sim in enumerate(sims):
            messages += sim.advance(t)
            floods[i].append(sim.flood_cm)  # type: ignore[attr-defined]
    # the same storms fill every well: storm drains rise together
    assert statistics.correlation(floods[0], floods[1]) > 0.8
    assert statistics.correlation(floods[0], floods[2]) > 0.8
    # storm drains fill most, a water-supply well hardly at all
    assert max(floods[3]) < 0.5 * max(floods[0]) and max(floods[3]) < 0.5 * max(floods[1])
    weather = sims[0].weather
    wet, dry = [], []
    for m in messages:
        if m.device_id == covers[0]["device_id"] and m.kind == "telemetry":
            raining = any(weather.rain_mm_h(m.ts_ms - k * 600_000) > 0 for k in range(6))
            (wet if raining else dry).append(m.payload["water_level_cm"])
    assert statistics.mean(wet) < statistics.mean(dry) - 20
    # a downpour brings the water up to the cover (the rule's 30 cm), and the cover says so at once:
    # between its hourly reports (its 10-minute water check)
    near = [m for m in messages if m.kind == "telemetry" and m.payload["water_level_cm"] < 30]
    assert near
    reports = Counter(m.device_id for m in messages if m.kind == "telemetry")
    assert max(reports.values()) > 20 * 24 * 1.05  # more than the hourly reports alone


def test_no_rain_no_flood(rows: list[dict[str, Any]]) -> None:
    sims, messages = simulate(of_type(rows, "manhole_cover"), days=5, anomalies=AnomalyRates.none())
    assert all(s.flood_cm == 0 for s in sims)  # type: ignore[attr-defined]
    for m in messages:
        if m.kind == "telemetry":
            assert m.payload["water_level_cm"] > 50


def test_a_lifted_cover_is_open_but_hardly_tilted(rows: list[dict[str, Any]]) -> None:
    sims, messages = simulate(of_type(rows, "manhole_cover"), days=3, anomalies=only(cover_lifted=3))
    baseline = {s.device_id: s.attributes["tilt_baseline_deg"] for s in sims}
    lifted = [m for m in messages if m.kind == "telemetry" and m.payload["cover_open"]]
    assert lifted
    for m in lifted:
        assert abs(m.payload["tilt_deg"] - baseline[m.device_id]) < 7
    closed_again = [m for m in messages if m.kind == "telemetry" and not m.payload["cover_open"]]
    assert closed_again[-1].ts_ms > lifted[0].ts_ms


def test_gas_builds_up_in_wells(rows: list[dict[str, Any]]) -> None:
    _, clean = simulate(of_type(rows, "manhole_cover"), days=3, anomalies=AnomalyRates.none())
    _, gassy = simulate(of_type(rows, "manhole_cover"), days=3, anomalies=only(well_gas=3))

    def alarming(p: Mapping[str, Any]) -> bool:  # the default rules' thresholds
        return p["ch4_lel_pct"] >= 25 or p["h2s_ppm"] >= 6 or p["co_ppm"] >= 24 or p["o2_pct"] < 19.5

    assert not any(alarming(m.payload) for m in clean if m.kind == "telemetry")
    assert any(alarming(m.payload) for m in gassy if m.kind == "telemetry")
    for m in gassy:
        validate(m)


def test_streetlight_leakage_and_pole_tilt(rows: list[dict[str, Any]]) -> None:
    poles = of_type(rows, "streetlight")
    _, calm = simulate(poles, days=3, anomalies=AnomalyRates.none())
    _, troubled = simulate(poles, days=3, anomalies=only(leakage=2, pole_tilt=2))
    calm_t = [m.payload for m in calm if m.kind == "telemetry"]
    assert max(p["leakage_ma"] for p in calm_t) < 30 and max(p["pole_tilt_deg"] for p in calm_t) < 3
    t = [m.payload for m in troubled if m.kind == "telemetry"]
    leak = [p["leakage_ma"] for p in t]
    assert any(30 <= x < 100 for x in leak) and any(x >= 100 for x in leak)  # warning and critical
    assert any(p["pole_tilt_deg"] >= 3 for p in t)
    for m in troubled:
        validate(m)


def test_rain_wets_the_poles_a_little(rows: list[dict[str, Any]]) -> None:
    pole = of_type(rows, "streetlight")[0]
    sim = make_simulator(pole, start_ms=START_MS, seed=1, anomalies=only(rain=3), report_interval_s=600)
    messages = [m for m in sim.advance(START_MS + 10 * DAY_MS) if m.kind == "telemetry"]
    wet = [m.payload["leakage_ma"] for m in messages if sim.weather.rain_mm_h(m.ts_ms) > 10]
    dry = [m.payload["leakage_ma"] for m in messages if sim.weather.rain_mm_h(m.ts_ms) == 0]
    assert wet and statistics.mean(wet) > statistics.mean(dry) + 1
    assert max(wet) < 30  # wet, not faulty


def test_a_stuck_relay_burns_the_lamp_by_day(rows: list[dict[str, Any]]) -> None:
    sims, messages = simulate(of_type(rows, "streetlight"), days=3, anomalies=only(lamp_stuck_on=2))
    rated = {s.device_id: s.attributes["rated_power_w"] for s in sims}
    on_min, off_min = parse_schedule("18:00-06:00")
    by_day = [
        m.payload | {"id": m.device_id}
        for m in messages
        if m.kind == "telemetry" and not in_window(local_minute(m.ts_ms), on_min, off_min)
    ]
    burning = [p for p in by_day if p["lamp_on"]]
    assert burning and any(p["lux"] > 100 for p in burning)
    for p in burning:
        assert p["power_w"] == pytest.approx(rated[p["id"]], rel=0.05)
    assert any(not p["lamp_on"] for p in by_day)  # repaired, or never stuck


def test_failed_lamps_draw_nothing_with_or_without_a_fault_event(rows: list[dict[str, Any]]) -> None:
    poles = [dict(of_type(rows, "streetlight")[0], device_id=f"c001-sl-9{k:03d}") for k in range(20)]
    _, messages = simulate(
        poles, days=10, anomalies=only(lamp_fault=0.3), report_interval_s=600, status=False
    )
    assert {m.payload["event"] for m in messages if m.kind == "event"} == {"lamp_fault"}
    announced = silent = 0
    for stream in by_device(messages).values():
        told, out = False, False  # a lamp_fault event since the lamp was last seen lit; in an outage
        for m in stream:
            if m.kind == "event":
                told = True
            elif m.payload["lamp_on"] and m.payload["power_w"] < 5:  # on, but drawing nothing: out
                if not out:
                    announced, silent = announced + told, silent + (not told)
                out = True
            elif m.payload["lamp_on"]:  # lit again: repaired
                told, out = False, False
    assert announced > 0 and silent > 0  # the driver told, or only the power tells


def test_parking_follows_the_day(rows: list[dict[str, Any]]) -> None:
    bays = [
        dict(
            of_type(rows, "parking_sensor")[0],
            device_id=f"c001-pk-9{k:03d}",
            attributes={"bay_kind": "normal"},
        )
        for k in range(40)
    ]
    _, messages = simulate(bays, days=10, anomalies=AnomalyRates.none(), report_interval_s=86_400)
    arrivals: Counter[int] = Counter()
    departures: Counter[int] = Counter()
    overnight_leaves: list[float] = []
    last: dict[str, tuple[bool, int]] = {}
    for m in messages:
        if m.kind != "telemetry":
            continue
        occupied = m.payload["occupied"]
        prev = last.get(m.device_id)
        if prev is not None and prev[0] != occupied:
            h = local_hour(m.ts_ms)
            (arrivals if occupied else departures)[int(h)] += 1
            if not occupied and 18 <= local_hour(prev[1]) < 22 and m.ts_ms - prev[1] > 6 * HOUR_MS:
                overnight_leaves.append(h)
        if prev is None or prev[0] != occupied:
            last[m.device_id] = (occupied, m.ts_ms)
    assert sum(arrivals[h] for h in range(17, 20)) > 3 * sum(arrivals[h] for h in range(1, 4))
    assert sum(departures[h] for h in range(7, 10)) > 3 * sum(departures[h] for h in range(0, 5))
    # cars home for the night leave in the morning rush
    assert overnight_leaves and all(5.5 <= h <= 11 for h in overnight_leaves)


def test_time_limited_bays_overstay_only_as_an_anomaly(rows: list[dict[str, Any]]) -> None:
    bay = dict(
        of_type(rows, "parking_sensor")[0],
        attributes={"bay_kind": "time_limited", "time_limit_min": 120.0},
    )

    def longest_stay_min(anomalies: AnomalyRates) -> float:
        sim = make_simulator(bay, start_ms=START_MS, seed=2, anomalies=anomalies, report_interval_s=86_400)
        longest, since = 0.0, None
        for m in sim.advance(START_MS + 10 * DAY_MS):
            if m.kind == "telemetry" and m.payload["occupied"] and since is None:
                since = m.ts_ms
            elif m.kind == "telemetry" and not m.payload["occupied"] and since is not None:
                longest, since = max(longest, (m.ts_ms - since) / 60_000), None
        return longest

    assert longest_stay_min(AnomalyRates.none()) <= 120
    assert longest_stay_min(only(overstay=2)) > 120


def test_an_abandoned_car_stays_for_days(rows: list[dict[str, Any]]) -> None:
    bay = dict(of_type(rows, "parking_sensor")[0], attributes={"bay_kind": "normal"})
    sim = make_simulator(
        bay, start_ms=START_MS, seed=2, anomalies=only(abandoned_vehicle=1), report_interval_s=86_400
    )
    messages = [m for m in sim.advance(START_MS + 30 * DAY_MS) if m.kind == "telemetry"]
    changes = [
        m
        for i, m in enumerate(messages)
        if i == 0 or m.payload["occupied"] != messages[i - 1].payload["occupied"]
    ]
    stays = [b.ts_ms - a.ts_ms for a, b in itertools.pairwise(changes) if a.payload["occupied"]]
    assert max(stays) > 7 * DAY_MS


def test_doors_are_busy_in_the_rush_hours_and_see_bursts_of_denied_cards(rows: list[dict[str, Any]]) -> None:
    doors = of_type(rows, "access_control")
    _, messages = simulate(doors, days=5, anomalies=only(denied_burst=3))
    by_hour: Counter[int] = Counter()
    denied = defaultdict(list)
    for m in messages:
        if m.kind == "event" and m.payload["event"] in ("access_granted", "access_denied"):
            by_hour[int(local_hour(m.ts_ms))] += 1
        if m.kind == "event" and m.payload["event"] == "access_denied":
            denied[(m.device_id, m.payload["credential"])].append(m.ts_ms)
    assert sum(by_hour[h] for h in (7, 8, 17, 18)) > 5 * sum(by_hour[h] for h in (2, 3, 4, 5))
    bursts = 0
    for stamps in denied.values():
        # the default rule's P3 level: 5 denials within 5 minutes on one door
        if any(stamps[i + 4] - stamps[i] <= 300_000 for i in range(len(stamps) - 4)):
            bursts += 1
    assert bursts >= 3


def test_night_denials_are_more_often_out_of_schedule(rows: list[dict[str, Any]]) -> None:
    door = of_type(rows, "access_control")[0]
    sim = make_simulator(door, start_ms=START_MS, seed=5, anomalies=AnomalyRates.none())
    denials = [m for m in sim.advance(START_MS + 60 * DAY_MS) if m.payload.get("event") == "access_denied"]
    night = [m.payload["reason"] for m in denials if local_hour(m.ts_ms) >= 23 or local_hour(m.ts_ms) < 6]
    day = [m.payload["reason"] for m in denials if 8 <= local_hour(m.ts_ms) < 20]
    share = lambda reasons: reasons.count("out_of_schedule") / len(reasons)  # noqa: E731
    assert share(night) > share(day) + 0.1


def test_smoke_detectors_heartbeat_drain_slowly_and_alarms_cost_battery(rows: list[dict[str, Any]]) -> None:
    row = of_type(rows, "smoke_detector")[0]
    quiet = make_simulator(row, start_ms=START_MS, anomalies=AnomalyRates.none())
    noisy = make_simulator(row, start_ms=START_MS, anomalies=only(smoke_alarm=2))
    before = quiet.battery_pct
    beats = [m for m in quiet.advance(START_MS + 30 * DAY_MS) if m.kind == "telemetry"]
    assert 27 <= len(beats) <= 33  # one a day
    assert before - quiet.battery_pct == pytest.approx(0.3, abs=0.01)  # 0.01 % a day
    noisy.advance(START_MS + 30 * DAY_MS)
    assert noisy.battery_pct < quiet.battery_pct - 5


def test_smoke_alarms_cluster_at_cooking_times(rows: list[dict[str, Any]]) -> None:
    _, messages = simulate(of_type(rows, "smoke_detector"), days=30, anomalies=only(smoke_alarm=1))
    hours = [int(local_hour(m.ts_ms)) for m in messages if m.payload.get("event") == "smoke_alarm"]
    meals = sum(h in (11, 12, 17, 18) for h in hours)
    night = sum(h in (1, 2, 3, 4) for h in hours)
    assert meals > 4 * night and len(hours) > 200


def test_a_detector_fault_repeats_until_serviced(rows: list[dict[str, Any]]) -> None:
    row = of_type(rows, "smoke_detector")[0]
    sim = make_simulator(row, start_ms=START_MS, seed=3, anomalies=only(detector_fault=0.2))
    events = [m.payload["event"] for m in sim.advance(START_MS + 60 * DAY_MS) if m.kind == "event"]
    assert events.count("fault") > events.count("self_test") >= 1
    first = events.index("fault")
    assert "self_test" in events[first:]  # serviced: the technician's test ends it


# -- faults -----------------------------------------------------------------------------------------


def test_fault_rates() -> None:
    assert not FaultRates.none().active and FaultRates().active
    assert FaultRates.every(3).duplicate == 3 and FaultRates.every(3).offline_s == FaultRates().offline_s
    assert FaultRates().scaled(2).late == 2 * FaultRates().late
    with pytest.raises(ValueError, match="duplicate"):
        FaultRates(duplicate=-1)
    with pytest.raises(ValueError, match="offline_s"):
        FaultRates(offline_s=(10, 5))


def test_zero_fault_rates_give_exactly_the_output_without_faults(rows: list[dict[str, Any]]) -> None:
    _, plain = simulate(rows, days=1, anomalies=AnomalyRates.every(2))
    _, zero = simulate(rows, days=1, anomalies=AnomalyRates.every(2), faults=FaultRates.none())
    assert plain == zero
    assert all(m.fault is None and m.raw is None for m in plain)


def _key(m: Message) -> tuple[str, int]:
    return m.device_id, m.payload["seq"]


def test_duplicates_and_late_messages_change_nothing_the_devices_measured(rows: list[dict[str, Any]]) -> None:
    faults = replace(FaultRates.none(), duplicate=30, late=30)
    _, plain = simulate(rows, days=1, status=False)
    sims, faulted = simulate(rows, days=1, faults=faults, status=False)
    held = [m for s in sims for m in s.held_back[:1]]  # still held back when the day ended
    originals = [m for m in faulted if m.fault != "duplicate"] + held
    assert sorted((_key(m), m.payload) for m in originals) == sorted((_key(m), m.payload) for m in plain)
    assert Counter(m.fault for m in faulted) == {
        None: len(plain) - len(held) - sum(s.fault_counts["late"] for s in sims),
        "duplicate": sum(s.fault_counts["duplicate"] for s in sims),
        "late": sum(s.fault_counts["late"] for s in sims),
    }
    for stream in by_device(faulted).values():
        highest = -1
        for i, m in enumerate(stream):
            if m.fault == "duplicate":  # right after the message it repeats: same payload, seq, ts
                assert stream[i - 1].payload == m.payload and stream[i - 1].encode() == m.encode()
            elif m.fault == "late":  # after later ones
                assert m.payload["seq"] < highest
            else:
                assert m.payload["seq"] > highest
            highest = max(highest, m.payload["seq"])


def test_offline_devices_go_quiet_then_come_back(rows: list[dict[str, Any]]) -> None:
    faults = replace(FaultRates.none(), offline=20, offline_s=(600, 3600))
    sims, messages = simulate(rows, days=1, faults=faults, status=False)
    lost = 0
    for sim in sims:
        stream = [m for m in messages if m.device_id == sim.device_id]
        offline = False
        seqs: list[int] = []
        for m in stream:
            if m.fault == "offline":
                assert not offline and m.kind == "status" and m.retain
                assert m.payload == {"online": False} and m.encode() == b'{"online":false}'  # the last will
                offline = True
            elif m.fault == "online":
                assert offline and m.kind == "status" and m.payload["online"] is True
                offline = False
                seqs.append(m.payload["seq"])
            else:
                assert not offline, "a device sent while offline"
                seqs.append(m.payload["seq"])
        assert seqs == sorted(seqs)
        lost += sim.seq - len(seqs)  # what it measured while away is missing from its seq
    assert lost == sum(s.fault_counts["lost"] for s in sims) > 0
    assert sum(s.fault_counts["offline"] for s in sims) > len(rows)


@dataclass(frozen=True)
class FakeDevice:
    device_id: str
    device_type: str
    community: str | None = None
    grid_code: str | None = None
    lifecycle: str = "in_service"


EXPECTED_REASONS = {
    "malformed_not_json": {Reason.NOT_JSON, Reason.NOT_UTF8},
    "malformed_wrong_type": {Reason.WRONG_TYPE},
    "malformed_out_of_range": {Reason.OUT_OF_RANGE},
    "malformed_unknown_field": {Reason.UNKNOWN_FIELD},
}


def test_the_gateway_rejects_malformed_payloads_and_drops_duplicates(rows: list[dict[str, Any]]) -> None:
    faults = replace(FaultRates.none(), faulty_unit=10, faulty_s=(1800, 3600), duplicate=20, late=20)
    _, messages = simulate(rows, days=1, anomalies=AnomalyRates.every(2), faults=faults)
    devices = {r["device_id"]: FakeDevice(r["device_id"], r["device_type"]) for r in rows}
    decoder = Decoder(devices.get, credential_key=b"k")
    outcomes: Counter[str] = Counter()
    for m in messages:
        out = decoder.decode(RawMessage(m.topic, m.encode(), received_ms=m.ts_ms or START_MS))
        if m.malformed:
            assert isinstance(out, Rejection), m
            assert out.reason in EXPECTED_REASONS[str(m.fault)], (m, out)
            if m.fault != "malformed_not_json":
                with pytest.raises(ValidationError):
                    validate(m)
        elif m.fault == "duplicate":
            assert isinstance(out, Duplicate)
        else:
            assert isinstance(out, Reading), (m, out)
        outcomes[str(m.fault)] += 1
    assert {f"malformed_{k}" for k in MALFORMED_KINDS} | {"duplicate", "late"} <= outcomes.keys()
    assert outcomes.keys() <= {*FAULT_TAGS, "None"}


def test_faults_are_reproducible_and_do_not_depend_on_stepping(rows: list[dict[str, Any]]) -> None:
    faults = FaultRates.every(20)
    row = of_type(rows, "access_control")[0]
    one = make_simulator(row, start_ms=START_MS, seed=3, faults=faults)
    many = make_simulator(row, start_ms=START_MS, seed=3, faults=faults)
    other = make_simulator(row, start_ms=START_MS, seed=4, faults=faults)
    end = START_MS + DAY_MS // 2
    stepped: list[Message] = []
    for t in range(START_MS, end + 1, 7_000):
        stepped += many.advance(t)
    stepped += many.advance(end)
    single = one.advance(end)
    assert single == stepped
    assert {m.fault for m in single} > {None}
    assert [m.fault for m in other.advance(end)] != [m.fault for m in single]


# -- the run loop: faults and credentials --------------------------------------------------------------


async def test_run_community_passes_faults_on_and_counts_them(rows: list[dict[str, Any]]) -> None:
    pub = MemoryPublisher()
    faults = replace(FaultRates.every(200), offline_s=(60, 600), faulty_s=(60, 600))
    stats = await run_community(
        rows, host="unused", port=0, speed=3600, interval_s=60, duration_s=0.5, publisher=pub,
        start_ms=START_MS, faults=faults,
    )  # fmt: skip
    published = Counter(m.fault for m in pub.published if m.fault is not None)
    assert stats.faults == published and published.keys() >= {"offline", "online", "duplicate", "late"}
    assert stats.lost > 0 and stats.failed == 0
    offline = [m for m in pub.published if m.fault == "offline"]
    assert all(m.retain and m.payload == {"online": False} for m in offline)
    # the last statuses: an online device says offline; one that dropped off has its will already
    last_status: dict[str, Message] = {}
    for m in pub.published:
        if m.kind == "status":
            last_status[m.device_id] = m
    assert len(last_status) == len(rows)
    assert all(m.payload["online"] is False for m in last_status.values())
    assert any(m.fault == "offline" for m in last_status.values())


CREDENTIALS_CSV = "device_id,username,password,client_id\nc001-mh-0001,c001-mh-0001,pw1,c001-mh-0001\n"


def test_credentials_csv() -> None:
    creds = read_credentials_csv(io.StringIO(CREDENTIALS_CSV + "c001-sl-0001,c001-sl-0001,pw2,\n"))
    assert creds == {
        "c001-mh-0001": DeviceCredentials("c001-mh-0001", "c001-mh-0001", "pw1", "c001-mh-0001"),
        "c001-sl-0001": DeviceCredentials("c001-sl-0001", "c001-sl-0001", "pw2", "c001-sl-0001"),
    }
    assert "pw1" not in repr(creds)
    with pytest.raises(ValueError, match="client_id"):
        read_credentials_csv(io.StringIO("device_id,username,password\nx,x,y\n"))
    with pytest.raises(ValueError, match="twice"):
        read_credentials_csv(io.StringIO(CREDENTIALS_CSV + CREDENTIALS_CSV.splitlines()[1] + "\n"))
    with pytest.raises(ValueError, match="required"):
        read_credentials_csv(io.StringIO(CREDENTIALS_CSV + "c001-sl-0001,c001-sl-0001,,\n"))


async def test_every_device_needs_its_credentials(rows: list[dict[str, Any]]) -> None:
    creds = read_credentials_csv(io.StringIO(CREDENTIALS_CSV))
    with pytest.raises(ValueError, match=f"no credentials for {len(rows) - 1} device"):
        await run_community(rows, host="unused", port=0, duration_s=0.1, credentials=creds)
    publisher = DeviceConnectionsPublisher("unused", 0, creds)
    with pytest.raises(ValueError, match="no credentials"):
        await publisher.start(rows)


def test_cli_options() -> None:
    a = _parser().parse_args(
        [
            "--devices-csv",
            "d.csv",
            "--credentials-csv",
            "c.csv",
            "--fault",
            "duplicate=20",
            "--anomaly",
            "rain=2",
        ]
    )
    assert a.credentials_csv == "c.csv" and a.fault_scale == 0
    assert _rates(a.fault, FaultRates.RATES, "fault") == {"duplicate": 20.0}
    assert _rates(a.anomaly, ["rain"], "anomaly") == {"rain": 2.0}
    for bad in (["bogus=1"], ["duplicate"], ["duplicate=x"], ["duplicate=-1"]):
        with pytest.raises(SystemExit):
            _rates(bad, FaultRates.RATES, "fault")
    assert math.isclose(FaultRates().scaled(_parser().parse_args([]).fault_scale).duplicate, 0)
