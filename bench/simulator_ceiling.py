"""Benchmark: the load simulator's own ceiling, so that it is never the bottleneck of a benchmark.

Two phases, each bounded by --messages:
1. generation + encoding only (values drawn, payloads formatted, PUBLISH packets framed; no network),
   in this one thread;
2. publishing at QoS 1 to a real Mosquitto (the shipped config, started in a temp dir) with a do-nothing
   subscriber (a raw-socket QoS 1 client in its own process that acknowledges in bulk), over 1, 2 and 4
   connections, as threads and as processes.
Each figure is printed with its ratio to the gateway's best measured throughput (--gateway-rate, README
"Figures"). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.broker_admin import Credentials
from simulators.load import (
    Fleet,
    LoadConfig,
    Parallel,
    PayloadGenerator,
    Profile,
    connect_packet,
    generation_rate,
    run_load,
)
from stack.services import start_mosquitto

GATEWAY_RATE = 20_600.0  # msg/s, 2 workers, rules off (README "Figures")
FILTERS = (b"sc/v1/+/+/telemetry", b"sc/v1/+/+/event")


def _subscribe_packet(mid: int) -> bytes:
    body = struct.pack("!H", mid) + b"".join(struct.pack("!H", len(f)) + f + b"\x01" for f in FILTERS)
    return bytes([0x82, len(body)]) + body


def _subscriber(port: int, account: Credentials, counter: Any, last: Any, ready: Any, stop: Any) -> None:
    """Receive at QoS 1 and acknowledge everything, one PUBACK write per read; count what came."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        connect_packet(f"{account.username}-ceiling-{os.getpid()}", 60, account.username, account.password)
    )
    if sock.recv(4)[3] != 0:
        raise SystemExit("subscriber: CONNACK refused")
    sock.sendall(_subscribe_packet(1))
    suback = sock.recv(5 + len(FILTERS))
    if suback[0] != 0x90 or any(b >= 0x80 for b in suback[4:]):
        raise SystemExit(f"subscriber: SUBACK refused {suback!r}")
    sock.settimeout(0.2)
    ready.set()
    pending = b""
    n = 0
    while not stop.is_set():
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        buf = pending + data
        i, end, size = 0, 0, len(buf)
        acks = []
        while i + 2 <= size:
            length, j, mult = 0, i + 1, 1
            while j < size and buf[j] & 0x80:
                length += (buf[j] & 0x7F) * mult
                mult *= 128
                j += 1
            if j >= size:
                break
            length += buf[j] * mult
            end = j + 1 + length
            if end > size:
                break
            if buf[i] & 0xF0 == 0x30:
                n += 1
                if buf[i] & 0x06:  # QoS 1: acknowledge its packet id
                    tl = (buf[j + 1] << 8) | buf[j + 2]
                    acks.append(b"\x40\x02" + buf[j + 3 + tl : j + 5 + tl])
            i = end
        pending = buf[i:]
        if acks:
            sock.sendall(b"".join(acks))
        counter.value = n
        last.value = time.monotonic()
    sock.close()


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", type=int, default=20_000)
    ap.add_argument("--messages", type=int, default=200_000, help="per phase")
    ap.add_argument("--connections", default="1,2,4", help="connection counts to measure")
    ap.add_argument("--parallel", default="threads,processes", help="threads, processes or both")
    ap.add_argument("--window", type=int, default=5000)
    ap.add_argument("--events", type=float, default=0.05, help="share of event messages")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--gateway-rate", type=float, default=GATEWAY_RATE, help="gateway msg/s to compare with")
    args = ap.parse_args(argv)
    conns = [int(c) for c in args.connections.split(",")]
    modes: list[Parallel] = []
    for m in (m.strip() for m in args.parallel.split(",")):
        if m not in ("threads", "processes"):
            ap.error(f"--parallel: {m!r} is neither threads nor processes")
        modes.append("threads" if m == "threads" else "processes")
    gw = args.gateway_rate

    fleet = Fleet.generate(args.devices, communities=20)
    profile = Profile(seed=args.seed, event_share=args.events)
    print(
        f"=== simulator ceiling ({os.cpu_count()} cores; {args.devices:,} devices, "
        f"{args.messages:,} messages per phase, {args.events:.0%} events; "
        f"gateway figure {gw:,.0f} msg/s) ===",
        flush=True,
    )
    gen = PayloadGenerator(fleet, profile, start_ms=int(time.time() * 1000))
    cpu0 = time.process_time()
    wall_rate, size = generation_rate(gen, args.messages)
    rate = args.messages / max(time.process_time() - cpu0, 1e-9)  # per core of CPU time: robust to noise
    print(
        f"1. generation + encoding, one thread: {rate:,.0f} msg/s per core of CPU time "
        f"({wall_rate:,.0f} msg/s of wall time; {size / args.messages:.0f} B/packet)   "
        f"x{rate / gw:.1f} the gateway",
        flush=True,
    )

    root = Path(tempfile.mkdtemp(prefix="sc-ceiling-", dir="/tmp"))
    os.chmod(root, 0o711)
    mq = start_mosquitto(root / "mosquitto")
    ctx = mp.get_context("fork")
    counter, last = ctx.Value("q", 0, lock=False), ctx.Value("d", 0.0, lock=False)
    ready, stop = ctx.Event(), ctx.Event()
    sub = None
    rows = []
    try:
        publisher = mq.publisher_account
        sub = ctx.Process(
            target=_subscriber, args=(mq.port, mq.gateway_account, counter, last, ready, stop), daemon=True
        )
        sub.start()
        sub_pid = sub.pid or 0
        if not ready.wait(15):
            raise SystemExit("the subscriber did not come up")
        print("2. publishing, QoS 1, to Mosquitto with a do-nothing QoS 1 subscriber:", flush=True)
        for mode in modes:
            for n in conns:
                if mode == "processes" and n == 1:
                    continue  # one connection: the same as a thread
                cfg = LoadConfig(
                    fleet=fleet,
                    profile=profile,
                    port=mq.port,
                    username=publisher.username,
                    password=publisher.password,
                    connections=n,
                    window=args.window,
                    messages=args.messages,
                    parallel=mode,
                    progress_s=0,
                )
                before = counter.value
                cpu_broker, cpu_own, cpu_sub = _cpu_s(mq.pid), _own_cpu_s(), _cpu_s(sub_pid)
                report = run_load(cfg, progress=None)
                deadline, seen, since = time.monotonic() + 60, -1, time.monotonic()
                while counter.value - before < report.acked and time.monotonic() < deadline:
                    if counter.value != seen:
                        seen, since = counter.value, time.monotonic()
                    elif time.monotonic() - since > 10:
                        break
                    time.sleep(0.02)
                delivered = counter.value - before
                span = max(last.value - report.t0, 1e-9)
                n_msgs = max(report.sent, 1)
                row = {
                    "mode": mode,
                    "connections": n,
                    "ack_rate": report.ack_rate,
                    "delivered_rate": delivered / span,
                    "ok": report.ok and delivered == report.acked,
                    # CPU time per message: what each party costs, whatever else the machine is doing
                    "publisher_us": max(1e6 * (_own_cpu_s() - cpu_own) / n_msgs, 1e-3),
                    "broker_us": 1e6 * (_cpu_s(mq.pid) - cpu_broker) / n_msgs,
                    "subscriber_us": 1e6 * (_cpu_s(sub_pid) - cpu_sub) / n_msgs,
                }
                rows.append(row)
                cap = 1e6 / max(row["publisher_us"], 1e-9)
                flag = "" if row["ok"] else f"\n   NOT ALL ACKNOWLEDGED AND DELIVERED:\n{report.summary()}"
                print(
                    f"   {n} connection(s), {mode:<9}  acknowledged {row['ack_rate']:>7,.0f} msg/s, "
                    f"delivered {row['delivered_rate']:>7,.0f} msg/s (x{row['delivered_rate'] / gw:.1f})   "
                    f"CPU per message: publisher {row['publisher_us']:.1f} us "
                    f"(= {cap:,.0f} msg/s per core, x{cap / gw:.1f}), "
                    f"broker {row['broker_us']:.1f} us, subscriber {row['subscriber_us']:.1f} us{flag}",
                    flush=True,
                )
    finally:
        stop.set()
        if sub is not None:
            sub.join(5)
            if sub.is_alive():
                sub.kill()
        mq.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(root)
    if rows:
        best = max(rows, key=lambda r: r["delivered_rate"])
        cheapest = min(rows, key=lambda r: r["publisher_us"])
        print(
            f"\nbest through the broker: {best['connections']} connection(s) as {best['mode']}, "
            f"{best['delivered_rate']:,.0f} msg/s = x{best['delivered_rate'] / gw:.1f} the gateway's "
            f"{gw:,.0f} msg/s\n"
            f"the publisher's own ceiling: {1e6 / cheapest['publisher_us']:,.0f} msg/s per core "
            f"({cheapest['connections']} connection(s) as {cheapest['mode']}) = "
            f"x{1e6 / cheapest['publisher_us'] / gw:.1f} the gateway; generation alone x{rate / gw:.1f}",
            flush=True,
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
