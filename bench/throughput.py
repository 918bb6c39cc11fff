"""Benchmark: N simulated devices through the real broker into the real InfluxDB, vs a do-nothing subscriber.

Prints messages sent, landed (verified by an InfluxDB query), lost, sustained throughput, publish->stored
latency p50/p99, gateway CPU and memory; and, in the same run, the same load through a do-nothing paho
subscriber as the baseline, with the ratio. Not part of the test suite: run `./manage bench`.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mqttload import Encoded, RawPublisher
from gateway.broker_admin import Credentials
from simulators.load import Fleet, PayloadGenerator, Profile
from stack.services import InfluxService, free_port, start_influxdb, start_mosquitto

TYPES = ("streetlight", "parking_sensor", "manhole_cover", "access_control", "smoke_detector")
# Device time of the first message: fixed, so the messages are the same for a seed (the gateway phase
# overwrites each ts with its send time anyway).
START_MS = 1_000_000_000_000


def build_messages(
    n_devices: int, n_messages: int, seed: int, storm: bool = False
) -> tuple[list[dict[str, object]], Encoded]:
    """Device rows and telemetry messages (round robin over devices), from simulators.load.

    Values are a quiet day's (simulators.load.QUIET) unless `storm`, which draws every value over its
    field's whole plausible range: valid for the gateway, but an alarm storm for the rules.
    """
    rows: list[dict[str, object]] = []
    for i in range(n_devices):
        t = TYPES[i % len(TYPES)]
        rows.append(
            {
                "device_id": f"b-{t[:2]}-{i:06d}",
                "device_type": t,
                "community": f"bench-{i % 20:02d}",
                "grid_code": f"110101001{i % 20:03d}{i % 7:03d}",
            }
        )
    gen = PayloadGenerator(Fleet.from_rows(rows), Profile(seed=seed, storm=storm), start_ms=START_MS)
    return rows, gen.encoded(n_messages, protocol=4)


def _baseline_subscriber(port: int, account: Credentials, total: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    import paho.mqtt.client as mqtt

    state = {"n": 0, "first": 0.0, "last": 0.0}

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if state["n"] == 0:
            state["first"] = time.perf_counter()
        state["n"] += 1
        state["last"] = time.perf_counter()

    # paho's defaults (MQTT 3.1.1, its own network thread, automatic acks): the cheapest paho can be
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-baseline-{os.getpid()}")
    c.username_pw_set(account.username, account.password)  # the gateway's account: the same rights
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe("sc/v1/+/+/telemetry", qos=1)
    c.loop_start()
    q.put("ready")
    deadline = time.monotonic() + 600
    last_n, stalled_since = -1, time.monotonic()
    while state["n"] < total and time.monotonic() < deadline:
        time.sleep(0.1)
        if state["n"] != last_n:
            last_n, stalled_since = state["n"], time.monotonic()
        elif time.monotonic() - stalled_since > 15:
            break
    c.loop_stop()
    q.put((state["n"], state["first"], state["last"]))


def run_baseline(
    port: int, enc: Encoded, window: int, subscriber: Credentials, publisher: Credentials
) -> dict[str, float]:
    q: mp.Queue = mp.get_context("fork").Queue()  # type: ignore[type-arg]
    p = mp.get_context("fork").Process(target=_baseline_subscriber, args=(port, subscriber, len(enc), q))
    p.start()
    assert q.get(timeout=30) == "ready"
    time.sleep(0.5)
    pub = RawPublisher(
        "127.0.0.1",
        port,
        "bench-pub-baseline",
        window=window,
        username=publisher.username,
        password=publisher.password,
    )
    res = pub.publish(enc, patch_ts=False)
    pub.wait_acks(len(enc))
    pub.close()
    n, first, last = q.get(timeout=660)
    p.join()
    return {"received": n, "rate": n / max(last - first, 1e-9), "publish_rate": res.send_rate}


def _scrape(ports: list[int]) -> str:
    out = []
    for p in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=2) as r:
                out.append(r.read().decode())
        except OSError:
            pass
    return "\n".join(out)


def _metric(text: str, name: str, having: str = "") -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{")) and having in line
    )


def _quantile_from_buckets(text: str, name: str, q: float) -> float:
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    if not buckets:
        return float("nan")
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    target = q * total
    prev_b, prev_c = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= target:
            if b == float("inf"):
                return prev_b
            return prev_b + (b - prev_b) * ((target - prev_c) / max(c - prev_c, 1e-9))
        prev_b, prev_c = b, c
    return bounds[-1]


def _proc_tree(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += _proc_tree(int(k))
    return out


def _cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_gateway(
    root: Path,
    mq_port: int,
    mq_pid: int,
    influx: InfluxService,
    rows: list[dict[str, object]],
    enc: Encoded,
    workers: int,
    window: int,
    rate: float | None,
    gateway_account: Credentials,
    publisher: Credentials,
    rules: bool = True,
    tag: str = "bench",
) -> dict[str, float]:
    """One gateway phase; `tag` names its InfluxDB database, instance, spool and state."""
    db_url = f"sqlite:///{root / 'registry.db'}"
    from gateway.db import make_engine, migrate
    from gateway.registry import DeviceRecord, Registry

    migrate(db_url)
    registry = Registry(make_engine(db_url))
    registry.upsert_many([DeviceRecord(**r) for r in rows])
    # in service: every default rule applies to them (devices being commissioned skip most rules)
    registry.mark_in_service([str(r["device_id"]) for r in rows])
    metrics_port = free_port()
    ports = [metrics_port + i for i in range(workers)]
    env = dict(
        os.environ,
        SC_MQTT_PORT=str(mq_port),
        SC_MQTT_USERNAME=gateway_account.username,
        SC_MQTT_PASSWORD=gateway_account.password,
        SC_INFLUX_URL=influx.url,
        SC_INFLUX_DB=tag,
        SC_DATABASE_URL=db_url,
        SC_SPOOL_DIR=str(root / f"spool-{tag}"),
        SC_METRICS_PORT=str(metrics_port),
        SC_WORKERS=str(workers),
        SC_INSTANCE=tag,
        SC_MQTT_SHARE_GROUP=f"g-{tag}",
        SC_LOG_LEVEL="WARNING",
        SC_RULES_ENABLED="true" if rules else "false",
        SC_RULES_STATE_PATH=str(root / f"rules-state-{tag}.json"),
    )
    log = open(root / "gateway.log", "wb")  # noqa: SIM115
    argv = [sys.executable, "-m", "gateway.cli", "run"]
    if os.environ.get("BENCH_PYSPY"):  # profile the gateway: BENCH_PYSPY=out.txt (raw collapsed stacks)
        argv = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "-r",
            "250",
            "--format",
            "raw",
            "-o",
            os.environ["BENCH_PYSPY"],
            "--subprocesses",
            "--",
            *argv,
        ]
    gw = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while _metric(_scrape(ports), "sc_broker_connected") < workers:
            if time.monotonic() > deadline or gw.poll() is not None:
                raise RuntimeError(f"gateway did not connect; see {root / 'gateway.log'}")
            time.sleep(0.2)
        pids = _proc_tree(gw.pid)
        cpu0 = _cpu_s(pids)
        others0 = {
            "broker": _cpu_s([mq_pid]),
            "influxdb": _cpu_s(_proc_tree(influx.pid)),
            "publisher": _cpu_s([os.getpid()]),
        }
        pub = RawPublisher(
            "127.0.0.1",
            mq_port,
            "bench-pub-gateway",
            window=window,
            username=publisher.username,
            password=publisher.password,
        )
        t_first = time.perf_counter()
        res = pub.publish(enc, rate=rate, patch_ts=True)
        acked = pub.wait_acks(len(enc))
        pub.close()
        # wait until every acknowledged message is stored (or nothing moves for 20 s)
        last, since, peak_rss, t_done = -1.0, time.monotonic(), 0.0, time.perf_counter()
        while True:
            text = _scrape(ports)
            stored = _metric(text, "sc_messages_total", 'outcome="stored"')
            peak_rss = max(peak_rss, _rss_mb(_proc_tree(gw.pid)))
            if stored != last:
                last, since, t_done = stored, time.monotonic(), time.perf_counter()
            if stored >= acked or time.monotonic() - since > 20:
                break
            time.sleep(0.05)
        t_rules = t_done
        evaluated = 0.0
        if rules:
            # the rules process works after the acknowledgement: wait until it has evaluated it all
            rules_port = [metrics_port + workers]
            last, since = -1.0, time.monotonic()
            while True:
                evaluated = _metric(_scrape(rules_port), "sc_rules_evaluated_total")
                peak_rss = max(peak_rss, _rss_mb(_proc_tree(gw.pid)))
                if evaluated != last:
                    last, since, t_rules = evaluated, time.monotonic(), time.perf_counter()
                if evaluated >= stored or time.monotonic() - since > 20:
                    break
                time.sleep(0.05)
        cpu = _cpu_s(_proc_tree(gw.pid)) - cpu0
        others = {
            "broker": _cpu_s([mq_pid]) - others0["broker"],
            "influxdb": _cpu_s(_proc_tree(influx.pid)) - others0["influxdb"],
            "publisher": _cpu_s([os.getpid()]) - others0["publisher"],
        }
        elapsed = t_done - t_first
        text = _scrape(ports)
        p50 = _quantile_from_buckets(text, "sc_stored_latency_seconds", 0.5)
        p99 = _quantile_from_buckets(text, "sc_stored_latency_seconds", 0.99)
        rejected = _metric(text, "sc_rejects_total")
    finally:
        if os.environ.get("BENCH_PYSPY"):
            for pid in _proc_tree(gw.pid)[1:]:
                os.kill(pid, signal.SIGTERM)
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()
    # verify by query: one point per message
    landed = 0
    for t in TYPES:
        r = influx.query(f'SELECT count("seq") FROM "{t}"', db=tag)
        series = r["results"][0].get("series")
        if series:
            landed += int(series[0]["values"][0][1])
    return {
        "sent": res.sent,
        "acked": acked,
        "landed": landed,
        "lost": acked - landed,
        "rejected": rejected,
        "rate": landed / max(elapsed, 1e-9),
        "rules": float(rules),
        "evaluated": evaluated,
        "rules_rate": evaluated / max(t_rules - t_first, 1e-9),
        "publish_rate": res.send_rate,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "cpu_s": cpu,
        "cpu_pct": 100 * cpu / max(elapsed, 1e-9),
        "peak_rss_mb": peak_rss,
        **{f"{k}_cpu_pct": 100 * v / max(elapsed, 1e-9) for k, v in others.items()},
        "elapsed_s": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=5000)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2, help="gateway processes sharing the subscription")
    ap.add_argument("--rate", type=float, default=None, help="offered msg/s (default: as fast as possible)")
    ap.add_argument("--window", type=int, default=20000, help="publisher's unacknowledged window")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    ap.add_argument("--no-rules", action="store_true", help="run the gateway without its rules stage")
    ap.add_argument(
        "--compare-rules",
        action="store_true",
        help="after the run with rules, run the same load without them and print the drop",
    )
    ap.add_argument(
        "--storm",
        action="store_true",
        help="values over each field's whole range: an alarm storm for the rules",
    )
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="sc-bench-", dir="/tmp"))
    os.chmod(root, 0o711)
    print(f"building {args.messages} messages for {args.devices} devices ...", flush=True)
    if args.devices < 500:
        ap.error("--devices must be at least 500 (one publish chunk), so no device repeats within a chunk")
    rows, enc = build_messages(args.devices, args.messages, args.seed, storm=args.storm)
    mq = start_mosquitto(root / "mosquitto")
    influx = start_influxdb(root / "influxdb")
    try:
        # The broker refuses anonymous clients: the gateway (and the baseline subscriber) log in with the
        # gateway's account, the load publisher with an adaptor account (it publishes for every device).
        gateway_account, publisher = mq.gateway_account, mq.publisher_account
        print("baseline: do-nothing paho subscriber ...", flush=True)
        base = run_baseline(mq.port, enc, args.window, gateway_account, publisher)
        print(
            f"  received {base['received']} at {base['rate']:.0f} msg/s "
            f"(publisher offered {base['publish_rate']:.0f} msg/s)",
            flush=True,
        )
        rules_text = "without rules" if args.no_rules else "with the default rules"
        print(f"gateway: {args.workers} worker(s), {rules_text} ...", flush=True)
        phase = functools.partial(
            run_gateway,
            root,
            mq.port,
            mq.pid,
            influx,
            rows,
            enc,
            args.workers,
            args.window,
            args.rate,
            gateway_account,
            publisher,
        )
        gw = phase(rules=not args.no_rules)
        plain = None
        if args.compare_rules and not args.no_rules:
            print(f"gateway: {args.workers} worker(s), without rules (same load, same run) ...", flush=True)
            plain = phase(rules=False, tag="bench_norules")
    finally:
        mq.stop()
        influx.stop()
    ratio = gw["rate"] / base["rate"]
    rules_line = (
        f"rules evaluated            {gw['evaluated']:.0f} at {gw['rules_rate']:.0f} msg/s "
        "(publish -> evaluated by the rules process)\n"
        if gw["rules"]
        else "rules                      off (--no-rules)\n"
    )
    ratio_text = f"{ratio:.2f}" if not args.rate else f"n/a (offered rate capped at {args.rate:.0f} msg/s)"
    print(
        f"""
=== results ({os.cpu_count()} cores; broker, database, publisher and gateway on one machine; QoS 1) ===
messages sent              {gw["sent"]}
acknowledged by the broker {gw["acked"]}
landed in InfluxDB (query) {gw["landed"]}
lost                       {gw["lost"]}
rejected                   {int(gw["rejected"])}
publisher offered          {gw["publish_rate"]:.0f} msg/s
gateway sustained          {gw["rate"]:.0f} msg/s  (validated, stored, acknowledged)
{rules_line}do-nothing subscriber      {base["rate"]:.0f} msg/s
ratio gateway / baseline   {ratio_text}
publish -> stored latency  p50 {gw["p50_ms"]:.0f} ms   p99 {gw["p99_ms"]:.0f} ms
gateway CPU                {gw["cpu_pct"]:.0f} % of one core ({gw["cpu_s"]:.1f} s in {gw["elapsed_s"]:.1f} s)
gateway peak memory        {gw["peak_rss_mb"]:.0f} MB (all processes)
others' CPU (same period)  broker {gw["broker_cpu_pct"]:.0f} %, InfluxDB {gw["influxdb_cpu_pct"]:.0f} %, \
publisher {gw["publisher_cpu_pct"]:.0f} %
""",
        flush=True,
    )
    if plain is not None:
        drop = 100 * (1 - gw["rate"] / plain["rate"])
        print(
            f"with vs without rules      {gw['rate']:.0f} vs {plain['rate']:.0f} msg/s stored "
            f"({drop:.0f} % drop; rules evaluated {gw['rules_rate']:.0f} msg/s); "
            f"without rules: landed {plain['landed']}, lost {plain['lost']}",
            flush=True,
        )
    if args.json:
        print(json.dumps({"gateway": gw, "baseline": base, "ratio": ratio}))
    shutil.rmtree(root, ignore_errors=True)
    return 0 if gw["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
