"""The delivery stage through the real wire, on SQLite and PostgreSQL: outbox rows written by the incident
store go to a real HTTP receiver that verifies every signature (tests/support/webhook_receiver.py), or to a
real Mosquitto. Order per incident, retries with the same webhook-id, 410, exhausted retries and re-sending,
a SIGKILLed `sc-gateway deliver`, forgeries rejected.

Nothing waits for time to pass: `wait_for` polls the outbox or the receiver with a deadline; to see that
nothing more is sent, a test waits for the deliverer's poll rounds instead."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, update

from gateway.cli import main as cli_main
from gateway.db import outbox
from gateway.delivery import DELIVERY_REGISTRY, DeliveryStage, RetryPolicy, wake_delivery
from gateway.incident_store import IncidentStore, OutboxRow
from gateway.settings import MQTT_ENDPOINT, EndpointConfig, Settings
from incidents.cloudevents import delivery_headers
from stack.services import MosquittoService, free_port, start_mosquitto
from tests.integration.conftest import REPO, wait_for
from tests.integration.test_incident_store import device, engine, verdict  # noqa: F401
from tests.support.webhook_receiver import Arrival, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"integration-test-webhook-key-32b").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"someone-else-s-webhook-key-32b!!").decode()
CASES = "cases"
FAST = RetryPolicy(base_s=0.05, max_s=0.2)
TYPES = ("opened", "updated", "resolved")


# ---- helpers --------------------------------------------------------------------------------------------


def _url(eng: Engine) -> str:
    return eng.url.render_as_string(hide_password=False)


def _settings(eng: Engine, receiver_url: str | None, **kw: Any) -> Settings:
    endpoints = []
    if receiver_url is not None:
        endpoints = [
            EndpointConfig(
                name=CASES,
                url=receiver_url,
                secret=SECRET,
                timeout_s=kw.pop("timeout_s", 5.0),
            )
        ]
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": _url(eng),
        "incident_endpoints": endpoints,
        "incident_mqtt": False,
        "delivery_poll_s": 0.1,
        "metrics_port": 0,
    }
    return Settings(**(values | kw))


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(SECRET) as r:
        yield r


@pytest.fixture
def store(engine: Engine) -> IncidentStore:  # noqa: F811
    return IncidentStore(engine, [CASES], instance="test")


def change(store: IncidentStore, device_id: str, kind: str, occurrences: int = 2) -> str:
    """Apply an opened / updated / resolved change to the device's incident now; returns its id."""
    if kind == "opened":
        v = verdict(device_id=device_id)
    elif kind == "updated":
        v = verdict(device_id=device_id, change="repeated", occurrences=occurrences)
    else:
        v = verdict("cleared", device_id=device_id, tilt=2.0)
    out = store.apply(v, device(device_id), dt.datetime.now(dt.UTC))
    assert out is not None and out[1] == f"sc.incident.{kind}", out
    return out[0].incident_id


def by_incident(arrivals: Sequence[Arrival]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in arrivals:
        out.setdefault(a.subject, []).append(a.type.removeprefix("sc.incident."))
    return out


def rows_of(store: IncidentStore, incident_ids: Sequence[str]) -> list[OutboxRow]:
    return [r for i in incident_ids for r in store.outbox_rows(i)]


def wait_delivered(store: IncidentStore, incident_ids: Sequence[str], n: int) -> list[OutboxRow]:
    return wait_for(
        lambda: rows_of(store, incident_ids),
        lambda rows: len(rows) == n and all(r.state == "delivered" for r in rows),
        what=f"{n} deliveries of {list(incident_ids)}",
    )


def sample(name: str, **labels: str) -> float:
    return DELIVERY_REGISTRY.get_sample_value(name, labels) or 0.0


@contextmanager
def running(stage: DeliveryStage) -> Iterator[DeliveryStage]:
    """The stage on an event loop of its own, in a thread (tests wait synchronously)."""
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(stage.run())
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=main, name="delivery-stage", daemon=True)
    thread.start()
    wait_for(lambda: bool(stage.deliverers) or bool(errors), what="the delivery stage to start")
    try:
        yield stage
    finally:
        stage.request_stop()
        thread.join(20)
        assert not thread.is_alive(), "the delivery stage did not stop"
        assert not errors, errors


def wait_polls(stage: DeliveryStage, rounds: int = 3) -> None:
    """Wait until every deliverer has looked at the outbox `rounds` more times."""
    start = [d.polls for d in stage.deliverers]
    wait_for(
        lambda: [d.polls - s for d, s in zip(stage.deliverers, start, strict=True)],
        lambda done: all(n >= rounds for n in done),
        what=f"{rounds} poll rounds",
    )


def cli(capsys: pytest.CaptureFixture[str], eng: Engine, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["--db", _url(eng), *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- order, wake-up, signatures -------------------------------------------------------------------------


def test_events_of_an_incident_arrive_in_order_signed_and_woken_by_the_pipe(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    receiver: WebhookReceiver,
) -> None:
    before = sample("sc_deliveries_total", endpoint=CASES, outcome="delivered")
    read_end, write_end = multiprocessing.Pipe(duplex=False)
    # a poll period far beyond the test: only the wake-up pipe (and finished attempts) make it look again
    stage = DeliveryStage(_settings(engine, receiver.url, delivery_poll_s=600), store, wakeup=read_end)
    with running(stage):
        wait_for(lambda: stage.deliverers[0].polls, what="the first look at the outbox")
        ids = []
        for dev in ("mc-a", "mc-b"):
            for kind in TYPES:
                ids.append(change(store, dev, kind))
                wake_delivery(write_end)
        incidents = sorted(set(ids))
        rows = wait_delivered(store, incidents, 6)
    write_end.close()
    read_end.close()

    assert receiver.rejections == []
    accepted = receiver.accepted()
    assert by_incident(accepted) == {i: list(TYPES) for i in incidents}
    assert len(receiver.all()) == 6  # nothing was sent twice
    sent = {r.event_id: r for r in rows}
    for a in accepted:
        row = sent[a.webhook_id]
        assert (a.subject, a.type) == (row.incident_id, row.event_type)
        assert a.data["incident_id"] == row.incident_id and a.data["status"] in ("open", "resolved")
        assert row.attempts == 1 and row.last_status == 204 and row.delivered_at is not None
    assert sample("sc_deliveries_total", endpoint=CASES, outcome="delivered") - before == 6
    assert sample("sc_delivery_seconds_count", endpoint=CASES) >= 6
    assert sample("sc_outbox_due", endpoint=CASES) == 0


def test_a_receiver_down_for_a_while_gets_every_event_in_order_once_back(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    receiver: WebhookReceiver,
) -> None:
    receiver.stop()
    stage = DeliveryStage(_settings(engine, receiver.url), store, policy=FAST)
    with running(stage):
        ids = []
        for dev in ("mc-1", "mc-2", "mc-3"):
            ids += [change(store, dev, "opened"), change(store, dev, "updated")]
        ids.append(change(store, "mc-1", "resolved"))
        incidents = sorted(set(ids))
        # every incident's head has been tried and retried; its later events wait behind it
        wait_for(
            lambda: rows_of(store, incidents),
            lambda rows: all(r.attempts >= 2 for r in rows if r.seq == 1),
            what="retries while the receiver is down",
        )
        waiting = [r for r in rows_of(store, incidents) if r.seq > 1]
        assert all(r.attempts == 0 and r.state == "pending" for r in waiting)
        assert all(r.last_status is None and r.last_error for r in rows_of(store, incidents) if r.seq == 1)
        receiver.start()
        rows = wait_delivered(store, incidents, 7)

    accepted = receiver.accepted()
    assert by_incident(accepted) == {
        incidents[0]: ["opened", "updated", "resolved"],
        incidents[1]: ["opened", "updated"],
        incidents[2]: ["opened", "updated"],
    }
    assert {a.webhook_id for a in accepted} == {r.event_id for r in rows}
    # anything that arrived twice is a retry of the same delivery (same webhook-id), nothing else
    assert {a.webhook_id for a in receiver.all()} == {r.event_id for r in rows}


def test_errors_and_timeouts_are_retried_with_the_same_webhook_id(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    receiver: WebhookReceiver,
) -> None:
    receiver.retry_after = "0"
    receiver.answer(503, 503, "close", 500, ("slow", 5.0, 204))
    # a timeout no quick answer reaches on a loaded machine, well below the slow one
    stage = DeliveryStage(_settings(engine, receiver.url, timeout_s=2.0), store, policy=FAST)
    with running(stage):
        iid = change(store, "mc-r", "opened")
        change(store, "mc-r", "resolved")
        rows = wait_delivered(store, [iid], 2)

    first, second = rows
    # (the receiver records the slow one when it answers, after the retry that was answered at once)
    attempts = wait_for(lambda: receiver.attempts(first.event_id), lambda a: len(a) == 6, what="6 attempts")
    answers = [a.answered for a in attempts]
    # the slow answer came after the gateway's timeout: tried again, same id (the receiver de-duplicates)
    assert answers == [503, 503, None, 500, 204, 204]
    assert {a.webhook_id for a in receiver.all()} == {first.event_id, second.event_id}
    assert first.attempts == 6 and first.last_status == 204 and first.last_error is None
    assert [a.answered for a in receiver.attempts(second.event_id)] == [204]
    assert by_incident(receiver.accepted()) == {iid: ["opened", "resolved"]}


def test_a_slow_incident_does_not_hold_back_the_others(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    receiver: WebhookReceiver,
) -> None:
    receiver.answer(("slow", 8.0, 204))  # room for the fast incident's two deliveries meanwhile
    stage = DeliveryStage(_settings(engine, receiver.url, timeout_s=10.0), store, policy=FAST)
    with running(stage):
        slow = change(store, "mc-s1", "opened")
        wait_for(receiver.scripted, lambda n: n == 0, what="the slow answer to start")
        fast = [change(store, "mc-s2", "opened"), change(store, "mc-s2", "resolved")]
        wait_delivered(store, fast[:1], 2)
        assert store.outbox_rows(slow)[0].state == "pending"  # still in flight
        change(store, "mc-s1", "resolved")
        wait_delivered(store, [slow], 2)
    assert by_incident(receiver.accepted()) == {fast[0]: ["opened", "resolved"], slow: ["opened", "resolved"]}
    assert [a.subject for a in receiver.accepted()][:2] == [fast[0], fast[0]]


# ---- 410 ------------------------------------------------------------------------------------------------


def test_410_disables_the_endpoint_until_enabled_then_everything_goes_in_order(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    receiver: WebhookReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.answer(410)
    stage = DeliveryStage(_settings(engine, receiver.url), store, policy=FAST)
    with running(stage):
        a = change(store, "mc-g1", "opened")
        wait_for(store.disabled_endpoints, what="the endpoint to be disabled")
        wait_for(lambda: store.outbox_rows(a)[0].state, lambda s: s == "disabled", what="a disabled row")
        # rows written from now on are disabled too, and nothing more is sent
        change(store, "mc-g1", "updated")
        b = change(store, "mc-g2", "opened")
        assert {r.state for r in rows_of(store, [a, b])} == {"disabled"}
        wait_polls(stage, 3)
        assert [x.answered for x in receiver.all()] == [410]
        assert stage.deliverers[0].disabled

        code, out, _ = cli(capsys, engine, "deliveries", "status", "--json")
        status = json.loads(out)
        assert code == 0 and status["endpoints"][CASES] == {"disabled": 3}
        assert [d["name"] for d in status["disabled"]] == [CASES] and "410" in status["disabled"][0]["reason"]
        code, _, err = cli(capsys, engine, "deliveries", "resend", "--failed", "--endpoint", CASES)
        assert code == 1 and "deliveries enable cases" in err
        code, _, err = cli(capsys, engine, "deliveries", "enable", "nobody")
        assert code == 1 and "'nobody' is not disabled" in err

        code, out, _ = cli(capsys, engine, "deliveries", "enable", CASES)
        assert code == 0 and "3 deliveries queued again" in out
        rows = wait_delivered(store, [a, b], 3)
        assert not stage.deliverers[0].disabled

    assert store.disabled_endpoints() == []
    assert by_incident(receiver.accepted()) == {a: ["opened", "updated"], b: ["opened"]}
    first = next(r for r in rows if r.incident_id == a and r.seq == 1)
    assert [x.answered for x in receiver.attempts(first.event_id)] == [410, 204]


# ---- exhausted retries, re-sending ----------------------------------------------------------------------


def test_exhausted_retries_fail_for_good_are_listed_and_resent(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    receiver: WebhookReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = sample("sc_deliveries_total", endpoint=CASES, outcome="failed")
    receiver.always(500)
    iid = change(store, "mc-x", "opened")
    change(store, "mc-x", "updated")
    # written 49 hours ago: past the 48 h window, so the next failed attempt is the last
    with engine.begin() as conn:
        conn.execute(update(outbox).values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=49)))
    stage = DeliveryStage(_settings(engine, receiver.url), store, policy=FAST)
    with running(stage):
        head = wait_for(
            lambda: store.outbox_rows(iid)[0], lambda r: r.state == "failed", what="the head to fail"
        )
        assert head.attempts == 1 and head.last_status == 500 and "HTTP 500" in (head.last_error or "")
        # the incident's next event waits behind the failed one
        wait_polls(stage, 3)
        later = store.outbox_rows(iid)[1]
        assert (later.state, later.attempts) == ("pending", 0)
        assert [r.id for r in store.deliveries(state="failed")] == [head.id]
        assert store.delivery_counts() == {CASES: {"failed": 1, "pending": 1}}

        code, out, _ = cli(capsys, engine, "deliveries", "list", "--state", "failed", "--json")
        listed = json.loads(out)
        assert code == 0 and [(d["id"], d["webhook_id"]) for d in listed] == [(head.id, head.event_id)]
        code, out, _ = cli(capsys, engine, "deliveries", "list", "--endpoint", CASES)
        assert code == 0 and "failed" in out and "HTTP 500" in out
        code, _, err = cli(capsys, engine, "deliveries", "resend", "--id", str(later.id))
        assert code == 1 and f"{later.id}: is pending" in err
        code, _, err = cli(capsys, engine, "deliveries", "resend", "--id", "999999")
        assert code == 1 and "no such delivery" in err

        code, out, _ = cli(capsys, engine, "deliveries", "resend", "--id", str(head.id))
        assert code == 0 and "1 deliveries queued again" in out
        # a re-sent delivery has a whole retry window again: failing now, it is retried, not failed
        again = wait_for(
            lambda: store.outbox_rows(iid)[0], lambda r: r.attempts >= 2, what="a second attempt"
        )
        assert again.state == "pending" and again.retry_from is not None
        receiver.always(204)
        rows = wait_delivered(store, [iid], 2)

    assert rows[0].event_id == head.event_id and rows[0].attempts >= 3
    assert by_incident(receiver.accepted()) == {iid: ["opened", "updated"]}
    assert sample("sc_deliveries_total", endpoint=CASES, outcome="failed") - before == 1
    code, out, _ = cli(capsys, engine, "deliveries", "resend", "--failed")
    assert code == 0 and "no failed deliveries" in out


# ---- the `sc-gateway deliver` process -------------------------------------------------------------------


class DeliverProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "deliver"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=log_path.parent,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_a_sigkilled_delivery_process_leaves_nothing_behind_the_next_one_sends_it(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SC_")}
    endpoint = {"name": CASES, "url": receiver.url, "secret": SECRET, "timeout_s": 5}
    env |= {
        "PYTHONPATH": str(REPO),
        "SC_ENVIRONMENT": "test",
        "SC_DATABASE_URL": _url(engine),
        "SC_INCIDENT_ENDPOINTS": json.dumps([endpoint]),
        "SC_INCIDENT_MQTT": "false",
        "SC_DELIVERY_POLL_S": "0.1",
        "SC_DELIVERY_BACKOFF_MAX_S": "1",
        "SC_METRICS_PORT": "0",
    }
    receiver.stop()
    procs: list[DeliverProcess] = []
    try:
        first = DeliverProcess(env, tmp_path / "deliver-1.log")
        procs.append(first)
        ids = [change(store, dev, kind) for dev in ("mc-k1", "mc-k2") for kind in TYPES]
        incidents = sorted(set(ids))
        wait_for(
            lambda: rows_of(store, incidents),
            lambda rows: all(r.attempts >= 1 for r in rows if r.seq == 1),
            what=f"the first process to try (log: {first.log_path})",
        )
        first.close()
        assert first.proc.returncode == -signal.SIGKILL
        assert not any(r.state == "delivered" for r in rows_of(store, incidents))

        receiver.start()
        second = DeliverProcess(env, tmp_path / "deliver-2.log")
        procs.append(second)
        wait_delivered(store, incidents, 6)
        # SIGTERM: a clean stop
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(20) == 0
        assert "delivery_stopped" in second.log()
    finally:
        for p in procs:
            p.close()

    assert by_incident(receiver.accepted()) == {i: list(TYPES) for i in incidents}
    assert len({a.webhook_id for a in receiver.all()}) == 6


# ---- forgeries ------------------------------------------------------------------------------------------


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    return httpx.post(url, content=body, headers=headers, timeout=5).status_code


def _forgeries(url: str) -> list[int]:
    """A genuine delivery, then a forged body, a wrong secret, a stale and a future timestamp."""
    body = json.dumps({"type": "sc.incident.opened", "subject": "INC-19990101-000001", "data": {}}).encode()
    now = int(time.time())
    wid = str(uuid.uuid4())
    return [
        _post(url, body, delivery_headers(SECRET, wid, now, body)),
        _post(url, body.replace(b"opened", b"closed"), delivery_headers(SECRET, wid, now, body)),
        _post(url, body, delivery_headers(OTHER_SECRET, wid, now, body)),
        _post(url, body, delivery_headers(SECRET, wid, now - 600, body)),
        _post(url, body, delivery_headers(SECRET, wid, now + 600, body)),
    ]


def test_forged_body_wrong_secret_and_stale_timestamps_are_rejected(receiver: WebhookReceiver) -> None:
    assert _forgeries(receiver.url) == [204, 401, 401, 401, 401]
    assert receiver.rejections == ["bad_signature", "bad_signature", "stale", "future"]
    assert len(receiver.all()) == 1


@pytest.fixture
def example_receiver(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """examples/verify_webhook.py, running."""
    port = free_port()
    log_path = tmp_path / "verify_webhook.log"
    env = os.environ | {"SC_WEBHOOK_SECRET": SECRET}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "verify_webhook.py"), str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: "listening" in log_path.read_text(), what="verify_webhook.py to listen")
        yield f"http://127.0.0.1:{port}/", log_path
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_example_receiver_rejects_forgeries_and_takes_real_deliveries(
    engine: Engine,  # noqa: F811
    store: IncidentStore,
    example_receiver: tuple[str, Path],
) -> None:
    url, log_path = example_receiver
    assert _forgeries(url) == [204, 401, 401, 401, 401]
    stage = DeliveryStage(_settings(engine, url), store, policy=FAST)
    with running(stage):
        iid = change(store, "mc-e", "opened")
        change(store, "mc-e", "resolved")
        wait_delivered(store, [iid], 2)
    lines = log_path.read_text().splitlines()
    assert [ln.split()[:2] for ln in lines if iid in ln] == [
        ["sc.incident.opened", iid],
        ["sc.incident.resolved", iid],
    ]


# ---- MQTT -----------------------------------------------------------------------------------------------


class Subscriber:
    """A paho client on the broker's admin account (it may read every topic), collecting sc/v1/incidents/#."""

    def __init__(self, broker: MosquittoService) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(broker.admin_username, broker.admin_password)
        self.client.on_connect = lambda c, *_: c.subscribe("sc/v1/incidents/#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(30), "subscriber: no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _mqtt_settings(eng: Engine, broker: MosquittoService) -> Settings:
    account = broker.gateway_account
    return _settings(
        eng,
        None,
        incident_mqtt=True,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_username=account.username,
        mqtt_password=account.password,
    )


def test_the_mqtt_endpoint_publishes_each_cloudevent_to_the_incident_topic(
    engine: Engine,  # noqa: F811
    mosquitto: MosquittoService,
) -> None:
    store = IncidentStore(engine, [MQTT_ENDPOINT], instance="test")
    sub = Subscriber(mosquitto)
    try:
        stage = DeliveryStage(_mqtt_settings(engine, mosquitto), store, policy=FAST)
        with running(stage):
            iid = change(store, "mc-m", "opened")
            change(store, "mc-m", "resolved")
            rows = wait_delivered(store, [iid], 2)
            got = wait_for(sub.received, lambda m: len(m) >= 2, what="2 MQTT messages")
    finally:
        sub.close()
    assert got == [(f"sc/v1/incidents/110101001001/{iid}", r.body) for r in rows]
    events = [json.loads(body) for _, body in got]
    assert [(e["type"], e["subject"], e["id"]) for e in events] == [
        (r.event_type, iid, r.event_id) for r in rows
    ]


def test_the_mqtt_endpoint_retries_while_the_broker_is_down(engine: Engine, service_dir: Path) -> None:  # noqa: F811
    store = IncidentStore(engine, [MQTT_ENDPOINT], instance="test")
    with start_mosquitto(service_dir) as broker:
        settings = _mqtt_settings(engine, broker)
        stage = DeliveryStage(settings, store, policy=FAST)
        with running(stage):
            first = change(store, "mc-d1", "opened")
            wait_delivered(store, [first], 1)
            broker.stop()
            second = change(store, "mc-d2", "opened")
            row = wait_for(
                lambda: store.outbox_rows(second)[0],
                lambda r: r.attempts >= 2,
                what="retries while the broker is down",
            )
            assert row.state == "pending" and "broker" in (row.last_error or "")
            broker.start()
            (row,) = wait_delivered(store, [second], 1)
            sub = Subscriber(broker)
            try:
                third = change(store, "mc-d3", "opened")
                wait_delivered(store, [third], 1)
                got = wait_for(sub.received, what="a message after the broker came back")
            finally:
                sub.close()
    assert row.attempts >= 3 and row.last_error is None
    assert [t for t, _ in got] == [f"sc/v1/incidents/110101001001/{third}"]


def test_a_publication_the_broker_refuses_is_not_taken_for_delivered(
    engine: Engine,  # noqa: F811
    mosquitto: MosquittoService,
) -> None:
    store = IncidentStore(engine, [MQTT_ENDPOINT], instance="test")
    account = mosquitto.publisher_account  # an adaptor: it may not publish on sc/v1/incidents/#
    settings = _mqtt_settings(engine, mosquitto).model_copy(
        update={"mqtt_username": account.username, "mqtt_password": SecretStr(account.password)}
    )
    with running(DeliveryStage(settings, store, policy=FAST)):
        iid = change(store, "mc-n", "opened")
        row = wait_for(lambda: store.outbox_rows(iid)[0], lambda r: r.attempts >= 2, what="refused attempts")
    assert row.state == "pending" and "broker refused the publication" in (row.last_error or "")
