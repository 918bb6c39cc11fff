"""The installers' routes against a real SQLite registry, with the broker's account administration faked
(the real broker is in tests/integration/test_api_installers.py): every route's happy path and every bad
input's 4xx and message, and no half-registered device when credentials cannot be issued."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import secrets
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from api.app import create_app
from api.auth import ApiKeyStore, Scope
from api.settings import ApiSettings
from gateway.broker_admin import BrokerAdminError, DeviceBatchError
from gateway.db import make_engine, migrate
from gateway.deadletter import DeadLetter, DeadLetterStore, DeviceStateStore, StatusUpdate
from gateway.registry import Registry

with warnings.catch_warnings():
    # starlette asks for httpx2 instead of httpx; the TestClient works the same with httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

T0 = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)
GRID = "110101001001001"


class FakeBroker:
    """What BrokerAdmin does with accounts, in memory, with the plugin's error words. `down` makes every
    command fail like an unreachable broker; `refuse` makes createClient fail for those ids."""

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, Any]] = {}
        self.down = False
        self.refuse: dict[str, str] = {}
        self.batches: list[int] = []

    def _up(self) -> None:
        if self.down:
            raise BrokerAdminError("connect", "127.0.0.1:1883: [Errno 111] Connection refused")

    def _account(self, command: str, username: str) -> dict[str, Any]:
        self._up()
        if username not in self.accounts:
            raise BrokerAdminError(command, "Client not found")
        return self.accounts[username]

    def create_device(self, device_id: str, device_type: str) -> str:
        self._up()
        if device_id in self.refuse:
            raise BrokerAdminError("createClient", self.refuse[device_id])
        if device_id in self.accounts:
            raise BrokerAdminError("createClient", "Client already exists")
        password = secrets.token_urlsafe(12)
        self.accounts[device_id] = {"type": device_type, "password": password, "disabled": False}
        return password

    def create_devices(self, devices: Iterable[tuple[str, str]]) -> dict[str, str]:
        self._up()
        items = list(devices)
        self.batches.append(len(items))
        existing = [d for d, _ in items if d in self.accounts]
        if existing:
            raise BrokerAdminError("createClient", f"Client already exists: {', '.join(existing)}")
        created: dict[str, str] = {}
        errors: dict[str, str] = {}
        for device_id, device_type in items:
            if device_id in self.refuse:
                errors[device_id] = self.refuse[device_id]
            else:
                created[device_id] = self.create_device(device_id, device_type)
        if errors:
            raise DeviceBatchError(errors, created)
        return created

    def rotate_password(self, username: str) -> str:
        account = self._account("setClientPassword", username)
        account["password"] = secrets.token_urlsafe(12)
        return str(account["password"])

    def disable(self, username: str) -> None:
        self._account("disableClient", username)["disabled"] = True

    def enable(self, username: str) -> None:
        self._account("enableClient", username)["disabled"] = False

    def delete(self, username: str) -> None:
        self._account("deleteClient", username)
        del self.accounts[username]

    def exists(self, username: str) -> bool:
        self._up()
        return username in self.accounts


@dataclass
class Api:
    client: TestClient
    engine: Engine
    broker: FakeBroker
    key: str
    registry: Registry

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers=self.headers, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.client.post(path, headers=self.headers, json=body, **kw)

    def patch(self, path: str, body: Any) -> Any:
        return self.client.patch(path, headers=self.headers, json=body)

    def create(self, device_id: str, device_type: str = "parking_sensor", **fields: Any) -> dict[str, Any]:
        body = {
            "device_id": device_id,
            "device_type": device_type,
            "community": "东华门社区",
            "grid_code": GRID,
        }
        r = self.post("/api/v1/devices", {**body, **fields})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def import_csv(self, text: str, **params: Any) -> Any:
        return self.client.post(
            "/api/v1/devices/import",
            headers={**self.headers, "Content-Type": "text/csv; charset=utf-8"},
            content=text.encode(),
            params=params,
        )


@contextlib.contextmanager
def make_api(tmp_path: Path, **settings: Any) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    migrate(url)
    engine = make_engine(url)
    broker = FakeBroker()
    app = create_app(ApiSettings(database_url=url, **settings), engine=engine, issuer=broker)
    _, key = ApiKeyStore(engine).create("test installer", "installer")
    with TestClient(app) as client:
        yield Api(client, engine, broker, key, Registry(engine))
    engine.dispose()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with make_api(tmp_path) as api:
        yield api


def detail(r: Any) -> str:
    return str(r.json()["detail"])


# ---------------------------------------------------------------------------------------------
# Create


def test_create_registers_the_device_and_returns_its_credentials_once(api: Api) -> None:
    out = api.create(
        "mh-1",
        "manhole_cover",
        component_code="1101010101000001",
        install_date="2026-11-20",
        firmware="1.4.2",
        batch="b1",
        attributes={"owner_class": "0101", "depth_cm": "180"},
    )
    device, creds = out["device"], out["credentials"]
    assert device["lifecycle"] == "registered" and device["install_date"] == "2026-11-20"
    assert device["attributes"] == {"owner_class": "0101", "depth_cm": 180.0}
    assert creds["username"] == creds["client_id"] == "mh-1"
    assert creds["password"] == api.broker.accounts["mh-1"]["password"]
    assert api.broker.accounts["mh-1"]["type"] == "manhole_cover"
    shown = api.get("/api/v1/devices/mh-1").json()
    assert "password" not in json.dumps(shown) and shown["state"] is None
    (event,) = api.get("/api/v1/devices/mh-1/history").json()
    assert event["action"] == "created" and event["detail"] == {"credentials": "issued"}
    assert event["actor"].endswith("test installer")


def test_create_without_credentials(api: Api) -> None:
    r = api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
        params={"issue_credentials": "false"},
    )
    assert r.status_code == 201 and r.json()["credentials"] is None
    assert api.broker.accounts == {}


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"grid_code": "1101"}, "body.grid_code", "must be 14 or 15 digits"),
        (
            {"component_code": "1101010901000001"},
            "body.component_code",
            "major class 09 is not a component class",
        ),
        ({"device_type": "parking"}, "body.device_type", "unknown device type (known: manhole_cover"),
        ({"device_id": "pk 1"}, "body.device_id", "must be 1 to 64 characters of A-Z a-z 0-9 _ -"),
        (
            {"attributes": {"depth_cm": 3}},
            "body.attributes",
            "unknown attribute 'depth_cm' for parking_sensor",
        ),
        ({"lat": 91}, "body.lat", "Input should be less than or equal to 90"),
        ({"lat": "north"}, "body.lat", "Input should be a valid number"),
        ({"install_date": "yesterday"}, "body.install_date", "Input should be a valid date"),
        ({"colour": "red"}, "body.colour", "unknown field"),
        ({"community": " "}, "body.community", "is required"),
    ],
)
def test_create_with_a_bad_field_is_422_naming_it(
    api: Api, change: dict[str, Any], field: str, message: str
) -> None:
    body = {
        "device_id": "pk-1",
        "device_type": "parking_sensor",
        "community": "c",
        "grid_code": GRID,
        **change,
    }
    r = api.post("/api/v1/devices", body)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and message in e["message"] for e in errors), errors
    assert detail(r).startswith("invalid request: ") and field in detail(r)
    assert api.registry.count() == 0 and api.broker.accounts == {}


def test_create_with_a_required_field_missing_is_422(api: Api) -> None:
    r = api.post("/api/v1/devices", {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c"})
    assert r.status_code == 422
    assert r.json()["errors"] == [{"field": "body.grid_code", "message": "is required"}]


def test_create_with_no_body_is_422(api: Api) -> None:
    r = api.client.post("/api/v1/devices", headers=api.headers)
    assert r.status_code == 422 and r.json()["errors"][0] == {"field": "body", "message": "is required"}


def test_create_twice_is_409_and_keeps_the_first(api: Api) -> None:
    first = api.create("pk-1")
    r = api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "streetlight", "community": "x", "grid_code": GRID},
    )
    assert r.status_code == 409 and detail(r) == "device 'pk-1' is already registered"
    assert api.broker.accounts["pk-1"]["password"] == first["credentials"]["password"]


def test_a_retired_id_is_not_reused(api: Api) -> None:
    api.create("pk-1")
    api.post("/api/v1/devices/pk-1/retire")
    r = api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
    )
    assert (
        r.status_code == 409
        and detail(r) == "device 'pk-1' is already registered (retired: a retired id is not reused)"
    )


def test_broker_down_is_503_and_nothing_is_registered(api: Api) -> None:
    api.broker.down = True
    r = api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "10"
    assert detail(r).startswith("device 'pk-1' was not registered: could not issue its MQTT credentials")
    assert "Connection refused" in detail(r)
    api.broker.down = False
    assert api.get("/api/v1/devices/pk-1").status_code == 404
    assert api.registry.current_version() == 0 and api.broker.accounts == {}
    assert api.create("pk-1")["credentials"] is not None  # and it can be done again


def test_a_duplicate_is_409_even_with_the_broker_down(api: Api) -> None:
    api.create("pk-1")
    api.broker.down = True
    r = api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
    )
    assert r.status_code == 409 and detail(r) == "device 'pk-1' is already registered"


def test_broker_refusing_is_502_and_nothing_is_registered(api: Api) -> None:
    api.broker.refuse["pk-1"] = "Quota exceeded"
    r = api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
    )
    assert r.status_code == 502 and "the broker refused createClient: Quota exceeded" in detail(r)
    assert api.registry.count() == 0


def test_a_failed_commit_deletes_the_account_again(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_log(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Registry, "_log", staticmethod(broken_log))
    with pytest.raises(RuntimeError, match="disk full"):
        api.post(
            "/api/v1/devices",
            {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
        )
    monkeypatch.undo()
    assert api.registry.count() == 0 and api.broker.accounts == {}


def test_an_account_left_without_a_registry_row_is_replaced(api: Api) -> None:
    api.broker.create_device("pk-1", "streetlight")  # e.g. from a registration whose undo failed
    out = api.create("pk-1")
    assert api.broker.accounts["pk-1"] == {
        "type": "parking_sensor",
        "password": out["credentials"]["password"],
        "disabled": False,
    }


# ---------------------------------------------------------------------------------------------
# Read


def test_list_filters_and_pages(api: Api) -> None:
    api.create("a-1", "streetlight", batch="b1")
    api.create("a-2", batch="b1")
    api.create("a-3", batch="b2", community="西华门社区")
    page = api.get("/api/v1/devices", params={"limit": 2}).json()
    assert [d["device_id"] for d in page["items"]] == ["a-1", "a-2"] and page["total"] == 3
    page = api.get("/api/v1/devices", params={"limit": 2, "offset": 2}).json()
    assert [d["device_id"] for d in page["items"]] == ["a-3"]
    assert [d["device_id"] for d in api.get("/api/v1/devices", params={"batch": "b1"}).json()["items"]] == [
        "a-1",
        "a-2",
    ]
    assert api.get("/api/v1/devices", params={"type": "streetlight"}).json()["total"] == 1
    assert api.get("/api/v1/devices", params={"community": "西华门社区"}).json()["total"] == 1
    assert api.get("/api/v1/devices", params={"lifecycle": "online"}).json()["total"] == 0
    assert api.get("/api/v1/devices", params={"grid_code": GRID}).json()["total"] == 3


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"limit": 0}, "query.limit", "Input should be greater than or equal to 1"),
        ({"limit": 1001}, "query.limit", "Input should be less than or equal to 1000"),
        ({"offset": -1}, "query.offset", "Input should be greater than or equal to 0"),
        ({"lifecycle": "broken"}, "query.lifecycle", "Input should be 'registered', 'online'"),
    ],
)
def test_bad_list_parameters_are_422(api: Api, params: dict[str, Any], field: str, message: str) -> None:
    r = api.get("/api/v1/devices", params=params)
    assert r.status_code == 422
    (error,) = r.json()["errors"]
    assert error["field"] == field and message in error["message"]


def test_unknown_device_is_404_on_every_device_route(api: Api) -> None:
    for method, path, body in [
        ("GET", "/api/v1/devices/nope", None),
        ("PATCH", "/api/v1/devices/nope", {"building": "1"}),
        ("POST", "/api/v1/devices/nope/move", {"community": "c", "grid_code": GRID}),
        ("POST", "/api/v1/devices/nope/disable", None),
        ("POST", "/api/v1/devices/nope/enable", None),
        ("POST", "/api/v1/devices/nope/retire", None),
        ("POST", "/api/v1/devices/nope/confirm", None),
        ("POST", "/api/v1/devices/nope/credentials/rotate", None),
        ("GET", "/api/v1/devices/nope/history", None),
    ]:
        r = api.client.request(method, path, headers=api.headers, json=body)
        assert r.status_code == 404, (method, path)
        assert detail(r) == "device 'nope' is not registered"


def test_one_device_shows_what_the_gateway_saw(api: Api) -> None:
    api.create("mh-1", "manhole_cover")
    payload = json.dumps({"ts": 1, "seq": 3, "tilt_deg": 0.5}).encode()
    DeviceStateStore(api.engine).record_many(
        [
            StatusUpdate(
                "mh-1",
                True,
                T0,
                "1.4.2",
                True,
                seq=3,
                last_topic="sc/v1/manhole_cover/mh-1/telemetry",
                last_payload=payload,
            )
        ]
    )
    DeviceStateStore(api.engine).add_seen_fields({"mh-1": ["tilt_deg"]})
    state = api.get("/api/v1/devices/mh-1").json()["state"]
    assert state["online"] is True and state["fw"] == "1.4.2" and state["last_seq"] == 3
    assert state["last_payload"] == {"ts": 1, "seq": 3, "tilt_deg": 0.5}
    assert state["last_topic"] == "sc/v1/manhole_cover/mh-1/telemetry"
    assert state["seen_fields"] == ["tilt_deg"] and state["missing_fields"] == ["cover_open", "battery_pct"]


# ---------------------------------------------------------------------------------------------
# Change and move


def test_patch_changes_only_what_is_sent_and_merges_attributes(api: Api) -> None:
    api.create("pk-1", building="B1", attributes={"bay_kind": "time_limited", "time_limit_min": 60})
    r = api.patch("/api/v1/devices/pk-1", {"firmware": "2.0", "attributes": {"time_limit_min": 120}})
    assert r.status_code == 200 and r.json()["changed"] is True
    device = r.json()["device"]
    assert device["building"] == "B1" and device["firmware"] == "2.0" and device["version"] == 2
    assert device["attributes"] == {"bay_kind": "time_limited", "time_limit_min": 120.0}
    device = api.patch(
        "/api/v1/devices/pk-1",
        {"building": None, "attributes": {"time_limit_min": None, "bay_kind": "normal"}},
    ).json()["device"]
    assert device["building"] is None and device["attributes"] == {"bay_kind": "normal"}


def test_patch_with_nothing_new_changes_nothing(api: Api) -> None:
    api.create("pk-1", building="B1")
    r = api.patch("/api/v1/devices/pk-1", {"building": "B1", "device_type": "parking_sensor"})
    assert r.json()["changed"] is False and r.json()["device"]["version"] == 1
    assert api.registry.current_version() == 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"device_type": "streetlight"},
            409,
            "device_type cannot change (is 'parking_sensor'): retire the device and register a new id",
        ),
        ({"grid_code": "12"}, 422, "body.grid_code: must be 14 or 15 digits (got '12')"),
        ({"community": None}, 422, "body.community: is required"),
        (
            {"component_code": "1101010901000001"},
            422,
            "body.component_code: major class 09 is not a component class",
        ),
        ({"attributes": {"bay_kind": "vip"}}, 422, "body.attributes: bay_kind must be one of"),
        ({"device_id": "other"}, 422, "body.device_id: unknown field"),
        ({"lifecycle": "in_service"}, 422, "body.lifecycle: unknown field"),
    ],
)
def test_bad_patches(api: Api, body: dict[str, Any], status: int, message: str) -> None:
    api.create("pk-1")
    r = api.patch("/api/v1/devices/pk-1", body)
    assert r.status_code == status, r.text
    assert message in detail(r)
    assert api.registry.current_version() == 1


def test_move_replaces_the_place_and_the_history_keeps_the_old_one(api: Api) -> None:
    api.create("pk-1", building="B1", lat=39.9, lon=116.4, address="old street 1")
    r = api.post(
        "/api/v1/devices/pk-1/move",
        {"community": "西华门社区", "grid_code": "110101001002003", "building": "7"},
    )
    assert r.status_code == 200 and r.json()["changed"]
    device = r.json()["device"]
    assert (device["community"], device["grid_code"], device["building"]) == (
        "西华门社区",
        "110101001002003",
        "7",
    )
    assert device["lat"] is None and device["address"] is None
    moved = api.get("/api/v1/devices/pk-1/history").json()[0]
    assert moved["action"] == "moved"
    assert moved["detail"]["changed"]["community"] == ["东华门社区", "西华门社区"]
    assert moved["detail"]["changed"]["lat"] == [39.9, None]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"grid_code": GRID}, "body.community: is required"),
        ({"community": "c", "grid_code": "1"}, "body.grid_code: must be 14 or 15 digits"),
        ({"community": "c", "grid_code": GRID, "firmware": "2"}, "body.firmware: unknown field"),
        (
            {"community": "c", "grid_code": GRID, "lon": 200},
            "body.lon: Input should be less than or equal to 180",
        ),
    ],
)
def test_bad_moves_are_422(api: Api, body: dict[str, Any], message: str) -> None:
    api.create("pk-1")
    r = api.post("/api/v1/devices/pk-1/move", body)
    assert r.status_code == 422 and message in detail(r)


# ---------------------------------------------------------------------------------------------
# Lifecycle


def test_disable_cuts_the_device_off_and_enable_brings_it_back(api: Api) -> None:
    api.create("pk-1")
    r = api.post("/api/v1/devices/pk-1/disable")
    assert r.status_code == 200 and r.json()["changed"] and r.json()["device"]["lifecycle"] == "disabled"
    assert api.broker.accounts["pk-1"]["disabled"] is True
    assert api.post("/api/v1/devices/pk-1/disable").json()["changed"] is False
    r = api.post("/api/v1/devices/pk-1/enable")
    assert (
        r.json()["device"]["lifecycle"] == "registered" and api.broker.accounts["pk-1"]["disabled"] is False
    )
    assert api.post("/api/v1/devices/pk-1/enable").json()["changed"] is False


def test_enable_returns_to_online_when_heard_from_and_to_in_service_when_it_was(api: Api) -> None:
    api.create("pk-1")
    api.create("pk-2")
    DeviceStateStore(api.engine).record_many([StatusUpdate("pk-1", True, T0, None, True)])
    api.registry.mark_online(["pk-1"])
    api.post("/api/v1/devices/pk-2/confirm")
    for device_id, back in (("pk-1", "online"), ("pk-2", "in_service")):
        api.post(f"/api/v1/devices/{device_id}/disable")
        assert api.post(f"/api/v1/devices/{device_id}/enable").json()["device"]["lifecycle"] == back


def test_disable_with_the_broker_down_is_503_and_changes_nothing(api: Api) -> None:
    api.create("pk-1")
    api.broker.down = True
    r = api.post("/api/v1/devices/pk-1/disable")
    assert r.status_code == 503 and "the broker did not answer" in detail(r)
    api.broker.down = False
    assert api.get("/api/v1/devices/pk-1").json()["lifecycle"] == "registered"


def test_a_device_without_an_account_can_be_disabled_enabled_and_retired(api: Api) -> None:
    api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
        params={"issue_credentials": "false"},
    )
    for action, lifecycle in (("disable", "disabled"), ("enable", "registered"), ("retire", "retired")):
        r = api.post(f"/api/v1/devices/pk-1/{action}")
        assert r.status_code == 200 and r.json()["device"]["lifecycle"] == lifecycle


def test_retire_deletes_the_account_and_is_final(api: Api) -> None:
    api.create("pk-1")
    r = api.post("/api/v1/devices/pk-1/retire")
    assert r.status_code == 200 and r.json()["device"]["lifecycle"] == "retired"
    assert "pk-1" not in api.broker.accounts
    assert api.post("/api/v1/devices/pk-1/retire").json()["changed"] is False
    for method, path, body in [
        ("POST", "/api/v1/devices/pk-1/enable", None),
        ("POST", "/api/v1/devices/pk-1/disable", None),
        ("POST", "/api/v1/devices/pk-1/confirm", None),
        ("PATCH", "/api/v1/devices/pk-1", {"building": "1"}),
        ("POST", "/api/v1/devices/pk-1/move", {"community": "c", "grid_code": GRID}),
        ("POST", "/api/v1/devices/pk-1/credentials/rotate", None),
    ]:
        r = api.client.request(method, path, headers=api.headers, json=body)
        assert r.status_code == 409, (method, path)
        assert detail(r).startswith("device 'pk-1' is retired")


def test_confirm_puts_a_device_in_service(api: Api) -> None:
    api.create("pk-1")
    r = api.post("/api/v1/devices/pk-1/confirm")
    device = r.json()["device"]
    assert device["lifecycle"] == "in_service" and device["in_service_at"] is not None
    assert api.post("/api/v1/devices/pk-1/confirm").json()["changed"] is False
    (confirmed, *_) = api.get("/api/v1/devices/pk-1/history").json()
    assert confirmed["action"] == "confirmed" and confirmed["detail"] == {
        "from": "registered",
        "to": "in_service",
    }


def test_confirming_a_disabled_device_is_409(api: Api) -> None:
    api.create("pk-1")
    api.post("/api/v1/devices/pk-1/disable")
    r = api.post("/api/v1/devices/pk-1/confirm")
    assert r.status_code == 409 and detail(r) == "device 'pk-1' is disabled: enable it before confirming it"


def test_rotate_gives_a_new_password(api: Api) -> None:
    old = api.create("pk-1")["credentials"]["password"]
    r = api.post("/api/v1/devices/pk-1/credentials/rotate")
    new = r.json()["credentials"]["password"]
    assert r.status_code == 200 and new != old and api.broker.accounts["pk-1"]["password"] == new
    assert api.get("/api/v1/devices/pk-1/history").json()[0]["action"] == "credentials_rotated"


def test_rotate_issues_credentials_to_a_device_that_has_none_disabled_if_it_is(api: Api) -> None:
    api.post(
        "/api/v1/devices",
        {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID},
        params={"issue_credentials": "false"},
    )
    api.post("/api/v1/devices/pk-1/disable")
    r = api.post("/api/v1/devices/pk-1/credentials/rotate")
    assert r.status_code == 200 and api.broker.accounts["pk-1"]["disabled"] is True
    assert api.get("/api/v1/devices/pk-1/history").json()[0]["action"] == "credentials_issued"


def test_rotate_with_the_broker_down_is_503(api: Api) -> None:
    api.create("pk-1")
    api.broker.down = True
    r = api.post("/api/v1/devices/pk-1/credentials/rotate")
    assert r.status_code == 503 and "Connection refused" in detail(r)


# ---------------------------------------------------------------------------------------------
# Import and export

CSV_HEADER = "device_id,device_type,community,grid_code,building,batch,attr.bay_kind\n"


def test_csv_import_reports_each_row_and_issues_credentials_to_the_created(api: Api) -> None:
    api.create("pk-0", building="old")
    r = api.import_csv(
        CSV_HEADER
        + f"pk-0,parking_sensor,东华门社区,{GRID},new,,\n"
        + f"pk-1,parking_sensor,东华门社区,{GRID},B1,b1,fire_lane\n"
        + f"pk-2,parking_sensr,东华门社区,{GRID},,,\n"
        + f"pk-1,parking_sensor,东华门社区,{GRID},B2,,\n"
        + f"sl-1,streetlight,东华门社区,{GRID},,b1,\n"
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["counts"] == {"created": 2, "updated": 1, "unchanged": 0, "error": 2} and not out["dry_run"]
    rows = {row["row"]: row for row in out["rows"]}
    assert [rows[i]["outcome"] for i in (2, 3, 4, 5, 6)] == [
        "updated",
        "created",
        "error",
        "error",
        "created",
    ]
    assert "device_type: unknown device type" in rows[4]["error"]
    assert rows[5]["error"] == "duplicate device_id 'pk-1': already on row 3"
    assert rows[2]["credentials"] is None and rows[4]["credentials"] is None
    assert rows[3]["credentials"]["password"] == api.broker.accounts["pk-1"]["password"]
    assert rows[6]["credentials"]["username"] == "sl-1"
    assert set(api.broker.accounts) == {"pk-0", "pk-1", "sl-1"}


def test_reimporting_the_same_rows_changes_nothing(api: Api) -> None:
    text = CSV_HEADER + f"pk-1,parking_sensor,c,{GRID},B1,b1,normal\n"
    api.import_csv(text)
    version = api.registry.current_version()
    again = api.import_csv(text).json()
    assert again["counts"] == {"created": 0, "updated": 0, "unchanged": 1, "error": 0}
    assert again["rows"][0]["credentials"] is None
    assert api.registry.current_version() == version


def test_dry_run_writes_nothing_and_issues_nothing(api: Api) -> None:
    r = api.import_csv(CSV_HEADER + f"pk-1,parking_sensor,c,{GRID},,,\n", dry_run="true")
    out = r.json()
    assert out["dry_run"] and out["version"] is None and out["rows"][0]["outcome"] == "created"
    assert out["rows"][0]["credentials"] is None
    assert api.registry.count() == 0 and api.broker.accounts == {}


def test_import_credentials_are_issued_in_batches(tmp_path: Path) -> None:
    with make_api(tmp_path, import_batch_size=2) as api:
        rows = "".join(f"pk-{i},parking_sensor,c,{GRID},,,\n" for i in range(5))
        assert api.import_csv(CSV_HEADER + rows).json()["counts"]["created"] == 5
        assert api.broker.batches == [2, 2, 1]


def test_json_import_takes_a_list_or_an_object_with_devices(api: Api) -> None:
    device = {"device_id": "pk-1", "device_type": "parking_sensor", "community": "c", "grid_code": GRID}
    r = api.post("/api/v1/devices/import", [device, {**device, "device_id": "pk 2"}])
    out = r.json()
    assert [row["outcome"] for row in out["rows"]] == ["created", "error"]
    assert out["rows"][1] == {
        "row": 2,
        "device_id": "pk 2",
        "outcome": "error",
        "error": "device_id: must be 1 to 64 characters of A-Z a-z 0-9 _ - (got 'pk 2')",
        "credentials": None,
    }
    r = api.post("/api/v1/devices/import", {"devices": [{**device, "building": "B9"}]})
    assert r.json()["rows"][0]["outcome"] == "updated"


def test_import_rows_for_retired_devices_or_another_type_are_errors(api: Api) -> None:
    api.create("pk-1")
    api.create("pk-2")
    api.post("/api/v1/devices/pk-2/retire")
    out = api.import_csv(
        CSV_HEADER + f"pk-1,streetlight,c,{GRID},,,\npk-2,parking_sensor,c,{GRID},,,\n"
    ).json()
    errors = [row["error"] for row in out["rows"]]
    assert errors == [
        "device_type cannot change (registered as parking_sensor): retire the device and register a new id",
        "device is retired: a retired id is not reused",
    ]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "message"),
    [
        ("text/plain", b"x", 415, "send the devices as text/csv or application/json (got 'text/plain')"),
        ("", b"x", 415, "(got 'no content type')"),
        ("application/json", b"[{", 422, "the body is not valid JSON: "),
        ("application/json", b'{"device_id": "x"}', 422, "expected a JSON array of device objects"),
        (
            "text/csv",
            "device_id,device_type\n井盖,manhole_cover\n".encode("gb18030"),
            422,
            "the CSV is not UTF-8 text",
        ),
        ("text/csv", b"", 422, "the file is empty: expected a header row naming the columns"),
        (
            "text/csv",
            b"device_id,device_type,community,grid_code,colour\n",
            422,
            "header row: unknown column(s) 'colour'",
        ),
        ("text/csv", b"device_id,device_type\n", 422, "missing required column(s) community, grid_code"),
    ],
)
def test_unusable_imports_are_refused_whole(
    api: Api, content_type: str, body: bytes, status: int, message: str
) -> None:
    headers = {**api.headers, **({"Content-Type": content_type} if content_type else {})}
    r = api.client.post("/api/v1/devices/import", headers=headers, content=body)
    assert r.status_code == status, r.text
    assert message in detail(r)
    assert api.registry.count() == 0


def test_an_import_larger_than_the_limit_is_413(tmp_path: Path) -> None:
    with make_api(tmp_path, api_max_import_bytes=1024) as api:
        r = api.import_csv(CSV_HEADER + "x" * 2000)
        assert r.status_code == 413 and "more than 1024: split it" in detail(r)


def test_import_with_the_broker_down_is_503_with_the_report_and_creates_nothing(api: Api) -> None:
    api.broker.down = True
    r = api.import_csv(CSV_HEADER + f"pk-1,parking_sensor,c,{GRID},,,\npk-2,parking_sensr,c,{GRID},,,\n")
    assert r.status_code == 503 and "Connection refused" in detail(r)
    rows = r.json()["report"]["rows"]
    assert rows[0]["outcome"] == "error" and rows[0]["error"].startswith(
        "not imported: could not issue credentials"
    )
    assert rows[1]["error"].startswith("device_type: unknown device type")
    api.broker.down = False
    assert api.registry.count() == 0 and api.broker.accounts == {}


def test_an_import_stopped_by_the_broker_keeps_what_was_done(tmp_path: Path) -> None:
    with make_api(tmp_path, import_batch_size=2) as api:
        calls = {"n": 0}
        real = api.broker.create_devices

        def flaky(devices: Iterable[tuple[str, str]]) -> dict[str, str]:
            calls["n"] += 1
            if calls["n"] == 2:
                api.broker.down = True
            return real(devices)

        api.broker.create_devices = flaky  # type: ignore[method-assign]
        rows = "".join(f"pk-{i},parking_sensor,c,{GRID},,,\n" for i in range(5))
        out = api.import_csv(CSV_HEADER + rows).json()
        assert out["counts"] == {"created": 2, "updated": 0, "unchanged": 0, "error": 3}
        assert "Connection refused" in out["aborted"]
        assert [r["credentials"] is not None for r in out["rows"]] == [True, True, False, False, False]
        api.broker.down = False
        assert sorted(api.broker.accounts) == ["pk-0", "pk-1"] and api.registry.count() == 2


def plain(device_id: str) -> Any:
    return {"device_id": device_id, "device_type": "parking_sensor", "community": "c", "grid_code": GRID}


def test_registry_writes_go_on_while_the_broker_issues_credentials(api: Api) -> None:
    api.registry.add(api.registry.validate(plain("pk-0")))
    issuing, release = threading.Event(), threading.Event()
    real = api.broker.create_devices

    def slow(devices: Iterable[tuple[str, str]]) -> dict[str, str]:
        issuing.set()
        assert release.wait(10)
        return real(devices)

    api.broker.create_devices = slow  # type: ignore[method-assign]
    result: list[Any] = []
    importer = threading.Thread(
        target=lambda: result.append(api.import_csv(CSV_HEADER + f"pk-1,parking_sensor,c,{GRID},,,\n"))
    )
    importer.start()
    try:
        assert issuing.wait(10)
        # What the gateway does meanwhile is not held up by the broker's slowness.
        assert api.registry.mark_online(["pk-0"]) == ["pk-0"]
    finally:
        release.set()
        importer.join(10)
    assert result[0].json()["counts"]["created"] == 1


def test_a_device_registered_meanwhile_without_credentials_loses_the_account_made_for_it(api: Api) -> None:
    real = api.broker.create_devices

    def racing(devices: Iterable[tuple[str, str]]) -> dict[str, str]:
        created = real(devices)
        api.registry.add(api.registry.validate(plain("pk-2")))  # someone else, without credentials
        return created

    api.broker.create_devices = racing  # type: ignore[method-assign]
    out = api.import_csv(
        CSV_HEADER + f"pk-1,parking_sensor,c,{GRID},,,\npk-2,parking_sensor,c,{GRID},,,\n"
    ).json()
    assert [(r["device_id"], r["outcome"], r["credentials"] is not None) for r in out["rows"]] == [
        ("pk-1", "created", True),
        ("pk-2", "unchanged", False),
    ]
    assert sorted(api.broker.accounts) == ["pk-1"]


def test_devices_the_broker_refuses_are_error_rows_the_others_created(api: Api) -> None:
    api.broker.refuse["pk-2"] = "Quota exceeded"
    rows = "".join(f"pk-{i},parking_sensor,c,{GRID},,,\n" for i in range(1, 4))
    out = api.import_csv(CSV_HEADER + rows).json()
    assert [r["outcome"] for r in out["rows"]] == ["created", "error", "created"]
    assert out["rows"][1]["error"] == "could not issue credentials: Quota exceeded"
    assert api.get("/api/v1/devices/pk-2").status_code == 404


def test_import_without_credentials(api: Api) -> None:
    out = api.import_csv(CSV_HEADER + f"pk-1,parking_sensor,c,{GRID},,,\n", issue_credentials="false").json()
    assert out["rows"][0]["outcome"] == "created" and out["rows"][0]["credentials"] is None
    assert api.broker.accounts == {}


def test_export_csv_and_json_import_again_unchanged(api: Api) -> None:
    api.create(
        "mh-1",
        "manhole_cover",
        component_code="1101010101000001",
        install_date="2026-11-20",
        attributes={"owner_class": "0101", "depth_cm": 180},
    )
    api.create(
        "pk-1", building="B1", lat=39.91, attributes={"bay_kind": "time_limited", "time_limit_min": 90}
    )
    r = api.get("/api/v1/devices/export")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["device_id"] for row in rows] == ["mh-1", "pk-1"]
    assert rows[0]["attr.owner_class"] == "0101" and rows[0]["install_date"] == "2026-11-20"
    assert api.import_csv(r.text).json()["counts"]["unchanged"] == 2

    exported = api.get("/api/v1/devices/export", params={"format": "json"}).json()
    assert [d["device_id"] for d in exported] == ["mh-1", "pk-1"] and exported[0]["lifecycle"] == "registered"
    assert api.post("/api/v1/devices/import", exported).json()["counts"]["unchanged"] == 2
    assert api.registry.current_version() == 2


def test_export_format_must_be_csv_or_json(api: Api) -> None:
    r = api.get("/api/v1/devices/export", params={"format": "xml"})
    assert r.status_code == 422 and "query.format: Input should be 'csv' or 'json'" in detail(r)


# ---------------------------------------------------------------------------------------------
# Scope


def test_a_scoped_key_reaches_only_its_communities(api: Api) -> None:
    api.create("in-1")
    api.create("out-1", community="西华门社区")
    _, scoped = ApiKeyStore(api.engine).create("team A", "installer", Scope(communities=("东华门社区",)))
    h = {"X-API-Key": scoped}
    assert [d["device_id"] for d in api.client.get("/api/v1/devices", headers=h).json()["items"]] == ["in-1"]
    # another community's device is answered as if it did not exist
    r = api.client.get("/api/v1/devices/out-1", headers=h)
    assert r.status_code == 404
    assert detail(r) == "device 'out-1' is not registered"
    r = api.client.post(
        "/api/v1/devices",
        headers=h,
        json={
            "device_id": "x",
            "device_type": "parking_sensor",
            "community": "西华门社区",
            "grid_code": GRID,
        },
    )
    assert r.status_code == 403
    r = api.client.post(
        "/api/v1/devices/in-1/move", headers=h, json={"community": "西华门社区", "grid_code": GRID}
    )
    assert r.status_code == 403 and detail(r).startswith("the new place is in community '西华门社区'")
    r = api.client.post(
        "/api/v1/devices/import",
        headers={**h, "Content-Type": "text/csv"},
        content=(CSV_HEADER + f"y,parking_sensor,西华门社区,{GRID},,,\n").encode(),
    )
    assert (
        r.json()["rows"][0]["error"]
        == "community '西华门社区' is outside this API key's scope (communities 东华门社区)"
    )
    assert [
        d["device_id"]
        for d in api.client.get("/api/v1/devices/export", headers=h, params={"format": "json"}).json()
    ] == ["in-1"]


# ---------------------------------------------------------------------------------------------
# Commissioning, unknown devices, dead letters


def test_commissioning_of_a_batch(api: Api) -> None:
    api.create("mh-1", "manhole_cover", batch="b1", building="3")
    api.create("mh-2", "manhole_cover", batch="b1")
    api.create("mh-3", "manhole_cover", batch="b2")
    states = DeviceStateStore(api.engine)
    states.record_many(
        [
            StatusUpdate(
                "mh-1",
                None,
                T0,
                None,
                False,
                last_topic="sc/v1/manhole_cover/mh-1/telemetry",
                last_payload=b'{"tilt_deg": 0.4}',
            )
        ]
    )
    states.add_seen_fields({"mh-1": ["tilt_deg"]})
    api.registry.mark_online(["mh-1"])
    out = api.get("/api/v1/commissioning", params={"batch": "b1"}).json()
    assert out["filter"] == {"batch": "b1"} and out["total"] == 2 and out["not_heard_from"] == 1
    assert out["counts"] == {"registered": 1, "online": 1, "in_service": 0, "disabled": 0, "retired": 0}
    first, second = out["devices"]
    assert (first["device_id"], first["heard_from"], first["last_seen"]) == ("mh-2", False, None)
    assert second["device_id"] == "mh-1" and second["last_payload"] == {"tilt_deg": 0.4}
    assert second["missing_fields"] == ["cover_open", "battery_pct"] and second["building"] == "3"
    assert api.get("/api/v1/commissioning", params={"community": "东华门社区"}).json()["total"] == 3
    assert api.get("/api/v1/commissioning", params={"limit": 0}).status_code == 422


def test_unknown_devices_and_dead_letters(api: Api) -> None:
    now = dt.datetime.now(dt.UTC)
    DeadLetterStore(api.engine).add_many(
        [
            DeadLetter(
                now - dt.timedelta(hours=2),
                "sc/v1/parking_sensor/new-1/telemetry",
                "new-1",
                "parking_sensor",
                "unregistered_device",
                "not registered",
                b'{"occupied": true}',
            ),
            DeadLetter(
                now,
                "sc/v1/parking_sensor/new-1/telemetry",
                "new-1",
                "parking_sensor",
                "unregistered_device",
                "not registered",
                b'{"occupied": false}',
            ),
            DeadLetter(
                now,
                "sc/v1/parking_sensor/pk-1/telemetry",
                "pk-1",
                "parking_sensor",
                "out_of_range",
                "battery_pct 140",
                b"\xff\xfe",
            ),
        ]
    )
    (unknown,) = api.get("/api/v1/unknown-devices").json()
    assert (
        unknown["device_id"] == "new-1"
        and unknown["count"] == 2
        and unknown["last_payload"] == {"occupied": False}
    )
    assert (
        unknown["topic"] == "sc/v1/parking_sensor/new-1/telemetry"
        and unknown["device_type"] == "parking_sensor"
    )
    assert api.get("/api/v1/unknown-devices", params={"since": "30m"}).json()[0]["count"] == 1
    since = (now + dt.timedelta(minutes=1)).replace(tzinfo=None).isoformat()
    assert api.get("/api/v1/unknown-devices", params={"since": since}).json() == []

    letters = api.get("/api/v1/deadletters", params={"reason": "out_of_range"}).json()
    assert [d["device_id"] for d in letters] == ["pk-1"]
    assert letters[0]["payload"] is None and letters[0]["payload_base64"] == "//4="
    assert len(api.get("/api/v1/deadletters", params={"device_id": "new-1", "limit": 1}).json()) == 1
    assert api.get("/api/v1/deadletters/counts").json() == {"unregistered_device": 2, "out_of_range": 1}
    assert api.get("/api/v1/deadletters/counts", params={"since": "1h"}).json() == {
        "unregistered_device": 1,
        "out_of_range": 1,
    }


@pytest.mark.parametrize(
    "path", ["/api/v1/unknown-devices", "/api/v1/deadletters", "/api/v1/deadletters/counts"]
)
def test_a_bad_since_is_422(api: Api, path: str) -> None:
    r = api.get(path, params={"since": "yesterday"})
    assert (
        r.status_code == 422
        and detail(r) == "since: 'yesterday' is neither a duration (30m, 24h, 7d) nor an ISO 8601 time"
    )


def test_dead_letter_limit_is_bounded(api: Api) -> None:
    r = api.get("/api/v1/deadletters", params={"limit": 5000})
    assert r.status_code == 422 and "query.limit: Input should be less than or equal to 1000" in detail(r)


# ---------------------------------------------------------------------------------------------
# Places and responsible units


def test_places_from_district_to_grid(api: Api) -> None:
    for code, name in (
        ("110101", "东城区"),
        ("110101001", "东华门街道"),
        ("110101001001", "东华门社区"),
        (GRID, "网格 1"),
    ):
        r = api.post("/api/v1/places", {"code": code, "name": name})
        assert r.status_code == 201, r.text
    grid = api.get(f"/api/v1/places/{GRID}").json()
    assert grid["level"] == "grid" and grid["parent_code"] == "110101001001" and grid["name"] == "网格 1"
    assert [p["code"] for p in api.get("/api/v1/places").json()] == [
        "110101",
        "110101001",
        "110101001001",
        GRID,
    ]
    assert [p["code"] for p in api.get("/api/v1/places", params={"level": "street"}).json()] == ["110101001"]
    assert [p["code"] for p in api.get("/api/v1/places", params={"parent_code": "110101"}).json()] == [
        "110101001"
    ]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"code": "110102001", "name": "x"},
            422,
            "the parent district 110102 of street 110102001 is not registered: add it first",
        ),
        ({"code": "110101", "name": "again"}, 409, "place 110101 is already registered"),
        (
            {"code": "1101", "name": "x"},
            422,
            "body.code: must be 6 (district), 9 (street), 12 (community), 15 or 14 (grid) digits",
        ),
        (
            {"code": "110102", "name": "x", "level": "street"},
            422,
            "code 110102 is a district code (6 digits), not a street",
        ),
        (
            {"code": "110101002", "name": "x", "parent_code": "110102"},
            422,
            "parent_code 110102 does not fit code 110101002",
        ),
        ({"code": "110102"}, 422, "body.name: is required"),
    ],
)
def test_bad_places(api: Api, body: dict[str, Any], status: int, message: str) -> None:
    assert api.post("/api/v1/places", {"code": "110101", "name": "东城区"}).status_code == 201
    r = api.post("/api/v1/places", body)
    assert r.status_code == status, r.text
    assert message in detail(r)


def test_unknown_place_is_404(api: Api) -> None:
    r = api.get("/api/v1/places/110101")
    assert r.status_code == 404 and detail(r) == "no place has the code '110101'"


def test_responsible_units(api: Api) -> None:
    r = api.post(
        "/api/v1/responsible-units",
        {"unit_id": "water", "name": "市自来水集团", "kind": "water", "contact": "010-1234"},
    )
    assert r.status_code == 201 and r.json()["name"] == "市自来水集团"
    api.post("/api/v1/responsible-units", {"unit_id": "gas", "name": "市燃气集团", "kind": "gas"})
    assert [u["unit_id"] for u in api.get("/api/v1/responsible-units").json()] == ["gas", "water"]
    assert [u["unit_id"] for u in api.get("/api/v1/responsible-units", params={"kind": "gas"}).json()] == [
        "gas"
    ]
    assert api.get("/api/v1/responsible-units/water").json()["contact"] == "010-1234"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"unit_id": "water", "name": "other"},
            409,
            "a responsible unit with id 'water' is already registered",
        ),
        (
            {"unit_id": "w2", "name": "市自来水集团"},
            409,
            "a responsible unit with name '市自来水集团' is already registered",
        ),
        (
            {"unit_id": "水务", "name": "x"},
            422,
            "body.unit_id: must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
        ),
        ({"unit_id": "w3"}, 422, "body.name: is required"),
    ],
)
def test_bad_units(api: Api, body: dict[str, Any], status: int, message: str) -> None:
    api.post("/api/v1/responsible-units", {"unit_id": "water", "name": "市自来水集团"})
    r = api.post("/api/v1/responsible-units", body)
    assert r.status_code == status and message in detail(r)


def test_unknown_unit_is_404(api: Api) -> None:
    r = api.get("/api/v1/responsible-units/nope")
    assert r.status_code == 404 and detail(r) == "no responsible unit has the id 'nope'"
