"""The managers' routes over HTTP against a real SQLite database: incident filters and paging, comments,
assignment, the live stream (server-sent events), devices with status, counts, readings' 4xx answers,
and the scope of a key everywhere."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

from api.app import create_app
from api.auth import ApiKeyStore, Scope
from api.manager import HistoryCursor
from api.readings import InfluxReader, Window, downsample_query, plan
from api.settings import ApiSettings
from gateway.db import make_engine, migrate
from gateway.deadletter import DeviceStateStore, StatusUpdate
from gateway.incident_store import IncidentStore
from gateway.registry import RegisteredDevice, Registry
from gateway.settings import EndpointConfig
from tests.integration.test_incident_store import NOW, at, verdict

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

A, B = "110101001001", "110101001002"  # two communities
GRID_A1, GRID_A2, GRID_B1 = "110101001001001", "110101001001002", "110101001002001"
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def settings(**kw: Any) -> ApiSettings:
    return ApiSettings(
        incident_mqtt=True,
        incident_endpoints=[EndpointConfig(name="city", url="https://cases.example/hook", secret=SECRET)],
        api_stream_poll_s=0.02,
        **kw,
    )


@pytest.fixture
def app(engine: Engine) -> FastAPI:
    return create_app(settings(), engine=engine, issuer=None)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def auth(engine: Engine, role: str, *communities: str) -> dict[str, str]:
    scope = Scope(communities=communities) if communities else None
    return {"Authorization": f"Bearer {ApiKeyStore(engine).create(f'{role} key', role, scope)[1]}"}


# -- the place: devices in two communities -------------------------------------------------------------


def register(
    engine: Engine,
    device_id: str,
    device_type: str = "manhole_cover",
    community: str = A,
    grid_code: str = GRID_A1,
    building: str | None = "3",
    lifecycle: str = "in_service",
) -> RegisteredDevice:
    registry = Registry(engine)
    registry.add(
        registry.validate(
            {
                "device_id": device_id,
                "device_type": device_type,
                "community": community,
                "grid_code": grid_code,
                "building": building,
            }
        )
    )
    if lifecycle != "registered":
        registry.set_lifecycle(device_id, lifecycle)  # type: ignore[arg-type]
    found = registry.describe(device_id)
    assert found is not None
    return found


def heard(engine: Engine, device_id: str, online: bool | None, payload: dict[str, Any] | None = None) -> None:
    kind = "telemetry" if payload is not None else "status"
    body = payload if payload is not None else {"online": online}
    DeviceStateStore(engine).record_many(
        [
            StatusUpdate(
                device_id=device_id,
                online=online,
                seen_at=NOW,
                fw="1.4.2",
                is_status_message=kind == "status",
                last_topic=f"sc/v1/x/{device_id}/{kind}",
                last_payload=json.dumps(body).encode(),
            )
        ]
    )


def raise_incident(
    engine: Engine,
    device: RegisteredDevice,
    minutes: int = 0,
    urgency: str = "P2",
    rule_id: str = "manhole_cover.tilt",
) -> str:
    store = IncidentStore(engine, ["city", "mqtt"])
    v = replace(
        verdict(device_id=device.device_id, urgency=urgency),
        rule_id=rule_id,
        device_type=device.device_type,
        community=device.community,
        grid_code=device.grid_code,
    )
    inc, _ = store.apply(v, device, at(minutes)) or pytest.fail("no incident")
    return inc.incident_id


@pytest.fixture
def place(engine: Engine) -> dict[str, RegisteredDevice]:
    """mc-001 online (telemetry), mc-002 never heard from, sl-001 offline in another grid, mc-005 in
    building 5, mc-009 in community B, mc-010 retired."""
    devices = {
        "mc-001": register(engine, "mc-001"),
        "mc-002": register(engine, "mc-002", lifecycle="registered"),
        "sl-001": register(engine, "sl-001", "streetlight", grid_code=GRID_A2),
        "mc-005": register(engine, "mc-005", building="5"),
        "mc-009": register(engine, "mc-009", community=B, grid_code=GRID_B1),
        "mc-010": register(engine, "mc-010", lifecycle="retired"),
    }
    heard(engine, "mc-001", True, {"ts": 1, "seq": 7, "tilt_deg": 1.5, "cover_open": False})
    heard(engine, "sl-001", False)
    heard(engine, "mc-009", True)
    return devices


def ids(page: dict[str, Any], key: str = "incidents") -> list[str]:
    return [i["incident_id"] if key == "incidents" else i["device_id"] for i in page[key]]


# -- incidents: filters and paging -----------------------------------------------------------------------


def test_incidents_filter_by_place_type_urgency_and_time_and_page(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    tilt = raise_incident(engine, place["mc-001"], 0, "P1")
    leak = raise_incident(engine, place["sl-001"], 10, "P3", "streetlight.leakage")
    b5 = raise_incident(engine, place["mc-005"], 20, "P2")
    other = raise_incident(engine, place["mc-009"], 30, "P2")
    h = auth(engine, "manager", A)

    def get(**params: Any) -> dict[str, Any]:
        r = client.get("/api/v1/incidents", params=params, headers=h)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    assert ids(get()) == [tilt, b5, leak]  # most urgent first; B's is outside the scope
    assert ids(get(grid_code=GRID_A2)) == [leak]
    assert ids(get(building="5")) == [b5]
    assert ids(get(type="streetlight")) == [leak]
    assert ids(get(urgency="P2")) == [b5]
    assert ids(get(opened_since=at(5).isoformat(), opened_until=at(20).isoformat())) == [leak]
    assert ids(get(since=at(10).isoformat(), until=at(15).isoformat())) == [leak]
    first, second = get(limit=2), get(limit=2, offset=2)
    assert (first["total"], second["total"]) == (3, 3)
    assert ids(first) + ids(second) == [tilt, b5, leak]
    # the unscoped view narrows to B by community
    assert ids(client.get(f"/api/v1/incidents?community={B}", headers=auth(engine, "viewer")).json()) == [
        other
    ]
    assert client.get(f"/api/v1/incidents?community={B}", headers=h).status_code == 403
    bad = client.get("/api/v1/incidents?opened_since=last tuesday", headers=h)
    assert bad.status_code == 422 and "last tuesday" in bad.json()["detail"]


# -- incidents: comments and assignment ------------------------------------------------------------------


def test_comments_are_kept_in_history_and_change_nothing_else(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    iid = raise_incident(engine, place["mc-001"])
    before = client.get(f"/api/v1/incidents/{iid}", headers=auth(engine, "viewer")).json()
    h = auth(engine, "manager", A)
    r = client.post(f"/api/v1/incidents/{iid}/comments", json={"text": " 已通知保安 "}, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["text"] == "已通知保安" and r.json()["actor"].startswith("user:apikey:")

    after = client.get(f"/api/v1/incidents/{iid}", headers=auth(engine, "viewer")).json()
    assert after["incident"] == before["incident"]  # updated_at too
    last = after["history"][-1]
    assert last["event_type"] == "comment" and last["change"] == {"text": "已通知保安"}
    assert last["actor"] == r.json()["actor"]
    # nothing delivered: the outbox holds the opening only
    store = IncidentStore(engine, ["city", "mqtt"])
    assert {row.event_type for row in store.outbox_rows(iid)} == {"sc.incident.opened"}


def test_comment_and_assign_answers_for_bad_input_roles_and_scope(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    mine = raise_incident(engine, place["mc-001"])
    other = raise_incident(engine, place["mc-009"])
    h = auth(engine, "manager", A)
    for path, body in (("comments", {"text": "x"}), ("assign", {"assignee": "王师傅"})):
        assert client.post(f"/api/v1/incidents/{other}/{path}", json=body, headers=h).status_code == 404
        assert (
            client.post(f"/api/v1/incidents/INC-20261121-999999/{path}", json=body, headers=h).status_code
            == 404
        )
        for role in ("viewer", "installer", "incident_system"):
            r = client.post(f"/api/v1/incidents/{mine}/{path}", json=body, headers=auth(engine, role))
            assert r.status_code == 403, role
        assert client.post(f"/api/v1/incidents/{mine}/{path}", json=body).status_code == 401
    for body in ({"text": ""}, {"text": "x" * 2001}, {}, {"text": "x", "colour": "red"}):
        r = client.post(f"/api/v1/incidents/{mine}/comments", json=body, headers=h)
        assert r.status_code == 422, body
    assert (
        client.post(f"/api/v1/incidents/{mine}/comments", json={"text": "   "}, headers=h).status_code == 422
    )
    assert (
        client.post(f"/api/v1/incidents/{mine}/assign", json={"assignee": ""}, headers=h).status_code == 422
    )


def test_assign_sets_the_assignee_records_it_and_tells_local_subscribers_only(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    iid = raise_incident(engine, place["mc-001"])
    h = auth(engine, "manager", A)
    r = client.post(f"/api/v1/incidents/{iid}/assign", json={"assignee": "保安队 王师傅"}, headers=h)
    assert r.status_code == 200, r.text
    inc = r.json()["incident"]
    assert r.json()["changed"] is True
    assert inc["assigned_to"] == "保安队 王师傅" and inc["assigned_by"].startswith("user:apikey:")
    assert inc["assigned_at"] is not None and inc["acknowledged_at"] is None  # assigning is not acking
    again = client.post(f"/api/v1/incidents/{iid}/assign", json={"assignee": "保安队 王师傅"}, headers=h)
    assert again.json()["changed"] is False

    store = IncidentStore(engine, ["city", "mqtt"])
    assigned = [row for row in store.outbox_rows(iid) if row.event_type == "sc.incident.updated"]
    assert [row.endpoint for row in assigned] == ["mqtt"]  # not the case system's endpoint

    taken_back = client.post(f"/api/v1/incidents/{iid}/assign", json={"assignee": None}, headers=h).json()
    assert taken_back["incident"]["assigned_to"] is None and taken_back["incident"]["assigned_at"] is None
    history = client.get(f"/api/v1/incidents/{iid}", headers=h).json()["history"]
    assert [x["event_type"] for x in history] == ["opened", "assigned", "unassigned"]
    assert history[1]["change"]["assigned_to"] == [None, "保安队 王师傅"]

    closed = client.post(
        f"/api/v1/incidents/{iid}/reports", json={"status": "closed"}, headers=auth(engine, "admin")
    )
    assert closed.is_success
    late = client.post(f"/api/v1/incidents/{iid}/assign", json={"assignee": "李"}, headers=h)
    assert late.status_code == 409 and "resolved" in late.json()["detail"]
    # a resolved incident still takes comments
    assert (
        client.post(f"/api/v1/incidents/{iid}/comments", json={"text": "复盘"}, headers=h).status_code == 201
    )


# -- incidents: the live stream --------------------------------------------------------------------------


class EventReader:
    """Reads a text/event-stream: events as {id, event, data} and the comment lines."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()
        self.comments: list[str] = []

    def next_event(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif not line:
                if "event" in fields:
                    return {**fields, "data": json.loads(fields["data"])}
                fields = {}
            else:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        raise AssertionError("the stream ended")

    def next_comment(self) -> str:
        for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                return self.comments[-1]
        raise AssertionError("the stream ended")


STREAM = "/api/v1/incidents/stream"


@pytest.mark.timeout(60)
def test_the_stream_sends_changes_in_scope_and_resumes_after_the_last_event_id(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    raise_incident(engine, place["mc-005"])  # before connecting: not sent
    h = auth(engine, "manager", A)
    with client.stream("GET", STREAM, headers=h) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = EventReader(r)
        assert events.next_comment().startswith("incident changes after")  # following from now on
        raise_incident(engine, place["mc-009"])  # community B: not for this key
        mine = raise_incident(engine, place["mc-001"], urgency="P1")
        opened = events.next_event()
        assert opened["event"] == "incident"
        assert opened["data"]["incident_id"] == mine and opened["data"]["event_type"] == "opened"
        assert opened["data"]["incident"]["urgency"] == "P1"
        assert int(opened["id"]) == opened["data"]["cursor"]

        client.post(f"/api/v1/incidents/{mine}/comments", json={"text": "在路上"}, headers=h)
        commented = events.next_event()
        assert commented["data"]["event_type"] == "comment"
        assert commented["data"]["change"] == {"text": "在路上"}
        assert int(commented["id"]) > int(opened["id"])
        last_id = commented["id"]

    # changes made while nobody listens come on reconnecting with Last-Event-ID
    client.post(f"/api/v1/incidents/{mine}/ack", headers=h)
    client.post(f"/api/v1/incidents/{mine}/assign", json={"assignee": "王"}, headers=h)
    with client.stream("GET", STREAM, headers={**h, "Last-Event-ID": last_id}) as r:
        events = EventReader(r)
        got = [events.next_event()["data"] for _ in range(2)]
        assert [(e["incident_id"], e["event_type"]) for e in got] == [
            (mine, "acknowledged"),
            (mine, "assigned"),
        ]
        assert got[1]["incident"]["assigned_to"] == "王"
    # ?after= does the same for clients that cannot set the header
    with client.stream("GET", STREAM, params={"after": last_id}, headers=h) as r:
        assert EventReader(r).next_event()["data"]["event_type"] == "acknowledged"


@pytest.mark.timeout(60)
def test_the_stream_keeps_the_connection_alive_when_quiet(engine: Engine) -> None:
    app = create_app(settings(api_stream_keepalive_s=0.05), engine=engine, issuer=None)
    with TestClient(app) as client, client.stream("GET", STREAM, headers=auth(engine, "viewer")) as r:
        events = EventReader(r)
        events.next_comment()
        assert events.next_comment() == "keep-alive"


@pytest.mark.timeout(60)
def test_the_stream_of_an_unscoped_key_includes_every_community_but_not_commissioning(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    with client.stream("GET", STREAM, headers=auth(engine, "admin")) as r:
        events = EventReader(r)
        events.next_comment()
        raise_incident(engine, place["mc-002"])  # registered, not in service: commissioning noise
        other = raise_incident(engine, place["mc-009"])
        assert events.next_event()["data"]["incident_id"] == other


def test_the_stream_answers_4xx_before_streaming(engine: Engine, client: TestClient) -> None:
    assert client.get(STREAM).status_code == 401
    assert client.get(STREAM, headers=auth(engine, "installer")).status_code == 403
    bad = client.get(STREAM, headers={**auth(engine, "viewer"), "Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["detail"]
    assert client.get(f"{STREAM}?community={B}", headers=auth(engine, "manager", A)).status_code == 403


def test_the_cursor_looks_again_for_ids_missing_below_it_for_a_while() -> None:
    cursor = HistoryCursor(10)
    cursor.saw([11, 14], now=100.0, wait_s=5)
    assert cursor.position == 14 and cursor.missing() == (12, 13)
    cursor.saw([12, 15], now=101.0, wait_s=5)  # 12 committed late
    assert cursor.position == 15 and cursor.missing() == (13,)
    cursor.saw([], now=105.0, wait_s=5)  # 13 never came (a rolled back insert): given up
    assert cursor.missing() == () and cursor.position == 15


# -- devices with status ---------------------------------------------------------------------------------


def test_devices_with_status_filtered_paged_and_scoped(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    raise_incident(engine, place["mc-001"])
    h = auth(engine, "manager", A)

    def get(**params: Any) -> list[str]:
        r = client.get("/api/v1/device-status", params=params, headers=h)
        assert r.status_code == 200, r.text
        return ids(r.json(), "items")

    assert get() == ["mc-001", "mc-002", "mc-005", "sl-001"]  # not B's, not the retired one
    assert get(lifecycle="retired") == ["mc-010"]
    assert get(grid_code=GRID_A2) == ["sl-001"]
    assert get(building="5") == ["mc-005"]
    assert get(type="streetlight") == ["sl-001"]
    assert get(online=True) == ["mc-001"]
    assert get(online=False) == ["mc-002", "mc-005", "sl-001"]
    page = client.get("/api/v1/device-status?limit=3&offset=3", headers=h).json()
    assert (page["total"], ids(page, "items")) == (4, ["sl-001"])

    one = client.get("/api/v1/device-status/mc-001", headers=h).json()
    assert one["online"] is True and one["fw"] == "1.4.2" and one["open_incidents"] == 1
    assert one["last_values"] == {"tilt_deg": 1.5, "cover_open": False}  # ts and seq left out
    assert one["building"] == "3" and one["lifecycle"] == "in_service"
    silent = client.get("/api/v1/device-status/mc-002", headers=h).json()
    assert silent["online"] is None and silent["last_seen"] is None and silent["last_values"] is None
    assert client.get("/api/v1/device-status/sl-001", headers=h).json()["last_values"] is None  # a status

    assert client.get("/api/v1/device-status/mc-009", headers=h).status_code == 404
    assert client.get("/api/v1/device-status/nope", headers=h).status_code == 404
    assert client.get(f"/api/v1/device-status?community={B}", headers=h).status_code == 403
    assert client.get("/api/v1/device-status", headers=auth(engine, "installer")).status_code == 403
    everyone = client.get("/api/v1/device-status", headers=auth(engine, "viewer")).json()
    assert everyone["total"] == 5


# -- overview --------------------------------------------------------------------------------------------


def test_overview_counts_devices_and_open_incidents_per_group_in_scope(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    raise_incident(engine, place["mc-001"], urgency="P1")
    raise_incident(engine, place["sl-001"], urgency="P3", rule_id="streetlight.leakage")
    raise_incident(engine, place["mc-009"], urgency="P2")
    raise_incident(engine, place["mc-002"], urgency="P2")  # commissioning: not counted

    everything = client.get("/api/v1/overview", headers=auth(engine, "viewer")).json()
    assert [r["key"] for r in everything["rows"]] == [{"community": A}, {"community": B}]
    a = everything["rows"][0]
    assert (a["devices"]["total"], a["devices"]["online"], a["devices"]["offline"]) == (4, 1, 1)
    assert a["devices"]["unknown"] == 2
    assert a["devices"]["by_lifecycle"]["retired"] == {"total": 1, "online": 0, "offline": 0, "unknown": 1}
    assert a["devices"]["by_lifecycle"]["in_service"]["online"] == 1
    assert a["incidents"]["open"] == 2
    assert a["incidents"]["by_urgency"] == {"P1": 1, "P2": 0, "P3": 1, "P4": 0}
    assert everything["totals"]["incidents"]["open"] == 3 and everything["totals"]["devices"]["total"] == 5

    h = auth(engine, "manager", A)
    mine = client.get("/api/v1/overview", headers=h).json()
    assert [r["key"] for r in mine["rows"]] == [{"community": A}]
    assert mine["totals"]["incidents"]["open"] == 2

    buildings = client.get("/api/v1/overview?by=building", headers=h).json()
    keyed = {(r["key"]["grid_code"], r["key"]["building"]): r for r in buildings["rows"]}
    assert set(keyed) == {(GRID_A1, "3"), (GRID_A1, "5"), (GRID_A2, "3")}
    assert keyed[(GRID_A1, "3")]["incidents"]["by_urgency"]["P1"] == 1
    assert keyed[(GRID_A2, "3")]["incidents"]["by_urgency"]["P3"] == 1
    assert keyed[(GRID_A1, "5")]["incidents"]["open"] == 0

    types = client.get("/api/v1/overview?by=type", headers=h).json()
    by_type = {r["key"]["device_type"]: r for r in types["rows"]}
    assert by_type["streetlight"]["devices"]["offline"] == 1
    assert by_type["manhole_cover"]["incidents"]["open"] == 1

    grids = client.get(f"/api/v1/overview?by=grid&grid_code={GRID_A2}", headers=h).json()
    assert [r["key"] for r in grids["rows"]] == [{"community": A, "grid_code": GRID_A2}]
    assert client.get(f"/api/v1/overview?community={B}", headers=h).status_code == 403
    assert client.get("/api/v1/overview?by=street", headers=h).status_code == 422


def test_overview_counts_incidents_by_status(
    engine: Engine, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    """Open ones split into acknowledged or not; resolved ones counted since `resolved_since`."""
    acked = raise_incident(engine, place["mc-001"], 0, "P1")
    raise_incident(engine, place["sl-001"], 1, "P3", "streetlight.leakage")
    raise_incident(engine, place["mc-005"], 2, "P2")
    raise_incident(engine, place["mc-009"], 3, "P2")  # community B
    h = auth(engine, "manager", A)
    assert client.post(f"/api/v1/incidents/{acked}/ack", headers=h).status_code == 200
    store = IncidentStore(engine, ["city", "mqtt"])
    cleared = replace(verdict("cleared", device_id="mc-005", tilt=1.0), community=A)
    assert store.apply(cleared, place["mc-005"], at(30)) is not None

    def by_status(**params: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        r = client.get("/api/v1/overview", params={"by": "grid", **params}, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        return body["totals"]["incidents"]["by_status"], {
            row["key"]["grid_code"]: row["incidents"]["by_status"] for row in body["rows"]
        }

    totals, grids = by_status(resolved_since=at(10).isoformat())
    assert totals == {"unacknowledged": 1, "acknowledged": 1, "resolved": 1}
    assert grids[GRID_A1] == {"unacknowledged": 0, "acknowledged": 1, "resolved": 1}
    assert grids[GRID_A2] == {"unacknowledged": 1, "acknowledged": 0, "resolved": 0}
    totals, _ = by_status(resolved_since=at(31).isoformat())  # resolved before that: not counted
    assert totals == {"unacknowledged": 1, "acknowledged": 1, "resolved": 0}
    bad = client.get("/api/v1/overview?resolved_since=yesterday-ish", headers=h)
    assert bad.status_code == 422 and "resolved_since" in bad.text


# -- readings: what is answered before InfluxDB is asked, and when it cannot answer -----------------------


def use_influx(app: FastAPI, handler: Any) -> list[httpx.Request]:
    """Point the app's readings at a fake InfluxDB (`handler`); returns the requests it got."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        result: httpx.Response = handler(request)
        return result

    reader = InfluxReader("http://influx.invalid", "sc", transport=httpx.MockTransport(record))
    app.state.services = dataclasses.replace(app.state.services, readings=reader)
    return seen


def test_readings_refuse_unknown_fields_bad_ranges_and_too_many_points(
    engine: Engine, app: FastAPI, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    asked = use_influx(app, lambda _r: httpx.Response(200, json={"results": [{"statement_id": 0}]}))
    h = auth(engine, "manager", A)
    url = "/api/v1/devices/mc-001/readings"

    r = client.get(url, params={"field": "water_level_cm,lamp_on"}, headers=h)
    assert r.status_code == 422 and "'lamp_on'" in r.json()["detail"] and "tilt_deg" in r.json()["detail"]
    r = client.get(url, params={"since": "1h", "until": "2h"}, headers=h)
    assert r.status_code == 422 and "before until" in r.json()["detail"]
    r = client.get(url, params={"since": "500d"}, headers=h)
    assert r.status_code == 422 and "400 days" in r.json()["detail"]
    r = client.get(url, params={"points": 2001}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.points"
    assert client.get(url, params={"since": "soon"}, headers=h).status_code == 422
    assert asked == []  # none of these reached InfluxDB

    assert client.get("/api/v1/devices/mc-009/readings", headers=h).status_code == 404
    assert client.get("/api/v1/devices/nope/readings", headers=h).status_code == 404
    assert client.get(url, headers=auth(engine, "installer")).status_code == 403

    ok = client.get(url, params=[("field", "water_level_cm"), ("field", "cover_open")], headers=h)
    assert ok.status_code == 200, ok.text
    assert ok.json()["points"] == [] and ok.json()["fields"] == {
        "water_level_cm": {"unit": "cm", "kind": "float", "aggregate": "mean"},
        "cover_open": {"unit": "", "kind": "bool", "aggregate": "last"},
    }
    q = dict(httpx.QueryParams(asked[0].content.decode()))
    assert q["db"] == "sc" and 'mean("water_level_cm")' in q["q"] and 'last("cover_open")' in q["q"]
    assert "device_id = 'mc-001'" in q["q"]


def test_readings_answer_503_when_influxdb_is_down_and_502_when_it_refuses(
    engine: Engine, app: FastAPI, client: TestClient, place: dict[str, RegisteredDevice]
) -> None:
    h = auth(engine, "viewer")

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    use_influx(app, down)
    r = client.get("/api/v1/devices/mc-001/readings", headers=h)
    assert r.status_code == 503 and "unreachable" in r.json()["detail"] and r.headers["retry-after"]
    use_influx(app, lambda _r: httpx.Response(401, json={"error": "authorization failed"}))
    r = client.get("/api/v1/devices/mc-001/readings", headers=h)
    assert r.status_code == 502 and "authorization failed" in r.json()["detail"]
    use_influx(app, lambda _r: httpx.Response(200, json={"results": [{"error": "database not found: sc"}]}))
    assert client.get("/api/v1/devices/mc-001/readings", headers=h).json()["points"] == []


def test_the_downsampling_plan_puts_at_most_points_buckets_from_since() -> None:
    since = dt.datetime(2026, 11, 21, 7, 30, 10, tzinfo=dt.UTC)
    window = plan(since, since + dt.timedelta(hours=24), 300)
    assert window.interval_ms == 288_000 and window.buckets == 300
    assert (int(since.timestamp() * 1000) - window.offset_ms) % window.interval_ms == 0
    assert plan(since, since + dt.timedelta(seconds=10), 300).interval_ms == 1000  # at least 1 s
    assert plan(since, since + dt.timedelta(hours=1), 7).buckets <= 7
    q = downsample_query("manhole_cover", "mc-'1", {"tilt_deg": "mean"}, Window(since, since, 1000))
    assert "device_id = 'mc-\\'1'" in q and 'FROM "manhole_cover"' in q and "fill(none)" in q
