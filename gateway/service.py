"""One gateway process, wired from settings; and a supervisor that runs several sharing the subscription."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import multiprocessing.queues as mpq
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import start_http_server

from devices import THING_MODELS
from gateway import logs, metrics
from gateway.db import make_engine, migrate
from gateway.deadletter import DeadLetter, DeadLetterStore, DeviceStateStore, StatusUpdate
from gateway.evaluate import ObservationQueue, RulesFeeder, die_with_parent, load_configured_rules, rules_main
from gateway.influx import V1Writer, V2Writer, Writer
from gateway.messages import Reason, Rejection
from gateway.pipeline import Pipeline, SeenUpdate, Sinks, db_rejections
from gateway.registry import Registry, RegistryCache
from gateway.settings import Settings
from gateway.store import Rejected, Spool, Store
from rules.loader import RuleLoadError

log = logging.getLogger("gateway.service")


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class SqlSinks(Sinks):
    """Dead letters, liveness and registry refresh through the SQL registry."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings.database_url)
        self.cache = RegistryCache(self.engine)
        self.deadletters = DeadLetterStore(self.engine, max_payload_bytes=settings.deadletter_payload_bytes)
        self.states = DeviceStateStore(self.engine)
        self.registry = Registry(self.engine)

    def dead_letters(self, rejections: Sequence[Rejection]) -> None:
        self.deadletters.add_many(
            [
                DeadLetter(
                    received_at=_dt(r.raw.received_ms),
                    topic=r.raw.topic,
                    device_id=r.device_id,
                    device_type=r.device_type,
                    reason=r.reason.value,
                    detail=r.detail,
                    payload=r.raw.payload,
                )
                for r in rejections
            ]
        )

    def seen(self, updates: Sequence[SeenUpdate], first_seen: Sequence[str]) -> None:
        self.states.record_many(
            [
                StatusUpdate(
                    device_id=u.device_id,
                    online=u.online,
                    seen_at=_dt(u.seen_ms),
                    fw=u.fw,
                    is_status_message=u.status_ms is not None,
                    seq=u.seq,
                    last_topic=u.topic,
                    last_payload=u.payload,
                )
                for u in updates
            ]
        )
        if first_seen:
            self.states.mark_online(list(first_seen))
        self._commission({u.device_id: u.fields for u in updates if u.fields})

    def _commission(self, fields: dict[str, set[str]]) -> None:
        """Devices that have now reported all their type's commissioning fields go in service."""
        if not fields:
            return
        seen = self.states.add_seen_fields(fields)
        ready = []
        for device_id, have in seen.items():
            info = self.cache.get(device_id)
            if info is not None and set(THING_MODELS[info.device_type].commissioning_fields) <= have:
                ready.append(device_id)
        if ready:
            moved = self.registry.mark_in_service(ready)
            if moved:
                log.info("devices_in_service", extra={"count": len(moved), "first": moved[0]})

    def prune_dead_letters(self, retention_days: float) -> int:
        before = datetime.now(UTC) - timedelta(days=retention_days)
        return self.deadletters.prune(before)

    def refresh_registry(self) -> None:
        self.cache.refresh()
        metrics.REGISTRY_DEVICES.set(len(self.cache))


def make_writer(s: Settings) -> Writer:
    if s.influx_mode == "v2":
        assert s.influx_org and s.influx_bucket and s.influx_token
        return V2Writer(
            s.influx_url,
            s.influx_org,
            s.influx_bucket,
            s.influx_token.get_secret_value(),
            timeout_s=s.influx_timeout_s,
        )
    return V1Writer(
        s.influx_url,
        s.influx_db,
        rp=s.influx_rp,
        username=s.influx_username,
        password=s.influx_password.get_secret_value() if s.influx_password else None,
        timeout_s=s.influx_timeout_s,
        create_db=s.influx_create_db,
    )


async def run_worker(
    s: Settings,
    index: int = 0,
    rules_queue: ObservationQueue | None = None,
    urgent_queue: ObservationQueue | None = None,
) -> None:
    """Run one gateway process until SIGTERM/SIGINT, then stop taking messages and finish what it holds.

    With `rules_queue`, the readings of every stored batch are handed to the rules process."""
    migrate(s.database_url)
    sinks = SqlSinks(s)
    sinks.refresh_registry()
    writer = make_writer(s)
    await writer.ensure_ready()

    async def on_rejected(rejected: Rejected) -> None:
        await asyncio.to_thread(sinks.dead_letters, db_rejections(rejected, time.time_ns() // 1_000_000))
        # Set aside like any other reject, so sc_rejects_total agrees with the dead-letter store.
        metrics.REJECTS.labels(Reason.DB_REJECTED.value).inc(len(rejected))

    spool = Spool(s.spool_dir / f"worker-{index}", s.spool_max_bytes)
    if len(spool):
        log.warning("spool_found_at_start", extra={"segments": len(spool), "bytes": spool.bytes})
    store = Store(writer, spool, on_rejected, retry_max_s=s.retry_max_s)
    # A "." cannot appear in a device id, so no device can take over the gateway's session by its id.
    client_id = f"svc.gateway.{s.instance}.{index}"
    feeder = None
    if rules_queue is not None:
        feeder = RulesFeeder(rules_queue, max_pending_batches=s.rules_queue_batches, urgent=urgent_queue)
    pipe = Pipeline(
        s,
        lookup=sinks.cache.get,
        store=store,
        sinks=sinks,
        client_id=client_id,
        on_readings=feeder,
        on_urgent=feeder.urgent if feeder is not None else None,
    )
    if s.metrics_port:
        try:
            start_http_server(s.metrics_port + index, addr="127.0.0.1", registry=metrics.REGISTRY)
        except OSError as exc:  # a taken port costs the metrics, not the ingestion
            log.error("metrics_unavailable", extra={"port": s.metrics_port + index, "error": str(exc)})

    async def housekeeping() -> None:
        while True:
            try:
                pruned = await asyncio.to_thread(sinks.prune_dead_letters, s.deadletter_retention_days)
                if pruned:
                    log.info("dead_letters_pruned", extra={"count": pruned})
            except Exception as exc:
                log.warning("dead_letter_prune_failed", extra={"error": str(exc)})
            await asyncio.sleep(3600)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "gateway_started",
        extra={
            "worker": index,
            "client_id": client_id,
            "devices": len(sinks.cache),
            "influx": s.influx_url,
            "mode": s.influx_mode,
        },
    )
    tasks = [
        asyncio.create_task(c)
        for c in (
            pipe.run_intake(),
            pipe.run_ticker(),
            pipe.run_writer(),
            store.drain_forever(),
            pipe.run_state_flusher(),
            pipe.run_registry_refresh(),
            housekeeping(),
            *([feeder.run()] if feeder is not None else []),
        )
    ]
    await stop.wait()
    log.info("gateway_stopping", extra={"worker": index})
    await pipe.drain_for_shutdown(timeout_s=10)
    await pipe.flush_state()
    if feeder is not None:
        await feeder.drain(timeout_s=10)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await writer.aclose()
    sinks.engine.dispose()
    log.info("gateway_stopped", extra={"worker": index, **pipe.stats})


def _worker_main(
    index: int,
    rules_queue: mpq.Queue[Any] | None,
    parent_pid: int,
    urgent_queue: mpq.Queue[Any] | None = None,
    lane: str | None = None,
) -> None:
    die_with_parent(parent_pid)
    s = Settings()
    if lane is not None:
        s = s.model_copy(update={"mqtt_lane": lane})
    logs.setup(s.log_level, s.log_json)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(s, index, rules_queue, urgent_queue))
    for q in (rules_queue, urgent_queue):
        if q is not None:
            # What this worker put on the queue must reach the pipe before the process ends.
            q.close()
            q.join_thread()


def run(s: Settings) -> int:
    """Run the rules process and `s.workers` gateway processes; restart one that dies; on SIGTERM/SIGINT
    stop the workers first (they store and acknowledge what they hold), then the rules process (it takes
    what they handed on, saves its state and exits)."""
    logs.setup(s.log_level, s.log_json)
    ctx = mp.get_context("spawn")
    rules_queue: mpq.Queue[Any] | None = None
    urgent_queue: mpq.Queue[Any] | None = None
    if s.rules_enabled:
        try:
            rules = load_configured_rules(s)
        except RuleLoadError as exc:
            log.error("rules_invalid", extra={"file": exc.file, "rule": exc.rule, "error": str(exc)})
            print(f"sc-gateway: bad rule file: {exc}", file=sys.stderr)
            return 2
        log.info("rules_loaded", extra={"rules": len(rules), "files": len(rules.files)})
        migrate(s.database_url)  # once, before the processes that use the database start
        rules_queue = ctx.Queue(maxsize=s.rules_queue_batches)
        urgent_queue = ctx.Queue(maxsize=1000)
    me = os.getpid()
    procs: dict[int, mp.process.BaseProcess] = {}
    rules_proc: mp.process.BaseProcess | None = None
    delivery_proc: mp.process.BaseProcess | None = None
    delivers = (
        rules_queue is not None and s.incidents_enabled and bool(s.incident_endpoints or s.incident_mqtt)
    )
    # the rules process pokes the delivery process through this pipe after committing deliveries
    wake_r, wake_w = ctx.Pipe(duplex=False) if delivers else (None, None)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # The priority lane: one more worker, for the urgent types' events only (numbered after the rules and
    # delivery processes, whose metrics ports are SC_METRICS_PORT + workers and + workers + 1).
    lanes = rules_queue is not None and s.priority_lane and s.mqtt_lane == "all" and bool(s.lane_types())
    priority_index = s.workers + 2

    def start_worker(i: int) -> mp.process.BaseProcess:
        lane = "urgent" if lanes and i == priority_index else None
        name = "sc-gateway-priority" if i == priority_index else f"sc-gateway-{i}"
        p = ctx.Process(target=_worker_main, args=(i, rules_queue, me, urgent_queue, lane), name=name)
        p.start()
        return p

    def start_rules() -> mp.process.BaseProcess:
        p = ctx.Process(
            target=rules_main, args=(rules_queue, me, wake_w, urgent_queue), name="sc-gateway-rules"
        )
        p.start()
        return p

    def start_delivery() -> mp.process.BaseProcess:
        from gateway.delivery import delivery_main

        p = ctx.Process(target=delivery_main, args=(wake_r, me), name="sc-gateway-delivery")
        p.start()
        return p

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if delivers:
        delivery_proc = start_delivery()
    if rules_queue is not None:
        rules_proc = start_rules()
    for i in [*range(s.workers), *([priority_index] if lanes else [])]:
        procs[i] = start_worker(i)
    while not stopping:
        time.sleep(0.2)
        for i, p in list(procs.items()):
            if not p.is_alive() and not stopping:
                log.error("worker_died_restarting", extra={"worker": i, "exitcode": p.exitcode})
                procs[i] = start_worker(i)
        if rules_proc is not None and not rules_proc.is_alive() and not stopping:
            log.error("rules_process_died_restarting", extra={"exitcode": rules_proc.exitcode})
            rules_proc = start_rules()
        if delivery_proc is not None and not delivery_proc.is_alive() and not stopping:
            log.error("delivery_process_died_restarting", extra={"exitcode": delivery_proc.exitcode})
            delivery_proc = start_delivery()
    for p in procs.values():
        if p.pid and p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    for p in procs.values():
        p.join(timeout=20)
    if rules_proc is not None and rules_queue is not None:
        try:
            rules_queue.put(None, timeout=30)
        except Exception as exc:
            log.error("rules_stop_not_sent", extra={"error": str(exc)})
        rules_proc.join(timeout=60)
        if rules_proc.is_alive():
            log.error("rules_process_did_not_stop")
            rules_proc.kill()
            rules_proc.join(timeout=5)
    if delivery_proc is not None:
        # what it has not sent stays in the outbox for the next start
        if delivery_proc.pid and delivery_proc.is_alive():
            os.kill(delivery_proc.pid, signal.SIGTERM)
        delivery_proc.join(timeout=15)
        if delivery_proc.is_alive():
            log.error("delivery_process_did_not_stop")
            delivery_proc.kill()
            delivery_proc.join(timeout=5)
    return 0
