"""The delivery stage: sends the outbox's incident changes to the incident systems and the local MQTT topic.

The rules process commits each incident change with one outbox row per endpoint (gateway.incident_store).
Here one `Deliverer` per endpoint (Settings.incident_endpoints, plus "mqtt" when SC_INCIDENT_MQTT) takes
the rows that are due (`IncidentStore.claim_outbox`: of each incident only the head, so one incident's
events go strictly one after another while up to MAX_IN_FLIGHT incidents are in flight) and sends them:

- an HTTP endpoint gets the row's exact bytes, signed the Standard Webhooks way with the row's event id as
  `webhook-id` (the same on every retry). 2xx: delivered. 410: the endpoint is disabled (its rows, and those
  written for it from now on, are `disabled` until `sc-gateway deliveries enable NAME`). Anything else, a
  timeout or no connection: retried with exponential backoff and jitter (Retry-After honoured on 429/503)
  until the row is older than SC_DELIVERY_RETRY_HOURS, then kept as `failed` for operators to re-send;
- "mqtt" publishes it at QoS 1 on sc/v1/incidents/{community}/{incident id}; the broker's PUBACK is
  delivered, a broker that is down is retried the same way.

Retries live in the outbox (next_attempt_at), so they survive restarts; a claimed row carries a lease, so
two delivery processes do not send the same row at once and a crash mid-attempt only delays it.

A new row goes out within milliseconds: the rules process writes a byte to the `wakeup` pipe after it
commits; besides, every SC_DELIVERY_POLL_S each deliverer looks for due retries and for rows other
processes wrote (the API, an operator's `resend`). SQL runs in worker threads: a slow incident system
never blocks anything but its own attempts, and never ingestion, which runs in other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import email.utils
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final, Literal, ParamSpec, Protocol, TypeVar

import aiomqtt
import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gateway import logs
from gateway.db import make_engine
from gateway.incident_store import IncidentStore, OutboxRow
from gateway.settings import MQTT_ENDPOINT, EndpointConfig, Settings
from incidents.cloudevents import delivery_headers

log = logging.getLogger("gateway.delivery")

#: the delivery process's own /metrics (on SC_METRICS_PORT + SC_WORKERS + 1)
DELIVERY_REGISTRY = CollectorRegistry(auto_describe=True)
DELIVERIES = Counter(
    "sc_deliveries",
    "delivery attempts by endpoint and outcome: delivered, retry, failed (retries exhausted), gone (410)",
    ["endpoint", "outcome"],
    registry=DELIVERY_REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "sc_delivery_seconds",
    "outbox row written to delivered, by endpoint",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400),
    registry=DELIVERY_REGISTRY,
)
OUTBOX_DUE = Gauge(
    "sc_outbox_due",
    "pending deliveries whose next attempt is due (heads and the events waiting behind them)",
    ["endpoint"],
    registry=DELIVERY_REGISTRY,
)
ENDPOINT_DISABLED = Gauge(
    "sc_delivery_endpoint_disabled",
    "1 while the endpoint is disabled (it answered 410)",
    ["endpoint"],
    registry=DELIVERY_REGISTRY,
)

#: incidents in flight at once per endpoint (each one's events still go one after another)
MAX_IN_FLIGHT: Final = 8
#: the first pause after a failed attempt (then doubling up to SC_DELIVERY_BACKOFF_MAX_S)
BACKOFF_BASE_S: Final = 1.0
#: a Retry-After is honoured up to this: a wrong header must not park deliveries for days
RETRY_AFTER_CAP_S: Final = 3600.0
#: a claimed row is someone's for its endpoint's timeout plus this
LEASE_MARGIN_S: Final = 10.0
#: at stop, attempts in flight get this long to finish; the rest are given back, due at once
STOP_GRACE_S: Final = 5.0
MQTT_CONNECT_TIMEOUT_S: Final = 5.0
#: one MQTT attempt, connecting (again) included, gets no longer than this
MQTT_ATTEMPT_TIMEOUT_S: Final = 15.0
#: after a failed broker connection, attempts within this fail at once instead of connecting again
MQTT_RECONNECT_PAUSE_S: Final = 1.0
ERROR_TEXT_MAX: Final = 300

P = ParamSpec("P")
T = TypeVar("T")


# ---- the retry rule (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, within a time window: retried until the row is `window` old."""

    base_s: float = BACKOFF_BASE_S
    max_s: float = 900.0
    window: dt.timedelta = dt.timedelta(hours=48)

    @classmethod
    def from_settings(cls, s: Settings) -> RetryPolicy:
        return cls(max_s=s.delivery_backoff_max_s, window=dt.timedelta(hours=s.delivery_retry_hours))


def backoff_s(attempts: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """The pause after the attempt that followed `attempts` failed ones: d = min(max_s, base_s · 2^attempts),
    then a uniform draw in [d/2, d] (jitter keeps many failed rows from coming back all at once)."""
    d = min(max_s, base_s * 2.0 ** min(max(attempts, 0), 60))
    return d / 2 + (rng or random).uniform(0, d / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent or not
    readable. A date in the past is 0."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay_s(
    policy: RetryPolicy, attempts: int, retry_after_s: float | None = None, rng: random.Random | None = None
) -> float:
    """The pause before the next attempt: the backoff, or longer if the endpoint asked (Retry-After)."""
    d = backoff_s(attempts, policy.base_s, policy.max_s, rng)
    if retry_after_s is not None:
        d = max(d, min(retry_after_s, RETRY_AFTER_CAP_S))
    return d


def gives_up(created_at: dt.datetime, now: dt.datetime, window: dt.timedelta) -> bool:
    """A failed attempt of a row at least `window` old is its last: retrying is bounded by time, not by a
    count, so "retried for at least the window" holds whatever the jitter drew."""
    return now - created_at >= window


# ---- one attempt ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt came to. `status`: the HTTP status (None: no answer, or MQTT)."""

    outcome: Literal["delivered", "gone", "retry"]
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


class Sender(Protocol):
    """Sends a row's body to one endpoint; never raises for the endpoint's failures (returns them)."""

    @property
    def name(self) -> str: ...
    @property
    def timeout_s(self) -> float: ...
    async def send(self, row: OutboxRow) -> Attempt: ...
    async def aclose(self) -> None: ...


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_TEXT_MAX else text[: ERROR_TEXT_MAX - 1] + "…"


class HttpSender:
    """POSTs to an incident-system endpoint (incident-delivery v1)."""

    def __init__(self, endpoint: EndpointConfig, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.endpoint = endpoint
        self._secret = endpoint.secret.get_secret_value()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(endpoint.timeout_s),
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
            follow_redirects=False,
        )

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def timeout_s(self) -> float:
        return self.endpoint.timeout_s

    async def send(self, row: OutboxRow) -> Attempt:
        headers = delivery_headers(self._secret, row.event_id, int(time.time()), row.body)
        try:
            # httpx's timeout bounds each phase; this bounds the whole attempt (a receiver that drips)
            async with asyncio.timeout(self.endpoint.timeout_s):
                resp = await self._client.post(self.endpoint.url, content=row.body, headers=headers)
        except TimeoutError:
            return Attempt("retry", None, f"no answer within {self.endpoint.timeout_s:g} s")
        except httpx.HTTPError as exc:
            return Attempt("retry", None, _short(f"{type(exc).__name__}: {exc}"))
        status = resp.status_code
        if 200 <= status < 300:
            return Attempt("delivered", status)
        if status == 410:
            return Attempt("gone", status, "410 Gone")
        retry_after = parse_retry_after(resp.headers.get("retry-after")) if status in (429, 503) else None
        return Attempt("retry", status, _short(f"HTTP {status}: {resp.text}"), retry_after)

    async def aclose(self) -> None:
        await self._client.aclose()


def incident_topic(row: OutboxRow) -> str:
    """sc/v1/incidents/{community}/{incident id}; `_` when the incident has no (usable) community."""
    try:
        community = json.loads(row.body)["data"]["location"]["community"]
    except (ValueError, KeyError, TypeError):
        community = None
    if not isinstance(community, str) or not community or any(c in community for c in "/+#\0"):
        community = "_"
    return f"sc/v1/incidents/{community}/{row.incident_id}"


# aiomqtt's publish returns nothing and ignores the PUBACK's reason code: the paho client underneath is
# wrapped so each task learns the message id of its own publish (a context variable is per task) and a
# refusal (MQTT 5 reason code >= 0x80, e.g. not authorised) is not taken for a delivery.
_PUBLISHED: contextvars.ContextVar[Any] = contextvars.ContextVar("sc_delivery_published", default=None)


class MqttSender:
    """Publishes at QoS 1 with the gateway's broker account; one connection, made when needed."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()
        self._failed_at = -float("inf")
        self._refused: dict[int, str] = {}

    @property
    def name(self) -> str:
        return MQTT_ENDPOINT

    @property
    def timeout_s(self) -> float:
        return MQTT_ATTEMPT_TIMEOUT_S

    async def _connected(self) -> aiomqtt.Client:
        async with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() - self._failed_at < MQTT_RECONNECT_PAUSE_S:
                raise aiomqtt.MqttError("the broker was unreachable a moment ago")
            s = self.s
            client = aiomqtt.Client(
                s.mqtt_host,
                s.mqtt_port,
                identifier=f"sc-delivery-{s.instance}-{os.getpid()}",
                username=s.mqtt_username,
                password=s.mqtt_password.get_secret_value() if s.mqtt_password else None,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=True,
                keepalive=s.mqtt_keepalive_s,
                timeout=MQTT_CONNECT_TIMEOUT_S,
            )
            try:
                await client.__aenter__()
            except aiomqtt.MqttError:
                self._failed_at = time.monotonic()
                raise
            self._watch_acks(client)
            self._client = client
            log.info("delivery_broker_connected", extra={"host": s.mqtt_host, "port": s.mqtt_port})
            return client

    def _watch_acks(self, client: aiomqtt.Client) -> None:
        paho = client._client
        publish = paho.publish
        on_publish: Any = paho.on_publish  # aiomqtt's (paho types it as a union of callback versions)
        self._refused.clear()

        def published(*args: Any, **kwargs: Any) -> Any:
            info = publish(*args, **kwargs)
            _PUBLISHED.set(info)
            return info

        def acked(c: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
            if getattr(reason_code, "is_failure", False):
                self._refused[mid] = str(reason_code)
            on_publish(c, userdata, mid, reason_code, properties)

        setattr(paho, "publish", published)  # noqa: B010  (mypy: assigning to a method)
        paho.on_publish = acked

    async def _drop(self, client: aiomqtt.Client) -> None:
        async with self._lock:
            if self._client is client:
                self._client = None
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)

    async def send(self, row: OutboxRow) -> Attempt:
        try:
            async with asyncio.timeout(MQTT_ATTEMPT_TIMEOUT_S):
                return await self._publish(incident_topic(row), row.body)
        except TimeoutError:
            client = self._client
            if client is not None:
                await self._drop(client)  # no PUBACK in time: the connection is not to be trusted
            return Attempt("retry", None, f"no PUBACK within {MQTT_ATTEMPT_TIMEOUT_S:g} s")

    async def _publish(self, topic: str, body: bytes) -> Attempt:
        for fresh in (False, True):
            try:
                client = await self._connected()
            except aiomqtt.MqttError as exc:
                return Attempt("retry", None, _short(f"broker: {exc}"))
            try:
                await client.publish(topic, body, qos=1, timeout=math.inf)
            except aiomqtt.MqttError as exc:
                await self._drop(client)
                if fresh:
                    return Attempt("retry", None, _short(f"broker: {exc}"))
                continue  # the connection had gone (a broker restart): once more on a new one
            info = _PUBLISHED.get()
            refused = self._refused.pop(info.mid, None) if info is not None else None
            if refused is not None:
                return Attempt("retry", None, _short(f"broker refused the publication: {refused}"))
            return Attempt("delivered")
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._drop(self._client)


# ---- one endpoint ---------------------------------------------------------------------------------------


async def _sql(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Deliverer:
    """The attempts of one endpoint: claims due rows, sends up to `max_in_flight` at once, records the
    outcomes."""

    def __init__(
        self,
        store: IncidentStore,
        sender: Sender,
        policy: RetryPolicy,
        *,
        poll_s: float,
        max_in_flight: int = MAX_IN_FLIGHT,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        self.name = sender.name
        self.policy = policy
        self.poll_s = poll_s
        self.max_in_flight = max_in_flight
        self.lease_s = sender.timeout_s + LEASE_MARGIN_S
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], OutboxRow] = {}
        self._stopping = False
        self._next_poll = 0.0
        #: the soonest retry this deliverer scheduled (monotonic): it looks again then, not at the next poll
        self._next_retry = float("inf")
        self.disabled = False
        self._failing = False
        self._store_failing = False
        #: rounds of the poll timer (a test waits for some to know nothing more is sent)
        self.polls = 0

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        ENDPOINT_DISABLED.labels(self.name).set(0)
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self._round()
                except Exception as exc:
                    # infrastructure (the database): logged once, tried again on the next poll
                    self._store_trouble(exc)
                    self._next_poll = time.monotonic() + self.poll_s
                timeout = max(0.0, min(self._next_poll, self._next_retry) - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            await self._finish()

    async def _round(self) -> None:
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            await self._check_endpoint()
            OUTBOX_DUE.labels(self.name).set(await _sql(self.store.due_count, self.name))
            self.polls += 1
        if time.monotonic() >= self._next_retry:
            self._next_retry = float("inf")
        free = self.max_in_flight - len(self._tasks)
        if free <= 0 or self.disabled:
            return
        rows = await _sql(self.store.claim_outbox, self.name, free, self.lease_s)
        self._store_ok()
        in_flight = {r.id for r in self._tasks.values()}
        for row in rows:
            if row.id in in_flight:
                continue  # an attempt that outlived its lease (a stalled database): not sent twice at once
            task = asyncio.create_task(self._deliver(row), name=f"deliver-{self.name}-{row.id}")
            self._tasks[task] = row
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._wake.set()  # a slot is free, and the incident's next event may be due

    async def _check_endpoint(self) -> None:
        disabled = {e.name: e for e in await _sql(self.store.disabled_endpoints)}.get(self.name)
        if disabled is not None and not self.disabled:
            log.warning(
                "delivery_endpoint_disabled",
                extra={"endpoint": self.name, "since": disabled.disabled_at, "reason": disabled.reason},
            )
        elif disabled is None and self.disabled:
            log.info("delivery_endpoint_enabled", extra={"endpoint": self.name})
        self.disabled = disabled is not None
        ENDPOINT_DISABLED.labels(self.name).set(int(self.disabled))

    async def _deliver(self, row: OutboxRow) -> None:
        try:
            attempt = await self.sender.send(row)
        except Exception as exc:  # a sender's bug must not end the loop: the row is retried
            log.exception("delivery_attempt_crashed", extra={"endpoint": self.name, "outbox_id": row.id})
            attempt = Attempt("retry", None, _short(f"{type(exc).__name__}: {exc}"))
        try:
            await self._record(row, attempt)
        except Exception as exc:
            # the row stays claimed; when the lease ends it is sent again (same webhook-id)
            self._store_trouble(exc)

    async def _record(self, row: OutboxRow, attempt: Attempt) -> None:
        now = _utcnow()
        if attempt.outcome == "delivered":
            await _sql(self.store.mark_delivered, row.id, attempt.status, now)
            DELIVERIES.labels(self.name, "delivered").inc()
            DELIVERY_SECONDS.labels(self.name).observe(max(0.0, (now - row.created_at).total_seconds()))
            if self._failing:
                self._failing = False
                log.info("delivery_endpoint_recovered", extra={"endpoint": self.name})
        elif attempt.outcome == "gone":
            await _sql(self.store.mark_retry, row.id, now, attempt.status, attempt.error)
            reason = f"{attempt.status} Gone at {now.isoformat(timespec='seconds')}"
            rows = await _sql(self.store.disable_endpoint, self.name, reason, now)
            DELIVERIES.labels(self.name, "gone").inc()
            if not self.disabled:
                self.disabled = True
                ENDPOINT_DISABLED.labels(self.name).set(1)
                log.warning(
                    "delivery_endpoint_disabled",
                    extra={"endpoint": self.name, "reason": reason, "rows_disabled": rows},
                )
        elif gives_up(row.retry_from or row.created_at, now, self.policy.window):
            await _sql(self.store.mark_failed, row.id, attempt.status, attempt.error)
            DELIVERIES.labels(self.name, "failed").inc()
            log.error(
                "delivery_failed",
                extra={
                    "endpoint": self.name,
                    "outbox_id": row.id,
                    "incident_id": row.incident_id,
                    "event_type": row.event_type,
                    "webhook_id": row.event_id,
                    "attempts": row.attempts + 1,
                    "status": attempt.status,
                    "error": attempt.error,
                },
            )
        else:
            delay = retry_delay_s(self.policy, row.attempts, attempt.retry_after_s, self._rng)
            await _sql(
                self.store.mark_retry,
                row.id,
                now + dt.timedelta(seconds=delay),
                attempt.status,
                attempt.error,
            )
            DELIVERIES.labels(self.name, "retry").inc()
            self._next_retry = min(self._next_retry, time.monotonic() + delay)
            if not self._failing:
                self._failing = True
                log.warning(
                    "delivery_endpoint_failing",
                    extra={"endpoint": self.name, "status": attempt.status, "error": attempt.error},
                )
        self._store_ok()

    def _store_trouble(self, exc: Exception) -> None:
        if not self._store_failing:
            self._store_failing = True
            log.error("delivery_store_failing", extra={"endpoint": self.name, "error": _short(str(exc))})

    def _store_ok(self) -> None:
        if self._store_failing:
            self._store_failing = False
            log.warning("delivery_store_recovered", extra={"endpoint": self.name})

    async def _finish(self) -> None:
        """Let the attempts in flight finish (STOP_GRACE_S); give the rest back, due at once."""
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=STOP_GRACE_S)
            rows = [self._tasks[t] for t in late if t in self._tasks]
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if rows:
                with contextlib.suppress(Exception):
                    await _sql(self.store.release, [r.id for r in rows])
                log.warning("delivery_attempts_cut_short", extra={"endpoint": self.name, "rows": len(rows)})
        await self.sender.aclose()


# ---- the stage ------------------------------------------------------------------------------------------


def make_senders(s: Settings) -> list[Sender]:
    """One sender per configured endpoint, and the MQTT publication when SC_INCIDENT_MQTT."""
    senders: list[Sender] = [HttpSender(e) for e in s.incident_endpoints]
    if s.incident_mqtt:
        senders.append(MqttSender(s))
    return senders


class DeliveryStage:
    """Every endpoint's Deliverer in one event loop, woken by the `wakeup` pipe or the poll timer."""

    def __init__(
        self,
        s: Settings,
        store: IncidentStore,
        *,
        wakeup: Connection | None = None,
        policy: RetryPolicy | None = None,
        senders: Sequence[Sender] | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.s = s
        self.store = store
        self.wakeup = wakeup
        self.policy = policy or RetryPolicy.from_settings(s)
        self._senders = senders
        self.max_in_flight = max_in_flight
        self.deliverers: list[Deliverer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False

    def request_stop(self) -> None:
        """Stop (from any thread, or a signal handler): attempts in flight get STOP_GRACE_S to finish."""
        self._stop_requested = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    def wake(self) -> None:
        for d in self.deliverers:
            d.wake()

    def _on_wakeup(self) -> None:
        assert self.wakeup is not None and self._loop is not None
        try:
            while self.wakeup.poll():
                self.wakeup.recv_bytes()
        except (EOFError, OSError):
            # the writer is gone (the rules process stopped): polling still finds every row
            self._loop.remove_reader(self.wakeup.fileno())
            log.warning("delivery_wakeup_closed")
        self.wake()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        senders = list(self._senders) if self._senders is not None else make_senders(self.s)
        self.deliverers = [
            Deliverer(
                self.store,
                sender,
                self.policy,
                poll_s=self.s.delivery_poll_s,
                max_in_flight=self.max_in_flight,
            )
            for sender in senders
        ]
        if self.wakeup is not None:
            self._loop.add_reader(self.wakeup.fileno(), self._on_wakeup)
        names = [d.name for d in self.deliverers]
        log.info("delivery_started", extra={"endpoints": ",".join(names) or "-"})
        with contextlib.suppress(Exception):
            await self._warn_unconfigured(names)
        tasks = [asyncio.create_task(d.run(), name=f"deliverer-{d.name}") for d in self.deliverers]
        try:
            await self._stop.wait()
        finally:
            for d in self.deliverers:
                d.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.wakeup is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self.wakeup.fileno())
            log.info("delivery_stopped")

    async def _warn_unconfigured(self, names: Sequence[str]) -> None:
        counts = await _sql(self.store.delivery_counts)
        for endpoint, states in counts.items():
            if endpoint not in names and states.get("pending"):
                log.warning(
                    "delivery_endpoint_not_configured",
                    extra={"endpoint": endpoint, "pending": states["pending"]},
                )


def wake_delivery(conn: Connection) -> None:
    """Tell the delivery process that outbox rows were committed (the write end of its `wakeup` pipe; call it
    after the commit). Never blocks: a full pipe means wake-ups are waiting already, and a closed one means
    the delivery process is gone (the supervisor's business; its successor polls)."""
    with contextlib.suppress(OSError):  # BlockingIOError and BrokenPipeError included
        os.set_blocking(conn.fileno(), False)
        # 4 bytes (an empty message's header): below PIPE_BUF, so written whole or not at all
        conn.send_bytes(b"")


def metrics_port_of(s: Settings) -> int:
    """The delivery process's /metrics port: after the workers' and the rules process's (0: off)."""
    return s.metrics_port + s.workers + 1 if s.metrics_port else 0


def run_delivery(s: Settings, wakeup: Connection | None = None, *, metrics_port: int | None = None) -> None:
    """Run the delivery stage in this process until SIGTERM or SIGINT (main thread only). `wakeup`: the read
    end of a multiprocessing Pipe(duplex=False); anything arriving on it means "rows were committed, look
    now" (the writer calls `wake_delivery` on the other end). `metrics_port` None: metrics_port_of(s); 0: no
    /metrics."""
    engine = make_engine(s.database_url)
    store = IncidentStore(engine, [], instance=s.instance)
    port = metrics_port_of(s) if metrics_port is None else metrics_port
    if port:
        try:
            start_http_server(port, addr="127.0.0.1", registry=DELIVERY_REGISTRY)
        except OSError as exc:
            log.error("delivery_metrics_unavailable", extra={"port": port, "error": str(exc)})
    stage = DeliveryStage(s, store, wakeup=wakeup)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stage.request_stop)
        await stage.run()

    try:
        asyncio.run(main())
    finally:
        engine.dispose()


def delivery_main(wakeup: Connection | None, parent_pid: int) -> None:
    """Entry point of the spawned delivery process: dies with the supervisor; on SIGTERM/SIGINT it stops
    taking rows and lets the attempts in flight finish (STOP_GRACE_S) before it exits."""
    from gateway.evaluate import die_with_parent

    die_with_parent(parent_pid)
    s = Settings()
    logs.setup(s.log_level, s.log_json)
    run_delivery(s, wakeup)
