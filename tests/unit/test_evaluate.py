"""The rules stage without processes: the worker-side hand-off, the rules runner (reload, snapshot,
alarms) and the alarms table, with controlled time and a SQLite file."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
from pathlib import Path
from typing import Any

import pytest

from gateway.alarms import AlarmStore
from gateway.db import make_engine, migrate
from gateway.evaluate import RulesFeeder, RulesRunner, pack, unpack
from gateway.messages import Reading
from gateway.registry import DeviceInfo
from gateway.settings import Settings
from rules.model import observation_of

T0 = 1_800_000_000_000


def _cover(lifecycle: str = "in_service") -> DeviceInfo:
    from types import MappingProxyType

    return DeviceInfo(
        device_id="mh-0001",
        device_type="manhole_cover",
        community="110101001001",
        grid_code="110101001001001",
        district=None,
        street=None,
        building=None,
        responsible_unit=None,
        lifecycle=lifecycle,
        attributes=MappingProxyType({"tilt_baseline_deg": 0.0}),
    )


def _tilt(deg: float, seq: int, ts: int, lifecycle: str = "in_service") -> Reading:
    return Reading(_cover(lifecycle), "telemetry", ts, {"tilt_deg": deg}, seq=seq, received_ms=ts)


def test_packed_readings_pickle_and_unpack_to_the_observation_of_the_reading() -> None:
    r = _tilt(15.0, 1, T0)
    (packed,) = pickle.loads(pickle.dumps(pack([r])))
    assert unpack(packed) == observation_of(r)


async def test_the_feeder_never_drops_and_holds_the_writer_only_past_its_bound() -> None:
    q: queue.Queue[Any] = queue.Queue(maxsize=1)
    feeder = RulesFeeder(q, max_pending_batches=2, retry_s=0.001)
    assert feeder([_tilt(1, 1, T0)]) is None  # straight into the queue
    assert feeder([_tilt(1, 2, T0 + 1)]) is None  # queue full: waits in the worker
    assert feeder.backlog == 1
    hold = feeder([_tilt(1, 3, T0 + 2)])
    assert hold is not None  # past the bound: the writer waits for room
    task = asyncio.create_task(feeder.run())
    got = []
    waiter = asyncio.ensure_future(hold)
    while len(got) < 3:
        try:
            got.extend(unpack(t).seq for t in q.get_nowait())
        except queue.Empty:
            await asyncio.sleep(0.001)
    await waiter
    assert got == [1, 2, 3] and feeder.backlog == 0
    task.cancel()


@pytest.fixture
def runner_for(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    migrate(url)
    engine = make_engine(url)

    def make(**settings: Any) -> RulesRunner:
        s = Settings(
            database_url=url,
            rules_state_path=tmp_path / "state.json",
            **settings,
        )
        return RulesRunner(s, AlarmStore(engine))

    yield make
    engine.dispose()


def test_alarms_are_upserted_while_open_and_closed_on_clear(runner_for: Any) -> None:
    runner = runner_for()
    store = runner.store
    runner.process(pack([_tilt(15, 1, T0), _tilt(15, 2, T0 + 1000)]))
    (row,) = store.list(open_only=True)
    assert (row.rule_id, row.alarm_key, row.urgency, row.change) == (
        "manhole_cover.tilt",
        "mh-0001",
        "P2",
        "opened",
    )
    runner.process(pack([_tilt(120, 3, T0 + 2000)]))  # flipped over: escalates the same row
    (row,) = store.list(open_only=True)
    assert (row.urgency, row.change) == ("P1", "escalated")
    runner.process(pack([_tilt(1, 4, T0 + 3000)]))
    assert store.list(open_only=True) == []
    (row,) = store.list()
    assert row.state == "cleared" and row.cleared_at is not None
    runner.process(pack([_tilt(15, 5, T0 + 4000), _tilt(15, 6, T0 + 5000)]))  # a new occurrence: a new row
    assert [r.state for r in store.list()] == ["open", "cleared"]


def test_a_device_being_commissioned_marks_its_alarm_as_commissioning_noise(runner_for: Any) -> None:
    runner = runner_for()
    runner.process(pack([_tilt(15, 1, T0, "online"), _tilt(15, 2, T0 + 1000, "online")]))
    (row,) = runner.store.list()
    assert row.commissioning_noise is True


def test_the_snapshot_is_saved_atomically_and_restored(runner_for: Any, tmp_path: Path) -> None:
    runner = runner_for()
    runner.process(pack([_tilt(15, 1, T0)]))  # one of the two consecutive readings
    runner.save()
    assert not (tmp_path / "state.json.tmp").exists()
    again = runner_for()
    again.restore()
    again.process(pack([_tilt(15, 2, T0 + 1000)]))  # the second one, after the "restart"
    assert [r.rule_id for r in again.store.list(open_only=True)] == ["manhole_cover.tilt"]


def test_an_unreadable_snapshot_is_set_aside_and_the_engine_starts_empty(
    runner_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state.json").write_text("{not json")
    runner = runner_for()
    with caplog.at_level(logging.ERROR):
        runner.restore()
    assert "rules_state_unreadable" in caplog.text
    assert (tmp_path / "state.json.bad").exists()


def test_changed_rule_files_are_reloaded_and_a_bad_edit_keeps_the_old_rules(
    runner_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("overrides:\n  device:\n    mh-0001:\n      manhole_cover.tilt: {consecutive: 1}\n")
    runner = runner_for(rules_dirs=str(site))
    assert not runner.reload_if_changed(T0)

    site.write_text("overrides:\n  device:\n    mh-0001:\n      manhole_cover.tilt: {consecutive: oops}\n")
    os.utime(site, ns=(1, 1))
    with caplog.at_level(logging.INFO):
        assert not runner.reload_if_changed(T0)
    (failed,) = [r for r in caplog.records if r.getMessage() == "rules_reload_failed"]
    assert failed.file == str(site) and failed.rule == "manhole_cover.tilt"  # type: ignore[attr-defined]
    runner.process(pack([_tilt(15, 1, T0)]))  # the old rules still apply: one reading is enough
    assert len(runner.store.list(open_only=True)) == 1

    site.write_text("overrides:\n  device:\n    mh-0001:\n      manhole_cover.tilt: {enabled: false}\n")
    os.utime(site, ns=(2, 2))
    with caplog.at_level(logging.INFO):
        assert runner.reload_if_changed(T0 + 1000)
    assert "rules_reloaded" in caplog.text
