"""The installers' API on the real wire: a real registry (SQLite and PostgreSQL), the real Mosquitto with its
dynamic security plugin issuing credentials, and the real gateway for commissioning.

A device registered through the API connects with the credentials it was given, only to its own topics;
disabling it cuts it off, rotating its password stops the old one, retiring it deletes its account. The
API and `sc-gateway api` are driven over HTTP (TestClient, and uvicorn once)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine, make_url

from api.app import create_app
from api.auth import ApiKeyStore
from api.settings import ApiSettings
from devices import THING_MODELS
from gateway.db import make_engine, migrate
from gateway.registry import Registry
from stack.services import MosquittoService, free_port
from tests.integration.conftest import REPO, Harness, now_ms, telemetry, wait_for

with warnings.catch_warnings():
    # starlette asks for httpx2 instead of httpx; the TestClient works the same with httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

TIMEOUT_S = 10
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code in CONNACK and PUBACK
BAD_CREDENTIALS = 0x86  # CONNACK "bad user name or password"
ADMINISTRATIVE_ACTION = 0x98  # DISCONNECT reason code
GRID = "110101001001001"


class Device:
    """A device's MQTT 5 connection with the credentials the API gave it; records the broker's answers.
    It does not reconnect by itself, so a refusal or a kick stays visible."""

    def __init__(self, broker: MosquittoService, username: str, password: str, client_id: str) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(120, 120)
        self.connack: ReasonCode | None = None
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: self.disconnects.put(reason)
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT_S), f"{client_id}: no CONNACK"

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        self.connack = reason
        self._connected.set()

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def publish(self, topic: str, payload: bytes = b"{}") -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, TIMEOUT_S), "no PUBACK"
            return self._acks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Api:
    client: TestClient
    broker: MosquittoService
    engine: Engine
    headers: dict[str, str]
    devices: list[Device]

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.client.post(path, headers=self.headers, json=body, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, headers=self.headers, **kw)

    def create(self, device_id: str, device_type: str = "manhole_cover", **fields: Any) -> dict[str, Any]:
        body = {
            "device_id": device_id,
            "device_type": device_type,
            "community": "东华门社区",
            "grid_code": GRID,
        }
        r = self.post("/api/v1/devices", {**body, **fields})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def connect(self, credentials: dict[str, str]) -> Device:
        device = Device(
            self.broker, credentials["username"], credentials["password"], credentials["client_id"]
        )
        self.devices.append(device)
        return device


def api_settings(broker: MosquittoService, url: str, **more: Any) -> ApiSettings:
    settings: dict[str, Any] = {
        "database_url": url,
        "mqtt_host": broker.host,
        "mqtt_port": broker.port,
        "mqtt_admin_username": broker.admin_username,
        "mqtt_admin_password": broker.admin_password,
    }
    return ApiSettings(**{**settings, **more})


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated registry: a SQLite file, or a fresh database in the session's PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
        migrate(url)
        yield url
        return
    postgres = request.getfixturevalue("postgres")
    name = f"api_{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(name)
    migrate(url)
    yield url
    if postgres.is_running():
        postgres.drop_database(name)


@contextlib.contextmanager
def open_api(
    broker: MosquittoService, url: str, engine: Engine | None = None, **settings: Any
) -> Iterator[Api]:
    own = engine is None
    engine = engine or make_engine(url)
    _, key = ApiKeyStore(engine).create("site installer", "installer")
    app = create_app(api_settings(broker, url, **settings), engine=engine)
    made: list[Device] = []
    try:
        with TestClient(app) as client:
            yield Api(client, broker, engine, {"Authorization": f"Bearer {key}"}, made)
    finally:
        for device in made:
            device.close()
        if own:
            engine.dispose()


@pytest.fixture
def api(mosquitto: MosquittoService, db_url: str) -> Iterator[Api]:
    with open_api(mosquitto, db_url) as api:
        yield api


def uid(prefix: str) -> str:
    """Device ids unique in the session's broker, whose accounts outlive a test."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def topic(device_type: str, device_id: str, kind: str = "telemetry") -> str:
    return f"sc/v1/{device_type}/{device_id}/{kind}"


# ---------------------------------------------------------------------------------------------
# Credentials on the real broker


def test_a_registered_device_connects_with_its_credentials_only_to_its_own_topics(api: Api) -> None:
    mine, other = uid("mh"), uid("mh")
    creds = api.create(mine)["credentials"]
    api.create(other)
    device = api.connect(creds)
    assert device.accepted, device.connack
    assert not device.publish(topic("manhole_cover", mine), b'{"tilt_deg": 0.3}').is_failure
    assert device.publish(topic("manhole_cover", other)).value == NOT_AUTHORIZED
    assert device.publish(topic("streetlight", mine)).value == NOT_AUTHORIZED

    wrong_id = api.connect({**creds, "client_id": f"{mine}-x"})
    assert not wrong_id.accepted  # the client id is bound to the device id


def test_disabling_through_the_api_cuts_the_device_off_and_enabling_lets_it_back(api: Api) -> None:
    device_id = uid("mh")
    creds = api.create(device_id)["credentials"]
    device = api.connect(creds)
    assert device.accepted

    r = api.post(f"/api/v1/devices/{device_id}/disable")
    assert r.status_code == 200 and r.json()["device"]["lifecycle"] == "disabled"
    assert device.disconnects.get(timeout=TIMEOUT_S).value == ADMINISTRATIVE_ACTION
    again = api.connect(creds)
    assert not again.accepted and again.connack is not None and again.connack.value == NOT_AUTHORIZED

    assert api.post(f"/api/v1/devices/{device_id}/enable").json()["device"]["lifecycle"] == "registered"
    assert api.connect(creds).accepted


def test_rotating_stops_the_old_password_and_retiring_deletes_the_account(api: Api) -> None:
    device_id = uid("sl")
    old = api.create(device_id, "streetlight", component_code="1101010118000001")["credentials"]
    connected = api.connect(old)
    assert connected.accepted

    r = api.post(f"/api/v1/devices/{device_id}/credentials/rotate")
    new = r.json()["credentials"]
    assert r.status_code == 200 and new["password"] != old["password"]
    assert connected.disconnects.get(timeout=TIMEOUT_S) is not None  # kicked when its password changed
    assert not api.connect(old).accepted
    assert api.connect(new).accepted

    assert api.post(f"/api/v1/devices/{device_id}/retire").json()["device"]["lifecycle"] == "retired"
    assert not api.connect(new).accepted
    with api.broker.admin() as admin:
        assert not admin.exists(device_id)


def test_an_import_issues_working_credentials_in_batches(mosquitto: MosquittoService, db_url: str) -> None:
    with open_api(mosquitto, db_url, import_batch_size=2) as api:
        ids = [uid("pk") for _ in range(5)]
        text = "device_id,device_type,community,grid_code,batch\n" + "".join(
            f"{d},parking_sensor,东华门社区,{GRID},b-{ids[0]}\n" for d in ids
        )
        r = api.client.post(
            "/api/v1/devices/import",
            headers={**api.headers, "Content-Type": "text/csv"},
            content=text.encode(),
        )
        out = r.json()
        assert r.status_code == 200 and out["counts"]["created"] == 5, r.text
        for row in out["rows"]:
            device = api.connect(row["credentials"])
            assert device.accepted, (row["device_id"], device.connack)
            assert not device.publish(topic("parking_sensor", row["device_id"])).is_failure
        again = api.client.post(
            "/api/v1/devices/import",
            headers={**api.headers, "Content-Type": "text/csv"},
            content=text.encode(),
        ).json()
        assert again["counts"]["unchanged"] == 5 and all(row["credentials"] is None for row in again["rows"])


def test_broker_down_is_503_and_no_device_is_half_made(mosquitto: MosquittoService, db_url: str) -> None:
    with open_api(mosquitto, db_url, mqtt_port=free_port(), mqtt_admin_timeout_s=2) as api:
        device_id = uid("mh")
        r = api.post(
            "/api/v1/devices",
            {"device_id": device_id, "device_type": "manhole_cover", "community": "c", "grid_code": GRID},
        )
        assert r.status_code == 503, r.text
        assert r.json()["detail"].startswith(f"device '{device_id}' was not registered: could not issue")
        assert api.get(f"/api/v1/devices/{device_id}").status_code == 404
        assert Registry(api.engine).current_version() == 0


# ---------------------------------------------------------------------------------------------
# The registry through the API, on SQLite and PostgreSQL


def test_registry_operations_through_the_api(api: Api) -> None:
    device_id = uid("mh")
    api.create(
        device_id,
        component_code="1101010111000001",
        install_date="2026-11-20",
        batch="b1",
        attributes={"owner_class": "0111", "depth_cm": 150},
    )
    r = api.client.patch(
        f"/api/v1/devices/{device_id}",
        headers=api.headers,
        json={"firmware": "1.2", "attributes": {"tilt_baseline_deg": 1.5, "depth_cm": None}},
    )
    assert r.json()["changed"] and r.json()["device"]["attributes"] == {
        "owner_class": "0111",
        "tilt_baseline_deg": 1.5,
    }
    same = api.client.patch(
        f"/api/v1/devices/{device_id}", headers=api.headers, json={"firmware": "1.2"}
    ).json()
    assert same["changed"] is False
    moved = api.post(
        f"/api/v1/devices/{device_id}/move", {"community": "西华门社区", "grid_code": "11010100100203"}
    )
    assert moved.json()["device"]["grid_code"] == "11010100100203"
    history = api.get(f"/api/v1/devices/{device_id}/history").json()
    assert [e["action"] for e in history] == ["moved", "updated", "created"]
    assert history[1]["detail"]["changed"]["attributes"][0] == {"owner_class": "0111", "depth_cm": 150.0}

    exported = api.get("/api/v1/devices/export", params={"format": "json"}).json()
    assert api.post("/api/v1/devices/import", exported).json()["counts"] == {
        "created": 0,
        "updated": 0,
        "unchanged": 1,
        "error": 0,
    }
    csv_text = api.get("/api/v1/devices/export").text
    reimport = api.client.post(
        "/api/v1/devices/import",
        headers={**api.headers, "Content-Type": "text/csv"},
        content=csv_text.encode(),
    ).json()
    assert reimport["counts"]["unchanged"] == 1

    for code, name in (
        ("110101", "东城区"),
        ("110101001", "东华门街道"),
        ("110101001001", "东华门社区"),
        (GRID, "1"),
    ):
        assert api.post("/api/v1/places", {"code": code, "name": name}).status_code == 201
    assert api.post("/api/v1/places", {"code": "110101", "name": "x"}).status_code == 409
    assert [p["level"] for p in api.get("/api/v1/places").json()] == [
        "district",
        "street",
        "community",
        "grid",
    ]
    assert api.post("/api/v1/responsible-units", {"unit_id": "gas", "name": "市燃气集团"}).status_code == 201
    assert api.post("/api/v1/responsible-units", {"unit_id": "gas2", "name": "市燃气集团"}).status_code == 409

    confirmed = api.post(f"/api/v1/devices/{device_id}/confirm").json()["device"]
    assert confirmed["lifecycle"] == "in_service"
    commissioning = api.get("/api/v1/commissioning", params={"batch": "b1"}).json()
    assert commissioning["counts"]["in_service"] == 1 and commissioning["not_heard_from"] == 1


def test_the_credentials_lock_serialises_issuers_and_leaves_the_registry_free(db_url: str) -> None:
    """Two engines on one database (as two processes would have): only the database's own lock (an
    advisory lock, an flock) serialises them; registry writes are not held up meanwhile."""
    other_url = make_url(db_url).update_query_dict(
        {"application_name": "other"} if "postgresql" in db_url else {"timeout": "9"}
    )
    first, second = make_engine(db_url), make_engine(other_url.render_as_string(hide_password=False))
    held, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with Registry(first).credentials_lock():
            held.set()
            release.wait(TIMEOUT_S)

    def wait_turn() -> None:
        with Registry(second).credentials_lock():
            second_in.set()

    holder, waiter = threading.Thread(target=hold), threading.Thread(target=wait_turn)
    try:
        holder.start()
        assert held.wait(TIMEOUT_S)
        waiter.start()
        registry = Registry(second)
        registry.add(
            registry.validate(
                {"device_id": uid("pk"), "device_type": "parking_sensor", "community": "c", "grid_code": GRID}
            )
        )
        assert not second_in.wait(0.3), "the second issuer got the lock while the first held it"
        release.set()
        assert second_in.wait(TIMEOUT_S)
    finally:
        release.set()
        holder.join(TIMEOUT_S)
        waiter.join(TIMEOUT_S)
        first.dispose()
        second.dispose()


# ---------------------------------------------------------------------------------------------
# Commissioning with the real gateway


def test_commissioning_shows_who_talks_and_unknown_devices_to_register(harness: Harness) -> None:
    batch = f"b-{uuid.uuid4().hex[:6]}"
    with open_api(harness.broker, harness.db_url, engine=harness.engine) as api:
        talking, silent = uid("mh"), uid("mh")
        creds = api.create(talking, batch=batch, building="3")["credentials"]
        api.create(silent, batch=batch)
        harness.start_gateway()

        device = api.connect(creds)
        assert device.accepted
        payload = telemetry({"device_id": talking, "device_type": "manhole_cover"}, seq=1, ts=now_ms())
        assert not device.publish(topic("manhole_cover", talking), json.dumps(payload).encode()).is_failure

        def progress() -> dict[str, Any]:
            return dict(api.get("/api/v1/commissioning", params={"batch": batch}).json())

        out = wait_for(
            progress, lambda o: o["counts"]["in_service"] == 1, what="the talking device in service"
        )
        assert out["not_heard_from"] == 1 and out["counts"]["registered"] == 1
        first, second = out["devices"]
        assert first["device_id"] == silent and not first["heard_from"]
        assert second["device_id"] == talking and second["last_payload"] == payload
        assert second["missing_fields"] == [] and set(
            THING_MODELS["manhole_cover"].commissioning_fields
        ) <= set(second["seen_fields"])

        ghost = uid("ghost")
        harness.publisher().send(topic("parking_sensor", ghost), {"occupied": True})
        unknown = wait_for(
            lambda: [u for u in api.get("/api/v1/unknown-devices").json() if u["device_id"] == ghost],
            what="the unregistered device in the unknown devices",
        )
        assert unknown[0]["device_type"] == "parking_sensor" and unknown[0]["last_payload"] == {
            "occupied": True
        }
        letters = api.get("/api/v1/deadletters", params={"device_id": ghost}).json()
        assert letters[0]["reason"] == "unregistered_device"

        api.post(f"/api/v1/devices/{talking}/disable")
        assert device.disconnects.get(timeout=TIMEOUT_S).value == ADMINISTRATIVE_ACTION


# ---------------------------------------------------------------------------------------------
# `sc-gateway api`


def test_sc_gateway_api_serves_over_http(mosquitto: MosquittoService, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    migrate(url)
    engine = make_engine(url)
    _, key = ApiKeyStore(engine).create("x", "admin")
    engine.dispose()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SC_")}
    env.update(
        PYTHONPATH=str(REPO),
        SC_DATABASE_URL=url,
        SC_MQTT_HOST=mosquitto.host,
        SC_MQTT_PORT=str(mosquitto.port),
        SC_MQTT_ADMIN_PASSWORD=mosquitto.admin_password,
    )
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "api", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            def health() -> int:
                if proc.poll() is not None:
                    raise AssertionError(f"sc-gateway api exited:\n{log.read_text()}")
                try:
                    return http.get("/healthz").status_code
                except httpx.TransportError:
                    return 0

            wait_for(health, lambda s: s == 200, what="sc-gateway api to answer")
            assert http.get("/api/v1/devices").status_code == 401
            device_id = uid("pk")
            r = http.post(
                "/api/v1/devices",
                headers={"X-API-Key": key},
                json={
                    "device_id": device_id,
                    "device_type": "parking_sensor",
                    "community": "c",
                    "grid_code": GRID,
                },
            )
            assert r.status_code == 201 and r.json()["credentials"]["username"] == device_id
            assert "/api/v1/devices/import" in http.get("/openapi.json").json()["paths"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_database_that_is_not_migrated_is_refused_at_start(
    mosquitto: MosquittoService, tmp_path: Path
) -> None:
    from gateway.db import SchemaNotCurrentError

    with pytest.raises(SchemaNotCurrentError, match="has never been migrated"):
        create_app(api_settings(mosquitto, f"sqlite:///{tmp_path / 'empty.db'}"))
