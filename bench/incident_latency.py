"""Benchmark: smoke alarm published → signed incident webhook received, idle and under telemetry load.

One gateway run (real Mosquitto, InfluxDB, SQLite registry; 2 workers, default rules, incidents on, one
webhook endpoint): first `--alarms` smoke detectors raise an alarm each on an idle gateway (the baseline),
then as many more while `--rate` msg/s (default 10,000) of quiet telemetry from 5,000 other devices flow
through the same gateway. For each alarm: publish time (alarm publisher process) → arrival of its signed
`sc.incident.opened` at a receiver in its own process (verified with incidents.cloudevents.verify).
Prints p50/p95/p99/max for both phases and the ratio; not part of the test suite.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mqttload import RawPublisher
from bench.throughput import _metric, _scrape, build_messages
from gateway.broker_admin import Credentials
from stack.services import free_port, start_influxdb, start_mosquitto

SMOKE_RULE = "smoke_detector.smoke_alarm"


# ---- the receiver (own process: its clock readings do not wait for the publisher's GIL) ----------------


def _receiver(port: int, secret: str, out: Any, ready: Any) -> None:
    from incidents.cloudevents import WebhookVerificationError, verify

    seen: set[str] = set()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            t = time.time()
            try:
                wid = verify(secret, dict(self.headers.items()), body)
            except WebhookVerificationError as exc:
                out.put(("rejected", str(exc), t))
                self.send_response(400)
                self.end_headers()
                return
            self.send_response(204)
            self.end_headers()
            if wid in seen:
                return
            seen.add(wid)
            event = json.loads(body)
            data = event["data"]
            if event["type"] == "sc.incident.opened" and data["rule_id"] == SMOKE_RULE:
                out.put(("opened", data["device"]["id"], t))

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Hook)
    ready.set()
    server.serve_forever(poll_interval=0.05)


# ---- the alarm publisher (own process, paho, QoS 1) ------------------------------------------------------


def _alarms(port: int, account: Credentials, ids: list[str], gap_s: float, out: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-alarms", protocol=mqtt.MQTTv5
    )
    c.username_pw_set(account.username, account.password)
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(0.5)
    for i, did in enumerate(ids):
        payload = json.dumps({"ts": int(time.time() * 1000), "seq": 1, "event": "smoke_alarm"})
        t = time.time()
        c.publish(f"sc/v1/smoke_detector/{did}/event", payload, qos=1)
        out.put(("sent", did, t))
        time.sleep(gap_s if i + 1 < len(ids) else 0)
    time.sleep(0.5)
    c.loop_stop()
    c.disconnect()


def _percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    a = np.array(ms)
    return {
        "n": len(ms),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def _phase(
    ctx: Any, port: int, account: Credentials, ids: list[str], gap_s: float, q: Any, timeout_s: float
) -> tuple[dict[str, float], int]:
    """Publish one alarm per id; wait for their webhooks; return latency percentiles (ms) and how many never
    arrived."""
    p = ctx.Process(target=_alarms, args=(port, account, ids, gap_s, q))
    p.start()
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s + gap_s * len(ids)
    while (len(got) < len(ids) or len(sent) < len(ids)) and time.monotonic() < deadline:
        try:
            kind, did, t = q.get(timeout=0.5)
        except Exception:
            continue
        if kind == "sent":
            sent[did] = t
        elif kind == "opened" and did in set(ids):
            got.setdefault(did, t)
        elif kind == "rejected":
            print(f"  receiver rejected a delivery: {did}", flush=True)
    p.join(10)
    lat = [1000 * (got[d] - sent[d]) for d in got if d in sent]
    return _percentiles(lat), len(ids) - len(lat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alarms", type=int, default=100, help="smoke alarms per phase")
    ap.add_argument("--gap", type=float, default=0.15, help="seconds between two alarms")
    ap.add_argument("--rate", type=float, default=10_000, help="background telemetry msg/s in phase 2")
    ap.add_argument("--devices", type=int, default=5000, help="background devices")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    ctx = mp.get_context("spawn")
    root = Path(tempfile.mkdtemp(prefix="sc-bench-inc-", dir="/tmp"))
    os.chmod(root, 0o711)
    load_s = args.alarms * args.gap + 8
    n_bg = int(args.rate * load_s)
    print(f"building {n_bg} background messages for {args.devices} devices ...", flush=True)
    rows, enc = build_messages(args.devices, n_bg, seed=11)
    detectors = [f"sd-lat-{i:04d}" for i in range(2 * args.alarms)]
    rows += [
        {
            "device_id": d,
            "device_type": "smoke_detector",
            "community": "bench-latency",
            "grid_code": "110101001099001",
            "building": f"B{i}",  # one per building: no fire confirmation by correlation
        }
        for i, d in enumerate(detectors)
    ]
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    hook_port = free_port()
    q = ctx.Queue()
    ready = ctx.Event()
    receiver = ctx.Process(target=_receiver, args=(hook_port, secret, q, ready), daemon=True)
    receiver.start()
    ready.wait(10)

    mq = start_mosquitto(root / "mosquitto")
    influx = start_influxdb(root / "influxdb")
    gw = None
    try:
        db_url = f"sqlite:///{root / 'registry.db'}"
        from gateway.db import make_engine, migrate
        from gateway.registry import DeviceRecord, Registry

        migrate(db_url)
        registry = Registry(make_engine(db_url))
        registry.upsert_many([DeviceRecord(**r) for r in rows])
        registry.mark_in_service([str(r["device_id"]) for r in rows])
        metrics_port = free_port()
        ports = [metrics_port + i for i in range(args.workers)]
        env = dict(
            os.environ,
            SC_MQTT_PORT=str(mq.port),
            SC_MQTT_USERNAME=mq.gateway_account.username,
            SC_MQTT_PASSWORD=mq.gateway_account.password,
            SC_INFLUX_URL=influx.url,
            SC_INFLUX_DB="bench",
            SC_DATABASE_URL=db_url,
            SC_SPOOL_DIR=str(root / "spool"),
            SC_METRICS_PORT=str(metrics_port),
            SC_WORKERS=str(args.workers),
            SC_INSTANCE="bench",
            SC_LOG_LEVEL="WARNING",
            SC_RULES_STATE_PATH=str(root / "rules-state.json"),
            SC_INCIDENT_ENDPOINTS=json.dumps(
                [{"name": "bench", "url": f"http://127.0.0.1:{hook_port}/hook", "secret": secret}]
            ),
            SC_INCIDENT_MQTT="false",
        )
        log = open(root / "gateway.log", "wb")  # noqa: SIM115
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run"], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while _metric(_scrape(ports), "sc_broker_connected") < args.workers:
            if time.monotonic() > deadline or gw.poll() is not None:
                raise RuntimeError(f"gateway did not connect; see {root / 'gateway.log'}")
            time.sleep(0.2)
        time.sleep(2)  # the rules and delivery processes start after the workers connect

        print(f"phase 1: {args.alarms} smoke alarms, gateway otherwise idle ...", flush=True)
        idle, idle_missing = _phase(
            ctx, mq.port, mq.publisher_account, detectors[: args.alarms], args.gap, q, 30
        )

        print(
            f"phase 2: {args.alarms} smoke alarms while {args.rate:.0f} msg/s of telemetry flow ...",
            flush=True,
        )
        stored0 = _metric(_scrape(ports), "sc_messages_total", 'outcome="stored"')
        pub = RawPublisher(
            "127.0.0.1",
            mq.port,
            "bench-bg",
            window=20000,
            username=mq.publisher_account.username,
            password=mq.publisher_account.password,
        )
        result: dict[str, Any] = {}

        def background() -> None:
            t0 = time.perf_counter()
            res = pub.publish(enc, rate=args.rate, patch_ts=True)
            result["offered"] = res.send_rate
            result["acked"] = pub.wait_acks(len(enc))
            result["elapsed"] = time.perf_counter() - t0

        bg = threading.Thread(target=background, daemon=True)
        t_bg = time.perf_counter()
        bg.start()
        time.sleep(3)  # let the load settle
        loaded, loaded_missing = _phase(
            ctx, mq.port, mq.publisher_account, detectors[args.alarms :], args.gap, q, 60
        )
        t_alarms = time.perf_counter() - t_bg
        stored_during = _metric(_scrape(ports), "sc_messages_total", 'outcome="stored"') - stored0
        bg.join(300)
        pub.close()
    finally:
        if gw is not None:
            gw.send_signal(signal.SIGINT)
            try:
                gw.wait(60)
            except subprocess.TimeoutExpired:
                gw.kill()
        mq.stop()
        influx.stop()
        receiver.terminate()

    ratio = loaded["p99"] / idle["p99"] if idle["p99"] else float("nan")
    print(
        f"""
=== smoke alarm published → signed webhook received ({os.cpu_count()} cores, everything on one machine) ===
idle gateway               n={idle["n"]:.0f}  p50 {idle["p50"]:.0f} ms  p95 {idle["p95"]:.0f} ms  \
p99 {idle["p99"]:.0f} ms  max {idle["max"]:.0f} ms  missing {idle_missing}
under telemetry load       n={loaded["n"]:.0f}  p50 {loaded["p50"]:.0f} ms  p95 {loaded["p95"]:.0f} ms  \
p99 {loaded["p99"]:.0f} ms  max {loaded["max"]:.0f} ms  missing {loaded_missing}
telemetry during phase 2   offered {result.get("offered", 0):.0f} msg/s, \
stored {stored_during / t_alarms:.0f} msg/s while the alarms ran ({stored_during:.0f} in {t_alarms:.1f} s)
ratio p99 loaded / idle    {ratio:.2f}
""",
        flush=True,
    )
    if args.json:
        print(json.dumps({"idle": idle, "loaded": loaded, "missing": [idle_missing, loaded_missing]}))
    shutil.rmtree(root, ignore_errors=True)
    return 0 if idle_missing == 0 and loaded_missing == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
