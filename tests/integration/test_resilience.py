"""No reading is lost when InfluxDB, the gateway or the broker goes away mid-stream, and two gateway
processes in one share group split the stream between them without losing or doubling a point.

A test that stops a service runs a private one in `service_dir`; the others use the session's.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stack.services import InfluxService, MosquittoService, start_influxdb, start_mosquitto
from tests.integration.conftest import (
    GatewayProcess,
    Harness,
    Publisher,
    community_rows,
    now_ms,
    telemetry,
    topic,
    wait_for,
)


@pytest.fixture
def private_influx(service_dir: Path) -> Iterator[InfluxService]:
    with start_influxdb(service_dir) as influx:
        yield influx


@pytest.fixture
def private_broker(service_dir: Path) -> Iterator[MosquittoService]:
    with start_mosquitto(service_dir) as broker:
        yield broker


def _covers(harness: Harness, n: int) -> list[dict[str, Any]]:
    rows = community_rows(f"r{uuid.uuid4().hex[:6]}", covers=n)
    harness.register(rows)
    return rows


class Stream:
    """Telemetry of a few devices, seq 0, 1, 2, ... each in turn with distinct device times, published from
    a thread until stopped; remembers which message id carried which (device, seq)."""

    def __init__(self, pub: Publisher, rows: list[dict[str, Any]], *, pause_s: float = 0.001) -> None:
        self.pub = pub
        self.rows = rows
        self.pause_s = pause_s
        self.t0 = now_ms() - 10 * 60_000
        self.sent: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def messages(self, start: int, stop: int) -> Iterator[tuple[str, dict[str, Any], str, int]]:
        for seq in range(start, stop):
            for row in self.rows:
                yield topic(row), telemetry(row, seq=seq, ts=self.t0 + seq), row["device_id"], seq

    def publish(self, start: int, stop: int) -> None:
        """Publish seq start..stop-1 of every device and wait for the broker's acknowledgements."""
        mids = []
        for t, payload, device_id, seq in self.messages(start, stop):
            mid = self.pub.publish(t, payload)
            self.sent[mid] = (device_id, seq)
            mids.append(mid)
        self.pub.wait_acked(mids)

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            for t, payload, device_id, s in self.messages(seq, seq + 1):
                self.sent[self.pub.publish(t, payload)] = (device_id, s)
            seq += 1
            time.sleep(self.pause_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    @property
    def count(self) -> int:
        return len(self.sent)

    def wait_published(self, more: int, what: str) -> None:
        """Wait until the thread has published `more` messages beyond what it had published so far."""
        target = self.count + more
        wait_for(lambda: self.count, lambda n: n >= target, what=f"{more} more messages published {what}")

    def acked(self) -> dict[str, list[int]]:
        """Per device, the seqs the broker acknowledged to the publisher, sorted."""
        out: dict[str, list[int]] = {row["device_id"]: [] for row in self.rows}
        for mid, (device_id, seq) in self.sent.items():
            if self.pub.is_acked(mid):
                out[device_id].append(seq)
        return {k: sorted(v) for k, v in out.items()}


def _stored_seqs(harness: Harness) -> dict[str, list[int]]:
    rows = harness.query('SELECT seq FROM "manhole_cover" GROUP BY device_id')
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(r["device_id"], []).append(r["seq"])
    return {k: sorted(v) for k, v in out.items()}


def _counts(harness: Harness) -> dict[str, int]:
    return {
        r["device_id"]: r["count"]
        for r in harness.query('SELECT count(seq) FROM "manhole_cover" GROUP BY device_id')
    }


def _assert_exactly_once(harness: Harness, expected: dict[str, list[int]], timeout: float = 60) -> None:
    """Every expected (device, seq) lands once: same point count and the same seqs, no more, no fewer."""
    want = {device: len(seqs) for device, seqs in expected.items() if seqs}
    try:
        wait_for(
            lambda: _counts(harness),
            lambda c: c == want,
            what="every published point in InfluxDB",
            timeout=timeout,
        )
    finally:
        stored = _stored_seqs(harness)
        for device, seqs in expected.items():
            missing = sorted(set(seqs) - set(stored.get(device, [])))
            extra = sorted(set(stored.get(device, [])) - set(seqs))
            if missing or extra:
                print(
                    f"{device}: {len(seqs)} expected, missing {_ranges(missing)}, unexpected {_ranges(extra)}"
                )
    assert stored == {d: s for d, s in expected.items() if s}
    for device, seqs in stored.items():
        assert not [s for s, n in Counter(seqs).items() if n > 1], f"{device}: a seq stored twice"


def _ranges(seqs: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    parts: list[str] = []
    for s in seqs:
        if parts and parts[-1].split("-")[-1] == str(s - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{s}"
        else:
            parts.append(str(s))
    return ", ".join(parts) or "none"


def _stored(gw: GatewayProcess) -> float:
    return gw.metrics().value("sc_messages_total", outcome="stored")


def test_influxdb_outage_is_spooled_and_drained_exactly_once(
    make_harness: Any, mosquitto: MosquittoService, private_influx: InfluxService
) -> None:
    harness: Harness = make_harness(mosquitto, private_influx)
    rows = _covers(harness, 3)
    gw = harness.start_gateway(SC_RETRY_MAX_S="1", SC_INFLUX_TIMEOUT_S="3")
    stream = Stream(harness.publisher(), rows)
    n = 1000  # per device: 3000 messages in all

    stream.publish(0, n // 3)
    wait_for(
        lambda: sum(_counts(harness).values()),
        lambda c: c == len(rows) * (n // 3),
        what="the first part in InfluxDB",
    )

    private_influx.stop()
    stream.publish(n // 3, 2 * n // 3)
    # Everything taken while InfluxDB is down is in the spool and acknowledged to the broker.
    wait_for(
        gw.metrics,
        lambda m: (
            m.value("sc_messages_total", outcome="stored") == len(rows) * (2 * n // 3)
            and m.value("sc_unacked_messages") == 0
            and m.value("sc_spool_segments") > 0
        ),
        what="the second part to be spooled and acknowledged",
    )

    private_influx.start()
    stream.publish(2 * n // 3, n)
    _assert_exactly_once(harness, stream.acked())
    assert stream.acked() == {row["device_id"]: list(range(n)) for row in rows}
    metrics = wait_for(gw.metrics, lambda m: m.value("sc_spool_segments") == 0, what="the spool to drain")
    assert metrics.value("sc_points_spooled_total") >= len(rows) * (n // 3)
    assert gw.is_running()


def test_spool_survives_a_gateway_crash_while_influxdb_is_down(
    make_harness: Any, mosquitto: MosquittoService, private_influx: InfluxService
) -> None:
    """What the spool holds has been acknowledged to the broker: it is the only copy, and must outlive
    the process that wrote it."""
    harness: Harness = make_harness(mosquitto, private_influx)
    rows = _covers(harness, 2)
    gw = harness.start_gateway(SC_RETRY_MAX_S="1", SC_INFLUX_TIMEOUT_S="3")
    stream = Stream(harness.publisher(), rows)
    n = 300

    private_influx.stop()
    stream.publish(0, n)
    wait_for(
        gw.metrics,
        lambda m: (
            m.value("sc_messages_total", outcome="stored") == len(rows) * n
            and m.value("sc_unacked_messages") == 0
            and m.value("sc_spool_segments") > 0
        ),
        what="the stream to be spooled and acknowledged",
    )
    gw.kill()

    restarted = harness.start_gateway("gateway-restarted", SC_RETRY_MAX_S="1")  # same spool dir
    assert restarted.metrics().value("sc_spool_segments") > 0
    private_influx.start()
    _assert_exactly_once(harness, {row["device_id"]: list(range(n)) for row in rows})
    wait_for(restarted.metrics, lambda m: m.value("sc_spool_segments") == 0, what="the spool to drain")
    assert "spool_found_at_start" in restarted.log_path.read_text()


def test_a_batch_that_could_not_be_made_durable_is_taken_again_when_redelivered(
    make_harness: Any, mosquitto: MosquittoService, private_influx: InfluxService
) -> None:
    """InfluxDB down and the spool's disk failing: the batch is neither stored nor acknowledged, so the
    broker delivers it again, and then it must be stored, not discarded as a duplicate of itself."""
    harness: Harness = make_harness(mosquitto, private_influx)
    rows = _covers(harness, 2)
    gw = harness.start_gateway(SC_RETRY_MAX_S="1", SC_MQTT_RECONNECT_MAX_S="1")
    private_influx.stop()
    spool = harness.workdir / "spool" / "worker-0"
    shutil.rmtree(spool)
    spool.write_text("a file where the spool directory was: every append fails")

    stream = Stream(harness.publisher(), rows)
    stream.publish(0, 5)
    wait_for(lambda: "batch_failed" in gw.log_path.read_text(), what="the batch to fail")

    spool.unlink()
    spool.mkdir()
    private_influx.start()
    _assert_exactly_once(harness, {row["device_id"]: list(range(5)) for row in rows})
    assert gw.is_running()


def test_gateway_killed_mid_stream_loses_nothing(
    make_harness: Any, mosquitto: MosquittoService, influxdb: InfluxService
) -> None:
    harness: Harness = make_harness(mosquitto, influxdb)
    rows = _covers(harness, 3)
    gw = harness.start_gateway()
    stream = Stream(harness.publisher(), rows)
    stream.start()
    try:
        wait_for(lambda: _stored(gw), lambda n: n >= 300, what="the gateway to take part of the stream")
        gw.kill()
        stream.wait_published(300, "while the gateway is down")
        restarted = harness.start_gateway("gateway-restarted")  # same instance: same session, same spool
        wait_for(
            lambda: _stored(restarted), lambda n: n >= 300, what="the restarted gateway to take messages"
        )
    finally:
        stream.stop()
    stream.pub.wait_acked(stream.sent)
    _assert_exactly_once(harness, stream.acked())
    assert restarted.is_running()


def test_broker_restart_mid_stream_loses_nothing_the_broker_acknowledged(
    make_harness: Any, private_broker: MosquittoService, influxdb: InfluxService
) -> None:
    """A clean broker restart (it saves its state) while devices keep publishing.

    Without a share group: Mosquitto 2.0 persists a session's plain subscriptions but not its shared
    ones (persist__subs_save writes only a topic node's `subs`), so after a restart a `$share`
    subscription exists only once the gateway has subscribed again, and what devices publish before
    that is acknowledged to them with "no matching subscribers" and dropped by the broker.
    """
    harness: Harness = make_harness(private_broker, influxdb)
    rows = _covers(harness, 3)
    gw = harness.start_gateway(SC_MQTT_SHARE_GROUP="", SC_MQTT_RECONNECT_MAX_S="1")
    stream = Stream(harness.publisher(), rows)
    stream.start()
    try:
        wait_for(lambda: _stored(gw), lambda n: n >= 300, what="the gateway to take part of the stream")
        private_broker.restart()
        before = _stored(gw)
        # The gateway's reconnect loop brings it back, and it takes messages again.
        wait_for(lambda: _stored(gw), lambda n: n >= before + 300, what="the gateway to take messages again")
    finally:
        stream.stop()
    stream.pub.wait_acked(stream.sent)  # the publisher sends again what the broker had not acknowledged
    assert not stream.pub.unrouted, "the broker dropped messages for want of a subscriber"
    _assert_exactly_once(harness, stream.acked())
    assert gw.metrics().value("sc_broker_connected") == 1
    assert "broker_disconnected" in gw.log_path.read_text()


def test_two_gateways_in_one_share_group_split_the_stream(
    make_harness: Any, mosquitto: MosquittoService, influxdb: InfluxService
) -> None:
    harness: Harness = make_harness(mosquitto, influxdb)
    rows = _covers(harness, 4)
    a = harness.start_gateway(
        "gateway-a", SC_INSTANCE=f"{harness.instance}-a", SC_SPOOL_DIR=str(harness.workdir / "spool-a")
    )
    b = harness.start_gateway(
        "gateway-b", SC_INSTANCE=f"{harness.instance}-b", SC_SPOOL_DIR=str(harness.workdir / "spool-b")
    )
    stream = Stream(harness.publisher(), rows)
    n = 500  # per device: 2000 messages in all
    stream.publish(0, n)

    _assert_exactly_once(harness, {row["device_id"]: list(range(n)) for row in rows})
    shares = wait_for(
        lambda: (_stored(a), _stored(b)),
        lambda s: sum(s) == len(rows) * n,
        what="both gateways to account for every message",
    )
    assert all(share > 0 for share in shares), shares
