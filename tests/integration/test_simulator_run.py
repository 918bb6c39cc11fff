"""simulators.run on the real broker: every device with its own login, last will and cmd subscription; faults.

A watcher logged in as the broker's admin reads sc/v1/# and sees what any subscriber (the gateway) would.
Runs are a few wall seconds at high speed; the assertions compare what arrived with what the runner says
it sent, never with the clock.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from pydantic import ValidationError

from devices import THING_MODELS
from devices.model import STATUS_ADAPTER
from simulators.behaviour import AnomalyRates, FaultRates, Message
from simulators.community import generate_community, write_devices_csv
from simulators.run import DeviceCredentials, RunStats, read_credentials_csv, run_community
from stack.services import MosquittoService
from tests.integration.conftest import REPO, TIMEOUT_S, wait_for

WILL = b'{"online":false}'
UPLINK = ("telemetry", "event", "status")
SPEED = 60.0  # a wall second is a simulated minute
DURATION_S = 3.0


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool

    @property
    def device_id(self) -> str:
        return self.topic.split("/")[3]

    @property
    def kind(self) -> str:
        return self.topic.split("/")[4]


class Watcher:
    """The admin account subscribed to `topic`: keeps the uplink (not the cmd topic, which it sees too)
    of the devices whose ids start with `prefix`."""

    def __init__(self, broker: MosquittoService, prefix: str, topic: str = "sc/v1/#") -> None:
        self.prefix = prefix
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"watch-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(broker.admin_username, broker.admin_password)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(TIMEOUT_S), "watcher: no SUBACK"

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) == 5 and parts[3].startswith(self.prefix) and parts[4] in UPLINK:
            with self._lock:
                self.seen.append(Seen(message.topic, message.payload, bool(message.retain)))

    def messages(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def wait_for_all(self, acked: Sequence[Message]) -> list[Seen]:
        """Wait until every acknowledged message (as many times as it was sent) has arrived."""
        wanted = Counter((m.topic, m.encode()) for m in acked if m.fault != "offline")

        def missing() -> Counter[tuple[str, bytes]]:
            return wanted - Counter((s.topic, s.payload) for s in self.messages())

        wait_for(missing, lambda m: not m, what="every acknowledged message at the watcher")
        return self.messages()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watchers(mosquitto: MosquittoService) -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for w in made:
        w.close()


@dataclass
class Fleet:
    rows: list[dict[str, Any]]
    credentials: dict[str, DeviceCredentials]
    prefix: str

    def ids(self) -> set[str]:
        return {r["device_id"] for r in self.rows}


def make_fleet(broker: MosquittoService, **counts: int) -> Fleet:
    """A small generated community whose devices have broker accounts of their own."""
    prefix = f"s{uuid.uuid4().hex[:6]}"
    sizes = {"covers": 2, "poles": 2, "doors": 2, "bays": 2, "detectors": 2} | counts
    rows = generate_community("模拟社区", seed=5, slug=prefix, buildings=2, **sizes)
    with broker.admin() as admin:
        passwords = admin.create_devices([(r["device_id"], r["device_type"]) for r in rows])
    credentials = {d: DeviceCredentials(d, d, p, d) for d, p in passwords.items()}
    return Fleet(rows, credentials, prefix)


async def run(
    fleet: Fleet,
    broker: MosquittoService,
    *,
    faults: FaultRates | None = None,
    speed: float = SPEED,
    **kwargs: Any,
) -> tuple[RunStats, list[Message]]:
    acked: list[Message] = []
    stats = await run_community(
        fleet.rows,
        host=broker.host,
        port=broker.port,
        speed=speed,
        interval_s=5,
        duration_s=DURATION_S,
        credentials=fleet.credentials,
        seed=1,
        anomalies=AnomalyRates.none(),
        faults=faults,
        on_publish=acked.append,
        **kwargs,
    )
    return stats, acked


def well_formed(seen: Seen) -> dict[str, Any] | None:
    """The payload if the gateway would take it (JSON, the thing model's fields, types and ranges)."""
    try:
        if seen.kind == "status":
            return dict(STATUS_ADAPTER.validate_json(seen.payload))
        model = THING_MODELS[seen.topic.split("/")[2]]
        adapter = model.telemetry_adapter if seen.kind == "telemetry" else model.event_adapter
        assert adapter is not None
        return dict(adapter.validate_json(seen.payload))
    except ValidationError:
        return None


def by_device(seen: Sequence[Seen]) -> dict[str, list[Seen]]:
    out: dict[str, list[Seen]] = defaultdict(list)
    for s in seen:
        out[s.device_id].append(s)
    return out


# ---- tests ---------------------------------------------------------------------------------------------


async def test_devices_log_in_with_their_own_credentials_and_every_message_arrives(
    mosquitto: MosquittoService, watchers: list[Watcher]
) -> None:
    fleet = make_fleet(mosquitto)
    bad = fleet.rows[0]["device_id"]
    fleet.credentials[bad] = replace(fleet.credentials[bad], password="not-its-password")
    watcher = Watcher(mosquitto, fleet.prefix)
    watchers.append(watcher)

    commanded = fleet.rows[1]
    gateway = mosquitto.gateway_account
    acked: list[Message] = []
    command_sent = asyncio.Event()

    def on_publish(m: Message) -> None:  # once the device is up, the gateway sends it a command
        acked.append(m)
        if m.device_id == commanded["device_id"] and not command_sent.is_set():
            command_sent.set()

    async def send_command() -> None:
        await command_sent.wait()
        topic = f"sc/v1/{commanded['device_type']}/{commanded['device_id']}/cmd"
        await asyncio.to_thread(_publish_once, mosquitto, gateway.username, gateway.password, topic)

    sender = asyncio.create_task(send_command())
    stats = await run_community(
        fleet.rows,
        host=mosquitto.host,
        port=mosquitto.port,
        speed=SPEED,
        interval_s=5,
        # room for the command's own connection and round trip before the devices go
        duration_s=2 * DURATION_S,
        credentials=fleet.credentials,
        seed=1,
        on_publish=on_publish,
    )
    await sender

    assert stats.refused[bad] >= 1 and set(stats.refused) == {bad}
    assert stats.failed > 0 and stats.acked == len(acked) and stats.sent == stats.acked + stats.failed
    assert stats.denied == 0
    assert stats.commands >= 1
    assert bad not in {m.device_id for m in acked}
    seen = watcher.wait_for_all(acked)
    streams = by_device(seen)
    assert bad not in streams  # refused: nothing of it ever reached a subscriber
    for r in fleet.rows[1:]:
        stream = streams[r["device_id"]]
        assert sum(s.kind == "telemetry" for s in stream) >= 5, r["device_id"]
        first, last = stream[0], stream[-1]
        assert first.kind == "status" and json.loads(first.payload)["online"] is True
        assert last.kind == "status" and json.loads(last.payload)["online"] is False
        for s in stream:
            assert well_formed(s) is not None, s


async def test_a_device_that_drops_off_leaves_its_last_will(
    mosquitto: MosquittoService, watchers: list[Watcher]
) -> None:
    """Off for longer than the run: its retained status stays the will the broker published for it."""
    fleet = make_fleet(mosquitto)
    watcher = Watcher(mosquitto, fleet.prefix)
    watchers.append(watcher)
    faults = replace(FaultRates.none(), offline=3000, offline_s=(86_400, 86_400))
    stats, acked = await run(fleet, mosquitto, faults=faults)
    dropped = {m.device_id for m in acked if m.fault == "offline"}
    assert dropped and stats.faults["offline"] == len(dropped) and "online" not in stats.faults
    seen = watcher.wait_for_all(acked)
    wait_for(
        lambda: {s.device_id for s in watcher.messages() if s.payload == WILL},
        lambda got: got == dropped,
        what="the last wills of the devices that dropped off",
    )
    # nothing from them after the will
    for device_id, stream in by_device(seen).items():
        if device_id in dropped:
            wills = [i for i, s in enumerate(stream) if s.payload == WILL]
            assert len(wills) == 1 and wills[0] == len(stream) - 1, device_id

    retained = Watcher(mosquitto, fleet.prefix, topic="sc/v1/+/+/status")  # a newcomer: retained only
    watchers.append(retained)
    statuses = wait_for(
        lambda: {s.device_id: s for s in retained.messages()},
        lambda got: got.keys() == fleet.ids(),
        what="a retained status of every device",
    )
    for device_id, s in statuses.items():
        assert s.retain
        if device_id in dropped:
            assert s.payload == WILL
        else:  # said goodbye when the run ended
            payload = json.loads(s.payload)
            assert payload["online"] is False and "fw" in payload


async def test_a_device_comes_back_after_dropping_off(
    mosquitto: MosquittoService, watchers: list[Watcher]
) -> None:
    fleet = make_fleet(mosquitto)
    watcher = Watcher(mosquitto, fleet.prefix)
    watchers.append(watcher)
    faults = replace(FaultRates.none(), offline=2000, offline_s=(20, 40))
    stats, acked = await run(fleet, mosquitto, faults=faults)
    assert stats.faults["online"] >= 1 and stats.lost >= 1 and stats.failed == 0
    seen = watcher.wait_for_all(acked)
    wills = Counter(s.device_id for s in seen if s.payload == WILL)
    assert wills == Counter(m.device_id for m in acked if m.fault == "offline")
    back = {m.device_id for m in acked if m.fault == "online"}
    for device_id in back:
        stream = [s for s in seen if s.device_id == device_id]
        will_at = next(i for i, s in enumerate(stream) if s.payload == WILL)
        after = stream[will_at + 1 :]
        assert after[0].kind == "status" and json.loads(after[0].payload)["online"] is True
        seqs = [json.loads(s.payload)["seq"] for s in after if s.kind == "telemetry"]
        before = [json.loads(s.payload)["seq"] for s in stream[:will_at] if s.kind == "telemetry"]
        if seqs and before:
            assert min(seqs) > max(before) + 1  # what it measured while away is missing


async def test_injected_faults_reach_the_subscribers_as_counted(
    mosquitto: MosquittoService, watchers: list[Watcher]
) -> None:
    fleet = make_fleet(mosquitto)
    watcher = Watcher(mosquitto, fleet.prefix)
    watchers.append(watcher)
    faults = replace(
        FaultRates.none(), duplicate=3000, late=3000, faulty_unit=3000, faulty_s=(30, 60), malformed_share=0.3
    )
    stats, acked = await run(fleet, mosquitto, faults=faults)
    assert stats.failed == 0
    seen = watcher.wait_for_all(acked)

    malformed = duplicates = out_of_order = 0
    for stream in by_device(seen).values():
        taken: set[int] = set()
        highest = -1
        for s in stream:
            payload = well_formed(s)
            if payload is None:
                malformed += 1
                continue
            seq = payload["seq"]
            if seq in taken:
                duplicates += 1
            elif seq < highest:
                out_of_order += 1
            taken.add(seq)
            highest = max(highest, seq)

    injected_malformed = sum(n for tag, n in stats.faults.items() if tag.startswith("malformed_"))
    assert malformed == injected_malformed > 0
    assert duplicates == stats.faults["duplicate"] > 0
    assert out_of_order == stats.faults["late"] > 0
    kinds = {tag for tag in stats.faults if tag.startswith("malformed_")}
    assert len(kinds) >= 3  # not JSON, wrong type, out of range, unknown field: most of them in a run


async def test_with_shared_connections_the_runner_says_offline_for_the_device(
    mosquitto: MosquittoService, watchers: list[Watcher]
) -> None:
    """An adaptor publishes for many devices: no connection of a device's own to carry a will."""
    prefix = f"s{uuid.uuid4().hex[:6]}"
    rows = generate_community(
        "模拟社区", seed=5, slug=prefix, buildings=2, covers=2, poles=2, doors=2, bays=2
    )
    watcher = Watcher(mosquitto, prefix)
    watchers.append(watcher)
    account = mosquitto.publisher_account
    acked: list[Message] = []
    faults = replace(FaultRates.none(), offline=3000, offline_s=(86_400, 86_400), duplicate=1000)
    stats = await run_community(
        rows,
        host=mosquitto.host,
        port=mosquitto.port,
        speed=SPEED,
        interval_s=5,
        duration_s=2,
        username=account.username,
        password=account.password,
        faults=faults,
        on_publish=acked.append,
    )
    dropped = {m.device_id for m in acked if m.fault == "offline"}
    assert dropped and stats.failed == 0 and stats.faults["duplicate"] > 0
    seen = watcher.wait_for_all(acked)
    assert {s.device_id for s in seen if s.payload == WILL} == dropped


async def test_hundreds_of_devices_each_on_its_own_connection(
    mosquitto: MosquittoService, watchers: list[Watcher]
) -> None:
    fleet = make_fleet(mosquitto, covers=50, poles=50, doors=50, bays=50, detectors=50)
    watcher = Watcher(mosquitto, fleet.prefix)
    watchers.append(watcher)
    stats, acked = await run(fleet, mosquitto, speed=10.0)  # ~500 messages a second in all
    assert stats.failed == 0 and not stats.refused
    assert {m.device_id for m in acked if m.kind == "telemetry"} == fleet.ids()
    seen = watcher.wait_for_all(acked)
    assert {s.device_id for s in seen} == fleet.ids()


def test_the_cli_runs_devices_with_their_credentials_csv(
    mosquitto: MosquittoService, watchers: list[Watcher], tmp_path: Path
) -> None:
    fleet = make_fleet(mosquitto, covers=1, poles=1, doors=1, bays=1, detectors=1)
    watcher = Watcher(mosquitto, fleet.prefix)
    watchers.append(watcher)
    devices_csv, credentials_csv = tmp_path / "devices.csv", tmp_path / "credentials.csv"
    write_devices_csv(fleet.rows, devices_csv)
    with open(credentials_csv, "w", newline="", encoding="utf-8") as fh:  # as `devices import` writes it
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["device_id", "username", "password", "client_id"])
        for c in fleet.credentials.values():
            writer.writerow([c.device_id, c.username, c.password, c.client_id])
    assert read_credentials_csv(credentials_csv) == fleet.credentials
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators.run",
            *("--host", mosquitto.host, "--port", str(mosquitto.port)),
            *("--devices-csv", str(devices_csv), "--credentials-csv", str(credentials_csv)),
            *("--interval", "5", "--speed", str(SPEED), "--duration", "2", "--progress", "0"),
            *("--fault", "duplicate=2000"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "one connection per device" in done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed=0" in summary and "duplicate=" in summary
    streams = wait_for(
        lambda: by_device(watcher.messages()),
        lambda got: (
            got.keys() == fleet.ids()
            and all(json.loads(s[-1].payload).get("online") is False for s in got.values())
        ),
        what="every device's messages, ending with its offline status",
    )
    for stream in streams.values():
        assert any(s.kind == "telemetry" for s in stream)


def _publish_once(broker: MosquittoService, username: str, password: str, topic: str) -> None:
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"cmd-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(username, password)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, b'{"command":"ping"}', qos=1)
        info.wait_for_publish(TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
