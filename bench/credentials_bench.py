"""Benchmark: issuing device credentials through the device accounts plugin, against the dynsec route.

Starts its own broker (stack.services.start_mosquitto, in a temp dir) and prints, in the same run:

- the restart time of the broker with no devices (the baseline for the replay below);
- N devices (default 100,000) issued through BrokerAdmin.create_devices: total time and devices/s,
  including the passwords, their hashes and the existence check;
- the old route for a few devices (default 1,000): createRole + createClient per device in the
  dynamic security plugin, 100 devices per message, as BrokerAdmin did before: ms per device, and the
  ratio to the plugin's ms per device (the dynsec cost grows with the devices it holds, so at 1,000 it is
  at its cheapest);
- the restart time with the N devices in the journal (replayed at start-up), and that devices log in
  after it (and a wrong password does not);
- the journal's size and the broker's resident memory;
- meanwhile, how long a device's QoS 1 publish waits for its PUBACK (the broker is single-threaded:
  while it handles a command message, no message moves), for both routes.

Not part of the test suite: `.venv/bin/python bench/credentials_bench.py [--devices N] [--baseline M]`.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices import DEVICE_TYPES
from gateway.broker_admin import BrokerAdmin, Credentials, new_password
from stack.services import MosquittoService, start_mosquitto


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _connack(broker: MosquittoService, account: Credentials, client_id: str) -> str:
    """The broker's answer to a CONNECT with these credentials ("Success", "Not authorized", ...)."""
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.username_pw_set(account.username, account.password)
    answered = threading.Event()
    reason: list[str] = []

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        reason.append(str(rc))
        answered.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not answered.wait(10):
            return "no answer"
        return reason[0]
    finally:
        client.disconnect()
        client.loop_stop()


class _Probe:
    """Publishes a QoS 1 reading every 10 ms (as the adaptor account) and records each PUBACK's wait."""

    def __init__(self, broker: MosquittoService) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id="bench-probe",
            protocol=mqtt.MQTTv5,
        )
        account = broker.publisher_account
        self.client.username_pw_set(account.username, account.password)
        # Every publish goes out at once: what is measured is the broker's wait, not paho's queue.
        self.client.max_inflight_messages_set(60000)
        # Message id -> when sent / when acknowledged (ids do not wrap within a run: 100 per second).
        self.sent: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            self.acked[mid] = now

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            # Not under our lock: paho calls on_publish holding a lock that publish() needs.
            sent = time.perf_counter()
            mid = self.client.publish("sc/v1/streetlight/bench-probe/telemetry", b"{}", qos=1).mid
            with self._lock:
                self.sent[mid] = sent

    def __enter__(self) -> _Probe:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(0.5)
        self.client.disconnect()
        self.client.loop_stop()

    def summary(self) -> str:
        with self._lock:
            waits = sorted(self.acked[m] - t for m, t in self.sent.items() if m in self.acked)
            unanswered = len(self.sent) - len(waits)
        if not waits:
            return "no samples"
        p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]
        median = waits[len(waits) // 2]
        text = f"median {1000 * median:.1f} ms, p99 {1000 * p99:.1f} ms, max {1000 * waits[-1]:.1f} ms"
        return text + (f", {unanswered} unanswered" if unanswered else "")


def _timed_restart(broker: MosquittoService) -> tuple[float, float]:
    """(stop s, start s): start is from launching the process until its port accepts connections."""
    t0 = time.perf_counter()
    broker.stop()
    t1 = time.perf_counter()
    broker.start()
    return t1 - t0, time.perf_counter() - t1


def _dynsec_route(admin: BrokerAdmin, devices: list[tuple[str, str]], per_message: int = 100) -> float:
    """Issue devices the way BrokerAdmin did before the plugin (a role and a client per device, in the
    dynamic security plugin); the elapsed seconds."""
    t0 = time.perf_counter()
    for start in range(0, len(devices), per_message):
        commands: list[dict[str, Any]] = []
        for device_id, device_type in devices[start : start + per_message]:
            base = f"sc/v1/{device_type}/{device_id}"
            acls = [
                *(
                    {"acltype": "publishClientSend", "topic": f"{base}/{k}", "priority": 0, "allow": True}
                    for k in ("telemetry", "event", "status")
                ),
                {"acltype": "subscribeLiteral", "topic": f"{base}/cmd", "priority": 0, "allow": True},
                {"acltype": "publishClientReceive", "topic": f"{base}/cmd", "priority": 0, "allow": True},
            ]
            role = f"sc-device-{device_id}"
            commands.append({"command": "createRole", "rolename": role, "acls": acls})
            commands.append(
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": new_password(),
                    "clientid": device_id,
                    "roles": [{"rolename": role}],
                }
            )
        errors = [r["error"] for r in admin.execute(commands) if "error" in r]
        if errors:
            raise RuntimeError(f"dynsec refused: {errors[:3]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000, help="devices issued through the plugin")
    ap.add_argument("--baseline", type=int, default=1000, help="devices issued the old (dynsec) way")
    ap.add_argument("--batch", type=int, default=1000, help="devices per createDevices message")
    ap.add_argument("--keep", action="store_true", help="keep the broker's data dir")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="sc-credbench-", dir="/tmp"))
    root.chmod(0o711)  # the broker runs as its own user when we are root
    broker = start_mosquitto(root / "mosquitto")
    try:
        broker.gateway_account  # noqa: B018  (service accounts exist, as in a real stack)
        empty_stop, empty_start = _timed_restart(broker)
        print(f"restart, no devices: stop {empty_stop:.2f} s, start {empty_start:.2f} s", flush=True)

        devices = [(f"bench-{i:06d}", DEVICE_TYPES[i % len(DEVICE_TYPES)]) for i in range(args.devices)]
        print(f"plugin: issuing {args.devices} devices, {args.batch} per message ...", flush=True)
        with broker.admin(timeout_s=60, batch_size=args.batch) as admin:
            with _Probe(broker) as plugin_probe:
                t0 = time.perf_counter()
                passwords = admin.create_devices(devices)
                plugin_s = time.perf_counter() - t0
            assert len(passwords) == args.devices
            plugin_ms = 1000 * plugin_s / args.devices
            print(
                f"  {args.devices} devices in {plugin_s:.2f} s: {args.devices / plugin_s:,.0f} devices/s, "
                f"{plugin_ms:.3f} ms per device",
                flush=True,
            )

            legacy = [(f"legacy-{i:06d}", DEVICE_TYPES[i % len(DEVICE_TYPES)]) for i in range(args.baseline)]
            print(
                f"dynsec route (baseline): issuing {args.baseline} devices, 100 per message ...", flush=True
            )
            with _Probe(broker) as dynsec_probe:
                dynsec_s = _dynsec_route(admin, legacy)
            dynsec_ms = 1000 * dynsec_s / args.baseline
            print(f"  {args.baseline} devices in {dynsec_s:.2f} s: {dynsec_ms:.2f} ms per device", flush=True)

        journal_mb = broker.devices_path.stat().st_size / 1e6
        rss_before = _rss_mb(broker.pid)
        full_stop, full_start = _timed_restart(broker)
        sample = random.Random(7).sample(list(passwords), 3)
        t0 = time.perf_counter()
        answers = [_connack(broker, Credentials(d, passwords[d]), d) for d in sample]
        connect_ms = 1000 * (time.perf_counter() - t0) / len(sample)
        wrong = _connack(broker, Credentials(sample[0], passwords[sample[1]]), sample[0])
        rss_after = _rss_mb(broker.pid)

        print()
        print(f"{'':46} {'figure':>14}")
        print(f"{'plugin: devices issued':46} {args.devices:>14,}")
        print(f"{'plugin: total time (s)':46} {plugin_s:>14.2f}")
        print(f"{'plugin: devices/s':46} {args.devices / plugin_s:>14,.0f}")
        print(f"{'plugin: ms per device':46} {plugin_ms:>14.3f}")
        print(f"{f'dynsec route: ms per device (first {args.baseline})':46} {dynsec_ms:>14.2f}")
        print(f"{'ratio dynsec / plugin per device':46} {dynsec_ms / plugin_ms:>14.0f}x")
        print(f"{'dynsec route for all N, at least (h)':46} {dynsec_ms * args.devices / 3.6e6:>14.2f}")
        print(f"{'journal size (MB)':46} {journal_mb:>14.1f}")
        print(f"{'a PUBACK waits, while the plugin issues':46} {plugin_probe.summary()}")
        print(f"{'a PUBACK waits, while dynsec issues':46} {dynsec_probe.summary()}")
        print(f"{'broker RSS with N devices (MB)':46} {rss_before:>14.1f}")
        print(f"{'restart, no devices: start (s)':46} {empty_start:>14.2f}")
        print(f"{'restart, N devices: stop (s)':46} {full_stop:>14.2f}")
        print(f"{'restart, N devices: start incl. replay (s)':46} {full_start:>14.2f}")
        print(f"{'after restart: CONNECTs of 3 devices':46} {', '.join(answers):>14}")
        print(f"{'after restart: ms per CONNECT':46} {connect_ms:>14.1f}")
        print(f"{'after restart: wrong password':46} {wrong:>14}")
        print(f"{'broker RSS after restart (MB)':46} {rss_after:>14.1f}")
        ok = all(a == "Success" for a in answers) and wrong == "Not authorized"
        return 0 if ok else 1
    finally:
        broker.stop()
        if args.keep:
            print(f"data dir kept: {broker.data_dir}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
