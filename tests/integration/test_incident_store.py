"""The incident store against a real SQLite file and a real PostgreSQL: lifecycle, history, outbox."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from gateway.db import incident_history, incidents, make_engine, migrate, outbox
from gateway.incident_store import IncidentStore
from gateway.registry import RegisteredDevice
from rules.model import Evidence, Verdict

#: Saturday 2026-11-21 15:30 in UTC+8
NOW = dt.datetime(2026, 11, 21, 7, 30, tzinfo=dt.UTC)
EP1, EP2 = "https://cases.example/hook", "https://centre.example/hook"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    name = ""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'incidents.db'}"
    else:
        postgres = request.getfixturevalue("postgres")
        name = f"inc_{uuid.uuid4().hex[:12]}"
        url = postgres.create_database(name)
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()
    if name and postgres.is_running():
        postgres.drop_database(name)


@pytest.fixture
def store(engine: Engine) -> IncidentStore:
    return IncidentStore(engine, [EP1, EP2], instance="test")


def device(device_id: str = "mc-001", lifecycle: str = "in_service") -> RegisteredDevice:
    return RegisteredDevice(
        device_id=device_id,
        device_type="manhole_cover",
        community="110101001001",
        grid_code="110101001001001",
        district="110101",
        street="110101001",
        building="3",
        address="东城区某街 1 号",
        lat=39.9,
        lon=116.4,
        responsible_unit="北京燃气集团",
        component_code="1101010111000001",
        attributes=MappingProxyType({}),
        lifecycle=lifecycle,
        created_at=NOW,
        updated_at=NOW,
        version=1,
    )


def verdict(state: str = "firing", device_id: str = "mc-001", tilt: float = 14.2, **kw: Any) -> Verdict:
    ms = int(NOW.timestamp() * 1000)
    return Verdict(
        rule_id="manhole_cover.tilt",
        key=device_id,
        device_id=device_id,
        device_type="manhole_cover",
        state=state,  # type: ignore[arg-type]
        change=kw.pop("change", "cleared" if state == "cleared" else "opened"),
        urgency=kw.pop("urgency", "P2"),
        evidence=Evidence(ms, {"tilt_deg": tilt}, "> 10"),
        message_zh=f"井盖倾斜：tilt_deg={tilt}",
        message_en=f"Manhole cover tilted: tilt_deg={tilt}",
        since_ms=ms,
        community="110101001001",
        grid_code="110101001001001",
        **kw,
    )


def at(minutes: int) -> dt.datetime:
    return NOW + dt.timedelta(minutes=minutes)


def test_open_update_resolve_writes_history_and_ordered_outbox(store: IncidentStore) -> None:
    inc, ev = store.apply(verdict(), device(), at(0)) or pytest.fail("no change")
    assert (inc.incident_id, ev) == ("INC-20261121-000001", "sc.incident.opened")
    _, ev = (
        store.apply(verdict(change="repeated", occurrences=2, urgency="P1"), device(), at(1)) or pytest.fail()
    )
    assert ev == "sc.incident.updated"
    _, ev = store.apply(verdict("cleared", tilt=2.0), device(), at(2), actor="device:mc-001") or pytest.fail()
    assert ev == "sc.incident.resolved"

    stored = store.get(inc.incident_id)
    assert stored is not None and stored.status == "resolved" and stored.urgency == "P1"
    assert stored.resolved_at == at(2)
    hist = store.history(inc.incident_id)
    assert [h.event_type for h in hist] == ["opened", "updated", "resolved"]
    assert [h.actor for h in hist] == ["rule:manhole_cover.tilt"] * 2 + ["device:mc-001"]
    assert hist[0].change["incident_id"] == inc.incident_id
    assert hist[1].change["urgency"] == ["P2", "P1"]

    rows = store.outbox_rows(inc.incident_id)
    assert len({r.event_id for r in rows}) == 6
    for endpoint in (EP1, EP2):
        mine = [r for r in rows if r.endpoint == endpoint]
        assert [(r.seq, r.event_type) for r in mine] == [
            (1, "sc.incident.opened"),
            (2, "sc.incident.updated"),
            (3, "sc.incident.resolved"),
        ]
        for r in mine:
            body = json.loads(r.body)
            assert body["id"] == r.event_id and body["type"] == r.event_type
            assert body["subject"] == inc.incident_id and body["source"] == "urn:sc-gateway:test"
            assert r.state == "pending" and r.attempts == 0
    assert store.open_incidents() == []


def test_one_open_incident_per_dedup_key(store: IncidentStore, engine: Engine) -> None:
    first, _ = store.apply(verdict(), device(), at(0)) or pytest.fail()
    again, ev = store.apply(verdict(), device(), at(1)) or pytest.fail()
    assert again.incident_id == first.incident_id and ev == "sc.incident.updated"
    with engine.connect() as conn:
        n_open = conn.execute(select(func.count()).select_from(incidents).where(incidents.c.status == "open"))
        assert n_open.scalar() == 1
    assert [i.incident_id for i in store.open_incidents()] == [first.incident_id]
    # after a resolve, the next firing opens a new incident with the next id
    store.apply(verdict("cleared"), device(), at(2))
    reopened, ev = store.apply(verdict(), device(), at(3)) or pytest.fail()
    assert ev == "sc.incident.opened" and reopened.incident_id == "INC-20261121-000002"
    assert store.apply(verdict("cleared", device_id="other"), device("other"), at(4)) is None


def test_ids_count_per_local_date(store: IncidentStore) -> None:
    ids = [
        (store.apply(verdict(device_id=f"mc-{n}"), device(f"mc-{n}"), at(n)) or pytest.fail())[0].incident_id
        for n in range(3)
    ]
    assert ids == ["INC-20261121-000001", "INC-20261121-000002", "INC-20261121-000003"]
    # 16:00 UTC is midnight in UTC+8: a new local day starts at 1 again
    nxt = store.apply(
        verdict(device_id="mc-x"), device("mc-x"), dt.datetime(2026, 11, 21, 16, 0, tzinfo=dt.UTC)
    )
    assert nxt is not None and nxt[0].incident_id == "INC-20261122-000001"


def test_commissioning_incidents_have_history_but_no_outbox(store: IncidentStore) -> None:
    inc, _ = store.apply(verdict(), device(lifecycle="online"), at(0)) or pytest.fail()
    store.apply(verdict("cleared"), device(lifecycle="online"), at(1))
    stored = store.get(inc.incident_id)
    assert inc.commissioning and stored is not None and stored.commissioning
    assert [h.event_type for h in store.history(inc.incident_id)] == ["opened", "resolved"]
    assert store.outbox_rows(inc.incident_id) == []
    assert store.pending_outbox(EP1, now=at(5)) == []


def test_a_crash_inside_the_transaction_leaves_nothing(
    store: IncidentStore, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    inc, _ = store.apply(verdict(), device(), at(0)) or pytest.fail()

    def crash(*_: Any) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(IncidentStore, "_enqueue", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        store.apply(verdict("cleared"), device(), at(1))
    with pytest.raises(RuntimeError, match="power cut"):
        store.apply(verdict(device_id="mc-002"), device("mc-002"), at(1))
    monkeypatch.undo()

    stored = store.get(inc.incident_id)
    assert stored is not None and stored.status == "open"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(incidents)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(incident_history)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(outbox)).scalar() == 2
    # the id given out inside the rolled-back transaction is given out again
    nxt, _ = store.apply(verdict(device_id="mc-002"), device("mc-002"), at(2)) or pytest.fail()
    assert nxt.incident_id == "INC-20261121-000002"


def test_pending_outbox_gives_only_the_head_of_each_incident(store: IncidentStore) -> None:
    a, _ = store.apply(verdict(device_id="a"), device("a"), at(0)) or pytest.fail()
    b, _ = store.apply(verdict(device_id="b"), device("b"), at(1)) or pytest.fail()
    store.apply(verdict(device_id="a", occurrences=2), device("a"), at(2))
    store.apply(verdict("cleared", device_id="a"), device("a"), at(3))

    heads = store.pending_outbox(EP1, now=at(10))
    assert [(r.incident_id, r.event_type) for r in heads] == [
        (a.incident_id, "sc.incident.opened"),
        (b.incident_id, "sc.incident.opened"),
    ]
    # a retry not yet due holds the incident back, and its later events with it
    assert store.mark_retry(heads[0].id, at(30), 503, "unavailable")
    assert [r.incident_id for r in store.pending_outbox(EP1, now=at(10))] == [b.incident_id]
    retried = store.pending_outbox(EP1, now=at(30))[0]
    assert retried.event_id == heads[0].event_id and retried.attempts == 1 and retried.last_status == 503
    # delivered: the next event of the incident becomes the head
    assert store.mark_delivered(retried.id, 200, now=at(30))
    assert [(r.incident_id, r.event_type) for r in store.pending_outbox(EP1, now=at(30))] == [
        (b.incident_id, "sc.incident.opened"),
        (a.incident_id, "sc.incident.updated"),
    ]
    # the other endpoint is independent
    assert len(store.pending_outbox(EP2, now=at(10))) == 2
    # exhausted: kept as failed and holds the incident's later events back
    assert store.mark_failed(store.pending_outbox(EP1, limit=1, now=at(30))[0].id, 500, "boom")
    assert [r.incident_id for r in store.pending_outbox(EP1, now=at(30))] == [a.incident_id]
    # 410: the endpoint is disabled
    assert store.disable_endpoint(EP2) == 4
    assert store.pending_outbox(EP2, now=at(30)) == []
    assert {r.state for r in store.outbox_rows(b.incident_id) if r.endpoint == EP2} == {"disabled"}
