"""Load mode against the real Mosquitto: every message acknowledged, a subscriber gets exactly what was sent,
refusals are counted by reason. Bounded in count; nothing here asserts a rate or a time."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from gateway.broker_admin import Credentials
from simulators import load
from simulators.load import Fleet, LoadConfig, PayloadGenerator, Profile, run_load
from stack.services import MosquittoService
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration

START_MS = int(time.time() * 1000) - 3_600_000


class Subscriber:
    """A paho MQTT 5 client on every device's uplink, keeping the (topic, payload) of one fleet's messages."""

    def __init__(self, broker: MosquittoService, account: Credentials, prefix: str) -> None:
        self.prefix = prefix
        self.received: Counter[tuple[str, bytes]] = Counter()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-load-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(account.username, account.password)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([("sc/v1/+/+/telemetry", 1), ("sc/v1/+/+/event", 1)])
        assert self._subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        if m.topic.split("/")[3].startswith(self.prefix):
            with self._lock:
                self.received[m.topic, bytes(m.payload)] += 1

    def count(self) -> int:
        with self._lock:
            return sum(self.received.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def prefix() -> str:
    return f"lt{uuid.uuid4().hex[:6]}"


@pytest.fixture
def subscriber(mosquitto: MosquittoService, prefix: str) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto, mosquitto.gateway_account, prefix)
    yield sub
    sub.close()


def config(broker: MosquittoService, fleet: Fleet, **kwargs: object) -> LoadConfig:
    account = broker.publisher_account
    base: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "username": account.username,
        "password": account.password,
        "progress_s": 0,
    }
    return LoadConfig(fleet=fleet, **(base | kwargs))  # type: ignore[arg-type]


def test_5000_devices_over_3_connections_all_acknowledged_and_received(
    mosquitto: MosquittoService, subscriber: Subscriber, prefix: str
) -> None:
    fleet = Fleet.generate(5000, communities=5, prefix=prefix)
    profile = Profile(seed=11, event_share=0.1)
    cfg = config(mosquitto, fleet, profile=profile, connections=3, messages=3 * 5000, start_ms=START_MS)
    report = run_load(cfg, progress=None)

    assert report.ok, report.summary()
    assert (report.sent, report.acked, report.unacknowledged) == (15_000, 15_000, 0)
    assert not report.refused and report.unrouted == 0  # our subscriber matched every one
    account = mosquitto.publisher_account.username
    assert [c.client_id for c in report.connections] == [f"{account}.0", f"{account}.1", f"{account}.2"]
    # device k goes through connection k % 3: 1,667 / 1,667 / 1,666 devices, 3 messages each
    assert [c.sent for c in report.connections] == [5001, 5001, 4998]

    expected = Counter(PayloadGenerator(fleet, profile, start_ms=START_MS, interval_ms=1000).messages(15_000))
    wait_for(subscriber.count, lambda n: n >= 15_000, what="15,000 messages at the subscriber")
    assert subscriber.received == expected
    per_device = Counter(topic.split("/")[3] for topic, _ in expected.elements())
    assert set(per_device.values()) == {3} and len(per_device) == 5000
    assert {topic.rsplit("/", 1)[1] for topic, _ in expected} == {"telemetry", "event"}


def test_processes_and_stamping_at_send(
    mosquitto: MosquittoService, subscriber: Subscriber, prefix: str
) -> None:
    fleet = Fleet.generate(1000, prefix=prefix)
    cfg = config(
        mosquitto,
        fleet,
        profile=Profile(seed=3),
        connections=2,
        messages=2000,
        parallel="processes",
        stamp_at_send=True,
    )
    before = time.time_ns() // 1_000_000
    report = run_load(cfg, progress=None)
    assert report.ok, report.summary()
    assert (report.sent, report.acked) == (2000, 2000)
    wait_for(subscriber.count, lambda n: n >= 2000, what="2,000 messages at the subscriber")
    expected = PayloadGenerator(fleet, Profile(seed=3), start_ms=START_MS).messages(2000)
    assert Counter(t for t, _ in subscriber.received.elements()) == Counter(t for t, _ in expected)
    stamps = [int(p[6:19]) for _, p in subscriber.received.elements()]
    assert min(stamps) >= before  # the send time, not the planned device time


def test_refusals_are_counted_by_reason_and_fail_the_run(
    mosquitto: MosquittoService, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = mosquitto.gateway_account  # may consume uplink, not publish it
    argv = ["--port", str(mosquitto.port), "--username", gateway.username, f"--password={gateway.password}"]
    argv += ["--devices", "100", "--prefix", prefix, "--messages", "300", "--connections", "2"]
    assert load.main([*argv, "--progress", "0"]) == 1
    out = capsys.readouterr().out
    assert "refused           300  (0x87 not authorized: 300)" in out
    assert "acknowledged      0" in out


def test_cli_paced_run_and_a_refused_login(mosquitto: MosquittoService, prefix: str) -> None:
    account = mosquitto.publisher_account
    argv = ["--port", str(mosquitto.port), "--username", account.username, f"--password={account.password}"]
    argv += ["--devices", "500", "--prefix", prefix, "--progress", "0", "--events", "0.2"]
    assert load.main([*argv, "--rate", "4000", "--messages", "1000", "--connections", "3"]) == 0
    assert load.main([*argv, "--duration", "0.5", "--connections", "2", "--parallel", "processes"]) == 0
    bad = ["--port", str(mosquitto.port), "--username", account.username, "--password", "wrong"]
    assert load.main([*bad, "--devices", "10", "--messages", "10", "--progress", "0"]) == 2


def test_a_stopped_run_still_waits_for_its_acknowledgements(mosquitto: MosquittoService, prefix: str) -> None:
    stop = threading.Event()
    cfg = config(
        mosquitto,
        Fleet.generate(300, prefix=prefix),
        profile=Profile(),
        connections=2,
        rate=2000.0,
        duration_s=60,
    )
    threading.Timer(3.0, stop.set).start()  # (if connecting takes longer, nothing is sent)
    report = run_load(cfg, progress=None, stop=stop)
    assert report.ok, report.summary()
    assert 0 < report.sent < 120_000 and report.acked == report.sent


def test_through_an_adaptor_account_only_its_assigned_devices_get_through(
    mosquitto: MosquittoService, subscriber: Subscriber, prefix: str
) -> None:
    """The way an NB-IoT platform or a LoRaWAN server publishes: an adaptor of the device-auth plugin, with
    several connections (client ids `<username>.<i>`), may publish only for the devices assigned to it."""
    fleet = Fleet.generate(300, communities=2, prefix=prefix)
    ids = [str(r["device_id"]) for r in fleet.rows]
    with mosquitto.admin() as admin:
        admin.create_devices([(str(r["device_id"]), str(r["device_type"])) for r in fleet.rows])
        adaptor = admin.create_adaptor(f"ld{uuid.uuid4().hex[:8]}")
        admin.assign_devices(adaptor.username.removeprefix("svc.adaptor."), ids[:200])
    profile = Profile(seed=3)
    cfg = config(
        mosquitto,
        fleet,
        profile=profile,
        username=adaptor.username,
        password=adaptor.password,
        connections=3,
        messages=600,  # 2 per device
        start_ms=START_MS,
    )
    report = run_load(cfg, progress=None)

    assert not report.ok  # the unassigned third is refused, and the run says so
    assert report.acked + sum(report.refused.values()) == 600
    assert report.refused == {0x87: 200}  # 100 unassigned devices × 2 messages
    assert [c.client_id for c in report.connections] == [f"{adaptor.username}.{i}" for i in range(3)]
    wait_for(subscriber.count, lambda n: n >= 400, what="the assigned devices' 400 messages")
    got = {topic.split("/")[3] for topic, _ in subscriber.received}
    assert got == set(ids[:200])
