"""The managers' web page on the whole chain: simulated devices publish to a real Mosquitto, a real
gateway (its workers, rules and incident stages) validates them, stores their readings in a real
InfluxDB and raises incidents in the registry database, which the API serves to the page in a real
browser (Debian's Chromium driven by Playwright).

A property manager of one community is logged in when two smoke detectors of one of its buildings go
off: their fire incidents appear on the board without a reload, one click acknowledges one (the
database records who), the cover's page charts the readings the gateway stored, and a fire in another
community shows neither on the board nor by URL.

Nothing here sleeps to let something happen: Playwright's expectations wait for what the page shows,
`wait_for` for what the database holds.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from api.app import create_app
from api.auth import Scope, UserStore
from api.settings import ApiSettings
from gateway.incident_store import IncidentStore
from incidents.model import Incident
from simulators.community import generate_community
from stack.services import InfluxService, MosquittoService
from tests.e2e.conftest import serve, shot
from tests.integration.conftest import Harness, Publisher, now_ms, topic, wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")

USERNAME, PASSWORD = "li.na", "correct horse battery"
P1_RED: Final = "rgb(211, 47, 47)"


@dataclass
class Live:
    base_url: str
    harness: Harness
    publisher: Publisher
    mine: list[dict[str, Any]]
    theirs: list[dict[str, Any]]

    def device(self, rows: list[dict[str, Any]], device_type: str, n: int = 0) -> dict[str, Any]:
        return [r for r in rows if r["device_type"] == device_type][n]

    def incidents(self, community: str) -> list[Incident]:
        found, _ = IncidentStore(self.harness.engine, []).find(communities=[community], status=None)
        return found


@pytest.fixture
def live(tmp_path: Path, mosquitto: MosquittoService, influxdb: InfluxService) -> Iterator[Live]:
    token = uuid.uuid4().hex[:6]
    # one building, two smoke detectors and a manhole cover: the manager's community; one detector in
    # another company's community
    mine = generate_community(
        f"望京花园-{token}", seed=3, slug=f"w{token}", community="101", buildings=1, grids=1,
        covers=1, poles=0, doors=0, bays=0, detectors=2,
    )  # fmt: skip
    theirs = generate_community(
        f"西城小区-{token}", seed=4, slug=f"x{token}", community="102", buildings=1, grids=1,
        covers=0, poles=0, doors=0, bays=0, detectors=1,
    )  # fmt: skip
    harness = Harness(tmp_path, mosquitto, influxdb)
    try:
        harness.register(mine + theirs)
        for row in mine + theirs:
            harness.registry.set_lifecycle(row["device_id"], "in_service")
        gateway = harness.start_gateway()
        publisher = harness.publisher()
        # the cover's last five hours (a report every 7.5 minutes), through the broker and the gateway
        # into InfluxDB
        cover = next(r for r in mine if r["device_type"] == "manhole_cover")
        start = now_ms() - 5 * 3600_000
        for seq in range(1, 41):
            publisher.send(topic(cover), quiet_cover(seq, start + seq * 450_000))
        UserStore(harness.engine).create(
            USERNAME,
            role="manager",
            password=PASSWORD,
            display_name="李娜",
            scope=Scope(communities=(mine[0]["community"],)),
        )
        settings = ApiSettings(
            incident_mqtt=False,
            influx_url=influxdb.url,
            influx_db=harness.influx_db,
            api_stream_poll_s=0.2,
        )
        with serve(create_app(settings, engine=harness.engine, issuer=None)) as base:
            yield Live(base, harness, publisher, mine, theirs)
        assert gateway.is_running(), gateway.tail()
    finally:
        harness.close()


def quiet_cover(seq: int, ts: int) -> dict[str, Any]:
    """A manhole cover's report with nothing wrong; the water level rises and falls (a chart to draw)."""
    return {
        "ts": ts,
        "seq": seq,
        "tilt_deg": 1.0,
        "cover_open": False,
        "water_level_cm": 40.0 + (seq % 8) * 5.0,
        "ch4_lel_pct": 0.5,
        "h2s_ppm": 0.1,
        "co_ppm": 2.0,
        "o2_pct": 20.9,
        "temperature_c": 15.0,
        "battery_pct": 90.0,
        "rssi_dbm": -70.0,
    }


def smoke_alarm(live: Live, row: dict[str, Any], seq: int) -> None:
    live.publisher.send(topic(row, "event"), {"ts": now_ms(), "seq": seq, "event": "smoke_alarm"})


def test_a_fire_in_the_managers_building_appears_live_from_the_devices(live: Live, page: Any) -> None:
    expect = sync_api.expect
    community, other = live.mine[0]["community"], live.theirs[0]["community"]
    page.goto(live.base_url + "/")
    page.fill("#username", USERNAME)
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    expect(page.locator("#view-board")).to_be_visible()
    expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
    page.evaluate("window.__sameDocument = true")

    # a fire in the other community first: it becomes an incident, but not on this board
    smoke_alarm(live, live.device(live.theirs, "smoke_detector"), 1)
    (foreign,) = wait_for(
        lambda: live.incidents(other), lambda found: len(found) == 1, what="the other community's fire"
    )

    # two detectors of the manager's building go off
    for n in (0, 1):
        smoke_alarm(live, live.device(live.mine, "smoke_detector", n), 1)
    fires = wait_for(
        lambda: live.incidents(community),
        lambda found: (
            {i.rule_id for i in found}
            >= {"smoke_detector.smoke_alarm", "smoke_detector.fire_confirmed_building"}
            and len(found) >= 3
        ),
        what="the fire incidents of the manager's building",
    )
    assert all(i.device.type == "smoke_detector" for i in fires), [i.rule_id for i in fires]
    for incident in fires:
        row = page.locator(f'li[data-incident-id="{incident.incident_id}"]')
        expect(row).to_be_visible()
        expect(row).to_have_attribute("data-urgency", "P1")
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    first = page.locator("#incident-list > li").first
    assert first.locator(".badge").evaluate("e => getComputedStyle(e).backgroundColor") == P1_RED
    expect(page.locator(f'li[data-incident-id="{foreign.incident_id}"]')).to_have_count(0)
    shot(page, "live-1-fire")

    # one click acknowledges the building's fire; the database says who did
    building_fire = next(i for i in fires if i.rule_id == "smoke_detector.fire_confirmed_building")
    row = page.locator(f'li[data-incident-id="{building_fire.incident_id}"]')
    row.locator("button.ack-button").click()
    expect(row).to_have_attribute("data-acknowledged", "true")
    stored = IncidentStore(live.harness.engine, []).get(building_fire.incident_id)
    assert stored is not None and stored.acknowledged_at is not None
    assert USERNAME in (stored.acknowledged_by or "")
    shot(page, "live-2-acknowledged")

    # the cover's page charts what the gateway stored in InfluxDB
    cover = live.device(live.mine, "manhole_cover")
    page.goto(f"{live.base_url}/app/devices/{cover['device_id']}")
    expect(page.locator("#device-title")).to_contain_text(cover["device_id"])
    series = page.locator("#chart polyline.series")
    expect(series).to_have_attribute("data-points", re.compile(r"^[1-9][0-9]+$"))  # 10 or more
    shot(page, "live-3-device")

    # the other community's detector, by URL: not found
    page.goto(f"{live.base_url}/app/devices/{live.device(live.theirs, 'smoke_detector')['device_id']}")
    expect(page.locator("#device-not-found")).to_be_visible()
