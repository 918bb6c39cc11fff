"""Pipeline: MQTT intake -> decode -> batch -> store (InfluxDB or spool) + dead letters -> acknowledge.

One event loop per gateway process. The only reconnect loop is here. Messages are acknowledged to the
broker only once what they became is durable, so a crash at any point means redelivery, never loss.
A bounded queue between intake and the writer turns a slow database into backpressure on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics, mqtt_tuning
from gateway.decode import Decoder
from gateway.lineproto import to_line
from gateway.messages import DeviceLike, Duplicate, RawMessage, Reading, Reason, Rejection
from gateway.settings import Settings
from gateway.store import Rejected, Store

log = logging.getLogger("gateway.pipeline")

COMMISSIONING = frozenset({"registered", "online"})


@dataclass(slots=True)
class SeenUpdate:
    """Coalesced per-device liveness, written to the registry's state table every few seconds."""

    device_id: str
    seen_ms: int
    online: bool | None = None
    fw: str | None = None
    status_ms: int | None = None
    seq: int | None = None
    topic: str | None = None
    payload: bytes | None = None
    #: telemetry fields seen, tracked only while the device is being commissioned
    fields: set[str] | None = None


@dataclass
class Batch:
    gen: int
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)
    mids: list[tuple[int, int]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    readings: list[Reading] = field(default_factory=list)
    #: holds an event of an urgent device type (SC_BATCH_URGENT_TYPES): written without waiting
    urgent: bool = False

    def __len__(self) -> int:
        return len(self.mids)


class Sinks:
    """The pipeline's outside effects other than InfluxDB; blocking calls, run in worker threads."""

    def dead_letters(self, rejections: Sequence[Rejection]) -> None:
        raise NotImplementedError

    def seen(self, updates: Sequence[SeenUpdate], first_seen: Sequence[str]) -> None:
        raise NotImplementedError

    def refresh_registry(self) -> None:
        raise NotImplementedError


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        lookup: Callable[[str], DeviceLike | None],
        store: Store,
        sinks: Sinks,
        client_id: str,
        on_readings: Callable[[list[Reading]], Awaitable[None] | None] | None = None,
        on_urgent: Callable[[list[Reading]], None] | None = None,
    ) -> None:
        self.s = settings
        self._urgent_types = settings.urgent_types()
        # The priority lane takes copies of messages the other workers take too (its own share group):
        # it stores them (an identical InfluxDB point, so a smoke alarm need not wait) and hands them to
        # the rules at once, but sets nothing aside (the other workers keep the dead letter) and counts
        # under `priority_*` outcomes, so sc_messages_total{outcome="stored"} counts each message once.
        self._copy_lane = settings.mqtt_lane == "urgent"
        self._outcomes = (
            ("priority_stored", "priority_rejected", "priority_duplicate")
            if self._copy_lane
            else ("stored", "rejected", "duplicate")
        )
        self.store = store
        self.sinks = sinks
        self.client_id = client_id
        self.decoder = Decoder(
            lookup,
            credential_key=settings.credential_hash_key.get_secret_value().encode(),
            max_payload_bytes=settings.max_payload_bytes,
            future_tolerance_ms=settings.ts_future_tolerance_s * 1000,
            past_tolerance_ms=settings.ts_past_tolerance_s * 1000,
        )
        self._on_readings = on_readings
        self._on_urgent = on_urgent
        self._gen = 0
        self._client: aiomqtt.Client | None = None
        self._batch = Batch(gen=0)
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=2)
        self._seen: dict[str, SeenUpdate] = {}
        self._first_seen: set[str] = set()
        self._skewed_reported = 0
        self.connected = asyncio.Event()
        self.stats: Counter[str] = Counter()
        self._stopping = False
        self._writing = False

    # ---- intake -------------------------------------------------------------------------------------

    def _client_for(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: unannotated
        props.SessionExpiryInterval = self.s.mqtt_session_expiry_s
        props.ReceiveMaximum = self.s.mqtt_receive_maximum
        client = aiomqtt.Client(
            self.s.mqtt_host,
            self.s.mqtt_port,
            identifier=self.client_id,
            username=self.s.mqtt_username,
            password=self.s.mqtt_password.get_secret_value() if self.s.mqtt_password else None,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            keepalive=self.s.mqtt_keepalive_s,
            timeout=10,
        )
        # Acknowledge only once stored: aiomqtt has no switch for it, the paho client underneath does.
        client._client.manual_ack_set(True)
        mqtt_tuning.tune(client._client)
        return client

    async def run_intake(self) -> None:
        """The documented aiomqtt reconnect loop, with capped exponential back-off and jitter."""
        delay = 0.1
        while True:
            try:
                async with self._client_for() as client:
                    self._gen += 1
                    self._batch = Batch(gen=self._gen)
                    self._client = client
                    for f in self.s.topic_filters():
                        await client.subscribe(f, qos=1)
                    stale = self.s.stale_filters()
                    if stale:
                        await client.unsubscribe(stale)
                    metrics.BROKER_CONNECTED.set(1)
                    self.connected.set()
                    log.info(
                        "broker_connected",
                        extra={
                            "host": self.s.mqtt_host,
                            "port": self.s.mqtt_port,
                            "client_id": self.client_id,
                            "generation": self._gen,
                        },
                    )
                    delay = 0.1
                    await self._consume(client)
            except aiomqtt.MqttError as exc:
                self._client = None
                self.connected.clear()
                metrics.BROKER_CONNECTED.set(0)
                log.warning("broker_disconnected", extra={"error": str(exc), "retry_in_s": round(delay, 1)})
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.s.mqtt_reconnect_max_s)

    async def _consume(self, client: aiomqtt.Client) -> None:
        max_points = self.s.batch_max_points
        decode = self.decoder.decode
        messages = client.messages
        # aiomqtt's iterator costs a task and an event-loop round trip per message; it is used to wait
        # (it also notices a disconnect), and whatever has queued up meanwhile is taken directly.
        queue = client._queue
        while True:
            message = await messages.__anext__()
            while True:
                if self._stopping:
                    # Keep the connection so the acknowledgements of what we hold still go out;
                    # this message is not acknowledged and will be delivered again.
                    await asyncio.Event().wait()
                payload = message.payload
                raw = RawMessage(
                    topic=message.topic.value,
                    payload=payload if isinstance(payload, bytes) else str(payload).encode(),
                    received_ms=time.time_ns() // 1_000_000,
                    mid=message.mid,
                    qos=message.qos,
                    retain=message.retain,
                )
                self._take(decode(raw), raw)
                if len(self._batch) >= max_points:
                    await self._flush()
                if queue.empty():
                    if self._batch.urgent:
                        await self._flush()
                    break
                message = queue.get_nowait()

    def _take(self, out: Reading | Rejection | Duplicate, raw: RawMessage) -> None:
        batch = self._batch
        if raw.qos > 0:
            batch.mids.append((raw.mid, raw.qos))
        if isinstance(out, Reading):
            dtype = out.device.device_type
            # A retained status replayed on subscribe is old news: keep the state, skip the point.
            if not (out.kind == "status" and raw.retain):
                batch.lines.append(to_line(out))
                batch.readings.append(out)
                if out.kind == "event" and dtype in self._urgent_types:
                    batch.urgent = True
                    if self._on_urgent is not None:
                        self._on_urgent([out])
            batch.counts[(dtype, self._outcomes[0])] += 1
            self._note_seen(out, raw)
        elif isinstance(out, Rejection):
            if not self._copy_lane:
                batch.rejections.append(out)
            batch.counts[(out.device_type or "unknown", self._outcomes[1])] += 1
        else:
            batch.counts[
                (raw.topic.split("/")[2] if raw.topic.count("/") >= 2 else "unknown", self._outcomes[2])
            ] += 1

    def _note_seen(self, r: Reading, raw: RawMessage) -> None:
        dev = r.device
        upd = self._seen.get(dev.device_id)
        if upd is None:
            upd = self._seen[dev.device_id] = SeenUpdate(dev.device_id, r.received_ms)
            if dev.lifecycle == "registered":
                self._first_seen.add(dev.device_id)
        upd.seen_ms = max(upd.seen_ms, r.received_ms)
        upd.topic, upd.payload = raw.topic, raw.payload
        if r.kind == "telemetry" and dev.lifecycle in COMMISSIONING:
            if upd.fields is None:
                upd.fields = set()
            upd.fields.update(r.values)
        if r.seq is not None:
            upd.seq = r.seq
        if r.kind == "status":
            upd.online = bool(r.values.get("online"))
            upd.fw = r.values.get("fw", upd.fw)
            upd.status_ms = r.ts_ms
        elif upd.online is None or upd.online is False:
            upd.online = True  # anything it sends proves it is online, even after its last will

    async def _flush(self) -> None:
        batch, self._batch = self._batch, Batch(gen=self._gen)
        if len(batch):
            metrics.UNACKED.inc(len(batch))
            await self._queue.put(batch)

    async def run_ticker(self) -> None:
        """Flush a partly filled batch once its oldest message is batch_max_delay_ms old."""
        delay = self.s.batch_max_delay_ms / 1000
        while True:
            await asyncio.sleep(delay / 2)
            if len(self._batch) and time.monotonic() - self._batch.started >= delay:
                await self._flush()

    # ---- writer -------------------------------------------------------------------------------------

    async def run_writer(self) -> None:
        while True:
            batch = await self._queue.get()
            self._writing = True
            try:
                await self.store.put(batch.lines)
                if batch.rejections:
                    await asyncio.to_thread(self.sinks.dead_letters, batch.rejections)
            except Exception:
                # Not stored and not acknowledged: the broker will deliver these again.
                log.exception("batch_failed", extra={"messages": len(batch)})
                for r in batch.readings:
                    if r.seq is not None:
                        self.decoder.forget(r.device_id, r.seq)
                metrics.UNACKED.dec(len(batch))
                await self._drop_connection()
                continue
            finally:
                self._writing = False
            self._account(batch)
            self._ack(batch)
            now_ms = time.time_ns() // 1_000_000
            for r in batch.readings[::4]:
                metrics.STORED_LATENCY.observe(max(0, now_ms - r.ts_ms) / 1000)
            if self._on_readings and batch.readings:
                # After the acknowledgement: a hook that returns an awaitable (the rules hand-off when
                # the rules process is behind) holds the next batch, which slows intake; nothing drops.
                pending = self._on_readings(batch.readings)
                if pending is not None:
                    await pending

    async def drain_for_shutdown(self, timeout_s: float) -> None:
        """Stop taking messages, store and acknowledge what is held, within timeout_s."""
        self._stopping = True
        await asyncio.sleep(0)
        await self._flush()
        deadline = time.monotonic() + timeout_s
        while (self._writing or not self._queue.empty()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # let the acknowledgements leave the socket

    def _account(self, batch: Batch) -> None:
        for (dtype, outcome), n in batch.counts.items():
            metrics.MESSAGES.labels(dtype, outcome).inc(n)
            self.stats[outcome] += n
        for rej in batch.rejections:
            metrics.REJECTS.labels(rej.reason.value).inc()
        skewed = self.decoder.skewed - self._skewed_reported
        if skewed:
            metrics.TS_SKEWED.inc(skewed)
            self._skewed_reported += skewed

    def _ack(self, batch: Batch) -> None:
        metrics.UNACKED.dec(len(batch))
        client = self._client
        if client is None or batch.gen != self._gen:
            return  # that connection is gone; the broker redelivers and duplicates are recognised
        paho = client._client
        mqtt_tuning.ack_qos1(paho, [mid for mid, qos in batch.mids if qos == 1])
        for mid, qos in batch.mids:
            if qos == 2:
                paho.ack(mid, qos)

    async def _drop_connection(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client._client.disconnect()

    # ---- housekeeping -------------------------------------------------------------------------------

    async def run_state_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.s.state_flush_s)
            await self.flush_state()

    async def flush_state(self) -> None:
        if not self._seen and not self._first_seen:
            return
        seen, self._seen = list(self._seen.values()), {}
        first, self._first_seen = sorted(self._first_seen), set()
        try:
            await asyncio.to_thread(self.sinks.seen, seen, first)
        except Exception:
            log.exception("state_flush_failed", extra={"devices": len(seen)})

    async def run_registry_refresh(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.s.registry_refresh_s)
            try:
                await asyncio.to_thread(self.sinks.refresh_registry)
                if failing:
                    log.warning("registry_refresh_recovered")
                failing = False
            except Exception as exc:
                if not failing:
                    log.error("registry_refresh_failing", extra={"error": str(exc)})
                failing = True


def db_rejections(rejected: Rejected, now_ms: int) -> list[Rejection]:
    """Points InfluxDB refused, as dead letters (the line itself is the payload)."""
    out = []
    for line, detail in rejected:
        head = line.split(" ", 1)[0]
        tags = dict(t.split("=", 1) for t in head.split(",")[1:] if "=" in t)
        raw = RawMessage(topic=f"influxdb/{head.split(',', 1)[0]}", payload=line.encode(), received_ms=now_ms)
        out.append(Rejection(raw, Reason.DB_REJECTED, detail, tags.get("device_id"), tags.get("device_type")))
    return out
