"""Load mode: tens of thousands of simulated devices at a chosen rate, over a few MQTT connections.

    python -m simulators.load --port 1883 --username svc.publisher --password ... \\
        --devices 50000 --communities 20 --rate 20000 --duration 60 --connections 4

Where ``simulators.run`` plays believable behaviour device by device, this mode is for volume: values are
drawn with numpy from the thing models (every declared telemetry field inside its plausible range, a
quiet day by default, ``--storm`` for the whole range), a share of messages can be events (``--events``,
the event drawn by weight), and the messages are pre-encoded MQTT PUBLISH packets sent over raw sockets
by adaptor connections (QoS 1, a window of unacknowledged messages; client ids ``<username>.<i>``).

The stream is a pure function of the devices, ``--seed``, the profile and the device clock (``--start-ms``
and the report interval): message ``i`` goes to device ``i % D`` (round robin, so that any stretch of the
stream is mixed), carries that device's ``seq = i // D`` and device time ``ts`` (13-digit epoch ms), and
its values come from a random generator seeded with ``(seed, i // BLOCK)``. The same arguments give the
same bytes whatever the number of connections (device ``k`` always goes through connection ``k % N``);
give ``--start-ms`` to replay a run byte for byte. Device time: each device reports once per interval
(``--interval``; default the fleet over ``--rate``, so that device time keeps up with the clock, else 1 s)
and starts now, or when the run is unpaced and its count known, early enough to end about now. An unpaced
run bounded only by ``--duration`` may get ahead of the clock (the gateway distrusts device times more
than 5 minutes ahead): pace it, bound it with ``--messages``, or use ``--stamp-at-send``, which overwrites
each ``ts`` with the time it is sent (for latency figures).

Publishing uses MQTT 5 so that the broker says when it refuses a message (PUBACK reason code >= 0x80,
counted by reason). Exit code 0 when every message was acknowledged and none refused, 1 otherwise, 2 when
nothing could start (bad arguments, connection refused).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from devices import DEVICE_ID_RE, DEVICE_TYPES, THING_MODELS
from devices.model import Field
from simulators.community import ID_PREFIXES, read_devices_csv, write_devices_csv

# ---- MQTT on a raw socket ----------------------------------------------------------------------------

#: fixed-width placeholder of the `ts` digits in payloads built by `encode`
TS_PLACEHOLDER = b"1000000000000"
_DIGIT_POS = np.arange(13)

#: MQTT 5 reason codes a broker may answer a PUBLISH or CONNECT with (the ones worth a name here)
REASON_NAMES: dict[int, str] = {
    0x10: "no matching subscribers",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x8E: "session taken over",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x93: "receive maximum exceeded",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9F: "connection rate exceeded",
}


def reason_name(code: int) -> str:
    return f"0x{code:02x} {REASON_NAMES.get(code, 'unknown reason')}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def connect_packet(
    client_id: str,
    keepalive: int = 60,
    username: str | None = None,
    password: str | None = None,
    protocol: int = 4,
) -> bytes:
    """CONNECT with a clean session; `protocol` 4 is MQTT 3.1.1, 5 is MQTT 5 (no properties)."""
    if protocol not in (4, 5):
        raise ValueError("protocol must be 4 (MQTT 3.1.1) or 5 (MQTT 5)")
    flags = 0x02  # clean session / clean start
    payload = _str(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += _str(username.encode())
        if password is not None:
            flags |= 0x40
            payload += _str(password.encode())
    var = _str(b"MQTT") + bytes([protocol, flags]) + struct.pack("!H", keepalive)
    if protocol == 5:
        var += b"\x00"  # no properties
    body = var + payload
    return bytes([0x10]) + _varint(len(body)) + body


# MQTT 5 property ids -> how their value is encoded (only to step over the ones we do not read)
_PROP_WIDTH = {0x01: 1, 0x02: 4, 0x11: 4, 0x13: 2, 0x17: 1, 0x18: 4, 0x19: 1, 0x21: 2, 0x22: 2, 0x23: 2}
_PROP_WIDTH |= {0x24: 1, 0x25: 1, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}
_PROP_STRINGS = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}  # string or binary: 2-byte length


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    """(value, index after it) of the variable byte integer at data[i]; IndexError if incomplete."""
    value, mult = 0, 1
    for k in range(4):
        b = data[i + k]
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, i + k + 1
        mult *= 128
    raise ValueError("malformed variable byte integer")


def parse_properties(data: bytes) -> dict[int, int | bytes]:
    """MQTT 5 properties (without their length prefix): id -> int or bytes; user properties are skipped."""
    props: dict[int, int | bytes] = {}
    i = 0
    while i < len(data):
        pid = data[i]
        i += 1
        if pid in _PROP_WIDTH:
            w = _PROP_WIDTH[pid]
            props[pid] = int.from_bytes(data[i : i + w], "big")
            i += w
        elif pid in _PROP_STRINGS:
            n = int.from_bytes(data[i : i + 2], "big")
            props[pid] = bytes(data[i + 2 : i + 2 + n])
            i += 2 + n
        elif pid == 0x26:  # user property: two strings
            for _ in range(2):
                i += 2 + int.from_bytes(data[i : i + 2], "big")
        elif pid == 0x0B:  # subscription identifier: a variable byte integer
            props[pid], i = _read_varint(data, i)
        else:
            raise ValueError(f"unknown MQTT 5 property 0x{pid:02x}")
    return props


@dataclass
class AckScan:
    """What the complete packets at the start of a stream of MQTT 5 packets from a broker say."""

    consumed: int  # bytes of complete packets (the rest waits for more data)
    acked: int = 0  # PUBACKs, refusals included
    unrouted: int = 0  # PUBACKs saying "no matching subscribers"
    refused: Counter[int] = field(default_factory=Counter)  # PUBACKs >= 0x80 by reason code
    disconnect: int | None = None  # a DISCONNECT's reason code (the packets after it are not read)


def scan_acks_v5(data: bytes) -> AckScan:
    """Count the PUBACKs (and a DISCONNECT) at the start of `data`, a broker's MQTT 5 packets."""
    # Fast paths, all in C: a run of success PUBACKs (40 02 id id) or of PUBACKs with a reason code
    # (40 03 id id rc). By induction every packet of such a run is where the stride says.
    for size in (4, 5):
        k = len(data) // size
        if not k:
            continue
        run = data[: k * size]
        if run[0::size] == b"\x40" * k and run[1::size] == bytes([size - 2]) * k:
            codes = run[4::5] if size == 5 else b""
            if not codes or max(codes) < 0x80:
                return AckScan(k * size, k, codes.count(0x10))
    scan = AckScan(0)
    i, n = 0, len(data)
    while i + 2 <= n:
        try:
            length, start = _read_varint(data, i + 1)
        except IndexError:
            break
        end = start + length
        if end > n:
            break
        kind = data[i] & 0xF0
        if kind == 0x40:
            scan.acked += 1
            code = data[start + 2] if length >= 3 else 0
            if code >= 0x80:
                scan.refused[code] += 1
            elif code == 0x10:
                scan.unrouted += 1
        elif kind == 0xE0:
            scan.disconnect = data[start] if length >= 1 else 0
            i = end
            break
        i = end
    scan.consumed = i
    return scan


@dataclass
class Encoded:
    """Messages as one buffer of PUBLISH packets with the byte offset of each packet and of its ts digits."""

    buf: bytearray
    starts: np.ndarray  # packet start offsets, plus the end
    ts_offsets: np.ndarray  # offset of the 13 ts digits in buf, -1 where there is none
    topics: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.starts) - 1


def encode(messages: list[tuple[str, dict[str, object]]], protocol: int = 4) -> Encoded:
    """Encode (topic, payload dict) pairs; a payload with "ts" gets a patchable fixed-width ts."""
    buf = bytearray()
    starts = np.zeros(len(messages) + 1, dtype=np.int64)
    ts_off = np.full(len(messages), -1, dtype=np.int64)
    props = b"\x00" if protocol == 5 else b""
    for i, (topic, payload) in enumerate(messages):
        starts[i] = len(buf)
        has_ts = "ts" in payload
        doc = {**payload, "ts": 1000000000000} if has_ts else payload
        body = json.dumps(doc, separators=(",", ":")).encode()
        mid = (i % 65535) + 1
        var = _str(topic.encode()) + struct.pack("!H", mid) + props
        pkt_body = var + body
        head = bytes([0x32]) + _varint(len(pkt_body))
        if has_ts:
            ts_off[i] = len(buf) + len(head) + len(var) + body.index(TS_PLACEHOLDER)
        buf += head + pkt_body
    starts[-1] = len(buf)
    return Encoded(buf, starts, ts_off)


def stamp(arr: np.ndarray, offsets: np.ndarray, ts_ms: int) -> None:
    """Write the 13 digits of `ts_ms` at each of `offsets` in `arr` (a uint8 view of a packet buffer)."""
    offs = offsets[offsets >= 0]
    if len(offs):
        digits = np.frombuffer(str(ts_ms).encode(), dtype=np.uint8)
        arr[offs[:, None] + _DIGIT_POS] = digits


@dataclass
class LoadResult:
    sent: int
    acked: int
    first_send: float
    last_send: float
    last_ack: float

    @property
    def send_rate(self) -> float:
        return self.sent / max(self.last_send - self.first_send, 1e-9)


_ACK_BATCH_BYTES = 4096
_ACK_BATCH_S = 0.005


class RawPublisher:
    """One MQTT connection sending pre-encoded QoS 1 packets, at most `window` unacknowledged.

    `protocol` 4 (MQTT 3.1.1, the default) or 5. With 5 the broker's PUBACKs carry a reason code:
    `refused` counts those >= 0x80 by code, `unrouted` those saying "no matching subscribers".
    `acked` counts every PUBACK, refusals included. A reader thread reads the PUBACKs; when the broker
    closes the connection, `error` says why and senders waiting for room in the window get a
    ConnectionError instead of waiting for ever.

    Mosquitto 2.0 announces its max_inflight_messages (100 as shipped) as the MQTT 5 Receive Maximum
    (`receive_maximum`) but holds publishers to it only for QoS 2: it answers a QoS 1 PUBLISH as soon as
    it has read it, and keeping thousands in flight is what lets one connection go fast.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        window: int = 20000,
        username: str | None = None,
        password: str | None = None,
        protocol: int = 4,
        timeout: float = 10.0,
    ) -> None:
        if window >= 65535:
            raise ValueError("window must be below 65535 (packet ids would be reused while in flight)")
        if window < 1:
            raise ValueError("window must be >= 1")
        self.protocol = protocol
        self.client_id = client_id
        self.sock = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(
                connect_packet(client_id, username=username, password=password, protocol=protocol)
            )
            self.receive_maximum: int | None = None
            self._connack()
            self.sock.settimeout(None)
        except BaseException:
            self.sock.close()
            raise
        self.window = window
        self.sent = 0
        self.acked = 0
        self.refused: Counter[int] = Counter()
        self.unrouted = 0
        self.last_ack = 0.0
        self.error: str | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._dead = False
        self._reader = threading.Thread(target=self._read_acks, daemon=True, name=f"acks-{client_id}")
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def _connack(self) -> None:
        head = self._recv_exact(2)
        if head[0] != 0x20:
            raise ConnectionError(f"expected CONNACK, got packet type 0x{head[0]:02x}")
        length, mult, b = head[1] & 0x7F, 128, head[1]
        while b & 0x80:
            b = self._recv_exact(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
        body = self._recv_exact(length)
        if self.protocol == 4:
            if body[1] != 0:
                raise ConnectionError(f"CONNACK refused: return code {body[1]}")
            return
        if body[1] >= 0x80:
            raise ConnectionError(f"CONNACK refused: {reason_name(body[1])}")
        if len(body) > 2:
            n, i = _read_varint(body, 2)
            props = parse_properties(body[i : i + n])
            rm = props.get(0x21)
            self.receive_maximum = rm if isinstance(rm, int) else 65535
        else:
            self.receive_maximum = 65535

    def _read_acks(self) -> None:
        pending = b""
        error = "broker closed the connection"
        try:
            while not self._closed:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                pending += data
                if len(data) < _ACK_BATCH_BYTES and self.sent - self.acked > _ACK_BATCH_BYTES // 4:
                    # The broker writes each PUBACK on its own: reading them as they trickle in costs a
                    # wake-up (and the GIL) per few acks. With many in flight, let them gather a moment.
                    time.sleep(_ACK_BATCH_S)
                if self.protocol == 4:
                    # PUBACK is always 4 bytes in 3.1.1: 0x40 0x02 mid mid
                    n = len(pending) // 4
                    if n:
                        pending = pending[n * 4 :]
                        self._count(n, 0, None)
                    continue
                scan = scan_acks_v5(pending)
                pending = pending[scan.consumed :]
                if scan.acked:
                    self._count(scan.acked, scan.unrouted, scan.refused)
                disconnect = scan.disconnect
                if disconnect is not None:
                    error = f"broker disconnected: {reason_name(disconnect)}"
                    break
        except OSError as exc:
            error = f"connection error: {exc}"
        with self._cond:
            self._dead = True
            if not self._closed:
                self.error = error
            self._cond.notify_all()

    def _count(self, n: int, unrouted: int, refused: Counter[int] | None) -> None:
        with self._cond:
            self.acked += n
            self.unrouted += unrouted
            if refused:
                self.refused.update(refused)
            self.last_ack = time.monotonic()
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    def send(
        self, data: bytes | bytearray | memoryview, count: int, give_up: Callable[[], bool] | None = None
    ) -> None:
        """Send `count` packets (in `data`) once the window has room for them; while waiting for room,
        `give_up()` returning true raises TimeoutError (a broker that stopped acknowledging)."""
        with self._cond:
            while self.sent + count - self.acked > self.window:
                if self._dead:
                    raise ConnectionError(self.error or "connection closed")
                if give_up is not None and give_up():
                    raise TimeoutError(f"{self.in_flight} messages unacknowledged, no room to send more")
                self._cond.wait(0.5)
            if self._dead:
                raise ConnectionError(self.error or "connection closed")
        self.sock.sendall(data)
        self.sent += count

    def publish(
        self, enc: Encoded, *, rate: float | None = None, chunk: int = 500, patch_ts: bool = True
    ) -> LoadResult:
        """Send every packet of `enc` (at `rate` msg/s if given, else as fast as the window allows)."""
        n = len(enc)
        mv = memoryview(enc.buf)
        arr = np.frombuffer(enc.buf, dtype=np.uint8)  # a writable view: patched in place, vectorised
        last_ts = 0
        base_acked = self.acked
        first = t0 = time.perf_counter()
        sent = 0
        while sent < n:
            k = min(chunk, n - sent)
            if rate:
                delay = t0 + (sent + k) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if patch_ts:
                # strictly increasing per chunk: a device appears at most once in a chunk, so no two
                # of its messages share a time (InfluxDB would keep one point for both)
                last_ts = max(int(time.time() * 1000), last_ts + 1)
                stamp(arr, enc.ts_offsets[sent : sent + k], last_ts)
            self.send(mv[enc.starts[sent] : enc.starts[sent + k]], k)
            sent += k
        last_send = time.perf_counter()
        return LoadResult(sent, self.acked - base_acked, first, last_send, self.last_ack)

    def wait_acks(self, total: int, timeout: float = 120.0) -> int:
        """Wait until `total` PUBACKs came in since connecting (or `timeout`, or the connection died)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.acked < total and not self._dead and time.monotonic() < deadline:
                self._cond.wait(min(0.5, max(deadline - time.monotonic(), 0.001)))
            return self.acked

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(2)


# ---- devices -------------------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    """ "streetlight=3,manhole_cover=1" -> {type: weight}; a bare type name weighs 1."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in THING_MODELS:
            raise ValueError(f"unknown device type {name!r} (known: {', '.join(DEVICE_TYPES)})")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{name}: weight {weight!r} is not a number") from None
    return mix


def _spread(count: int, weights: Sequence[float]) -> list[int]:
    """Smooth weighted round robin: `count` picks of indices into `weights`, every prefix in proportion."""
    total = sum(weights)
    current = [0.0] * len(weights)
    out = []
    for _ in range(count):
        for j, w in enumerate(weights):
            current[j] += w
        best = max(range(len(weights)), key=lambda j: current[j])
        current[best] -= total
        out.append(best)
    return out


@dataclass(frozen=True)
class Fleet:
    """The simulated devices: registration rows (device_id, device_type, community, grid_code, ...)."""

    rows: tuple[Mapping[str, Any], ...]

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("a fleet needs at least one device")
        seen: set[str] = set()
        for row in self.rows:
            did, dtype = str(row.get("device_id")), row.get("device_type")
            if dtype not in THING_MODELS:
                raise ValueError(f"{did}: unknown device type {dtype!r}")
            if not DEVICE_ID_RE.match(did):
                raise ValueError(f"{did!r} is not a valid device id")
            if did in seen:
                raise ValueError(f"device id {did} appears twice")
            seen.add(did)

    @classmethod
    def generate(
        cls,
        count: int,
        *,
        mix: Mapping[str, float] | None = None,
        communities: int = 1,
        prefix: str = "ld",
    ) -> Fleet:
        """`count` devices, their types in the proportions of `mix` (default: every type alike), interleaved
        so that any stretch of the fleet is mixed, in `communities` consecutive slices (3 grids each).

        Ids look like ``ld-c001-sl-00001``; community names ``ld-001`` with unit grid codes
        ``110101900{community:03d}{grid:03d}``. The same arguments always give the same fleet.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        if not 1 <= communities <= 999:
            raise ValueError("communities must be 1..999")
        if not DEVICE_ID_RE.match(f"{prefix}-c001-sl-00001"):
            raise ValueError(f"prefix {prefix!r} does not make valid device ids")
        weights = dict(mix) if mix is not None else dict.fromkeys(DEVICE_TYPES, 1.0)
        types = [t for t in DEVICE_TYPES if weights.get(t, 0) > 0]
        unknown = set(weights) - set(THING_MODELS)
        if unknown:
            raise ValueError(f"unknown device types {sorted(unknown)}")
        if not types or any(w < 0 for w in weights.values()):
            raise ValueError("the mix needs at least one type with a weight > 0, and none below 0")
        numbers: Counter[tuple[int, str]] = Counter()
        rows = []
        for k, j in enumerate(_spread(count, [weights[t] for t in types])):
            t, c = types[j], k * communities // count
            numbers[c, t] += 1
            n = numbers[c, t]
            grid = 1 + k % 3
            rows.append(
                {
                    "device_id": f"{prefix}-c{c + 1:03d}-{ID_PREFIXES[t]}-{n:05d}",
                    "device_type": t,
                    "community": f"{prefix}-{c + 1:03d}",
                    "grid_code": f"110101900{c + 1:03d}{grid:03d}",
                }
            )
        return cls(tuple(rows))

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> Fleet:
        return cls(tuple(rows))

    @classmethod
    def from_csv(cls, path: Path | str) -> Fleet:
        """A registration CSV (simulators.community.write_devices_csv / `sc-gateway devices import`)."""
        return cls(tuple(read_devices_csv(path)))

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def device_ids(self) -> list[str]:
        return [str(r["device_id"]) for r in self.rows]

    @cached_property
    def device_types(self) -> list[str]:
        return [str(r["device_type"]) for r in self.rows]

    def write_csv(self, out: Path | str | TextIO) -> None:
        write_devices_csv(self.rows, out)


# ---- values --------------------------------------------------------------------------------------------

# A quiet day: readings inside every default rule's good side (rules evaluate, alarms stay rare).
# Fields not listed draw over their whole plausible range, as in --storm for all of them.
QUIET: dict[str, tuple[float, float] | bool] = {
    "tilt_deg": (0.0, 3.0),
    "cover_open": False,
    "water_level_cm": (100.0, 400.0),
    "ch4_lel_pct": (0.0, 5.0),
    "h2s_ppm": (0.0, 2.0),
    "co_ppm": (0.0, 10.0),
    "o2_pct": (20.0, 21.0),
    "temperature_c": (10.0, 30.0),
    "battery_pct": (40.0, 100.0),
    "rssi_dbm": (-100.0, -60.0),
    "lamp_on": True,
    "dimming_pct": (50.0, 100.0),
    "voltage_v": (215.0, 225.0),
    "current_a": (0.3, 0.8),
    "power_w": (60.0, 150.0),
    "power_factor": (0.9, 1.0),
    "energy_kwh": (100.0, 200.0),
    "leakage_ma": (0.0, 10.0),
    "pole_tilt_deg": (0.0, 1.0),
    "lux": (0.0, 5.0),
    "door_open": False,
    "occupied": False,
    "alarm": False,
    "smoke_obscuration_pct_m": (0.0, 1.0),
    # event fields
    "open_s": (60.0, 900.0),
}

#: how often each event happens relative to the others of its type (events not listed weigh 1)
EVENT_WEIGHTS: dict[str, float] = {
    "access_granted": 70,
    "access_denied": 12,
    "door_held_open": 8,
    "door_forced_open": 4,
    "tamper": 1,
    "duress": 0.5,
    "emergency_call": 1,
    "hatch_open": 3,
    "hatch_closed": 3,
    "lamp_fault": 2,
    "smoke_alarm": 2,
    "alarm_cleared": 2,
    "silenced": 1,
    "low_battery": 4,
    "fault": 1,
    "removed": 1,
    "installed": 1,
    "self_test": 8,
}

#: span drawn from for a bound the thing model leaves open (energy_kwh has no maximum)
_OPEN_SPAN = 1000.0

_TRUE, _FALSE = b"true", b"false"
_BOOLS = np.array([_FALSE, _TRUE], dtype=object)


@dataclass(frozen=True)
class Profile:
    """How values are drawn: `seed`; a quiet day (QUIET) or a `storm` (every value over its whole range);
    `event_share` of the messages of types that declare events are events, chosen by `event_weights`
    (default EVENT_WEIGHTS)."""

    seed: int = 0
    storm: bool = False
    event_share: float = 0.0
    event_weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if not 0.0 <= self.event_share <= 1.0:
            raise ValueError("event share must be within 0..1")

    def weight(self, event: str) -> float:
        """An event's weight: from `event_weights` (unlisted: 0), else EVENT_WEIGHTS (unlisted: 1)."""
        if self.event_weights is not None:
            return float(self.event_weights.get(event, 0.0))
        return float(EVENT_WEIGHTS.get(event, 1.0))


class _Column:
    """How one payload field is drawn and written: a %-format and a numpy draw of n values."""

    def __init__(self, f: Field, profile: Profile) -> None:
        self.key = json.dumps(f.name).encode()
        self.fixed: bool | None = None
        quiet = None if profile.storm else QUIET.get(f.name)
        if f.kind is bool:
            self.kind, self.fmt = "bool", b"%s"
            if isinstance(quiet, bool):
                self.fixed = quiet
        elif f.kind is str:
            self.fmt = b"%s"
            if f.choices:
                self.kind = "choice"
                self.choices = np.array([json.dumps(c).encode() for c in f.choices], dtype=object)
            else:
                self.kind = "text"
                self.text_prefix = f.name[:16].encode()
        else:
            lo = float(f.minimum) if f.minimum is not None else None
            hi = float(f.maximum) if f.maximum is not None else None
            lo = lo if lo is not None else (hi - _OPEN_SPAN if hi is not None else 0.0)
            hi = hi if hi is not None else lo + _OPEN_SPAN
            if isinstance(quiet, tuple):
                lo, hi = max(lo, quiet[0]), min(hi, quiet[1])
            if f.kind is int:
                self.kind, self.fmt = "int", b"%d"
                self.lo, self.hi = math.ceil(lo), math.floor(hi)
            else:
                self.kind = "float"
                self.digits = 3 if hi - lo <= 1 else 2
                self.fmt = b"%%.%df" % self.digits
                scale = 10**self.digits
                # rounding must not step outside a bound that has more digits than we keep
                self.lo, self.hi = math.ceil(lo * scale) / scale, math.floor(hi * scale) / scale
            if self.lo > self.hi:
                raise ValueError(f"{f.name}: no value to draw within {lo}..{hi}")

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "float":
            return np.clip(np.round(rng.uniform(self.lo, self.hi, n), self.digits), self.lo, self.hi)
        if self.kind == "int":
            return rng.integers(self.lo, self.hi + 1, n)
        if self.kind == "bool":
            if self.fixed is not None:
                return np.full(n, _TRUE if self.fixed else _FALSE, dtype=object)
            return _BOOLS[rng.integers(0, 2, n)]
        if self.kind == "choice":
            return self.choices[rng.integers(0, len(self.choices), n)]
        codes = rng.integers(0, 2**32, n).tolist()
        return np.array([b'"%s-%08x"' % (self.text_prefix, c) for c in codes] or [], dtype=object)


class _Group:
    """Messages of one shape (a type's telemetry, or one of its events): a %-template and its columns."""

    def __init__(self, head: bytes, fields: Sequence[Field], profile: Profile) -> None:
        self.columns = [_Column(f, profile) for f in fields]
        self.template = (
            b'{"ts":%d,"seq":%d' + head + b"".join(b"," + c.key + b":" + c.fmt for c in self.columns) + b"}"
        )


#: messages per random block: the values of message i come from the generator seeded (seed, i // BLOCK)
BLOCK = 4096
TELEMETRY, EVENT = 0, 1
_HDR = np.array([b"\x32" + _varint(n) for n in range(1 << 14)], dtype=object)
_MID = np.array([b"\x00\x00"] + [struct.pack("!H", m) for m in range(1, 65536)], dtype=object)


@dataclass
class Batch:
    """Messages of one block for one connection, in stream order: global index, device, kind, payload."""

    index: np.ndarray
    device: np.ndarray
    kind: np.ndarray  # TELEMETRY or EVENT
    payloads: list[bytes]

    def __len__(self) -> int:
        return len(self.payloads)


@dataclass
class Framed:
    """A batch as PUBLISH packets: one buffer, each packet's start (plus the end), each ts's digits."""

    buf: bytearray
    starts: np.ndarray
    ts_offsets: np.ndarray


class PayloadGenerator:
    """The message stream of a fleet under a profile (see the module docstring for its definition).

    Device time: device k's report seq s is at ``start_ms + s * interval_ms + k * interval_ms // D``, so a
    device's reports are `interval_ms` apart and the fleet's are spread evenly across each interval.
    """

    def __init__(self, fleet: Fleet, profile: Profile, *, start_ms: int, interval_ms: int = 1000) -> None:
        if not 10**12 <= start_ms < 10**13:
            raise ValueError("start_ms must be epoch milliseconds with 13 digits (2001 .. 2286)")
        if interval_ms < 1:
            raise ValueError("interval_ms must be >= 1")
        self.fleet, self.profile = fleet, profile
        self.start_ms, self.interval_ms = start_ms, interval_ms
        self.n_devices = d = len(fleet)
        present = set(fleet.device_types)
        self.types = [t for t in DEVICE_TYPES if t in present]
        index = {t: j for j, t in enumerate(self.types)}
        self.type_of = np.array([index[t] for t in fleet.device_types], dtype=np.int64)
        self.telemetry: list[_Group] = []
        self.events: list[list[tuple[_Group, float]]] = []
        for t in self.types:
            model = THING_MODELS[t]
            self.telemetry.append(_Group(b"", model.telemetry, profile))
            evs = [(ev, profile.weight(ev.name)) for ev in model.events]
            self.events.append(
                [
                    (_Group(b',"event":' + json.dumps(ev.name).encode(), ev.fields, profile), w)
                    for ev, w in evs
                ]
            )
        self.has_events = np.array([bool(e) and sum(w for _, w in e) > 0 for e in self.events], dtype=bool)
        self.event_p = [
            np.array([w for _, w in e]) / sum(w for _, w in e) if h else None
            for e, h in zip(self.events, self.has_events, strict=True)
        ]
        topics = [
            [
                _str(f"sc/v1/{t}/{did}/{kind}".encode())
                for t, did in zip(fleet.device_types, fleet.device_ids, strict=True)
            ]
            for kind in ("telemetry", "event")
        ]
        self.topic_field = np.array(topics[0] + topics[1], dtype=object)  # [kind * D + device]
        self.topic_len = np.fromiter(map(len, self.topic_field.tolist()), dtype=np.int64, count=2 * d)
        self.phase = (np.arange(d, dtype=np.int64) * interval_ms) // d

    # -- the stream ----------------------------------------------------------------------------------

    def batch(self, block: int, connection: int = 0, connections: int = 1, limit: int | None = None) -> Batch:
        """The messages of `block` that go through `connection` of `connections`, below `limit` if given."""
        lo = block * BLOCK
        idx = np.arange(lo, lo + BLOCK, dtype=np.int64)
        dev = idx % self.n_devices
        typ = self.type_of[dev]
        rng = np.random.default_rng([self.profile.seed, block])
        is_event = (rng.random(BLOCK) < self.profile.event_share) & self.has_events[typ]
        keep = np.ones(BLOCK, dtype=bool)
        if connections > 1:
            keep &= dev % connections == connection
        if limit is not None:
            keep &= idx < limit
        pos = np.cumsum(keep) - 1  # where a kept message lands in the batch
        n = int(keep.sum())
        seq = idx // self.n_devices
        ts = self.start_ms + seq * self.interval_ms + self.phase[dev]
        out = np.empty(n, dtype=object)
        # Every draw happens whatever is kept, in a fixed order: a message's values never depend on
        # the connection count or the limit.
        for j in range(len(self.types)):
            of_type = typ == j
            self._fill(self.telemetry[j], np.flatnonzero(of_type & ~is_event), rng, keep, pos, ts, seq, out)
            p = self.event_p[j]
            if p is None:
                continue
            rows = np.flatnonzero(of_type & is_event)
            choice = rng.choice(len(p), size=len(rows), p=p)
            for e, (group, _w) in enumerate(self.events[j]):
                self._fill(group, rows[choice == e], rng, keep, pos, ts, seq, out)
        return Batch(idx[keep], dev[keep], is_event[keep].astype(np.int64), out.tolist())

    @staticmethod
    def _fill(
        group: _Group,
        rows: np.ndarray,
        rng: np.random.Generator,
        keep: np.ndarray,
        pos: np.ndarray,
        ts: np.ndarray,
        seq: np.ndarray,
        out: np.ndarray,
    ) -> None:
        cols = [c.draw(len(rows), rng) for c in group.columns]
        sel = keep[rows]
        rows = rows[sel]
        if not len(rows):
            return
        values = [ts[rows].tolist(), seq[rows].tolist(), *(c[sel].tolist() for c in cols)]
        tmpl = group.template
        out[pos[rows]] = [tmpl % v for v in zip(*values, strict=True)]

    def batches(
        self, connection: int = 0, connections: int = 1, limit: int | None = None, first_block: int = 0
    ) -> Iterator[Batch]:
        """Block after block, for ever unless `limit` (a global message count) is given."""
        block = first_block
        while limit is None or block * BLOCK < limit:
            b = self.batch(block, connection, connections, limit)
            if len(b):
                yield b
            block += 1

    def messages(self, count: int) -> list[tuple[str, bytes]]:
        """The first `count` messages of the stream as (topic, payload): for tests and inspection."""
        out = []
        for b in self.batches(limit=count):
            for d, k, p in zip(b.device.tolist(), b.kind.tolist(), b.payloads, strict=True):
                out.append((self.topic(d, k), p))
        return out

    def topic(self, device: int, kind: int) -> str:
        return bytes(self.topic_field[kind * self.n_devices + device][2:]).decode()

    # -- packets -------------------------------------------------------------------------------------

    def frame(self, batch: Batch, first_mid: int = 1, protocol: int = 5) -> Framed:
        """PUBLISH packets (QoS 1) of `batch`; packet ids count up from `first_mid` (1..65535, wrapping)."""
        n = len(batch)
        v5 = 1 if protocol == 5 else 0
        tsel = batch.kind * self.n_devices + batch.device
        tlen = self.topic_len[tsel]
        plen = np.fromiter(map(len, batch.payloads), dtype=np.int64, count=n)
        rl = tlen + 2 + v5 + plen
        if n and int(rl.max()) >= 1 << 14:
            raise ValueError("a packet above 16 KiB: payloads this size are not what load mode makes")
        parts: list[Any] = [None] * ((4 + v5) * n)
        step = 4 + v5
        parts[0::step] = _HDR[rl].tolist()
        parts[1::step] = self.topic_field[tsel].tolist()
        parts[2::step] = _MID[(first_mid - 1 + np.arange(n)) % 65535 + 1].tolist()
        if v5:
            parts[3::step] = [b"\x00"] * n
        parts[step - 1 :: step] = batch.payloads
        hlen = np.where(rl < 128, 2, 3)
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(hlen + rl, out=starts[1:])
        # every payload starts with {"ts": and 13 digits
        ts_offsets = starts[:-1] + hlen + tlen + 2 + v5 + 6
        return Framed(bytearray(b"".join(parts)), starts, ts_offsets)

    def encoded(self, count: int, protocol: int = 4) -> Encoded:
        """The first `count` messages as one Encoded (bench/throughput.py), packet ids 1, 2, ... wrapping."""
        bufs, starts, offs, base, sent = [], [np.zeros(1, dtype=np.int64)], [], 0, 0
        for b in self.batches(limit=count):
            f = self.frame(b, first_mid=sent % 65535 + 1, protocol=protocol)
            bufs.append(f.buf)
            starts.append(f.starts[1:] + base)
            offs.append(f.ts_offsets + base)
            base += len(f.buf)
            sent += len(b)
        return Encoded(
            bytearray(b"".join(bufs)),
            np.concatenate(starts),
            np.concatenate(offs) if offs else np.zeros(0, dtype=np.int64),
        )


# ---- pacing --------------------------------------------------------------------------------------------


class Pacer:
    """An absolute schedule: message i of the whole stream is due at ``t0 + i / rate``.

    Connections pace themselves against the same t0 and global indices, so together they send `rate`
    spread evenly. A sender that fell behind sends at once until it has caught up (the schedule, not the
    last send, sets the pace, so the average over the run is the rate asked). No rate: nothing waits.
    """

    def __init__(
        self,
        rate: float | None,
        t0: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate, self.t0, self.clock, self.sleep = rate, t0, clock, sleep

    def due(self, index: int) -> float:
        """When the message before global index `index` is due (so `due(n)` ends the first n)."""
        return self.t0 if not self.rate else self.t0 + index / self.rate

    def wait(self, index: int) -> float:
        """Sleep until the first `index` messages are due; returns the time slept."""
        delay = self.due(index) - self.clock()
        if delay > 0:
            self.sleep(delay)
            return delay
        return 0.0


#: with a rate, a connection sends a piece at most every this many seconds of schedule
PACE_SLICE_S = 0.005


def piece_size(
    rate: float | None,
    connections: int,
    n_devices: int,
    *,
    chunk: int = 1024,
    window: int = 65534,
    unique: bool = False,
) -> int:
    """Messages a connection sends in one go: at most `chunk` and half its `window`, about PACE_SLICE_S
    of its share of `rate`, and with `unique` no more than its fewest devices (so that no device appears
    twice in one piece)."""
    k = min(chunk, max(1, window // 2))
    if rate:
        k = min(k, max(1, int(rate * PACE_SLICE_S / connections)))
    if unique:
        k = min(k, max(1, n_devices // connections))
    return max(1, k)


# ---- running -------------------------------------------------------------------------------------------

Parallel = Literal["threads", "processes"]


@dataclass(frozen=True)
class LoadConfig:
    """One load run. `messages` and/or `duration_s` bound it (at least one); `rate` is total msg/s."""

    fleet: Fleet
    profile: Profile
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id_prefix: str | None = None
    connections: int = 1
    window: int = 5000
    rate: float | None = None
    messages: int | None = None
    duration_s: float | None = None
    start_ms: int | None = None
    interval_ms: int | None = None
    stamp_at_send: bool = False
    parallel: Parallel = "threads"
    chunk: int = 1024
    ack_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    progress_s: float = 5.0

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError("connections must be >= 1")
        if self.connections > len(self.fleet):
            raise ValueError("more connections than devices")
        if self.messages is None and self.duration_s is None:
            raise ValueError("give messages or a duration (or both)")
        if self.messages is not None and self.messages < 0:
            raise ValueError("messages must be >= 0")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if not 1 <= self.window < 65535:
            raise ValueError("window must be 1..65534")
        if self.parallel not in ("threads", "processes"):
            raise ValueError("parallel must be threads or processes")
        if self.client_id_prefix is None:
            # an adaptor account's client ids start with its username (<username>.<i>)
            object.__setattr__(self, "client_id_prefix", self.username or f"sc-load-{os.getpid()}")

    @property
    def limit(self) -> int | None:
        """The global message count, when it is known before the run."""
        bounds = []
        if self.messages is not None:
            bounds.append(self.messages)
        if self.rate and self.duration_s:
            bounds.append(math.ceil(self.rate * self.duration_s))
        return min(bounds) if bounds else None

    def device_interval_ms(self) -> int:
        """Device time between two reports of one device: the fleet over the rate, else 1 s."""
        if self.interval_ms is not None:
            return self.interval_ms
        if self.rate:
            return max(1, round(1000 * len(self.fleet) / self.rate))
        return 1000

    def device_start_ms(self, now_ms: int) -> int:
        """Where device time starts: `start_ms`, else so that the last planned report is about now."""
        if self.start_ms is not None:
            return self.start_ms
        if self.limit is None or self.rate:
            return now_ms  # paced: device time keeps up with the wall clock
        rounds = math.ceil(self.limit / len(self.fleet))
        return now_ms - rounds * self.device_interval_ms()

    def client_id(self, i: int) -> str:
        return f"{self.client_id_prefix}.{i}"


@dataclass
class ConnectionReport:
    client_id: str
    sent: int = 0
    acked: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    unrouted: int = 0
    first_send: float = 0.0
    last_send: float = 0.0
    last_ack: float = 0.0
    receive_maximum: int | None = None
    error: str | None = None

    @property
    def accepted(self) -> int:
        return self.acked - sum(self.refused.values())

    @property
    def unacknowledged(self) -> int:
        return self.sent - self.acked


@dataclass
class LoadReport:
    config: LoadConfig
    connections: list[ConnectionReport]
    t0: float
    elapsed_s: float

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.connections)

    @property
    def acked(self) -> int:
        return sum(c.accepted for c in self.connections)

    @property
    def refused(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for c in self.connections:
            total.update(c.refused)
        return total

    @property
    def unrouted(self) -> int:
        return sum(c.unrouted for c in self.connections)

    @property
    def unacknowledged(self) -> int:
        return sum(c.unacknowledged for c in self.connections)

    @property
    def errors(self) -> list[str]:
        return [f"{c.client_id}: {c.error}" for c in self.connections if c.error]

    @property
    def ok(self) -> bool:
        return not self.refused and not self.unacknowledged and not self.errors

    @property
    def send_rate(self) -> float:
        """Messages sent per second, from the start to the last send."""
        last = max((c.last_send for c in self.connections), default=self.t0)
        return self.sent / max(last - self.t0, 1e-9)

    @property
    def ack_rate(self) -> float:
        """Messages acknowledged per second, from the start to the last PUBACK."""
        last = max((c.last_ack for c in self.connections), default=self.t0)
        return self.acked / max(last - self.t0, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acknowledged": self.acked,
            "refused": {reason_name(k): v for k, v in sorted(self.refused.items())},
            "unacknowledged": self.unacknowledged,
            "no_matching_subscribers": self.unrouted,
            "rate_asked": self.config.rate,
            "send_rate": round(self.send_rate, 1),
            "ack_rate": round(self.ack_rate, 1),
            "elapsed_s": round(self.elapsed_s, 3),
            "errors": self.errors,
            "connections": [
                {
                    "client_id": c.client_id,
                    "sent": c.sent,
                    "acknowledged": c.accepted,
                    "refused": {reason_name(k): v for k, v in sorted(c.refused.items())},
                    "unacknowledged": c.unacknowledged,
                    "send_rate": round(c.sent / max(c.last_send - self.t0, 1e-9), 1),
                    "receive_maximum": c.receive_maximum,
                    "error": c.error,
                }
                for c in self.connections
            ],
        }

    def summary(self) -> str:
        cfg = self.config
        asked = f"{cfg.rate:,.0f} msg/s" if cfg.rate else "as fast as possible"
        refused = ", ".join(f"{reason_name(k)}: {v:,}" for k, v in sorted(self.refused.items())) or "none"
        lines = [
            f"=== load: {len(cfg.fleet):,} devices over {cfg.connections} connection(s) ({cfg.parallel}), "
            f"QoS 1, window {cfg.window} ===",
            f"sent              {self.sent:,}",
            f"acknowledged      {self.acked:,}"
            + (f"  ({self.unrouted:,} with no matching subscribers)" if self.unrouted else ""),
            f"refused           {sum(self.refused.values()):,}  ({refused})",
            f"unacknowledged    {self.unacknowledged:,}",
            f"rate              asked {asked}; achieved {self.send_rate:,.0f} msg/s sent, "
            f"{self.ack_rate:,.0f} msg/s acknowledged ({self.elapsed_s:.2f} s)",
            "per connection:",
        ]
        for c in self.connections:
            rate = c.sent / max(c.last_send - self.t0, 1e-9) if c.sent else 0.0
            bad = f"  refused {sum(c.refused.values()):,}" if c.refused else ""
            lines.append(
                f"  {c.client_id:<24} sent {c.sent:>10,}  acked {c.accepted:>10,}{bad}  "
                f"unacked {c.unacknowledged:,}  {rate:,.0f} msg/s"
            )
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


# counters each connection publishes for the progress line: sent, acknowledged, refused
_N_COUNTERS = 3


class _Shared:
    """What the coordinator and the connection workers share, the same for threads and processes."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("fork")
        self.counters = ctx.Array("q", n * _N_COUNTERS, lock=False)
        self.t0 = ctx.Value("d", 0.0, lock=False)
        self.start = ctx.Event()
        self.stop = ctx.Event()
        self.abort = ctx.Event()
        self.events: Any = ctx.Queue()  # ("ready", i, None) / ("error", i, message) / ("done", i, report)

    def update(self, i: int, pub: RawPublisher) -> None:
        base = i * _N_COUNTERS
        self.counters[base] = pub.sent
        self.counters[base + 1] = pub.acked
        self.counters[base + 2] = sum(pub.refused.values())

    def totals(self) -> tuple[int, int, int]:
        c = self.counters[:]
        return sum(c[0::_N_COUNTERS]), sum(c[1::_N_COUNTERS]), sum(c[2::_N_COUNTERS])


class _Stop(Exception):
    pass


def _connection(cfg: LoadConfig, i: int, shared: _Shared, start_ms: int) -> ConnectionReport:
    report = ConnectionReport(cfg.client_id(i))
    try:
        pub = RawPublisher(
            cfg.host,
            cfg.port,
            report.client_id,
            window=cfg.window,
            username=cfg.username,
            password=cfg.password,
            protocol=5,
            timeout=cfg.connect_timeout_s,
        )
    except (OSError, ConnectionError, ValueError) as exc:
        report.error = f"cannot connect: {exc}"
        shared.events.put(("error", i, report.error))
        return report
    report.receive_maximum = pub.receive_maximum
    try:
        shared.events.put(("ready", i, None))
        while not shared.start.wait(0.2):
            if shared.abort.is_set():
                return report
        if shared.abort.is_set():
            return report
        t0 = shared.t0.value
        gen = PayloadGenerator(
            cfg.fleet, cfg.profile, start_ms=start_ms, interval_ms=cfg.device_interval_ms()
        )
        pacer = Pacer(cfg.rate, t0)
        deadline = t0 + cfg.duration_s if cfg.duration_s else None
        k = piece_size(
            cfg.rate,
            cfg.connections,
            len(cfg.fleet),
            chunk=cfg.chunk,
            window=cfg.window,
            unique=cfg.stamp_at_send,
        )
        last_ts = 0

        def give_up() -> bool:
            late = deadline is not None and time.monotonic() > deadline + cfg.ack_timeout_s
            return late or shared.stop.is_set()

        try:
            for batch in gen.batches(i, cfg.connections, cfg.limit):
                framed = gen.frame(batch, first_mid=pub.sent % 65535 + 1, protocol=5)
                mv = memoryview(framed.buf)
                arr = np.frombuffer(framed.buf, dtype=np.uint8) if cfg.stamp_at_send else None
                for s in range(0, len(batch), k):
                    e = min(s + k, len(batch))
                    if shared.stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                        raise _Stop
                    pacer.wait(int(batch.index[e - 1]) + 1)
                    if arr is not None:
                        last_ts = max(time.time_ns() // 1_000_000, last_ts + 1)
                        stamp(arr, framed.ts_offsets[s:e], last_ts)
                    if not report.first_send:
                        report.first_send = time.monotonic()
                    pub.send(mv[framed.starts[s] : framed.starts[e]], e - s, give_up)
                    report.last_send = time.monotonic()
                    shared.update(i, pub)
        except _Stop:
            pass
        except TimeoutError as exc:
            if not shared.stop.is_set():
                report.error = str(exc)
        except (OSError, ConnectionError) as exc:
            report.error = str(exc)
        ack_deadline = time.monotonic() + cfg.ack_timeout_s
        while pub.acked < pub.sent and time.monotonic() < ack_deadline and not pub.error:
            pub.wait_acks(pub.sent, min(0.25, ack_deadline - time.monotonic()))
            shared.update(i, pub)
        if pub.error and not report.error:
            report.error = pub.error
    finally:
        pub.close()
        shared.update(i, pub)
        report.sent, report.acked, report.refused = pub.sent, pub.acked, Counter(pub.refused)
        report.unrouted, report.last_ack = pub.unrouted, pub.last_ack
    return report


def _worker(cfg: LoadConfig, i: int, shared: _Shared, start_ms: int, in_child: bool) -> None:
    if in_child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops the run
    try:
        report = _connection(cfg, i, shared, start_ms)
    except Exception as exc:  # a bug: report it rather than leave the coordinator waiting
        report = ConnectionReport(cfg.client_id(i), error=f"{type(exc).__name__}: {exc}")
        shared.events.put(("error", i, report.error))
    shared.events.put(("done", i, report))


def run_load(
    cfg: LoadConfig,
    *,
    progress: TextIO | None = sys.stderr,
    stop: threading.Event | None = None,
) -> LoadReport:
    """Run `cfg`: connect every connection, start them together, print progress lines to `progress`
    every `cfg.progress_s` seconds, wait for the PUBACKs; the report says what happened.

    Raises ConnectionError when a connection cannot be opened (nothing is sent then).
    """
    n = cfg.connections
    shared = _Shared(n)
    start_ms = cfg.device_start_ms(time.time_ns() // 1_000_000)
    workers: list[threading.Thread | mp.process.BaseProcess] = []
    for i in range(n):
        if cfg.parallel == "processes":
            p = mp.get_context("fork").Process(
                target=_worker, args=(cfg, i, shared, start_ms, True), name=f"load-{i}", daemon=True
            )
            workers.append(p)
        else:
            workers.append(
                threading.Thread(
                    target=_worker, args=(cfg, i, shared, start_ms, False), name=f"load-{i}", daemon=True
                )
            )
    for w in workers:
        w.start()
    reports: dict[int, ConnectionReport] = {}
    t0 = time.monotonic()
    try:
        _start(cfg, shared, reports)
        t0 = shared.t0.value
        last_t, last_sent = t0, 0
        next_progress = t0 + cfg.progress_s
        while len(reports) < n:
            # ^C (or `stop`) stops sending; the connections still wait for their PUBACKs and report
            if not any(w.is_alive() for w in workers):
                _drain(shared, reports, n)  # what they put last; a worker killed put nothing
                break
            try:
                if stop is not None and stop.is_set():
                    shared.stop.set()
                with contextlib.suppress(queue.Empty):
                    what, i, detail = shared.events.get(timeout=0.1)
                    if what == "done":
                        reports[i] = detail
                now = time.monotonic()
                if progress is not None and cfg.progress_s > 0 and now >= next_progress:
                    sent, acked, refused = shared.totals()
                    rate = (sent - last_sent) / max(now - last_t, 1e-9)
                    print(
                        f"[{now - t0:7.1f} s] sent {sent:,}  acknowledged {acked - refused:,}  "
                        f"refused {refused:,}  {rate:,.0f} msg/s",
                        file=progress,
                        flush=True,
                    )
                    last_t, last_sent, next_progress = now, sent, now + cfg.progress_s
            except KeyboardInterrupt:
                shared.stop.set()
    finally:
        shared.abort.set()
        for w in workers:
            w.join(cfg.ack_timeout_s + 10)
        for w in workers:
            if isinstance(w, mp.process.BaseProcess) and w.is_alive():
                w.kill()  # our own child, by its handle
    elapsed = time.monotonic() - t0
    lost = ConnectionReport("?", error="the connection's worker ended without a report")
    return LoadReport(
        cfg, [reports.get(i, replace(lost, client_id=cfg.client_id(i))) for i in range(n)], t0, elapsed
    )


def _drain(shared: _Shared, reports: dict[int, ConnectionReport], n: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while len(reports) < n and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            what, i, detail = shared.events.get(timeout=0.1)
            if what == "done":
                reports[i] = detail


def _start(cfg: LoadConfig, shared: _Shared, reports: dict[int, ConnectionReport]) -> None:
    """Wait until every connection is up, then start them all at one t0; ConnectionError if one is not."""
    ready: set[int] = set()
    errors: list[str] = []
    deadline = time.monotonic() + cfg.connect_timeout_s + 5
    while len(ready) + len(errors) < cfg.connections:
        try:
            what, i, detail = shared.events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            errors.append("connections did not come up in time")
            break
        if what == "ready":
            ready.add(i)
        elif what == "error":
            errors.append(f"{cfg.client_id(i)}: {detail}")
        elif what == "done":
            reports[i] = detail
    if errors:
        raise ConnectionError("; ".join(errors))
    shared.t0.value = time.monotonic() + 0.02
    shared.start.set()


def generation_rate(gen: PayloadGenerator, count: int, protocol: int = 5) -> tuple[float, int]:
    """(messages/s, bytes) of drawing, formatting and framing the first `count` messages, one thread."""
    t = time.perf_counter()
    size, sent = 0, 0
    for b in gen.batches(limit=count):
        f = gen.frame(b, first_mid=sent % 65535 + 1, protocol=protocol)
        size += len(f.buf)
        sent += len(b)
    return sent / max(time.perf_counter() - t, 1e-9), size


# ---- CLI -----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.load",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Exit code: 0 every message acknowledged, 1 some refused or unacknowledged, 2 no start.",
    )
    p.add_argument("--host", default="127.0.0.1", help="broker (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="default 1883")
    p.add_argument(
        "--username", default=os.environ.get("SC_SIM_USERNAME"), help="adaptor account, or SC_SIM_USERNAME"
    )
    p.add_argument("--password", default=os.environ.get("SC_SIM_PASSWORD"), help="or SC_SIM_PASSWORD")
    p.add_argument("--client-id-prefix", help="client ids are <prefix>.<i> (default: the username)")
    src = p.add_argument_group("devices")
    src.add_argument("--devices", type=int, default=10_000, help="how many to generate (default 10,000)")
    src.add_argument("--mix", help="type weights, e.g. streetlight=3,manhole_cover=1 (default: all alike)")
    src.add_argument("--communities", type=int, default=1, help="communities they are in (default 1)")
    src.add_argument("--prefix", default="ld", help="device id prefix (default ld)")
    src.add_argument("--devices-csv", metavar="FILE", help="the devices of a registration CSV instead")
    src.add_argument("--write-devices", metavar="FILE", help="write their registration CSV and exit")
    val = p.add_argument_group("values")
    val.add_argument("--seed", type=int, default=0, help="default 0")
    val.add_argument("--storm", action="store_true", help="every value over its whole plausible range")
    val.add_argument("--events", type=float, default=0.0, metavar="SHARE", help="share of events, 0..1")
    val.add_argument("--start-ms", type=int, help="device time of the first reports (default: about now)")
    val.add_argument("--interval", type=float, metavar="S", help="device time between a device's reports")
    val.add_argument("--stamp-at-send", action="store_true", help="ts = the time a message is sent")
    run = p.add_argument_group("sending")
    run.add_argument("--rate", type=float, metavar="MSG_PER_S", help="total (default: as fast as possible)")
    run.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    run.add_argument("--messages", type=int, metavar="N", help="stop after N messages")
    run.add_argument("--connections", type=int, default=4, help="default 4")
    run.add_argument("--window", type=int, default=5000, help="unacknowledged per connection (default 5000)")
    run.add_argument(
        "--parallel", choices=("threads", "processes"), default="threads", help="default threads"
    )
    run.add_argument("--ack-timeout", type=float, default=30.0, metavar="S", help="PUBACK wait (default 30)")
    run.add_argument("--progress", type=float, default=5.0, metavar="S", help="every S s on stderr (0: off)")
    run.add_argument("--json", action="store_true", help="the summary as JSON")
    return p


def _fleet(a: argparse.Namespace) -> Fleet:
    if a.devices_csv:
        return Fleet.from_csv(a.devices_csv)
    mix = parse_mix(a.mix) if a.mix else None
    return Fleet.generate(a.devices, mix=mix, communities=a.communities, prefix=a.prefix)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    try:
        fleet = _fleet(a)
        if a.write_devices:
            fleet.write_csv(a.write_devices)
            print(f"{len(fleet)} devices written to {a.write_devices}", file=sys.stderr)
            return 0
        cfg = LoadConfig(
            fleet=fleet,
            profile=Profile(seed=a.seed, storm=a.storm, event_share=a.events),
            host=a.host,
            port=a.port,
            username=a.username,
            password=a.password,
            client_id_prefix=a.client_id_prefix,
            connections=a.connections,
            window=a.window,
            rate=a.rate,
            messages=a.messages,
            duration_s=a.duration,
            start_ms=a.start_ms,
            interval_ms=None if a.interval is None else max(1, round(a.interval * 1000)),
            stamp_at_send=a.stamp_at_send,
            parallel=a.parallel,
            ack_timeout_s=a.ack_timeout,
            progress_s=a.progress,
        )
        if cfg.start_ms is not None:
            PayloadGenerator(fleet, cfg.profile, start_ms=cfg.start_ms)  # check it before connecting
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    what = f"{cfg.messages:,} messages" if cfg.messages is not None else f"{cfg.duration_s:g} s"
    print(
        f"load: {len(fleet):,} devices, {what} at "
        f"{f'{cfg.rate:,.0f} msg/s' if cfg.rate else 'full speed'} over {cfg.connections} connection(s) "
        f"to {cfg.host}:{cfg.port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        report = run_load(cfg)
    except ConnectionError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report.as_dict(), indent=1) if a.json else report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
