"""The managers' web page in a real browser (Debian's Chromium driven by Playwright) against a real API
server (uvicorn on a free port, a migrated SQLite registry) with a real InfluxDB for the readings.

A property manager of one community logs in and sees the incidents of that community only; a new P1 fire
incident written to the database appears on the board without a reload (the live stream); one click
acknowledges it and the API says so; the site map, a device page with its readings chart and incident
history, and the counts are shown; a device of another community, asked for by URL, is "not found" (the
API answers 404). Screenshots go to artifacts/screenshots/.

Nothing here sleeps to let something happen: Playwright's expectations wait for what the page shows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from sqlalchemy import Engine

from api.app import create_app
from api.auth import Scope, UserStore
from api.settings import ApiSettings
from gateway.db import make_engine, migrate
from gateway.incident_store import IncidentStore
from gateway.lineproto import to_line
from gateway.messages import Reading
from gateway.registry import DeviceRecord, PlaceRecord, Places, Registry
from rules.model import Evidence, Verdict
from stack.services import InfluxService
from tests.e2e.conftest import serve, shot

sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")

USERNAME, PASSWORD = "wang.fang", "correct horse battery"
INSIDE: Final = {"district": "东城区", "street": "东华门街道", "community": "东华门社区"}
OUTSIDE: Final = {"district": "西城区", "street": "西长安街街道", "community": "西长安街社区"}
CODES: Final = {"in": "110101001001", "out": "110102001001"}
P1_RED: Final = "rgb(211, 47, 47)"


@dataclass
class Site:
    base_url: str
    engine: Engine
    store: IncidentStore
    incident_in: str
    incident_out: str


def _device(
    device_id: str, device_type: str, place: dict[str, str], code: str, lat: float, lon: float
) -> Any:
    return DeviceRecord.model_validate(
        {
            "device_id": device_id,
            "device_type": device_type,
            **place,
            "grid_code": code + "001",
            "building": "3",
            "address": f"{place['street']} {device_id}",
            "lat": lat,
            "lon": lon,
        }
    )


def _verdict(
    device_id: str, device_type: str, rule_id: str, urgency: str, community: str, **kw: Any
) -> Verdict:
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    return Verdict(
        rule_id=rule_id,
        key=device_id,
        device_id=device_id,
        device_type=device_type,
        state="firing",
        change="opened",
        urgency=urgency,  # type: ignore[arg-type]
        evidence=Evidence(now_ms, kw.pop("values"), kw.pop("threshold")),
        message_zh=kw.pop("zh"),
        message_en=kw.pop("en"),
        since_ms=now_ms,
        community=community,
        grid_code=kw.pop("grid_code"),
    )


def _water(i: int) -> float:
    return 100.0 + (i % 12) * 2.5


def _write_readings(influx: InfluxService, db: str, registry: Registry, device_id: str) -> None:
    device = registry.describe(device_id)
    assert device is not None
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=5)
    lines = []
    for i in range(60):
        ts_ms = int((start + dt.timedelta(minutes=5 * i)).timestamp() * 1000)
        values = {"water_level_cm": _water(i), "tilt_deg": 1.5, "cover_open": False}
        lines.append(to_line(Reading(device, "telemetry", ts_ms, values, seq=i)))
    influx.create_database(db)
    r = httpx.post(
        f"{influx.url}/write",
        params={"db": db, "precision": "ms"},
        content="\n".join(lines).encode(),
        timeout=30,
    )
    assert r.status_code == 204, r.text


@pytest.fixture
def site(tmp_path: Path, influxdb: InfluxService, influx_db_name: str) -> Iterator[Site]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    engine = make_engine(url)
    places = Places(engine)
    for place, code in ((INSIDE, CODES["in"]), (OUTSIDE, CODES["out"])):
        for level, length in (("district", 6), ("street", 9), ("community", 12)):
            places.add(PlaceRecord(code=code[:length], name=place[level]))
        places.add(PlaceRecord(code=code + "001", name=f"{place['community']} 1 号网格"))
    registry = Registry(engine)
    for record in (
        _device("mc-001", "manhole_cover", INSIDE, CODES["in"], 39.9140, 116.4010),
        _device("sd-001", "smoke_detector", INSIDE, CODES["in"], 39.9150, 116.4030),
        _device("sl-001", "streetlight", INSIDE, CODES["in"], 39.9132, 116.4045),
        _device("out-001", "manhole_cover", OUTSIDE, CODES["out"], 39.9070, 116.3660),
    ):
        registry.add(record)
        registry.confirm(record.device_id)  # in service: their incidents are not commissioning noise
    _write_readings(influxdb, influx_db_name, registry, "mc-001")

    store = IncidentStore(engine, [])
    opened = []
    for device_id, place, code in (("mc-001", INSIDE, CODES["in"]), ("out-001", OUTSIDE, CODES["out"])):
        device = registry.describe(device_id)
        v = _verdict(
            device_id,
            "manhole_cover",
            "manhole_cover.tilt",
            "P3",
            place["community"],
            grid_code=code + "001",
            values={"tilt_deg": 14.2},
            threshold="> 10",
            zh="井盖倾斜：tilt_deg=14.2",
            en="Manhole cover tilted: tilt_deg=14.2",
        )
        change = store.apply(v, device, dt.datetime.now(dt.UTC))
        assert change is not None
        opened.append(change[0].incident_id)

    UserStore(engine).create(
        USERNAME,
        role="manager",
        password=PASSWORD,
        display_name="王芳",
        scope=Scope(communities=(INSIDE["community"],)),
    )
    settings = ApiSettings(
        incident_mqtt=False, influx_url=influxdb.url, influx_db=influx_db_name, api_stream_poll_s=0.2
    )
    app = create_app(settings, engine=engine, issuer=None)
    try:
        with serve(app) as base:
            yield Site(base, engine, store, opened[0], opened[1])
    finally:
        engine.dispose()


def api_get(site: Site, token: str, path: str) -> httpx.Response:
    return httpx.get(f"{site.base_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_a_manager_works_the_board_live(site: Site, page: Any) -> None:
    expect = sync_api.expect
    page.goto(site.base_url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#login-form h2")).to_have_text("登录")  # Chinese first
    shot(page, "1-login")

    # a wrong password is told, and nothing else happens
    page.fill("#username", USERNAME)
    page.fill("#password", "not the password")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("用户名或密码错误")

    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    expect(page.locator("#view-board")).to_be_visible()
    expect(page).to_have_url(site.base_url + "/app/board")
    expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
    token = page.evaluate("sessionStorage.getItem('sc.token')")
    assert isinstance(token, str) and token.startswith("sct_")
    mine = page.locator(f'li[data-incident-id="{site.incident_in}"]')
    expect(mine).to_be_visible()
    expect(mine).to_have_attribute("data-urgency", "P3")
    expect(page.locator(f'li[data-incident-id="{site.incident_out}"]')).to_have_count(0)
    expect(page.locator("#who")).to_contain_text("王芳")

    # a new P1 fire incident, written to the database, appears without a reload
    page.evaluate("window.__sameDocument = true")
    registry = Registry(site.engine)
    fire = _verdict(
        "sd-001",
        "smoke_detector",
        "smoke_detector.smoke_alarm",
        "P1",
        INSIDE["community"],
        grid_code=CODES["in"] + "001",
        values={"alarm": True, "smoke_obscuration_pct_m": 12.5},
        threshold="alarm = true",
        zh="烟感报警：疑似火情",
        en="Smoke alarm: possible fire",
    )
    change = site.store.apply(fire, registry.describe("sd-001"), dt.datetime.now(dt.UTC))
    assert change is not None
    fire_id = change[0].incident_id
    row = page.locator(f'li[data-incident-id="{fire_id}"]')
    expect(row).to_be_visible()
    expect(row).to_have_attribute("data-urgency", "P1")
    expect(row).to_have_attribute("data-acknowledged", "false")
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    badge = row.locator(".badge")
    assert badge.evaluate("e => getComputedStyle(e).backgroundColor") == P1_RED
    # the most urgent first
    expect(page.locator("#incident-list > li").first).to_have_attribute("data-incident-id", fire_id)
    shot(page, "2-board-new-p1")

    # one click acknowledges it; the API says so
    row.locator("button.ack-button").click()
    expect(row).to_have_attribute("data-acknowledged", "true")
    expect(row.locator(".ack-state")).to_contain_text(USERNAME)
    detail = api_get(site, token, f"/api/v1/incidents/{fire_id}")
    assert detail.status_code == 200
    incident = detail.json()["incident"]
    assert incident["acknowledged_at"] is not None and USERNAME in incident["acknowledged_by"]
    shot(page, "3-board-acknowledged")

    # English labels on a click, and back
    page.click("#lang-toggle")
    expect(page.locator("#view-board h2")).to_have_text("Live alerts")
    page.click("#lang-toggle")
    expect(page.locator("#view-board h2")).to_have_text("实时告警")

    # the site: this community's devices by their coordinates, the one with an open alarm marked
    page.click('#nav a[data-view="site"]')
    expect(page).to_have_url(site.base_url + "/app/site")
    dots = page.locator("#site-map a.device-link")
    expect(dots).to_have_count(3)
    expect(page.locator('#site-map a[data-device-id="sd-001"]')).to_have_attribute("data-state", "incident")
    expect(page.locator('#site-map a[data-device-id="out-001"]')).to_have_count(0)
    shot(page, "4-site")

    # a device page: facts, a readings chart from InfluxDB, its incident history
    page.locator('#site-map a[data-device-id="mc-001"] circle').click()
    expect(page).to_have_url(site.base_url + "/app/devices/mc-001")
    expect(page.locator("#device-title")).to_contain_text("mc-001")
    series = page.locator("#chart polyline.series")
    expect(series).to_have_attribute("data-field", "tilt_deg")  # the type's first numeric field
    options = page.locator("#field-picker option").all_inner_texts()
    assert any(o.startswith("water_level_cm") for o in options) and any(
        o.startswith("tilt_deg") for o in options
    )
    assert not any(o.startswith("cover_open") for o in options), "a boolean field offered for the chart"
    page.select_option("#field-picker", "water_level_cm")
    expect(series).to_have_attribute("data-field", "water_level_cm")
    assert int(series.get_attribute("data-points") or 0) > 10
    heights = {pair.split(",")[1] for pair in (series.get_attribute("points") or "").split()}
    assert len(heights) > 3, "the water level's saw tooth is drawn flat"
    expect(page.locator(f'#device-incidents li[data-incident-id="{site.incident_in}"]')).to_be_visible()
    shot(page, "5-device")

    # counts per community: only the manager's
    page.click('#nav a[data-view="overview"]')
    table = page.locator("#overview-table")
    expect(table.locator(f'tbody tr[data-key="{INSIDE["community"]}"]')).to_be_visible()
    expect(table.locator("tbody tr")).to_have_count(1)
    expect(table.locator("tfoot td").nth(1)).to_have_text("3")
    # the fire incident acknowledged above, the earlier one not yet
    expect(table.locator('tfoot td[data-status="acknowledged"]')).to_have_text("1")
    expect(table.locator('tfoot td[data-status="unacknowledged"]')).to_have_text("1")
    page.select_option("#overview-by", "grid")
    expect(table.locator("tbody tr").first).to_contain_text(CODES["in"] + "001")
    shot(page, "6-overview")

    # another community's device, asked for by URL: not found, as the API answers
    page.goto(site.base_url + "/app/devices/out-001")
    expect(page.locator("#device-not-found")).to_be_visible()
    expect(page.locator("#device-not-found h2")).to_have_text("未找到该设备")
    expect(page.locator("#device-body")).to_be_hidden()
    assert api_get(site, token, "/api/v1/device-status/out-001").status_code == 404
    shot(page, "7-device-not-found")

    # log out: the token is gone from the page and no longer works
    page.click("#logout")
    expect(page.locator("#login-form")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('sc.token')") is None
    assert api_get(site, token, "/api/v1/me").status_code == 401


def test_a_street_viewer_sees_the_street_read_only(site: Site, page: Any) -> None:
    """A grid member scoped to a street: the street's incidents, devices and counts, and no way to act."""
    expect = sync_api.expect
    UserStore(site.engine).create(
        "zhao.lei",
        role="viewer",
        password=PASSWORD,
        display_name="赵磊",
        scope=Scope(streets=(INSIDE["street"],)),
    )
    page.goto(site.base_url + "/")
    page.fill("#username", "zhao.lei")
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
    mine = page.locator(f'li[data-incident-id="{site.incident_in}"]')
    expect(mine).to_be_visible()
    expect(page.locator(f'li[data-incident-id="{site.incident_out}"]')).to_have_count(0)
    expect(page.locator("button.ack-button")).to_have_count(0)  # read only
    shot(page, "8-viewer-board")

    page.click('#nav a[data-view="site"]')
    expect(page.locator('#site-map a[data-device-id="mc-001"]')).to_have_count(1)
    expect(page.locator('#site-map a[data-device-id="out-001"]')).to_have_count(0)
    page.click('#nav a[data-view="overview"]')
    table = page.locator("#overview-table")
    expect(table.locator(f'tbody tr[data-key="{INSIDE["community"]}"]')).to_be_visible()
    expect(table.locator("tbody tr")).to_have_count(1)
