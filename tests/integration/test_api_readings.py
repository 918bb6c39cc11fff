"""A device's readings through the API from a real InfluxDB: points written as the gateway writes them
(gateway.lineproto), read back downsampled per bucket (mean of numbers, last of booleans), one device's
series only, and 503 when InfluxDB is not there."""

from __future__ import annotations

import datetime as dt
import statistics
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from api.app import create_app
from api.auth import ApiKeyStore, Scope
from api.settings import ApiSettings
from gateway.db import make_engine, migrate
from gateway.lineproto import to_line
from gateway.messages import Reading
from gateway.registry import RegisteredDevice, Registry
from stack.services import InfluxService, free_port

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

COMMUNITY, GRID = "110101001001", "110101001001001"
MINUTES = 600  # ten hours, one reading a minute
#: a whole minute eleven hours ago: the readings run from here for ten hours
ANCHOR = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(hours=11)


def water(i: int) -> float:
    """mc-001's water level at minute i: a saw tooth within each hour, one cm higher every hour."""
    return 100.0 + (i % 60) * 0.5 + i // 60


def cover_open(i: int) -> bool:
    return i % 7 == 0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def register(engine: Engine, device_id: str, community: str = COMMUNITY) -> RegisteredDevice:
    registry = Registry(engine)
    return registry.add(
        registry.validate(
            {
                "device_id": device_id,
                "device_type": "manhole_cover",
                "community": community,
                "grid_code": GRID,
            }
        )
    )


@pytest.fixture
def written(engine: Engine, influxdb: InfluxService, influx_db_name: str) -> str:
    """mc-001's ten hours of readings and mc-002's (another level) in a fresh database; returns its name."""
    mine, other = register(engine, "mc-001"), register(engine, "mc-002")
    lines = []
    for i in range(MINUTES):
        ts_ms = int((ANCHOR + dt.timedelta(minutes=i)).timestamp() * 1000)
        values = {"water_level_cm": water(i), "cover_open": cover_open(i), "tilt_deg": 1.5}
        lines.append(to_line(Reading(mine.info(), "telemetry", ts_ms, values, seq=i)))
        lines.append(to_line(Reading(other.info(), "telemetry", ts_ms, {"water_level_cm": 999.0}, seq=i)))
    influxdb.create_database(influx_db_name)
    resp = httpx.post(
        f"{influxdb.url}/write",
        params={"db": influx_db_name, "precision": "ms"},
        content="\n".join(lines).encode(),
        timeout=30,
    )
    assert resp.status_code == 204, resp.text
    return influx_db_name


@pytest.fixture
def client(engine: Engine, influxdb: InfluxService, written: str) -> Iterator[TestClient]:
    settings = ApiSettings(incident_mqtt=False, influx_url=influxdb.url, influx_db=written)
    with TestClient(create_app(settings, engine=engine, issuer=None)) as c:
        yield c


def auth(engine: Engine) -> dict[str, str]:
    key = ApiKeyStore(engine).create("manager", "manager", Scope(communities=(COMMUNITY,)))[1]
    return {"Authorization": f"Bearer {key}"}


def readings(client: TestClient, engine: Engine, device_id: str = "mc-001", **params: Any) -> dict[str, Any]:
    r = client.get(f"/api/v1/devices/{device_id}/readings", params=params, headers=auth(engine))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def iso(t: dt.datetime) -> str:
    return t.isoformat()


def test_hourly_buckets_hold_the_mean_of_numbers_and_the_last_boolean(
    client: TestClient, engine: Engine
) -> None:
    body = readings(
        client,
        engine,
        field=["water_level_cm", "cover_open"],
        since=iso(ANCHOR),
        until=iso(ANCHOR + dt.timedelta(hours=10)),
        points=10,
    )
    assert body["interval_s"] == 3600
    points = body["points"]
    assert len(points) == 10
    for hour, point in enumerate(points):
        minutes = range(hour * 60, hour * 60 + 60)
        assert dt.datetime.fromisoformat(point["time"]) == ANCHOR + dt.timedelta(hours=hour)
        assert point["water_level_cm"] == pytest.approx(statistics.fmean(water(i) for i in minutes))
        assert point["cover_open"] is cover_open(minutes[-1])
        assert set(point) == {"time", "water_level_cm", "cover_open"}


def test_as_many_points_as_readings_gives_the_readings_and_one_point_their_mean(
    client: TestClient, engine: Engine
) -> None:
    span = {"since": iso(ANCHOR), "until": iso(ANCHOR + dt.timedelta(minutes=MINUTES))}
    every = readings(client, engine, field="water_level_cm", points=MINUTES, **span)["points"]
    assert [p["water_level_cm"] for p in every] == pytest.approx([water(i) for i in range(MINUTES)])
    one = readings(client, engine, field="water_level_cm", points=1, **span)["points"]
    assert len(one) == 1
    assert one[0]["water_level_cm"] == pytest.approx(statistics.fmean(water(i) for i in range(MINUTES)))


def test_the_default_is_every_field_over_the_last_day_in_at_most_300_points(
    client: TestClient, engine: Engine
) -> None:
    body = readings(client, engine)
    assert 0 < len(body["points"]) <= 300
    assert set(body["fields"]) >= {"tilt_deg", "water_level_cm", "cover_open", "battery_pct"}
    levels = [p["water_level_cm"] for p in body["points"]]
    assert (
        min(water(i) for i in range(MINUTES)) <= min(levels) <= max(levels) <= max(map(water, range(MINUTES)))
    )
    assert all(p["tilt_deg"] == pytest.approx(1.5) for p in body["points"])
    assert all(p["battery_pct"] is None for p in body["points"])  # never reported


def test_each_device_gets_its_own_series_and_a_quiet_field_none(client: TestClient, engine: Engine) -> None:
    other = readings(client, engine, "mc-002", field="water_level_cm", points=5)["points"]
    assert other and all(p["water_level_cm"] == 999.0 for p in other)
    assert readings(client, engine, field="ch4_lel_pct")["points"] == []
    before = {"since": iso(ANCHOR - dt.timedelta(hours=5)), "until": iso(ANCHOR)}
    assert readings(client, engine, field="water_level_cm", **before)["points"] == []


def test_no_database_yet_is_no_readings_and_no_influxdb_is_503(
    engine: Engine, influxdb: InfluxService
) -> None:
    register(engine, "mc-001")
    for url, db, expected in (
        (influxdb.url, "never_written", 200),
        (f"http://127.0.0.1:{free_port()}", "sc", 503),
    ):
        settings = ApiSettings(incident_mqtt=False, influx_url=url, influx_db=db, influx_query_timeout_s=5)
        with TestClient(create_app(settings, engine=engine, issuer=None)) as client:
            r = client.get("/api/v1/devices/mc-001/readings", headers=auth(engine))
            assert r.status_code == expected, r.text
            if expected == 200:
                assert r.json()["points"] == []
            else:
                assert "InfluxDB is unreachable" in r.json()["detail"]
