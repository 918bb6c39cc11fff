"""Integration harness: a real gateway process (`python -m gateway.cli run`) between a real Mosquitto and a
real InfluxDB, with a SQLite registry of its own.

`harness` runs against the session's broker and InfluxDB; `make_harness(broker, influx)` against any
(a test that stops a service starts a private one in `service_dir`). Every gateway process a harness
starts is stopped at teardown, and when a test fails its log tail is attached to the report.

Nothing here sleeps to let something happen: `wait_for` polls InfluxDB, SQL or /metrics with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from devices import THING_MODELS
from devices.samples import example_payload
from gateway.broker_admin import BrokerAdmin, Credentials
from gateway.db import make_engine, migrate
from gateway.deadletter import DeadLetterStore, DeviceStateStore
from gateway.registry import Registry
from simulators.community import generate_community, write_devices_csv
from stack.services import InfluxService, MosquittoService, free_port
from tests.support.broker_client import Client, Connect

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0
LOG_TAIL_LINES = 60
CREDENTIAL_KEY = "integration-test-credential-key"
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason code

T = TypeVar("T")

_HARNESSES = pytest.StashKey[list["Harness"]]()


def wait_for(
    get: Callable[[], T], ok: Callable[[T], bool] = bool, *, what: str, timeout: float = TIMEOUT_S
) -> T:
    """Poll `get()` until `ok(value)`; return that value, or fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}; last value: {value!r:.2000}"
            )
        time.sleep(0.1)


# ---- metrics -------------------------------------------------------------------------------------------


class Metrics:
    """One scrape of a gateway's /metrics: sample name + labels -> value."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if there is none)."""
        return sum(v for n, lab, v in self.samples if n == name and labels.items() <= lab.items())

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, lab, v in self.samples:
            if n == name and label in lab:
                out[lab[label]] = out.get(label, 0.0) + v
        return out


# ---- the gateway process -------------------------------------------------------------------------------


class GatewayProcess:
    """`python -m gateway.cli run` with its settings in SC_* variables; stdout and stderr go to `log_path`."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_path
        self.metrics_port = int(env["SC_METRICS_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(timeout=5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Self:
        """Start the process and wait until it is subscribed (its sc_broker_connected gauge is 1)."""
        assert not self.is_running(), f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting {self.name} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.log_path.parent,
                start_new_session=True,
            )
        self.wait_connected()
        return self

    def wait_connected(self) -> None:
        wait_for(self._connected, what=f"{self.name} to connect and subscribe")

    def _connected(self) -> bool:
        if not self.is_running():
            raise AssertionError(f"{self.name} exited with {self.returncode}:\n{self.tail()}")
        text = self._scrape()
        return text is not None and Metrics(text).value("sc_broker_connected") == 1

    def _scrape(self, process: int = 0) -> str | None:
        try:
            resp = self._http.get(f"http://127.0.0.1:{self.metrics_port + process}/metrics")
        except httpx.HTTPError:
            return None
        return resp.text if resp.status_code == 200 else None

    def metrics(self, process: int = 0) -> Metrics:
        """One scrape of the /metrics of worker 0, or of the process at SC_METRICS_PORT + `process`
        (workers 0..n-1, then the rules process, the delivery process, the priority lane)."""
        text = self._scrape(process)
        if text is None:
            raise AssertionError(
                f"{self.name}: /metrics on port {self.metrics_port + process} did not answer\n{self.tail()}"
            )
        return Metrics(text)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (the gateway stores and acknowledges what it holds), SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: nothing is flushed on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        self.stop()
        self._http.close()


# ---- MQTT clients --------------------------------------------------------------------------------------


class Publisher:
    """A paho 2.x MQTT v5 client on its network thread that publishes at QoS 1.

    It reconnects by itself and paho sends again what the broker has not acknowledged, so it can keep
    publishing through a broker restart; `acked` holds the ids of the messages the broker acknowledged.
    It logs in as `credentials` (default: the broker's adaptor account, which publishes for any device).
    """

    def __init__(
        self, broker: MosquittoService, client_id: str | None = None, credentials: Credentials | None = None
    ) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        account = credentials or broker.publisher_account
        self.client.username_pw_set(account.username, account.password)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(0.1, 1)
        self.acked: set[int] = set()
        self.unrouted: set[int] = set()  # acknowledged with "no matching subscribers": nobody got them
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT_S), "publisher: no CONNACK"

    def _on_publish(
        self, _client: mqtt.Client, _userdata: object, mid: int, reason_code: Any, _props: Any
    ) -> None:
        if not reason_code.is_failure:
            with self._lock:
                self.acked.add(mid)
                if reason_code.value == NO_MATCHING_SUBSCRIBERS:
                    self.unrouted.add(mid)

    def is_acked(self, mid: int) -> bool:
        with self._lock:
            return mid in self.acked

    def publish(self, topic: str, payload: bytes | Mapping[str, Any], *, retain: bool = False) -> int:
        """Queue one QoS 1 message (even while disconnected); returns its message id."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, body, qos=1, retain=retain)
        assert info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN), mqtt.error_string(info.rc)
        return info.mid

    def send(self, topic: str, payload: bytes | Mapping[str, Any], *, retain: bool = False) -> None:
        """Publish and wait for the broker's PUBACK."""
        self.wait_acked([self.publish(topic, payload, retain=retain)])

    def send_many(self, messages: Iterable[tuple[str, bytes | Mapping[str, Any]]]) -> None:
        """Publish in order, then wait until the broker acknowledged every one."""
        self.wait_acked([self.publish(t, p) for t, p in messages])

    def wait_acked(self, mids: Iterable[int], timeout: float = TIMEOUT_S) -> None:
        wanted = set(mids)

        def missing() -> set[int]:
            with self._lock:
                return wanted - self.acked

        wait_for(missing, lambda m: not m, what="the broker's PUBACKs", timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- devices and payloads ------------------------------------------------------------------------------


def community_rows(slug: str, **counts: int) -> list[dict[str, Any]]:
    """Registration rows of a small simulated community; counts: covers, poles, doors, bays, detectors."""
    base = {"covers": 0, "poles": 0, "doors": 0, "bays": 0, "detectors": 0}
    return generate_community("测试社区", seed=7, slug=slug, buildings=2, **(base | counts))


def topic(row: Mapping[str, Any], kind: str = "telemetry") -> str:
    return f"sc/v1/{row['device_type']}/{row['device_id']}/{kind}"


def telemetry(row: Mapping[str, Any], seq: int, ts: int) -> dict[str, Any]:
    """A valid full telemetry payload of the device's type (the same seq gives the same values)."""
    model = THING_MODELS[row["device_type"]]
    return example_payload(model, random.Random(f"{row['device_id']}|{seq}"), seq=seq, ts=ts)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports nothing listens on right now: a gateway's processes
    serve their metrics on SC_METRICS_PORT + i (workers, rules, delivery, priority lane)."""
    for _ in range(200):
        base = free_port()
        if base + count > 65536:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free loopback ports found")


# ---- the harness ---------------------------------------------------------------------------------------


class Harness:
    """A registry, an InfluxDB database and the gateway processes of one test."""

    def __init__(
        self, workdir: Path, broker: MosquittoService, influx: InfluxService, db_url: str | None = None
    ) -> None:
        self.workdir = workdir
        self.broker = broker
        self.influx = influx
        token = uuid.uuid4().hex[:10]
        self.influx_db = f"it_{token}"
        self.share_group = f"it-{token}"
        self.instance = f"it-{token}"
        self.db_url = db_url or f"sqlite:///{workdir / 'reg.db'}"
        migrate(self.db_url)  # before any gateway starts, like `sc-gateway db migrate` in a deployment
        self.engine: Engine = make_engine(self.db_url)
        self.registry = Registry(self.engine)
        self.deadletters = DeadLetterStore(self.engine)
        self.states = DeviceStateStore(self.engine)
        self.gateways: list[GatewayProcess] = []
        self.publishers: list[Publisher] = []
        self._http = httpx.Client(base_url=influx.url, timeout=10)

    # -- registry

    def register(self, rows: list[dict[str, Any]]) -> None:
        """Register devices through the registry's CSV import (the installers' path)."""
        path = self.workdir / f"devices-{uuid.uuid4().hex[:6]}.csv"
        write_devices_csv(rows, path)
        report = self.registry.import_csv(path)
        assert report.ok, [r for r in report.rows if r.outcome == "error"]

    # -- gateways

    def gateway_env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SC_")}
        account = self.broker.gateway_account
        env.update(
            {
                "PYTHONPATH": str(REPO),
                "SC_ENVIRONMENT": "test",
                "SC_INSTANCE": self.instance,
                "SC_MQTT_HOST": self.broker.host,
                "SC_MQTT_PORT": str(self.broker.port),
                "SC_MQTT_USERNAME": account.username,
                "SC_MQTT_PASSWORD": account.password,
                "SC_MQTT_SHARE_GROUP": self.share_group,
                "SC_INFLUX_URL": self.influx.url,
                "SC_INFLUX_DB": self.influx_db,
                "SC_DATABASE_URL": self.db_url,
                "SC_SPOOL_DIR": str(self.workdir / "spool"),
                "SC_METRICS_PORT": str(free_port_run(8)),
                "SC_BATCH_MAX_DELAY_MS": "50",
                "SC_REGISTRY_REFRESH_S": "0.5",
                "SC_STATE_FLUSH_S": "0.5",
                "SC_CREDENTIAL_HASH_KEY": CREDENTIAL_KEY,
            }
        )
        env.update(overrides)
        return env

    def gateway(self, name: str = "gateway", **overrides: str) -> GatewayProcess:
        """A gateway process (not started); `overrides` are SC_* variables."""
        gw = GatewayProcess(name, self.gateway_env(**overrides), self.workdir / f"{name}.log")
        self.gateways.append(gw)
        return gw

    def start_gateway(self, name: str = "gateway", **overrides: str) -> GatewayProcess:
        return self.gateway(name, **overrides).start()

    # -- MQTT

    def publisher(self, client_id: str | None = None) -> Publisher:
        pub = Publisher(self.broker, client_id)
        self.publishers.append(pub)
        return pub

    def device_credentials(self, row: Mapping[str, Any]) -> Credentials:
        """The device's own broker account (username = client id = device id), made for this test."""
        with self.broker.admin() as admin:
            password = admin.create_device(row["device_id"], row["device_type"])
        return Credentials(row["device_id"], password)

    # -- InfluxDB

    def query(self, q: str) -> list[dict[str, Any]]:
        """Rows of an InfluxQL query in this test's database (times in epoch ms), all series together."""
        resp = self._http.post("/query", params={"db": self.influx_db, "epoch": "ms"}, data={"q": q})
        assert resp.status_code == 200, f"{q}: {resp.status_code} {resp.text[:300]}"
        result = resp.json()["results"][0]
        assert "error" not in result, f"{q}: {result['error']}"
        rows = []
        for series in result.get("series", []):
            for values in series["values"]:
                rows.append({**series.get("tags", {}), **dict(zip(series["columns"], values, strict=True))})
        return rows

    def write_lines(self, body: str) -> None:
        """Write line protocol straight into this test's database (ms precision), creating it."""
        self.query_admin(f'CREATE DATABASE "{self.influx_db}"')
        resp = self._http.post(
            "/write", params={"db": self.influx_db, "precision": "ms"}, content=body.encode()
        )
        assert resp.status_code == 204, resp.text

    def query_admin(self, q: str) -> None:
        resp = self._http.post("/query", data={"q": q})
        assert resp.status_code == 200, resp.text

    def field_types(self, measurement: str) -> dict[str, str]:
        return {r["fieldKey"]: r["fieldType"] for r in self.query(f'SHOW FIELD KEYS FROM "{measurement}"')}

    def points(self, measurement: str, device_id: str) -> list[dict[str, Any]]:
        return self.query(f"SELECT * FROM \"{measurement}\" WHERE device_id = '{device_id}'")

    def seqs(self, measurement: str, device_id: str) -> list[int]:
        """The seq field of every point of one device, in time order (a point stored twice shows twice
        only if its time differs; same-time rewrites are one point, as InfluxDB keys points by time)."""
        return [
            r["seq"] for r in self.query(f"SELECT seq FROM \"{measurement}\" WHERE device_id = '{device_id}'")
        ]

    def wait_points(
        self, measurement: str, device_id: str, n: int, timeout: float = TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """Wait until the device has at least `n` points in `measurement`; return them."""
        return wait_for(
            lambda: self.points(measurement, device_id),
            lambda rows: len(rows) >= n,
            what=f"{n} point(s) of {device_id} in {measurement}",
            timeout=timeout,
        )

    # -- teardown

    def close(self) -> None:
        for pub in self.publishers:
            pub.close()
        for gw in self.gateways:
            gw.close()
        if self.influx.is_running():
            self.query_admin(f'DROP DATABASE "{self.influx_db}"')
        self._http.close()
        self.engine.dispose()

    def log_tails(self) -> list[tuple[str, str]]:
        return [(f"{gw.name} log ({gw.log_path})", gw.tail()) for gw in self.gateways]


@pytest.fixture
def make_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """`make_harness(broker, influx)`: a harness on the given services; its gateways stop at teardown."""
    made: list[Harness] = []
    request.node.stash[_HARNESSES] = made

    def make(broker: MosquittoService, influx: InfluxService, db_url: str | None = None) -> Harness:
        workdir = tmp_path / f"h{len(made)}"
        workdir.mkdir()
        h = Harness(workdir, broker, influx, db_url)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def harness(
    make_harness: Callable[..., Harness], mosquitto: MosquittoService, influxdb: InfluxService
) -> Harness:
    """A harness on the session's broker and InfluxDB."""
    return make_harness(mosquitto, influxdb)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield  # type: ignore[misc]
    if report.failed and report.when in ("setup", "call"):
        for h in item.stash.get(_HARNESSES, []):
            for title, text in h.log_tails():
                report.sections.append((title, text))
    return report  # type: ignore[return-value]


# -- broker account tests (tests/support/broker_client.py) --------------------------------------------


@pytest.fixture
def connect(mosquitto: MosquittoService) -> Iterator[Connect]:
    """connect(account, client_id, broker=session broker) -> Client; every client is closed afterwards."""
    made: list[Client] = []

    def make(account: Credentials | None, client_id: str, broker: MosquittoService = mosquitto) -> Client:
        client = Client(broker, account, client_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def admin(mosquitto: MosquittoService) -> Iterator[BrokerAdmin]:
    with mosquitto.admin() as a:
        yield a
