"""Store stage: line protocol batches -> InfluxDB, or a durable on-disk spool while it is unreachable.

Order is kept: while anything is in the spool, new batches go behind it, and one drain task sends the
spool oldest first. A batch is "taken" once it is in InfluxDB or fsynced in the spool; only then are its
messages acknowledged to the broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway import metrics
from gateway.influx import Outcome, Writer, WriteResult

log = logging.getLogger("gateway.store")

Rejected = list[tuple[str, str]]  # (line, InfluxDB's error)


class SpoolFullError(Exception):
    """The spool is at its bound; intake must pause."""


class Spool:
    """Segments of line protocol on disk, one file per batch, named in order. Synchronous file I/O."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        # append() (intake) and replace_oldest()/pop_oldest() (drain) run in different worker threads.
        self._lock = threading.Lock()
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()  # an append interrupted by a crash was never acknowledged
        self._segments = sorted(self.dir.glob("*.lp"))
        self.bytes = sum(p.stat().st_size for p in self._segments)
        self._next = int(self._segments[-1].stem) + 1 if self._segments else 0
        self._warned = False
        self._gauges()

    def __len__(self) -> int:
        return len(self._segments)

    def _gauges(self) -> None:
        metrics.SPOOL_BYTES.set(self.bytes)
        metrics.SPOOL_SEGMENTS.set(len(self._segments))

    def has_room(self, nbytes: int) -> bool:
        return self.bytes + nbytes <= self.max_bytes

    def append(self, body: bytes) -> None:
        if not self.has_room(len(body)):
            raise SpoolFullError(f"spool at {self.bytes} of {self.max_bytes} bytes")
        path = self.dir / f"{self._next:016d}.lp"
        self._next += 1
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        with self._lock:
            self._segments.append(path)
            self.bytes += len(body)
            self._gauges()
        if self.bytes > 0.8 * self.max_bytes and not self._warned:
            self._warned = True
            log.error("spool_nearly_full", extra={"bytes": self.bytes, "max_bytes": self.max_bytes})

    def oldest(self) -> tuple[Path, bytes] | None:
        if not self._segments:
            return None
        path = self._segments[0]
        return path, path.read_bytes()

    def replace_oldest(self, body: bytes) -> None:
        """Keep only what is still unsent of the oldest segment (after a partial drain)."""
        path = self._segments[0]
        old = path.stat().st_size
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with self._lock:
            self.bytes += len(body) - old
            self._gauges()

    def pop_oldest(self) -> None:
        with self._lock:
            path = self._segments.pop(0)
            self.bytes -= path.stat().st_size
        path.unlink()
        if self.bytes < 0.5 * self.max_bytes:
            self._warned = False
        self._gauges()


class Store:
    """Writes batches in order, bisecting 400s and splitting 413s; spools and retries everything else."""

    def __init__(
        self,
        writer: Writer,
        spool: Spool,
        on_rejected: Callable[[Rejected], Awaitable[None]],
        *,
        retry_max_s: float = 30.0,
    ) -> None:
        self._writer = writer
        self._spool = spool
        self._on_rejected = on_rejected
        self._retry_max_s = retry_max_s
        self._failures = 0
        self._next_attempt = 0.0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self.up = True
        metrics.INFLUX_UP.set(1)

    @property
    def spooled_segments(self) -> int:
        return len(self._spool)

    async def put(self, lines: list[str]) -> None:
        """Take a batch: returns once it is in InfluxDB or durably spooled."""
        if not lines:
            return
        metrics.BATCH_POINTS.observe(len(lines))
        if len(self._spool) == 0 and time.monotonic() >= self._next_attempt:
            unsent, result = await self._send(lines)
            if not unsent:
                return
            self._failed(result)
            lines = unsent
        await self._to_spool(lines)

    async def _to_spool(self, lines: list[str]) -> None:
        body = ("\n".join(lines) + "\n").encode()
        while True:
            # Cleared before the attempt, not after it fails: room the drain makes while the append is
            # finding the spool full must still wake us (else we could wait for ever on an empty spool).
            self._room.clear()
            try:
                await asyncio.to_thread(self._spool.append, body)
                break
            except SpoolFullError:
                # Intake waits here; the broker keeps the messages we have not acknowledged.
                await self._room.wait()
        metrics.POINTS_SPOOLED.inc(len(lines))
        self._wake.set()

    async def _send(self, lines: list[str]) -> tuple[list[str], WriteResult | None]:
        """Write lines in order.

        Returns (lines not yet written because of a transient failure, that failure).
        """
        pending: list[list[str]] = [lines]
        rejected: Rejected = []
        try:
            while pending:
                chunk = pending.pop(0)
                t0 = time.perf_counter()
                result = await self._writer.write(("\n".join(chunk) + "\n").encode())
                metrics.WRITE_SECONDS.observe(time.perf_counter() - t0)
                if result.outcome is Outcome.OK:
                    metrics.POINTS_WRITTEN.inc(len(chunk))
                    self._recovered()
                    continue
                metrics.WRITE_ERRORS.labels(result.outcome.value).inc()
                if result.outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
                    if len(chunk) == 1:
                        rejected.append((chunk[0], f"{result.status}: {result.detail}"))
                    else:
                        # InfluxDB names the bad point only in prose; halve until it is alone.
                        mid = len(chunk) // 2
                        pending[0:0] = [chunk[:mid], chunk[mid:]]
                    continue
                return [line for part in [chunk, *pending] for line in part], result
            return [], None
        finally:
            if rejected:
                await self._on_rejected(rejected)

    def _failed(self, result: WriteResult | None) -> None:
        self._failures += 1
        delay = min(self._retry_max_s, 0.5 * 2 ** min(self._failures - 1, 16))
        delay *= random.uniform(0.8, 1.2)
        if result is not None and result.retry_after_s is not None:
            delay = max(delay, min(result.retry_after_s, 3600.0))
        self._next_attempt = time.monotonic() + delay
        if self.up or self._failures in (3, 10) or self._failures % 50 == 0:
            level = logging.ERROR if result and result.outcome is Outcome.CONFIG else logging.WARNING
            log.log(
                level,
                "influx_write_failing",
                extra={
                    "status": result.status if result else None,
                    "detail": result.detail if result else "",
                    "failures": self._failures,
                    "retry_in_s": round(delay, 2),
                    "spool_segments": len(self._spool),
                },
            )
        self.up = False
        metrics.INFLUX_UP.set(0)

    def _recovered(self) -> None:
        if not self.up:
            log.warning("influx_write_recovered", extra={"failures": self._failures})
        self.up = True
        self._failures = 0
        self._next_attempt = 0.0
        metrics.INFLUX_UP.set(1)

    async def drain_forever(self) -> None:
        """Send the spool, oldest first, whenever it has anything and the back-off allows."""
        errors = 0
        while True:
            if len(self._spool) == 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                continue
            oldest = await asyncio.to_thread(self._spool.oldest)
            if oldest is None:
                continue
            _, body = oldest
            lines = [ln for ln in body.decode().split("\n") if ln]
            try:
                unsent, result = await self._send(lines)
            except Exception:
                # E.g. the dead-letter sink is down. The segment stays (resent lines are idempotent in
                # InfluxDB); this task must not die, or nothing would ever drain the spool again.
                errors += 1
                self._next_attempt = time.monotonic() + min(self._retry_max_s, 0.5 * 2 ** min(errors - 1, 16))
                if errors in (1, 3, 10) or errors % 50 == 0:
                    log.exception(
                        "spool_drain_failed", extra={"errors": errors, "spool_segments": len(self._spool)}
                    )
                continue
            errors = 0
            if unsent:
                if len(unsent) != len(lines):
                    await asyncio.to_thread(self._spool.replace_oldest, ("\n".join(unsent) + "\n").encode())
                self._failed(result)
                continue
            await asyncio.to_thread(self._spool.pop_oldest)
            self._room.set()
            if len(self._spool) == 0:
                log.info("spool_drained")
