"""Store stage over a scripted fake Writer: order, on-disk spool, back-off, bisecting, bounds, restarts.

The Writer is the edge of InfluxDB, so it is faked here: it can fail on demand in ways a real server will
not (a 503 for exactly one request, a 413 then a timeout, ...). Time is virtual: `gateway.store` sees a
controllable clock in place of time.monotonic, and its asyncio.sleep moves that clock instead of waiting
(see `Clock`), so back-off and Retry-After are asserted on the clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import gateway.store as store_mod
from gateway.influx import Outcome, WriteResult
from gateway.store import Rejected, Spool, SpoolFullError, Store

TS = 1_795_239_454_000
OK = WriteResult(Outcome.OK, 204)
UNAVAILABLE = WriteResult(Outcome.RETRY, 503, '{"error":"service unavailable"}')
REFUSED = WriteResult(Outcome.RETRY, None, "ConnectError: [Errno 111] Connection refused")
DB_NOT_FOUND = WriteResult(Outcome.CONFIG, 404, '{"error":"database not found: \\"sc\\""}')
TOO_LARGE = WriteResult(Outcome.TOO_LARGE, 413, '{"error":"Request Entity Too Large"}')


def bad_request(line: str) -> WriteResult:
    return WriteResult(Outcome.REJECTED, 400, f'{{"error":"unable to parse \'{line}\': invalid boolean"}}')


# ---- virtual time -----------------------------------------------------------------------------------


class Clock:
    """time.monotonic as gateway.store sees it.

    The store's sleeps go through `_StoreAsyncio.sleep`: with `auto` on they move the clock by the time
    asked for (virtual time runs as fast as the loop); with it off the clock only moves when a test
    moves it, and a sleep just yields for a millisecond of real time.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.auto = False
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _StoreAsyncio:
    """The `asyncio` module as gateway.store sees it: the real one, but sleep() is virtual."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self._clock.sleeps.append(delay)
        if self._clock.auto:
            self._clock.advance(delay)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.001)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    # Only the store's view is replaced: the event loop and this module keep the real time and asyncio.
    monkeypatch.setattr(
        store_mod, "time", types.SimpleNamespace(monotonic=c.monotonic, perf_counter=time.perf_counter)
    )
    monkeypatch.setattr(store_mod, "asyncio", _StoreAsyncio(c))
    return c


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 3.0) -> None:
    """Poll on real time; the timeout only matters when the test is failing."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def draining(store: Store) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(store.drain_forever())
    try:
        yield task
    finally:
        assert not task.done() or task.cancelled(), f"drain_forever ended: {task.exception()!r}"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- the scripted writer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    at: float  # store clock
    lines: list[str]
    outcome: Outcome


class ScriptedWriter:
    """A Writer whose answers are scripted: first `script` (one answer per request, whatever the body),
    then `failing` for every request while set, then by content: a body holding a line of `bad` gets
    that line's answer, a body of more than `max_lines` lines gets a 413, anything else is written."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.script: list[WriteResult] = []
        self.failing: WriteResult | None = None
        self.bad: dict[str, WriteResult] = {}
        self.max_lines: int | None = None
        self.gate: asyncio.Event | None = None  # when set to an unset Event, requests wait for it
        self.in_flight = asyncio.Event()
        self.attempts: list[Attempt] = []
        self.written: list[str] = []

    async def write(self, body: bytes) -> WriteResult:
        assert body.endswith(b"\n"), body[-40:]
        lines = body.decode().split("\n")[:-1]
        assert all(lines), "a body holds no empty line"
        self.in_flight.set()
        if self.gate is not None:
            await self.gate.wait()
        result = self._answer(lines)
        self.attempts.append(Attempt(self.clock.now, lines, result.outcome))
        if result.outcome is Outcome.OK:
            self.written.extend(lines)
        self.in_flight.clear()
        return result

    def _answer(self, lines: list[str]) -> WriteResult:
        if self.script:
            return self.script.pop(0)
        if self.failing is not None:
            return self.failing
        for line in lines:
            if line in self.bad:
                return self.bad[line]
        if self.max_lines is not None and len(lines) > self.max_lines:
            return TOO_LARGE
        return OK

    async def ensure_ready(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class DeadLetters:
    def __init__(self) -> None:
        self.calls: list[Rejected] = []
        self.fail_next = 0  # how many of the next calls raise (the dead-letter database is down)

    async def __call__(self, rejected: Rejected) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("dead-letter database unreachable")
        self.calls.append(list(rejected))

    @property
    def lines(self) -> list[str]:
        return [line for call in self.calls for line, _ in call]


@dataclass
class Rig:
    store: Store
    spool: Spool
    writer: ScriptedWriter
    dead: DeadLetters
    dir: Path

    def files(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())

    def segment_lines(self) -> list[list[str]]:
        return [p.read_text().splitlines() for p in sorted(self.dir.glob("*.lp"))]


@pytest.fixture
def make_rig(tmp_path: Path, clock: Clock) -> Callable[..., Rig]:
    def make(
        *,
        max_bytes: int = 1 << 20,
        spool_dir: Path | None = None,
        retry_max_s: float = 30.0,
        spool_cls: type[Spool] = Spool,
    ) -> Rig:
        directory = spool_dir or tmp_path / "spool"
        spool = spool_cls(directory, max_bytes)
        writer = ScriptedWriter(clock)
        dead = DeadLetters()
        return Rig(Store(writer, spool, dead, retry_max_s=retry_max_s), spool, writer, dead, directory)

    return make


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


def batch(tag: str, n: int = 3) -> list[str]:
    return [
        f"manhole_cover,batch={tag},device_id=mh-{i:04d} tilt_deg={i}.5,seq={i}i {TS + i}" for i in range(n)
    ]


def body_size(lines: list[str]) -> int:
    return len(("\n".join(lines) + "\n").encode())


# ---- healthy path -----------------------------------------------------------------------------------


async def test_healthy_batches_are_written_in_order_and_never_touch_the_disk(rig: Rig) -> None:
    a, b, c = batch("a"), batch("b"), batch("c")
    for lines in (a, b, c):
        await rig.store.put(lines)
    assert rig.writer.written == a + b + c
    assert [at.lines for at in rig.writer.attempts] == [a, b, c]
    assert rig.files() == []
    assert rig.store.up and rig.store.spooled_segments == 0
    assert rig.dead.calls == []


async def test_an_empty_batch_is_not_sent(rig: Rig) -> None:
    await rig.store.put([])
    assert rig.writer.attempts == [] and rig.files() == []


# ---- transient failures: the spool ------------------------------------------------------------------


async def test_a_transient_failure_spools_the_batch_in_an_fsynced_segment(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod.os, "replace", replace)
    rig.writer.failing = UNAVAILABLE
    a, b = batch("a"), batch("b")

    await rig.store.put(a)  # returns: taken, though InfluxDB said 503

    d = os.path.realpath(rig.dir)
    seg0 = os.path.join(d, "0000000000000000")
    # file content on disk, then the rename, then the directory entry: a crash at any point loses nothing
    # that was acknowledged
    assert events == [("fsync", seg0 + ".tmp"), ("replace", seg0 + ".tmp", seg0 + ".lp"), ("fsync", d)]
    assert rig.files() == ["0000000000000000.lp"]
    assert (rig.dir / "0000000000000000.lp").read_text() == "\n".join(a) + "\n"
    assert not rig.store.up and rig.store.spooled_segments == 1
    assert rig.spool.bytes == body_size(a)

    await rig.store.put(b)  # within the back-off: straight to the spool, no request
    assert len(rig.writer.attempts) == 1
    assert rig.files() == ["0000000000000000.lp", "0000000000000001.lp"]
    assert rig.segment_lines() == [a, b]
    assert rig.writer.written == []


async def test_batches_go_behind_the_spool_even_after_influx_recovers(rig: Rig, clock: Clock) -> None:
    a, b, c = batch("a"), batch("b"), batch("c")
    rig.writer.failing = REFUSED
    await rig.store.put(a)
    rig.writer.failing = None
    clock.advance(3600)  # back-off long over: only the non-empty spool holds b back

    await rig.store.put(b)
    assert [at.lines for at in rig.writer.attempts] == [a], "b must not overtake a"
    assert rig.segment_lines() == [a, b]

    async with draining(rig.store):
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
        assert rig.writer.written == a + b
        await rig.store.put(c)  # spool empty again: written directly
    assert rig.writer.written == a + b + c
    assert [at.lines for at in rig.writer.attempts] == [a, a, b, c]
    assert rig.files() == [] and rig.store.up


async def test_drain_sends_many_segments_oldest_first_exactly_once(rig: Rig, clock: Clock) -> None:
    batches = [batch(f"b{i:02d}", n=5) for i in range(25)]  # more than 10: names must sort numerically
    rig.writer.failing = UNAVAILABLE
    for lines in batches:
        await rig.store.put(lines)
    assert rig.store.spooled_segments == 25
    rig.writer.failing = None
    clock.advance(3600)

    async with draining(rig.store):
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")

    everything = [line for lines in batches for line in lines]
    assert rig.writer.written == everything
    assert max(Counter(rig.writer.written).values()) == 1
    assert [at.lines for at in rig.writer.attempts[1:]] == batches  # one request per segment, in order
    assert rig.files() == [] and rig.spool.bytes == 0


async def test_a_batch_arriving_while_the_last_segment_is_in_flight_goes_behind_it(
    rig: Rig, clock: Clock
) -> None:
    a, b = batch("a"), batch("b")
    rig.writer.failing = UNAVAILABLE
    await rig.store.put(a)
    rig.writer.failing = None
    clock.advance(3600)
    rig.writer.gate = asyncio.Event()

    async with draining(rig.store):
        await wait_until(rig.writer.in_flight.is_set, "the drain to send segment a")
        await rig.store.put(b)  # a is still in the spool: b is spooled behind it, not sent past it
        assert rig.segment_lines() == [a, b]
        rig.writer.gate.set()
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.writer.written == a + b


async def test_a_partly_sent_segment_keeps_only_its_unsent_lines(rig: Rig, clock: Clock) -> None:
    lines = batch("a", n=8)
    rig.writer.failing = UNAVAILABLE
    await rig.store.put(lines)
    rig.writer.failing = None
    # the drain's first request is too large; of the halves, the first is written, the second times out
    rig.writer.script = [TOO_LARGE, OK, WriteResult(Outcome.RETRY, None, "timeout: ReadTimeout('')")]
    clock.advance(3600)

    async with draining(rig.store):
        await wait_until(lambda: len(rig.writer.attempts) == 4, "the three drain requests")
        await wait_until(lambda: rig.segment_lines() == [lines[4:]], "the segment to be cut to its rest")
        # the back-off is set just after the cut: move the clock only once it is
        await wait_until(lambda: rig.store._next_attempt > clock.now, "the drain to back off")
        assert rig.spool.bytes == body_size(lines[4:])
        assert rig.writer.written == lines[:4]
        clock.advance(3600)
        await wait_until(lambda: rig.store.spooled_segments == 0, "the rest to drain")
    assert rig.writer.written == lines  # nothing twice, nothing lost
    assert rig.dead.calls == []


# ---- back-off and Retry-After -------------------------------------------------------------------------


async def test_retry_after_is_honoured(rig: Rig, clock: Clock) -> None:
    a, b = batch("a"), batch("b")
    t0 = clock.now
    rig.writer.script = [WriteResult(Outcome.RETRY, 429, "too many requests", retry_after_s=30.0)]

    await rig.store.put(a)
    # the first back-off is 0.5 s ± 20 %: the server's 30 s wins
    assert rig.store._next_attempt == pytest.approx(t0 + 30.0)

    async with draining(rig.store):
        clock.now = t0 + 29.9
        await asyncio.sleep(0.03)  # real time: the drain loop runs many times, and must not send
        await rig.store.put(b)
        assert len(rig.writer.attempts) == 1, "sent before Retry-After ran out"
        assert rig.segment_lines() == [a, b]

        clock.now = t0 + 30.0
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")

    assert [at.at for at in rig.writer.attempts] == [t0, t0 + 30.0, t0 + 30.0]
    assert rig.writer.written == a + b
    # the drain re-checks the clock at least every second, so it never oversleeps a deadline
    assert clock.sleeps and max(clock.sleeps) <= 1.0


async def test_retry_after_is_capped_at_an_hour(rig: Rig, clock: Clock) -> None:
    t0 = clock.now
    rig.writer.script = [WriteResult(Outcome.RETRY, 503, "", retry_after_s=7 * 86400.0)]
    await rig.store.put(batch("a"))
    assert rig.store._next_attempt == pytest.approx(t0 + 3600.0)


async def test_transient_failures_back_off_exponentially_up_to_the_cap(
    make_rig: Callable[..., Rig], clock: Clock
) -> None:
    rig = make_rig(retry_max_s=8.0)
    a = batch("a")
    rig.writer.failing = REFUSED
    clock.auto = True

    async with draining(rig.store):
        await rig.store.put(a)
        await wait_until(lambda: len(rig.writer.attempts) >= 9, "nine attempts")
        times = [at.at for at in rig.writer.attempts[:9]]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        expected = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]  # doubling, then retry_max_s
        for gap, base in zip(gaps, expected, strict=True):
            assert base * 0.8 - 1e-6 <= gap <= base * 1.2 + 1e-6, (gaps, expected)
        assert rig.files() == ["0000000000000000.lp"] and rig.writer.written == []

        rig.writer.failing = None
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.writer.written == a
    assert rig.store.up and rig.store._failures == 0 and rig.store._next_attempt == 0.0


# ---- rejected points ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_index", [0, 537, 999])
async def test_one_bad_line_among_1000_is_dead_lettered_and_the_other_999_written(
    rig: Rig, bad_index: int
) -> None:
    lines = [f"streetlight,device_id=sl-{i:04d} power_w={i}.0,seq={i}i {TS + i}" for i in range(1000)]
    bad = lines[bad_index] = f"streetlight,device_id=sl-{bad_index:04d} power_w=abc {TS}"
    rig.writer.bad[bad] = bad_request(bad)

    await rig.store.put(lines)

    assert rig.dead.calls == [[(bad, f"400: {bad_request(bad).detail}")]]
    assert rig.writer.written == [line for line in lines if line != bad]
    # halving: one request for the whole batch, then two per level down to the single line
    assert len(rig.writer.attempts) <= 1 + 2 * 10
    assert rig.files() == [] and rig.store.up


async def test_the_drain_bisects_a_spooled_batch_with_a_bad_line(rig: Rig, clock: Clock) -> None:
    lines = batch("a", n=100)
    bad = lines[42]
    rig.writer.failing = UNAVAILABLE
    await rig.store.put(lines)
    rig.writer.failing = None
    rig.writer.bad[bad] = bad_request(bad)
    clock.advance(3600)

    async with draining(rig.store):
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.dead.lines == [bad]
    assert rig.writer.written == lines[:42] + lines[43:]


async def test_413_splits_the_batch_until_it_fits_and_everything_is_written(rig: Rig) -> None:
    lines = batch("a", n=1000)
    rig.writer.max_lines = 100
    await rig.store.put(lines)
    assert rig.writer.written == lines
    assert rig.dead.calls == [] and rig.files() == []
    assert all(len(at.lines) <= 100 for at in rig.writer.attempts if at.outcome is Outcome.OK)


async def test_a_single_line_too_large_for_influx_is_dead_lettered(rig: Rig) -> None:
    lines = batch("a", n=5)
    huge = lines[2] = f'access_control,device_id=ac-0001 note="{"x" * 5000}" {TS}'
    rig.writer.bad[huge] = TOO_LARGE
    await rig.store.put(lines)
    assert rig.dead.lines == [huge]
    assert rig.dead.calls[0][0][1].startswith("413: ")
    assert rig.writer.written == lines[:2] + lines[3:]


async def test_a_failing_dead_letter_sink_does_not_kill_the_drain(rig: Rig, clock: Clock) -> None:
    lines = batch("a", n=10)
    bad = lines[3]
    rig.writer.failing = UNAVAILABLE
    await rig.store.put(lines)
    rig.writer.failing = None
    rig.writer.bad[bad] = bad_request(bad)
    rig.dead.fail_next = 1  # PostgreSQL down just when the drain isolates the bad line
    clock.advance(3600)

    async with draining(rig.store) as task:
        await wait_until(lambda: rig.store._next_attempt > clock.now or task.done(), "the drain to back off")
        assert not task.done(), "drain_forever died: the spool would never drain again"
        assert rig.store.spooled_segments == 1  # the segment is kept: the bad line is not dead-lettered yet
        clock.advance(3600)
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.dead.lines == [bad]
    assert set(rig.writer.written) == set(lines) - {bad}  # resent good lines are idempotent in InfluxDB


# ---- configuration errors -----------------------------------------------------------------------------


async def test_a_config_error_keeps_the_data_in_the_spool(rig: Rig, clock: Clock) -> None:
    a, b = batch("a"), batch("b")
    rig.writer.failing = DB_NOT_FOUND
    await rig.store.put(a)
    await rig.store.put(b)
    clock.auto = True

    async with draining(rig.store):
        await wait_until(lambda: len(rig.writer.attempts) >= 6, "the drain to keep retrying")
        assert rig.segment_lines() == [a, b], "a 404 must not drop data"
        assert rig.dead.calls == [] and rig.writer.written == []
        assert not rig.store.up
        rig.writer.failing = None  # the operator fixed the database name / created it
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.writer.written == a + b


# ---- restarts and crashes -----------------------------------------------------------------------------


async def test_a_restarted_store_finds_the_segments_and_drains_them(
    make_rig: Callable[..., Rig], clock: Clock
) -> None:
    a, b, c = batch("a"), batch("b"), batch("c")
    first = make_rig()
    first.writer.failing = REFUSED
    await first.store.put(a)
    await first.store.put(b)
    # the process dies here: no drain ran, nothing was flushed beyond what put() did

    second = make_rig(spool_dir=first.dir)
    assert second.store.spooled_segments == 2
    assert second.spool.bytes == body_size(a) + body_size(b)
    await second.store.put(c)  # behind what the previous run left
    assert second.writer.attempts == []
    assert second.files() == ["0000000000000000.lp", "0000000000000001.lp", "0000000000000002.lp"]

    async with draining(second.store):
        await wait_until(lambda: second.store.spooled_segments == 0, "the spool to drain")
    assert second.writer.written == a + b + c
    assert second.files() == []


async def test_an_interrupted_append_is_cleaned_at_start(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    (d / "0000000000000002.lp").write_text("m,k=v x=1i 1\nm,k=v x=2i 2\n")
    (d / "0000000000000002.tmp").write_text("m,k=v x=2i 2\n")  # crash while cutting segment 2 down
    (d / "0000000000000003.tmp").write_text("m,k=v x=3i 3\nm,k=v x=")  # crash while appending 3

    rig = make_rig(spool_dir=d)
    assert rig.files() == ["0000000000000002.lp"]
    assert rig.store.spooled_segments == 1 and rig.spool.bytes == len("m,k=v x=1i 1\nm,k=v x=2i 2\n")

    async with draining(rig.store):
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.writer.written == ["m,k=v x=1i 1", "m,k=v x=2i 2"]  # the torn append was never acknowledged

    rig.writer.failing = REFUSED
    await rig.store.put(batch("a"))
    assert rig.files() == ["0000000000000003.lp"]  # numbering continues after the last segment seen


# ---- the spool bound ----------------------------------------------------------------------------------


async def test_a_full_spool_makes_put_wait_until_the_drain_makes_room(
    make_rig: Callable[..., Rig], clock: Clock
) -> None:
    a, b, c = batch("a"), batch("b"), batch("c")
    rig = make_rig(max_bytes=body_size(a) + body_size(b))
    rig.writer.failing = REFUSED
    await rig.store.put(a)
    await rig.store.put(b)

    put_c = asyncio.create_task(rig.store.put(c))
    await asyncio.sleep(0.05)
    assert not put_c.done(), "put() must wait while the spool is full (not drop, not raise)"
    assert rig.segment_lines() == [a, b]

    rig.writer.failing = None
    clock.advance(3600)
    async with draining(rig.store):
        await asyncio.wait_for(put_c, timeout=3)  # returns None: taken
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.writer.written == a + b + c


class _RacySpool(Spool):
    """append() that, having found the spool full, lets the drain make room and signal it before raising:
    the interleaving of a real append thread with the drain, made certain."""

    store: Store | None = None

    def append(self, body: bytes) -> None:
        if self.store is not None and not self.has_room(len(body)):
            deadline = time.monotonic() + 2.0
            while not self.store._room.is_set() and time.monotonic() < deadline:
                time.sleep(0.001)
            raise SpoolFullError("full when looked at")
        super().append(body)


async def test_room_made_while_put_finds_the_spool_full_is_not_missed(
    make_rig: Callable[..., Rig], clock: Clock
) -> None:
    a, b = batch("a"), batch("b")
    rig = make_rig(max_bytes=body_size(a), spool_cls=_RacySpool)
    assert isinstance(rig.spool, _RacySpool)
    rig.writer.failing = REFUSED
    await rig.store.put(a)  # the spool is now full
    rig.writer.failing = None
    clock.advance(3600)
    rig.spool.store = rig.store

    put_b = asyncio.create_task(rig.store.put(b))
    await asyncio.sleep(0.01)
    async with draining(rig.store):
        # the drain sends a, pops it (the spool is now empty) and signals room while put(b) is still
        # in its failed append; if put(b) then clears that signal it waits for ever
        await asyncio.wait_for(put_b, timeout=2)
        await wait_until(lambda: rig.store.spooled_segments == 0, "the spool to drain")
    assert rig.writer.written == a + b
