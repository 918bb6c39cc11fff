"""The local stack itself: each real service starts, serves, and keeps its data across a restart."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker_admin import Credentials
from stack.services import (
    InfluxService,
    MosquittoService,
    PostgresService,
    StackError,
    start_influxdb,
    start_mosquitto,
    start_postgres,
)

TIMEOUT_S = 10


class Mqtt:
    """A paho client on its network thread, logged in as `account`, with what it received in a queue."""

    def __init__(
        self,
        broker: MosquittoService,
        account: Credentials,
        client_id: str,
        *,
        session_expiry_s: int | None = None,
    ):
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(account.username, account.password)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self.connect_reason: ReasonCode | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _client, _userdata, message: self.messages.put(message)
        properties = None
        if session_expiry_s is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
        self.client.connect(
            broker.host, broker.port, clean_start=session_expiry_s is None, properties=properties
        )
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT_S), "no CONNACK"
        assert self.connect_reason is not None and not self.connect_reason.is_failure, self.connect_reason

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        # Asserting here would only kill paho's network thread: the test thread checks.
        self.connect_reason = reason_code
        self.session_present = flags.session_present
        self._connected.set()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(TIMEOUT_S), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published(), "no PUBACK"

    def receive(self, count: int) -> list[bytes]:
        return [bytes(self.messages.get(timeout=TIMEOUT_S).payload) for _ in range(count)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def mqtt_client(
    broker: MosquittoService, account: Credentials, client_id: str = "", **kwargs: int
) -> Iterator[Mqtt]:
    client = Mqtt(broker, account, client_id or f"test-{uuid.uuid4().hex[:8]}", **kwargs)
    try:
        yield client
    finally:
        client.close()


def _telemetry_topic() -> str:
    return f"sc/v1/manhole_cover/stack-{uuid.uuid4().hex[:12]}/telemetry"


def test_mosquitto_round_trip_at_qos1(mosquitto: MosquittoService) -> None:
    topic = _telemetry_topic()
    with (
        mqtt_client(mosquitto, mosquitto.gateway_account) as sub,
        mqtt_client(mosquitto, mosquitto.publisher_account) as pub,
    ):
        sub.subscribe(topic)
        pub.publish(topic, b'{"tilt_deg": 1.5}')
        message = sub.messages.get(timeout=TIMEOUT_S)
        assert message.payload == b'{"tilt_deg": 1.5}'
        assert message.qos == 1


def test_mosquitto_keeps_queued_messages_of_a_persistent_session_across_a_restart(service_dir: Path) -> None:
    topic = _telemetry_topic()
    with start_mosquitto(service_dir) as broker:
        gateway, publisher = broker.gateway_account, broker.publisher_account
        with mqtt_client(broker, gateway, "gateway", session_expiry_s=3600) as sub:
            sub.subscribe(topic)
        # The subscriber is away: the broker queues for its session.
        with mqtt_client(broker, publisher) as pub:
            for i in range(5):
                pub.publish(topic, f"reading {i}".encode())

        port = broker.port
        broker.restart()
        assert broker.port == port

        with mqtt_client(broker, gateway, "gateway", session_expiry_s=3600) as sub:
            assert sub.session_present
            assert sub.receive(5) == [f"reading {i}".encode() for i in range(5)]


def test_mosquitto_start_failure_shows_the_log(service_dir: Path) -> None:
    with pytest.raises(StackError, match=r"(?s)mosquitto failed to start.*no_such_option"):
        start_mosquitto(service_dir, extra_conf="no_such_option true")


def write_point(influx: InfluxService, db: str) -> None:
    line = "manhole_cover,device_id=mc-1 tilt_deg=1.5,cover_open=false 1700000000000000001"
    with httpx.Client(base_url=influx.url, timeout=TIMEOUT_S) as http:
        response = http.post("/write", params={"db": db, "precision": "ns"}, content=line)
        assert response.status_code == 204, response.text


def read_back(influx: InfluxService, db: str) -> list[list[object]]:
    with httpx.Client(base_url=influx.url, timeout=TIMEOUT_S) as http:
        response = http.get(
            "/query", params={"db": db, "epoch": "ns", "q": "SELECT tilt_deg, cover_open FROM manhole_cover"}
        )
    response.raise_for_status()
    [result] = response.json()["results"]
    [series] = result["series"]
    values: list[list[object]] = series["values"]
    return values


def test_influxdb_write_and_query(influxdb: InfluxService, influx_db_name: str) -> None:
    with httpx.Client(base_url=influxdb.url, timeout=TIMEOUT_S) as http:
        assert http.get("/ping").status_code == 204
        created = http.post("/query", params={"q": f'CREATE DATABASE "{influx_db_name}"'})
        assert created.status_code == 200, created.text
    write_point(influxdb, influx_db_name)
    assert read_back(influxdb, influx_db_name) == [[1700000000000000001, 1.5, False]]


def test_influxdb_restart_keeps_data(service_dir: Path) -> None:
    with start_influxdb(service_dir) as influx:
        influx.create_database("kept")
        write_point(influx, "kept")
        url = influx.url
        influx.restart()
        assert influx.url == url
        assert read_back(influx, "kept") == [[1700000000000000001, 1.5, False]]


def test_postgres_connects_and_creates_databases(postgres: PostgresService, postgres_dsn: str) -> None:
    engine = sa.create_engine(postgres.dsn)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == "sc_gateway"
    finally:
        engine.dispose()

    name = f"t_{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_database(name)
    engine = sa.create_engine(dsn)
    try:
        with engine.begin() as conn:
            tables = conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))
            assert tables.scalar_one() == 0
            conn.execute(sa.text("CREATE TABLE device (id text PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO device VALUES ('mc-1')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM device")).scalars().all() == ["mc-1"]
    finally:
        engine.dispose()
        postgres.drop_database(name)

    engine = sa.create_engine(postgres_dsn)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_postgres_comes_back_after_a_kill(service_dir: Path) -> None:
    with start_postgres(service_dir, for_tests=True) as pg:
        engine = sa.create_engine(pg.dsn)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE device (id text PRIMARY KEY)"))
                conn.execute(sa.text("INSERT INTO device VALUES ('mc-1')"))
            pg.kill()
            assert not pg.is_running()
            pg.restart()
            engine.dispose()
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT id FROM device")).scalars().all() == ["mc-1"]
        finally:
            engine.dispose()
