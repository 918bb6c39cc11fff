"""A load publisher that is never the bottleneck: pre-encoded MQTT 3.1.1 QoS 1 PUBLISH packets, raw socket.

Packets are built once (numpy for the values); sending is `sendall` of large slices, with a window of
unacknowledged packet ids so the broker is never overrun; PUBACKs are read by a thread. Each message's
`ts` is a fixed-width 13-digit field patched just before its chunk is sent, so publish->stored latency
can be measured from the stored point.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np

TS_PLACEHOLDER = b"1000000000000"
_DIGIT_POS = np.arange(13)


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
    client_id: str, keepalive: int = 60, username: str | None = None, password: str | None = None
) -> bytes:
    flags = 0x02  # clean session
    payload = _str(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += _str(username.encode())
        if password is not None:
            flags |= 0x40
            payload += _str(password.encode())
    var = _str(b"MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body = var + payload
    return bytes([0x10]) + _varint(len(body)) + body


@dataclass
class Encoded:
    """Messages as one buffer of PUBLISH packets with the byte offset of each packet and of its ts digits."""

    buf: bytearray
    starts: np.ndarray  # packet start offsets, plus the end
    ts_offsets: np.ndarray  # offset of the 13 ts digits in buf, -1 where there is none
    topics: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.starts) - 1


def encode(messages: list[tuple[str, dict[str, object]]]) -> Encoded:
    """Encode (topic, payload dict) pairs; a payload with "ts" gets a patchable fixed-width ts."""
    buf = bytearray()
    starts = np.zeros(len(messages) + 1, dtype=np.int64)
    ts_off = np.full(len(messages), -1, dtype=np.int64)
    for i, (topic, payload) in enumerate(messages):
        starts[i] = len(buf)
        has_ts = "ts" in payload
        doc = {**payload, "ts": 1000000000000} if has_ts else payload
        body = json.dumps(doc, separators=(",", ":")).encode()
        mid = (i % 65535) + 1
        var = _str(topic.encode()) + struct.pack("!H", mid)
        pkt_body = var + body
        head = bytes([0x32]) + _varint(len(pkt_body))
        if has_ts:
            ts_off[i] = len(buf) + len(head) + len(var) + body.index(TS_PLACEHOLDER)
        buf += head + pkt_body
    starts[-1] = len(buf)
    return Encoded(buf, starts, ts_off)


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


class RawPublisher:
    """One MQTT 3.1.1 connection sending pre-encoded QoS 1 packets, at most `window` unacknowledged."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        window: int = 20000,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if window >= 65535:
            raise ValueError("window must be below 65535 (packet ids would be reused while in flight)")
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id, username=username, password=password))
        ack = self._recv_exact(4)
        if ack[0] != 0x20 or ack[3] != 0:
            raise ConnectionError(f"CONNACK refused: {ack!r}")
        self.window = window
        self.acked = 0
        self.last_ack = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def _read_acks(self) -> None:
        pending = b""
        try:
            while not self._closed:
                data = self.sock.recv(1 << 16)
                if not data:
                    return
                pending += data
                # PUBACK is always 4 bytes in 3.1.1: 0x40 0x02 mid mid
                n = len(pending) // 4
                if n:
                    pending = pending[n * 4 :]
                    with self._cond:
                        self.acked += n
                        self.last_ack = time.perf_counter()
                        self._cond.notify_all()
        except OSError:
            return

    def publish(
        self, enc: Encoded, *, rate: float | None = None, chunk: int = 500, patch_ts: bool = True
    ) -> LoadResult:
        """Send every packet of `enc` (at `rate` msg/s if given, else as fast as the window allows)."""
        n = len(enc)
        mv = memoryview(enc.buf)
        arr = np.frombuffer(enc.buf, dtype=np.uint8)  # a writable view: patched in place, vectorised
        last_ts = 0
        ts_offsets = enc.ts_offsets
        base_acked = self.acked
        first = time.perf_counter()
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            k = min(chunk, n - sent)
            with self._cond:
                while sent + k - (self.acked - base_acked) > self.window:
                    self._cond.wait(0.5)
            if rate:
                due = t0 + (sent + k) / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if patch_ts:
                offs = ts_offsets[sent : sent + k]
                offs = offs[offs >= 0]
                if len(offs):
                    # strictly increasing per chunk: a device appears at most once in a chunk, so no two
                    # of its messages share a time (InfluxDB would keep one point for both)
                    last_ts = max(int(time.time() * 1000), last_ts + 1)
                    digits = np.frombuffer(str(last_ts).encode(), dtype=np.uint8)
                    arr[offs[:, None] + _DIGIT_POS] = digits
            self.sock.sendall(mv[enc.starts[sent] : enc.starts[sent + k]])
            sent += k
        last_send = time.perf_counter()
        return LoadResult(sent, self.acked - base_acked, first, last_send, self.last_ack)

    def wait_acks(self, total: int, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.acked < total and time.monotonic() < deadline:
                self._cond.wait(0.5)
            return self.acked

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()
