"""Run a community of simulated devices against an MQTT broker, in (optionally sped-up) real time.

    python -m simulators.run --host 127.0.0.1 --port 1883 --community-seed 1 --duration 60
    python -m simulators.run --host 127.0.0.1 --port 1883 --devices-csv devices.csv --real-intervals
    python -m simulators.run --devices-csv devices.csv --credentials-csv creds.csv --fault duplicate=20

Each device first publishes a retained ``{"online": true, "fw": ...}`` status, then telemetry and
events on ``sc/v1/{type}/{id}/...`` at QoS 1. Nothing is printed per message; counters are kept.

Two ways to reach the broker: a few shared connections with one (adaptor) account, the default; or,
with a credentials CSV (``sc-gateway devices import --issue-credentials OUT.csv``), one MQTT 5
connection per device with its own username, password and client id, its own last will (retained
``{"online": false}`` on its status topic) and a subscription to its own ``cmd`` topic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import heapq
import json
import logging
import os
import signal
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from simulators.behaviour import OFFLINE_PAYLOAD, AnomalyRates, DeviceSim, FaultRates, Message, make_simulator
from simulators.community import generate_community, read_devices_csv

log = logging.getLogger("simulators.run")

DEFAULT_INTERVAL_S = 5.0
#: how many device connections may be opening at once (a power cut ends: every device dials in)
CONNECT_CONCURRENCY = 50
#: a device's last will, exactly as the device protocol gives it
WILL_PAYLOAD = json.dumps(OFFLINE_PAYLOAD, separators=(",", ":")).encode()
#: CONNACK codes that mean "not with these credentials" (MQTT 3.1.1 return codes, MQTT 5 reason codes)
REFUSED_CONNACK = frozenset({2, 4, 5, 0x85, 0x86, 0x87, 0x8A, 0x8C})
#: a refused device tries again, but rarely (its credentials will not fix themselves)
REFUSED_RETRY_S = 30.0
#: the columns of a credentials file (gateway.cli CredentialsFile)
CREDENTIALS_COLUMNS = ("device_id", "username", "password", "client_id")


class PublishError(Exception):
    """A message could not be delivered to the broker (after retries)."""


class Publisher(Protocol):
    """Carries device messages to the broker.

    Implementations decide the connections: a few shared ones (``SharedConnectionsPublisher``, like an
    adaptor account publishing for many devices) or one per device (``DeviceConnectionsPublisher``:
    client id = device id, its own credentials and last will).

    Injected faults arrive as messages too (``Message.fault``): a device going ``"offline"`` comes as
    its retained ``{"online": false}`` status. With shared connections that is simply published; a
    publisher with per-device connections instead drops the device's connection so that the broker
    publishes its last will. The ``"online"`` status that follows means: reconnect, then publish it.
    """

    async def start(self, devices: Sequence[Mapping[str, Any]]) -> None:
        """Open the connections for these devices (may return before they are up)."""

    async def publish(self, message: Message) -> None:
        """Publish at QoS 1; return once the broker acknowledged it, raise PublishError if it cannot."""

    async def stop(self) -> None:
        """Close the connections."""


@dataclass
class RunStats:
    """What a run did: messages handed to the publisher, acknowledged by the broker, given up on.

    Also: ``faults`` injected, by ``Message.fault`` tag, counted as handed to the publisher (``offline``,
    ``online``, ``duplicate``, ``late``, ``malformed_*``); ``lost``: messages devices produced while
    offline (never sent); with per-device connections, ``refused``: refused CONNACKs by device,
    ``denied``: publishes the broker refused (PUBACK with an error code), ``commands``: messages the
    devices received on their ``cmd`` topics.
    """

    sent: int = 0
    acked: int = 0
    failed: int = 0
    acked_by_kind: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    denied: int = 0
    commands: int = 0

    def summary(self) -> str:
        kinds = " ".join(f"{k}={n}" for k, n in sorted(self.acked_by_kind.items()))
        text = f"sent={self.sent} acked={self.acked} failed={self.failed} ({kinds})"
        if self.faults or self.lost:
            injected = " ".join(f"{k}={n}" for k, n in sorted(self.faults.items()))
            text += f" faults: {injected} lost={self.lost}".rstrip()
        if self.refused or self.denied or self.commands:
            text += f" refused_devices={len(self.refused)} denied={self.denied} commands={self.commands}"
        return text


@dataclass(frozen=True)
class DeviceCredentials:
    """One device's MQTT login, as ``sc-gateway devices import --issue-credentials`` writes it."""

    device_id: str
    username: str
    password: str = field(repr=False)
    client_id: str


def read_credentials_csv(source: Path | str | TextIO) -> dict[str, DeviceCredentials]:
    """device_id -> credentials, from a CSV with the columns device_id,username,password,client_id."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8-sig", newline="") as fh:
            return _read_credentials(fh, str(source))
    return _read_credentials(source, "<csv>")


def _read_credentials(fh: TextIO, where: str) -> dict[str, DeviceCredentials]:
    reader = csv.DictReader(fh)
    missing = set(CREDENTIALS_COLUMNS) - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{where}: missing column(s) {sorted(missing)}")
    out: dict[str, DeviceCredentials] = {}
    for line, raw in enumerate(reader, start=2):
        device_id = (raw["device_id"] or "").strip()
        username, password = (raw["username"] or "").strip(), raw["password"] or ""
        if not device_id or not username or not password:
            raise ValueError(f"{where}:{line}: device_id, username and password are required")
        if device_id in out:
            raise ValueError(f"{where}:{line}: {device_id} appears twice")
        client_id = (raw["client_id"] or "").strip() or device_id
        out[device_id] = DeviceCredentials(device_id, username, password, client_id)
    return out


def _refusal(exc: BaseException) -> bool:
    """Did the broker refuse these credentials (as opposed to a network trouble)?"""
    rc = getattr(exc, "rc", None)
    value = rc.value if isinstance(rc, ReasonCode) else rc
    return isinstance(exc, aiomqtt.MqttCodeError) and value in REFUSED_CONNACK


async def _first_of(*events: asyncio.Event, timeout: float) -> None:
    """Wait until one of the events is set, at most ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class _Connection:
    """One MQTT connection kept up by its own reconnect loop; publishes wait for it to be up."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        identifier: str,
        username: str | None,
        password: str | None,
        timeout_s: float,
        retries: int,
    ) -> None:
        self.identifier = identifier
        self.timeout_s = timeout_s
        self.retries = retries
        self.client = aiomqtt.Client(
            host, port, identifier=identifier, username=username, password=password, timeout=timeout_s
        )
        # many publishes awaiting their PUBACK at once is normal here, not a sign of trouble
        self.client.pending_calls_threshold = 100_000
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep(), name=f"mqtt-{self.identifier}")

    async def _keep(self) -> None:
        delay = 0.5
        connected_before = False
        while True:
            try:
                async with self.client:
                    self.ready.set()
                    delay = 0.5
                    log.info("%s: %s", self.identifier, "reconnected" if connected_before else "connected")
                    connected_before = True
                    # No subscriptions: this only returns (by raising) when the connection drops.
                    async for _ in self.client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                log.warning("%s: disconnected (%s); retry in %.1f s", self.identifier, exc, delay)
            finally:
                self.ready.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
            try:
                await asyncio.wait_for(self.ready.wait(), self.timeout_s)
            except TimeoutError:
                error = PublishError(f"{self.identifier}: not connected")
                continue
            try:
                await self.client.publish(topic, payload, qos=1, retain=retain, timeout=self.timeout_s)
                return
            except aiomqtt.MqttError as exc:
                error = exc
        raise PublishError(f"{topic}: {error}") from error

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
            self._task = None


class SharedConnectionsPublisher:
    """A few connections publish for all devices; a device always goes through the same one (order kept)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connections: int = 2,
        username: str | None = None,
        password: str | None = None,
        client_id_prefix: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        prefix = client_id_prefix or f"sc-sim-{os.getpid()}"
        self._connections = [
            _Connection(
                host,
                port,
                identifier=f"{prefix}-{k}",
                username=username,
                password=password,
                timeout_s=timeout_s,
                retries=retries,
            )
            for k in range(connections)
        ]

    async def start(self, devices: Sequence[Mapping[str, Any]]) -> None:
        for c in self._connections:
            c.start()

    def _for(self, device_id: str) -> _Connection:
        return self._connections[zlib.crc32(device_id.encode()) % len(self._connections)]

    async def publish(self, message: Message) -> None:
        await self._for(message.device_id).publish(message.topic, message.encode(), retain=message.retain)

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self._connections))


class _DeviceConnection:
    """One device's own MQTT 5 connection: its credentials, its last will, its ``cmd`` subscription.

    Kept up by its own loop like ``_Connection``, except while the device is meant to be offline
    (``go_offline``: a DISCONNECT with reason 0x04, so the broker publishes the will) and that a
    refused login is counted and tried again only every ``REFUSED_RETRY_S``. One message at a time
    (``lock``): order is kept and the PUBACK seen is that message's.
    """

    def __init__(
        self,
        host: str,
        port: int,
        credentials: DeviceCredentials,
        *,
        device_type: str,
        stats: RunStats,
        gate: asyncio.Semaphore,
        timeout_s: float,
        retries: int,
    ) -> None:
        self.device_id = credentials.device_id
        base = f"sc/v1/{device_type}/{credentials.device_id}"
        self.cmd_topic = f"{base}/cmd"
        self.stats = stats
        self.gate = gate
        self.timeout_s = timeout_s
        self.retries = retries
        self.client = aiomqtt.Client(
            host,
            port,
            identifier=credentials.client_id,
            username=credentials.username,
            password=credentials.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(f"{base}/status", WILL_PAYLOAD, qos=1, retain=True),
            timeout=timeout_s,
        )
        self.client.pending_calls_threshold = 100_000
        # aiomqtt does not tell a refused PUBACK from a good one: listen in on paho's callback
        self._paho = self.client._client
        self._puback: ReasonCode | None = None
        inner: Any = self._paho.on_publish

        def on_publish(client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
            self._puback = reason
            if inner is not None:
                inner(client, userdata, mid, reason, props)

        self._paho.on_publish = on_publish
        self.lock = asyncio.Lock()
        self.ready = asyncio.Event()
        self.down = asyncio.Event()
        self.down.set()
        self.wanted = asyncio.Event()
        self.wanted.set()
        self.refused = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep(), name=f"mqtt-{self.device_id}")

    async def _keep(self) -> None:
        delay = 0.5
        connected_before = False
        while True:
            await self.wanted.wait()
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with self.gate:
                        await stack.enter_async_context(self.client)
                    self.down.clear()
                    self.refused.clear()
                    await self.client.subscribe(self.cmd_topic, qos=1)
                    self.ready.set()
                    delay = 0.5
                    log.debug("%s: %s", self.device_id, "reconnected" if connected_before else "connected")
                    connected_before = True
                    if not self.wanted.is_set():  # told to go offline while connecting
                        self._cut()
                    async for message in self.client.messages:
                        self.stats.commands += 1
                        log.debug("%s: command on %s", self.device_id, message.topic)
            except aiomqtt.MqttError as exc:
                if _refusal(exc):
                    if not self.refused.is_set():
                        log.warning("%s: login refused (%s)", self.device_id, exc)
                    self.stats.refused[self.device_id] += 1
                    self.refused.set()
                    delay = max(delay, REFUSED_RETRY_S)
                elif self.wanted.is_set():
                    log.warning("%s: disconnected (%s); retry in %.1f s", self.device_id, exc, delay)
            finally:
                self.ready.clear()
                self.down.set()
            if self.wanted.is_set():
                await asyncio.sleep(delay)
                delay = delay if delay >= REFUSED_RETRY_S else min(delay * 2, 10.0)

    def _cut(self) -> None:
        """Drop the connection as a device losing power or radio would: the broker sends the last will."""
        self._paho.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))

    async def go_offline(self) -> None:
        self.wanted.clear()
        if self.ready.is_set():
            self.ready.clear()
            self._cut()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.down.wait(), self.timeout_s)

    def come_online(self) -> None:
        self.wanted.set()

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
            if not self.ready.is_set():
                if not self.refused.is_set():
                    await _first_of(self.ready, self.refused, timeout=self.timeout_s)
                if self.refused.is_set() and not self.ready.is_set():
                    raise PublishError(f"{self.device_id}: login refused")
                if not self.ready.is_set():
                    error = PublishError(f"{self.device_id}: not connected")
                    continue
            self._puback = None
            try:
                await self.client.publish(topic, payload, qos=1, retain=retain, timeout=self.timeout_s)
            except aiomqtt.MqttError as exc:
                error = exc
                continue
            if self._puback is not None and self._puback.is_failure:
                self.stats.denied += 1
                raise PublishError(f"{topic}: refused by the broker ({self._puback})")
            return
        raise PublishError(f"{topic}: {error}") from error

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
            self._task = None


class DeviceConnectionsPublisher:
    """One MQTT 5 connection per device, logged in with the device's own credentials.

    ``credentials``: device_id -> DeviceCredentials (``read_credentials_csv``); every device given to
    ``start`` needs its own. Counters (refused logins, refused publishes, commands received) go to
    ``stats``. At most ``connect_concurrency`` connections are being opened at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        credentials: Mapping[str, DeviceCredentials],
        *,
        stats: RunStats | None = None,
        connect_concurrency: int = CONNECT_CONCURRENCY,
        timeout_s: float = 10.0,
        retries: int = 3,
    ) -> None:
        if connect_concurrency < 1:
            raise ValueError("connect_concurrency must be >= 1")
        self.host, self.port = host, port
        self.credentials = credentials
        self.stats = stats if stats is not None else RunStats()
        self.connect_concurrency = connect_concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self._connections: dict[str, _DeviceConnection] = {}

    async def start(self, devices: Sequence[Mapping[str, Any]]) -> None:
        missing = [str(d["device_id"]) for d in devices if d["device_id"] not in self.credentials]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"no credentials for {len(missing)} device(s): {shown}")
        gate = asyncio.Semaphore(self.connect_concurrency)
        for d in devices:
            conn = _DeviceConnection(
                self.host,
                self.port,
                self.credentials[d["device_id"]],
                device_type=str(d["device_type"]),
                stats=self.stats,
                gate=gate,
                timeout_s=self.timeout_s,
                retries=self.retries,
            )
            self._connections[conn.device_id] = conn
            conn.start()

    async def publish(self, message: Message) -> None:
        conn = self._connections.get(message.device_id)
        if conn is None:
            raise PublishError(f"{message.device_id}: no connection (not given to start)")
        async with conn.lock:
            if message.fault == "offline":
                await conn.go_offline()
                return
            if message.fault == "online":
                conn.come_online()
            await conn.publish(message.topic, message.encode(), retain=message.retain)

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self._connections.values()))
        self._connections.clear()


async def run_community(
    devices: Sequence[Mapping[str, Any]],
    *,
    host: str,
    port: int,
    speed: float = 1.0,
    interval_s: float | None = None,
    duration_s: float | None = None,
    username: str | None = None,
    password: str | None = None,
    stop: asyncio.Event | None = None,
    on_publish: Callable[[Message], None] | None = None,
    real_intervals: bool = False,
    seed: int = 0,
    anomalies: AnomalyRates | None = None,
    jitter: float = 0.1,
    start_ms: int | None = None,
    publisher: Publisher | None = None,
    connections: int = 2,
    max_in_flight: int = 256,
    offline_on_stop: bool = True,
    stats: RunStats | None = None,
    shutdown_timeout_s: float = 10.0,
    faults: FaultRates | None = None,
    credentials: Mapping[str, DeviceCredentials] | None = None,
    connect_concurrency: int = CONNECT_CONCURRENCY,
) -> RunStats:
    """Simulate ``devices`` (registration rows) and publish what they send until ``stop`` or ``duration_s``.

    - Cadence: every device reports every ``interval_s`` simulated seconds (default 5, ±``jitter``), or
      at its thing model's report interval with ``real_intervals``; events happen in between.
    - ``speed``: simulated seconds per wall second. ``duration_s`` is wall time. Timestamps are the
      simulated clock, which starts at ``start_ms``; by default now, or, when speeding up for a known
      duration, far enough back that the simulated clock reaches the wall clock at the end (so that
      no timestamp lies in the future; the gateway distrusts those older than 7 days).
    - ``on_publish(message)`` is called for each message the broker acknowledged.
    - ``publisher``: how messages reach the broker; default ``connections`` shared connections to
      ``host``:``port`` logged in as ``username``, or, given ``credentials`` (device_id ->
      DeviceCredentials, every device needs its own), one connection per device
      (``DeviceConnectionsPublisher``, at most ``connect_concurrency`` opening at once). At the end,
      each device's retained status is set to offline (as its last will would) unless
      ``offline_on_stop`` is false. Finishing in-flight messages and saying offline each get at most
      ``shutdown_timeout_s``.
    - ``faults``: device and network faults (``FaultRates``); None: none, which is also what all-zero
      rates give. Devices offline at the end are left to their last will.

    Returns the counters (also updated live in ``stats`` if given).
    """
    if speed <= 0:
        raise ValueError("speed must be > 0")
    if real_intervals and interval_s is not None:
        raise ValueError("give interval_s or real_intervals, not both")
    report_interval_s = None if real_intervals else (interval_s or DEFAULT_INTERVAL_S)
    stop = stop or asyncio.Event()
    stats = stats if stats is not None else RunStats()
    loop = asyncio.get_running_loop()
    if start_ms is None:
        start_ms = int(time.time() * 1000)
        if speed > 1 and duration_s:
            start_ms -= int((speed - 1) * duration_s * 1000)
    sims: list[DeviceSim] = [
        make_simulator(
            row,
            start_ms=start_ms,
            seed=seed,
            report_interval_s=report_interval_s,
            jitter=jitter,
            anomalies=anomalies,
            faults=faults,
        )
        for row in devices
    ]
    if publisher is None and credentials is not None:
        missing = [str(d["device_id"]) for d in devices if d["device_id"] not in credentials]
        if missing:
            raise ValueError(f"no credentials for {len(missing)} device(s): {', '.join(missing[:5])}")
        publisher = DeviceConnectionsPublisher(
            host, port, credentials, stats=stats, connect_concurrency=connect_concurrency
        )
    publisher = publisher or SharedConnectionsPublisher(
        host, port, connections=connections, username=username, password=password
    )
    wall0 = loop.time()
    deadline = wall0 + duration_s if duration_s is not None else None

    def sim_now() -> int:
        return start_ms + int((loop.time() - wall0) * 1000 * speed)

    in_flight = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    failing: set[str] = set()  # devices whose failures were logged already (log state changes only)

    async def send(message: Message) -> None:
        try:
            await publisher.publish(message)
        except PublishError as exc:
            stats.failed += 1
            if message.device_id not in failing:
                failing.add(message.device_id)
                log.warning("giving up on a message (and not saying so again for this device): %s", exc)
        except asyncio.CancelledError:
            stats.failed += 1  # still unacknowledged when the run ended
            raise
        else:
            stats.acked += 1
            stats.acked_by_kind[message.kind] += 1
            if on_publish is not None:
                try:
                    on_publish(message)
                except Exception:
                    log.exception("on_publish callback failed")
        finally:
            in_flight.release()

    async def dispatch(message: Message) -> None:
        await in_flight.acquire()  # a slow broker slows the simulation instead of piling up tasks
        stats.sent += 1
        if message.fault is not None:
            stats.faults[message.fault] += 1
        task = asyncio.create_task(send(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def drain() -> bool:
        if tasks:
            _, not_done = await asyncio.wait(set(tasks), timeout=shutdown_timeout_s)
            return not not_done
        return True

    await publisher.start(devices)
    try:
        for sim in sims:
            await dispatch(sim.status(sim_now()))
        heap = [(sim.next_due_ms, i, sim) for i, sim in enumerate(sims)]
        heapq.heapify(heap)
        while heap and not stop.is_set():
            wait_s = (heap[0][0] - sim_now()) / 1000 / speed
            if deadline is not None:
                wait_s = min(wait_s, deadline - loop.time())
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait_s)
            if stop.is_set() or (deadline is not None and loop.time() >= deadline):
                break
            now = sim_now()
            while heap[0][0] <= now:
                _, i, sim = heapq.heappop(heap)
                lost_before = sim.fault_counts["lost"]
                for message in sim.advance(now):
                    await dispatch(message)
                stats.lost += sim.fault_counts["lost"] - lost_before
                heapq.heappush(heap, (sim.next_due_ms, i, sim))
        drained = await drain()

        async def say_offline() -> None:
            for sim in sims:
                if not sim.offline:  # one that dropped off has its last will as its status already
                    await dispatch(sim.status(sim_now(), online=False))
            await drain()

        if offline_on_stop and not drained:
            log.warning(
                "messages still unacknowledged after %.0f s; not setting statuses offline", shutdown_timeout_s
            )
        elif offline_on_stop:
            # bounded: with the broker gone, stopping must not wait for every retry to give up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(say_offline(), shutdown_timeout_s)
    finally:
        pending = list(tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await publisher.stop()
    return stats


# -- CLI --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulators.run", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--username", default=os.environ.get("SC_SIM_USERNAME"))
    p.add_argument("--password", default=os.environ.get("SC_SIM_PASSWORD"), help="or SC_SIM_PASSWORD")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--devices-csv", metavar="FILE", help="registration rows CSV")
    src.add_argument("--community-seed", type=int, metavar="N", help="generate a community (default: seed 1)")
    p.add_argument("--community-name", default="和平里社区")
    cadence = p.add_mutually_exclusive_group()
    cadence.add_argument("--interval", type=float, metavar="S", help="report every S s (default 5)")
    cadence.add_argument("--real-intervals", action="store_true", help="use each type's report interval")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S wall seconds (default: ^C)")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    p.add_argument("--seed", type=int, help="behaviour seed (default: the community seed, else 0)")
    p.add_argument("--anomaly-scale", type=float, default=1.0, help="multiply the anomaly rates (0: none)")
    p.add_argument(
        "--anomaly",
        action="append",
        default=[],
        metavar="NAME=PER_DAY",
        help="set one anomaly rate, per device per simulated day (repeatable), e.g. leakage=2",
    )
    p.add_argument(
        "--fault-scale",
        type=float,
        default=0.0,
        help="multiply the default fault rates (default 0: no faults; 1: the small default rates)",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=PER_DAY",
        help=f"set one fault rate (repeatable): {', '.join(FaultRates.RATES)}, e.g. duplicate=20",
    )
    p.add_argument(
        "--credentials-csv",
        metavar="FILE",
        help="one connection per device with its own login (device_id,username,password,client_id)",
    )
    p.add_argument("--connections", type=int, default=2, help="shared MQTT connections")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=CONNECT_CONCURRENCY,
        help=f"device connections opening at once, with --credentials-csv (default {CONNECT_CONCURRENCY})",
    )
    p.add_argument("--progress", type=float, default=10.0, metavar="S", help="print counters every S s")
    p.add_argument("--keep-online", action="store_true", help="leave the retained statuses online at the end")
    return p


def _rates(pairs: Sequence[str], allowed: Sequence[str], what: str) -> dict[str, float]:
    """["leakage=2", ...] -> {"leakage": 2.0}; SystemExit naming the problem otherwise."""
    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or name not in allowed:
            raise SystemExit(f"--{what} {pair!r}: expected NAME=PER_DAY, NAME one of {', '.join(allowed)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"--{what} {pair!r}: {value!r} is not a number") from None
        if out[name] < 0:
            raise SystemExit(f"--{what} {pair!r}: a rate is >= 0")
    return out


async def _main(a: argparse.Namespace) -> int:
    anomaly_names = [f.name for f in dataclasses.fields(AnomalyRates)]
    anomalies = dataclasses.replace(
        AnomalyRates().scaled(a.anomaly_scale), **_rates(a.anomaly, anomaly_names, "anomaly")
    )
    fault_rates: dict[str, Any] = _rates(a.fault, FaultRates.RATES, "fault")
    faults = dataclasses.replace(FaultRates().scaled(a.fault_scale), **fault_rates)
    try:  # a bad file is a start-up error in one line, not a traceback
        credentials = read_credentials_csv(a.credentials_csv) if a.credentials_csv else None
        if a.devices_csv:
            devices = read_devices_csv(a.devices_csv)
            seed = a.seed if a.seed is not None else 0
        else:
            community_seed = a.community_seed if a.community_seed is not None else 1
            devices = generate_community(a.community_name, seed=community_seed)
            seed = a.seed if a.seed is not None else community_seed
    except (OSError, ValueError) as exc:
        raise SystemExit(f"simulators.run: {exc}") from None
    if credentials is not None:
        missing = [str(d["device_id"]) for d in devices if d["device_id"] not in credentials]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise SystemExit(f"simulators.run: no credentials for {len(missing)} device(s): {shown}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats = RunStats()

    async def progress() -> None:
        while True:
            await asyncio.sleep(a.progress)
            print(stats.summary(), file=sys.stderr, flush=True)

    reporter = asyncio.create_task(progress()) if a.progress > 0 else None
    how = "one connection per device" if credentials is not None else f"{a.connections} shared connections"
    print(f"simulating {len(devices)} devices against {a.host}:{a.port}, {how}", file=sys.stderr, flush=True)
    try:
        await run_community(
            devices,
            host=a.host,
            port=a.port,
            speed=a.speed,
            interval_s=a.interval,
            real_intervals=a.real_intervals,
            duration_s=a.duration,
            username=a.username,
            password=a.password,
            stop=stop,
            seed=seed,
            anomalies=anomalies,
            faults=faults if faults.active else None,
            credentials=credentials,
            connections=a.connections,
            connect_concurrency=a.connect_concurrency,
            offline_on_stop=not a.keep_online,
            stats=stats,
        )
    finally:
        if reporter is not None:
            reporter.cancel()
    print(stats.summary(), flush=True)
    return 0 if stats.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
