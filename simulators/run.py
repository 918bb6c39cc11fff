"""Run a community of simulated devices against an MQTT broker, in (optionally sped-up) real time.

    python -m simulators.run --host 127.0.0.1 --port 1883 --community-seed 1 --duration 60
    python -m simulators.run --host 127.0.0.1 --port 1883 --devices-csv devices.csv --real-intervals

Each device first publishes a retained ``{"online": true, "fw": ...}`` status, then telemetry and
events on ``sc/v1/{type}/{id}/...`` at QoS 1. Nothing is printed per message; counters are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import logging
import os
import signal
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiomqtt

from simulators.behaviour import AnomalyRates, DeviceSim, Message, make_simulator
from simulators.community import generate_community, read_devices_csv

log = logging.getLogger("simulators.run")

DEFAULT_INTERVAL_S = 5.0


class PublishError(Exception):
    """A message could not be delivered to the broker (after retries)."""


class Publisher(Protocol):
    """Carries device messages to the broker.

    Implementations decide the connections: a few shared ones (``SharedConnectionsPublisher``, like an
    adaptor account publishing for many devices) or one per device (client id = device id, its own
    credentials and last will), which only needs the device rows given to ``start``.
    """

    async def start(self, devices: Sequence[Mapping[str, Any]]) -> None:
        """Open the connections for these devices (may return before they are up)."""

    async def publish(self, message: Message) -> None:
        """Publish at QoS 1; return once the broker acknowledged it, raise PublishError if it cannot."""

    async def stop(self) -> None:
        """Close the connections."""


@dataclass
class RunStats:
    """What a run did: messages handed to the publisher, acknowledged by the broker, given up on."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    acked_by_kind: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        kinds = " ".join(f"{k}={n}" for k, n in sorted(self.acked_by_kind.items()))
        return f"sent={self.sent} acked={self.acked} failed={self.failed} ({kinds})"


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
      ``host``:``port``. At the end, each device's retained status is set to offline (as its last will
      would) unless ``offline_on_stop`` is false. Finishing in-flight messages and saying offline
      each get at most ``shutdown_timeout_s``.

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
        )
        for row in devices
    ]
    publisher = publisher or SharedConnectionsPublisher(
        host, port, connections=connections, username=username, password=password
    )
    wall0 = loop.time()
    deadline = wall0 + duration_s if duration_s is not None else None

    def sim_now() -> int:
        return start_ms + int((loop.time() - wall0) * 1000 * speed)

    in_flight = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def send(message: Message) -> None:
        try:
            await publisher.publish(message)
        except PublishError as exc:
            stats.failed += 1
            log.warning("giving up on a message: %s", exc)
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
                for message in sim.advance(now):
                    await dispatch(message)
                heapq.heappush(heap, (sim.next_due_ms, i, sim))
        drained = await drain()

        async def say_offline() -> None:
            for sim in sims:
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
    p.add_argument("--connections", type=int, default=2, help="shared MQTT connections")
    p.add_argument("--progress", type=float, default=10.0, metavar="S", help="print counters every S s")
    p.add_argument("--keep-online", action="store_true", help="leave the retained statuses online at the end")
    return p


async def _main(a: argparse.Namespace) -> int:
    if a.devices_csv:
        devices = read_devices_csv(a.devices_csv)
        seed = a.seed if a.seed is not None else 0
    else:
        community_seed = a.community_seed if a.community_seed is not None else 1
        devices = generate_community(a.community_name, seed=community_seed)
        seed = a.seed if a.seed is not None else community_seed
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
    print(f"simulating {len(devices)} devices against {a.host}:{a.port}", file=sys.stderr, flush=True)
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
            anomalies=AnomalyRates().scaled(a.anomaly_scale),
            connections=a.connections,
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
