"""The incidents routes over HTTP against a real SQLite database: the incident system's back-channel,
listing and reading with community scope, acknowledging, false-alarm counts, and their 4xx answers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine

from api.app import create_app
from api.auth import ApiKeyStore, Scope
from api.settings import ApiSettings
from gateway.db import make_engine, migrate
from gateway.incident_store import IncidentStore
from tests.integration.test_incident_store import at, device, verdict

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

COMMUNITY = "110101001001"  # the test device's community


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(ApiSettings(incident_mqtt=True), engine=engine, issuer=None)) as c:
        yield c


def auth(engine: Engine, role: str, scope: Scope | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {ApiKeyStore(engine).create(f'{role} key', role, scope)[1]}"}


def open_incident(engine: Engine, device_id: str = "mc-001", urgency: str = "P2") -> str:
    store = IncidentStore(engine, ["city", "mqtt"])
    inc, _ = (
        store.apply(verdict(device_id=device_id, urgency=urgency), device(device_id), at(0)) or pytest.fail()
    )
    return inc.incident_id


def test_the_incident_system_reports_progress_and_closes_a_case(engine: Engine, client: TestClient) -> None:
    iid = open_incident(engine)
    h = auth(engine, "incident_system")
    r = client.post(
        f"/api/v1/incidents/{iid}/reports",
        json={"status": "dispatched", "report_id": "CASE-1#1", "case_id": "CASE-1"},
        headers=h,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] is True
    assert body["incident"]["status"] == "dispatched" and body["incident"]["case_id"] == "CASE-1"
    assert body["incident"]["acknowledged_by"] == "incident_system"
    # a retried report is recognised
    again = client.post(
        f"/api/v1/incidents/{iid}/reports", json={"status": "dispatched", "report_id": "CASE-1#1"}, headers=h
    )
    assert again.status_code == 200 and again.json()["accepted"] is False

    closed = client.post(
        f"/api/v1/incidents/{iid}/reports", json={"status": "closed", "note": "已处置"}, headers=h
    )
    assert closed.json()["incident"]["resolution"] == "closed"
    assert closed.json()["incident"]["resolved_at"] is not None

    admin = auth(engine, "admin")
    detail = client.get(f"/api/v1/incidents/{iid}", headers=admin).json()
    assert [x["event_type"] for x in detail["history"]] == [
        "opened",
        "reported:dispatched",
        "reported:closed",
    ]
    assert [x["status"] for x in detail["reports"]] == ["dispatched", "closed"]
    assert detail["reports"][1]["note"] == "已处置"
    assert client.get("/api/v1/incidents", headers=admin).json() == {"total": 0, "incidents": []}
    listed = client.get("/api/v1/incidents?status=resolved", headers=admin).json()
    assert [i["incident_id"] for i in listed["incidents"]] == [iid]


def test_false_alarms_are_visible_to_whoever_tunes_the_rules(engine: Engine, client: TestClient) -> None:
    h = auth(engine, "incident_system")
    for dev in ("mc-001", "mc-001", "mc-002"):
        iid = open_incident(engine, dev)
        assert client.post(
            f"/api/v1/incidents/{iid}/reports", json={"status": "false_alarm"}, headers=h
        ).is_success
    r = client.get("/api/v1/false-alarms", headers=auth(engine, "installer"))
    assert [(x["rule_id"], x["device_id"], x["count"]) for x in r.json()] == [
        ("manhole_cover.tilt", "mc-001", 2),
        ("manhole_cover.tilt", "mc-002", 1),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "finished"}, "status"),
        ({}, "status"),
        ({"status": "closed", "report_id": ""}, "report_id"),
        ({"status": "closed", "colour": "red"}, "colour"),
        ({"status": "closed", "reported_at": "yesterday"}, "reported_at"),
    ],
)
def test_bad_reports_are_422_naming_the_field(
    engine: Engine, client: TestClient, body: dict[str, object], field: str
) -> None:
    iid = open_incident(engine)
    r = client.post(f"/api/v1/incidents/{iid}/reports", json=body, headers=auth(engine, "incident_system"))
    assert r.status_code == 422
    assert any(field in e["field"] for e in r.json()["errors"]), r.json()


def test_who_may_do_what(engine: Engine, client: TestClient) -> None:
    iid = open_incident(engine)
    report = {"status": "dispatched"}
    assert client.post(f"/api/v1/incidents/{iid}/reports", json=report).status_code == 401
    for role in ("installer", "manager", "viewer"):
        r = client.post(f"/api/v1/incidents/{iid}/reports", json=report, headers=auth(engine, role))
        assert r.status_code == 403 and "incident_system" in r.json()["detail"]
    assert (
        client.post(f"/api/v1/incidents/{iid}/ack", headers=auth(engine, "incident_system")).status_code
        == 403
    )
    assert client.get("/api/v1/false-alarms", headers=auth(engine, "manager")).status_code == 403
    unknown = client.post(
        "/api/v1/incidents/INC-20261121-999999/reports", json=report, headers=auth(engine, "incident_system")
    )
    assert unknown.status_code == 404 and "INC-20261121-999999" in unknown.json()["detail"]


def test_a_manager_sees_and_acknowledges_only_their_communities(engine: Engine, client: TestClient) -> None:
    mine = open_incident(engine, "mc-001", urgency="P1")
    store = IncidentStore(engine, ["city"])
    other_dev = replace(device("mc-009"), community="other")
    other_v = replace(verdict(device_id="mc-009"), community="other")
    other, _ = store.apply(other_v, other_dev, at(0)) or pytest.fail()

    h = auth(engine, "manager", Scope(communities=(COMMUNITY,)))
    listed = client.get("/api/v1/incidents", headers=h).json()
    assert [i["incident_id"] for i in listed["incidents"]] == [mine] and listed["total"] == 1
    assert client.get(f"/api/v1/incidents/{other.incident_id}", headers=h).status_code == 404
    assert client.get("/api/v1/incidents?community=other", headers=h).status_code == 403
    assert client.post(f"/api/v1/incidents/{other.incident_id}/ack", headers=h).status_code == 404

    acked = client.post(f"/api/v1/incidents/{mine}/ack", headers=h).json()
    assert acked["acknowledged_at"] is not None and acked["acknowledged_by"].startswith("user:apikey:")
    # everyone with the unscoped view sees both, P1 first
    everything = client.get("/api/v1/incidents", headers=auth(engine, "viewer")).json()
    assert [i["incident_id"] for i in everything["incidents"]] == [mine, other.incident_id]
