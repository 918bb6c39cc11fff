"""The rules stage: workers hand stored readings to one rules process, which evaluates them and writes alarms.

Rule state is per device, but a shared subscription spreads one device's messages over all workers, so
the rules run in a single process per installation (docs/architecture.md). Each worker, after a batch is
durable and acknowledged, packs its readings as compact tuples and puts them, one message per batch, on a
bounded multiprocessing queue (`RulesFeeder`). It never blocks its event loop: when the queue is full the
batch waits in the worker (`sc_rules_backlog`) and an async loop retries; past a bound the worker's next
batch waits too, which slows intake (the broker holds the rest). Nothing is dropped.

The rules process (`rules_main`, driven by `RulesRunner`) owns the `rules.engine.Engine`: it restores the
engine's snapshot at start, evaluates every batch, ticks once a second, saves the snapshot atomically every
SC_RULES_SNAPSHOT_S and at stop, reloads rule files whose mtimes changed (a bad edit is logged and the
old rules kept), and writes verdicts to the SQL `alarms` table (`gateway.alarms.AlarmStore`). It stops
when the supervisor sends `None`, after every worker has stopped, so it sees everything they stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import json
import logging
import os
import queue
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from gateway import logs, metrics
from gateway.alarms import AlarmStore
from gateway.db import make_engine, write_transaction
from gateway.incident_store import IncidentStore
from gateway.messages import Reading
from gateway.registry import RegisteredDevice, Registry
from gateway.settings import Settings
from incidents.model import DeviceLike
from rules.engine import Engine, RuleSet
from rules.loader import DEFAULT_RULES_DIR, RuleLoadError, load_rules, rule_files
from rules.model import Observation, Verdict

log = logging.getLogger("gateway.evaluate")

#: the rules process's own /metrics (on SC_METRICS_PORT + SC_WORKERS)
RULES_REGISTRY = CollectorRegistry(auto_describe=True)
EVALUATED = Counter(
    "sc_rules_evaluated", "observations evaluated by the rules process", registry=RULES_REGISTRY
)
VERDICTS = Counter(
    "sc_rules_verdicts", "verdicts (alarm changes), by change", ["change"], registry=RULES_REGISTRY
)
LAG = Gauge(
    "sc_rules_lag_seconds",
    "gateway receive time of the newest evaluated observation to its evaluation",
    registry=RULES_REGISTRY,
)
RULES_COUNT = Gauge("sc_rules_loaded", "rules in the rule set in use", registry=RULES_REGISTRY)
INCIDENT_CHANGES = Counter(
    "sc_incident_changes",
    "incident changes written (opened, updated, resolved, escalated, reminder)",
    ["change"],
    registry=RULES_REGISTRY,
)

TICK_MS = 1000
#: observations of a stored batch evaluated before the urgent lane is looked at again (~5 ms of work)
URGENT_CHECK_EVERY = 500
RELOAD_CHECK_MS = 2000
#: a compact, picklable Observation (Observation's mappings are read-only proxies, which do not pickle)
Packed = tuple[Any, ...]


class ObservationQueue(Protocol):
    """What the hand-off needs of a multiprocessing queue (tests use a queue.Queue)."""

    def put_nowait(self, item: Any, /) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...


# ---- packing --------------------------------------------------------------------------------------------


def pack(readings: Sequence[Reading]) -> list[Packed]:
    """Readings as compact tuples with their registry context (see `unpack`)."""
    out = []
    for r in readings:
        d: Any = r.device
        attrs = getattr(d, "attributes", None)
        out.append(
            (
                d.device_id,
                d.device_type,
                r.kind,
                r.ts_ms,
                r.received_ms or r.ts_ms,
                r.values,
                r.event,
                r.seq,
                d.community,
                d.grid_code,
                getattr(d, "building", None),
                dict(attrs) if attrs else None,
                d.lifecycle,
            )
        )
    return out


_EMPTY: Any = MappingProxyType({})


def unpack(t: Packed) -> Observation:
    """The Observation of a packed reading (as `rules.model.observation_of` would make it)."""
    did, dtype, kind, ts, received, values, event, seq, community, grid, building, attrs, lifecycle = t
    return Observation(
        device_id=did,
        device_type=dtype,
        kind=kind,
        ts_ms=ts,
        received_ms=received,
        values=values,
        event=event,
        seq=seq,
        community=community,
        grid_code=grid,
        building=building,
        attributes=MappingProxyType(attrs) if attrs else _EMPTY,
        lifecycle=lifecycle,
    )


# ---- worker side ----------------------------------------------------------------------------------------


class RulesFeeder:
    """The `Pipeline(on_readings=...)` hook of a worker: one queue message per stored batch."""

    def __init__(
        self,
        q: ObservationQueue,
        *,
        max_pending_batches: int = 64,
        retry_s: float = 0.02,
        urgent: ObservationQueue | None = None,
    ) -> None:
        self._q = q
        self._urgent = urgent
        self._pending: deque[list[Packed]] = deque()
        self._backlog = 0
        self._max_pending = max_pending_batches
        self._retry_s = retry_s
        self._has_pending = asyncio.Event()
        self.sent = 0

    @property
    def backlog(self) -> int:
        """Observations waiting in this worker for room in the queue."""
        return self._backlog

    def urgent(self, readings: list[Reading]) -> None:
        """The fast lane (SC_BATCH_URGENT_TYPES events, e.g. a smoke alarm): handed on at decode, before
        storage, so the rules see it ahead of the stored backlog. The reading still comes again through
        the normal path after storage: the engine counts an event once per (seq, device time), so the
        second is a duplicate. A full lane just leaves it to the normal path."""
        if self._urgent is None:
            return
        with contextlib.suppress(queue.Full):
            self._urgent.put_nowait(pack(readings))
            metrics.RULES_SENT_URGENT.inc(len(readings))

    def __call__(self, readings: list[Reading]) -> Awaitable[None] | None:
        packed = pack(readings)
        if not self._pending and self._put(packed):
            return None
        self._pending.append(packed)
        self._backlog += len(packed)
        metrics.RULES_BACKLOG.set(self._backlog)
        self._has_pending.set()
        if len(self._pending) >= self._max_pending:
            return self._wait_for_room()
        return None

    def _put(self, packed: list[Packed]) -> bool:
        try:
            self._q.put_nowait(packed)
        except queue.Full:
            return False
        self.sent += len(packed)
        metrics.RULES_SENT.inc(len(packed))
        return True

    def _flush_pending(self) -> None:
        while self._pending and self._put(self._pending[0]):
            self._backlog -= len(self._pending.popleft())
        metrics.RULES_BACKLOG.set(self._backlog)
        if not self._pending:
            self._has_pending.clear()

    async def _wait_for_room(self) -> None:
        while len(self._pending) >= self._max_pending:
            await asyncio.sleep(self._retry_s)

    async def run(self) -> None:
        """Retry what waits, without blocking the event loop."""
        while True:
            await self._has_pending.wait()
            self._flush_pending()
            if self._pending:
                await asyncio.sleep(self._retry_s)

    async def drain(self, timeout_s: float) -> int:
        """At shutdown: hand on what waits, within timeout_s; returns the observations left behind."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self._flush_pending()
            if self._pending:
                await asyncio.sleep(self._retry_s)
        if self._pending:
            log.error("rules_handoff_incomplete", extra={"observations": self._backlog})
        return self._backlog


# ---- the rules process ----------------------------------------------------------------------------------


def rule_paths(s: Settings) -> list[Path]:
    """The default rules, then SC_RULES_DIRS in order."""
    return [DEFAULT_RULES_DIR, *s.rule_paths()]


def load_configured_rules(s: Settings) -> RuleSet:
    """Load and validate the rules the settings name (RuleLoadError names the file and rule)."""
    return load_rules(rule_paths(s))


def _signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for f in rule_files(paths):
        try:
            st = f.stat()
        except OSError:
            out.append((str(f), -1, -1))
        else:
            out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dt(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


class Wakeup(Protocol):
    """The write end of the pipe the delivery process waits on (multiprocessing Connection)."""

    def fileno(self) -> int: ...
    def send_bytes(self, buf: bytes, /) -> None: ...


class DeviceLookup:
    """Registry devices for the incidents stage (place, routing, lifecycle), cached until the registry's
    version changes (checked at most once per round)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._version = -1
        self._cache: dict[str, RegisteredDevice | None] = {}

    def devices(self, verdicts: Sequence[Verdict]) -> dict[str, DeviceLike]:
        version = self.registry.current_version()
        if version != self._version:
            self._cache.clear()
            self._version = version
        out: dict[str, DeviceLike] = {}
        for v in verdicts:
            did = v.device_id or (v.members[0] if v.members else None)
            if did is None or did in out:
                continue
            if did not in self._cache:
                self._cache[did] = self.registry.describe(did)
            found = self._cache[did]
            if found is not None:
                out[did] = found
        return out


def wake(wakeup: Wakeup | None) -> None:
    """Tell the delivery process there is something to send (gateway.delivery.wake_delivery)."""
    if wakeup is not None:
        from gateway.delivery import wake_delivery

        wake_delivery(wakeup)  # type: ignore[arg-type]


class RulesRunner:
    """The rules process's work, without the process: testable with a queue.Queue and a SQLite file.

    With `incidents`, verdicts also become governance incidents, written in the alarms' transaction with
    their outbox rows; `wakeup` is then poked after each commit that queued deliveries. Every
    SC_ESCALATION_CHECK_S it escalates and reminds (IncidentStore.escalate_due / remind_due) and resolves
    in its engine the alarms whose cases the incident system closed."""

    def __init__(
        self,
        s: Settings,
        store: AlarmStore,
        *,
        rules: RuleSet | None = None,
        incidents: IncidentStore | None = None,
        registry: Registry | None = None,
        wakeup: Wakeup | None = None,
    ) -> None:
        self.s = s
        self.store = store
        self.incidents = incidents
        self.lookup = DeviceLookup(registry) if registry is not None and incidents is not None else None
        self.wakeup = wakeup
        self.paths = rule_paths(s)
        self._signature = _signature(self.paths)
        self.engine = Engine(rules if rules is not None else load_rules(self.paths))
        self.state_path = s.rules_state_path
        self._lifecycles: dict[str, str] = {}
        self._unwritten: list[Verdict] = []
        self._store_failing = False
        now = _now_ms()
        self._next_tick = now + TICK_MS
        self._next_reload_check = now + RELOAD_CHECK_MS
        self._next_snapshot = now + int(s.rules_snapshot_s * 1000)
        self._next_incident_check = now + int(s.escalation_check_s * 1000)
        self.observations = 0
        self.verdicts = 0

    # -- state

    def restore(self) -> None:
        path = self.state_path
        if not path.exists():
            return
        try:
            self.engine.restore(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = path.with_name(path.name + ".bad")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log.error(
                "rules_state_unreadable",
                extra={"path": str(path), "moved_to": str(aside), "error": str(exc)},
            )
            return
        restarted = self.engine.restart_absence_clocks(_now_ms())
        log.info(
            "rules_state_restored",
            extra={
                "path": str(path),
                "open_alarms": len(self.engine.open_alarms()),
                "absence_clocks_restarted": restarted,
            },
        )

    def save(self) -> None:
        """Write the engine's snapshot atomically (temp file, fsync, rename)."""
        path = self.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps(self.engine.snapshot(), separators=(",", ":"), ensure_ascii=False)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- work

    def process(self, batch: Sequence[Packed]) -> None:
        observations = [unpack(t) for t in batch]
        lifecycles = self._lifecycles
        for obs in observations:
            lifecycles[obs.device_id] = obs.lifecycle
        self.observations += len(observations)
        self._emit(self.engine.process_batch(observations))
        EVALUATED.inc(len(observations))
        if observations:
            LAG.set(max(0, _now_ms() - observations[-1].received_ms) / 1000)

    def _emit(self, verdicts: list[Verdict]) -> None:
        if verdicts:
            self.verdicts += len(verdicts)
            self._unwritten.extend(verdicts)
            for v in verdicts:
                VERDICTS.labels(v.change).inc()
                if v.change in ("opened", "cleared", "escalated"):
                    log.info(
                        f"alarm_{v.change}",
                        extra={"rule": v.rule_id, "key": v.key, "urgency": v.urgency, "text": v.message},
                    )
        self._write()

    def _write(self) -> None:
        if not self._unwritten:
            return
        try:
            now_ms = _now_ms()
            devices = self.lookup.devices(self._unwritten) if self.lookup is not None else {}
            with write_transaction(self.store.engine) as conn:
                self.store.apply(self._unwritten, self._lifecycles, now_ms, conn=conn)
                changes = (
                    self.incidents.apply_many(conn, self._unwritten, devices, _dt(now_ms))
                    if self.incidents is not None
                    else []
                )
        except Exception as exc:
            # Infrastructure: keep the verdicts and try again on the next housekeeping round.
            if not self._store_failing:
                log.error("alarm_store_failing", extra={"error": str(exc), "waiting": len(self._unwritten)})
            self._store_failing = True
            return
        if self._store_failing:
            log.warning("alarm_store_recovered")
        self._store_failing = False
        self._unwritten = []
        self._incident_changes([(i, t.rsplit(".", 1)[-1]) for i, t in changes])

    def _incident_changes(self, changes: Sequence[tuple[Any, str]]) -> None:
        if not changes:
            return
        for incident, change in changes:
            INCIDENT_CHANGES.labels(change).inc()
            if change != "updated" or incident.escalation_level:
                log.info(
                    f"incident_{change}",
                    extra={
                        "incident": incident.incident_id,
                        "rule": incident.rule_id,
                        "urgency": incident.urgency,
                        "commissioning": incident.commissioning,
                    },
                )
        if any(not i.commissioning for i, _ in changes):
            wake(self.wakeup)

    def incident_housekeeping(self, now_ms: int) -> None:
        """Escalations, reminders, and alarms closed from outside (the case system closed the case)."""
        if self.incidents is None:
            return
        now = _dt(now_ms)
        try:
            changes = [(i, "escalated") for i in self.incidents.escalate_due(now)]
            changes += [(i, "reminder") for i in self.incidents.remind_due(self.s.reminder_after_h, now)]
            resolutions = self.incidents.take_alarm_resolutions(now)
        except Exception as exc:
            log.error("incident_housekeeping_failed", extra={"error": str(exc)})
            return
        self._incident_changes(changes)
        for rule_id, key in resolutions:
            self._emit(self.engine.resolve(rule_id, key, now_ms))

    def housekeeping(self, now_ms: int | None = None) -> None:
        """Tick, reload changed rule files and save the snapshot when each is due."""
        now = _now_ms() if now_ms is None else now_ms
        if now >= self._next_tick:
            self._emit(self.engine.tick(now))
            self._next_tick = now + TICK_MS
        elif self._unwritten:
            self._write()
        if now >= self._next_reload_check:
            self._next_reload_check = now + RELOAD_CHECK_MS
            self.reload_if_changed(now)
        if now >= self._next_incident_check:
            self._next_incident_check = now + int(self.s.escalation_check_s * 1000)
            self.incident_housekeeping(now)
        if now >= self._next_snapshot:
            self._next_snapshot = now + int(self.s.rules_snapshot_s * 1000)
            try:
                self.save()
            except OSError as exc:
                log.error("rules_state_save_failed", extra={"path": str(self.state_path), "error": str(exc)})

    def reload_if_changed(self, now_ms: int) -> bool:
        sig = _signature(self.paths)
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            rules = load_rules(self.paths)
        except RuleLoadError as exc:
            log.error("rules_reload_failed", extra={"error": str(exc), "file": exc.file, "rule": exc.rule})
            return False
        self._emit(self.engine.swap(rules, now_ms))
        RULES_COUNT.set(len(rules))
        log.info("rules_reloaded", extra={"rules": len(rules), "files": len(rules.files)})
        return True

    def wait_s(self) -> float:
        """How long the loop may wait for a batch before housekeeping is due."""
        return max(0.0, min(self._next_tick, self._next_snapshot) - _now_ms()) / 1000

    def stop(self) -> None:
        self._emit(self.engine.tick(_now_ms()))
        self.save()
        if self._unwritten:
            log.error("alarms_not_written_at_stop", extra={"verdicts": len(self._unwritten)})


def die_with_parent(parent_pid: int) -> None:
    """Linux: be killed when the supervisor dies (a crash of the gateway is a crash of all its processes)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def next_item(q: ObservationQueue, urgent: ObservationQueue | None, timeout: float) -> Any:
    """The next batch for the rules process: the urgent lane's first, else the normal queue's; `()` when
    nothing came within `timeout`."""
    if urgent is not None:
        with contextlib.suppress(queue.Empty):
            return urgent.get(False)
        readers: list[Any] = [getattr(q, "_reader", None), getattr(urgent, "_reader", None)]
        if all(readers):  # multiprocessing queues: wait on both pipes at once
            mp_wait(readers, timeout)
            for source in (urgent, q):
                with contextlib.suppress(queue.Empty):
                    return source.get(False)
            return ()
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return ()


def run_rules(
    s: Settings, q: ObservationQueue, wakeup: Wakeup | None = None, urgent: ObservationQueue | None = None
) -> None:
    """The rules process's loop, until `None` arrives on the queue."""
    engine = make_engine(s.database_url)
    incidents = IncidentStore.configured(engine, s) if s.incidents_enabled else None
    runner = RulesRunner(s, AlarmStore(engine), incidents=incidents, registry=Registry(engine), wakeup=wakeup)
    runner.restore()
    RULES_COUNT.set(len(runner.engine.rules))
    if s.metrics_port:
        try:
            start_http_server(s.metrics_port + s.workers, addr="127.0.0.1", registry=RULES_REGISTRY)
        except OSError as exc:
            log.error(
                "rules_metrics_unavailable", extra={"port": s.metrics_port + s.workers, "error": str(exc)}
            )
    log.info(
        "rules_started",
        extra={"rules": len(runner.engine.rules), "files": len(runner.engine.rules.files)},
    )
    try:
        while True:
            item = next_item(q, urgent, runner.wait_s())
            if item is None:
                break
            if item:
                # a big stored batch goes in chunks, with the urgent lane looked at between them
                for start in range(0, len(item), URGENT_CHECK_EVERY):
                    runner.process(item[start : start + URGENT_CHECK_EVERY])
                    while urgent is not None:
                        try:
                            runner.process(urgent.get(False))
                        except queue.Empty:
                            break
            runner.housekeeping()
    finally:
        runner.stop()
        engine.dispose()
    log.info("rules_stopped", extra={"observations": runner.observations, "verdicts": runner.verdicts})


def rules_main(
    q: ObservationQueue,
    parent_pid: int,
    wakeup: Wakeup | None = None,
    urgent: ObservationQueue | None = None,
) -> None:
    """Entry point of the spawned rules process. It ignores SIGINT/SIGTERM (a Ctrl-C or a service manager
    signals the whole group): it stops when the supervisor says so, after the workers."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s = Settings()
    logs.setup(s.log_level, s.log_json)
    run_rules(s, q, wakeup, urgent)
