"""The registry, dead letters and device state against real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
import io
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, text

from gateway.db import current_revision, head_revision, make_engine, metadata, migrate, require_current_schema
from gateway.deadletter import DeadLetter, DeadLetterStore, DeviceStateStore, OnlineCounts, StatusUpdate
from gateway.incident_store import IncidentStore
from gateway.registry import (
    DEVICE_TYPES,
    DeviceExistsError,
    DeviceNotFoundError,
    DeviceRecord,
    Registry,
    RegistryCache,
)

T0 = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)
HEADER = ["device_id", "device_type", "community", "grid_code", "building", "lat", "lon", "attr.bay_kind"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh database in the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    postgres = request.getfixturevalue("postgres")
    name = f"reg_{uuid.uuid4().hex[:12]}"
    url: str = postgres.create_database(name)
    yield url
    if postgres.is_running():
        postgres.drop_database(name)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrate(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def registry(engine: Engine) -> Registry:
    return Registry(engine)


def record(device_id: str, **changes: Any) -> DeviceRecord:
    data: dict[str, Any] = {
        "device_id": device_id,
        "device_type": "parking_sensor",
        "community": "东华门社区",
        "grid_code": "110101001001001",
        **changes,
    }
    return DeviceRecord.model_validate(data)


def csv_text(rows: list[list[Any]], header: list[str] = HEADER) -> io.StringIO:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    buf.seek(0)
    return buf


def count_statements(engine: Engine) -> list[str]:
    statements: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    return statements


# ---------------------------------------------------------------------------------------------
# Schema


def test_migrate_twice_is_a_no_op_and_the_schema_matches_the_tables(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        Registry(engine).add(record("pk-1"))
        migrate(db_url)
        assert current_revision(engine) == head_revision()
        require_current_schema(engine)
        assert Registry(engine).get("pk-1") is not None
        assert Registry(engine).current_version() == 1
        with engine.connect() as conn:
            # The migration scripts and gateway.db describe the same schema.
            assert (
                compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
                == []
            )
    finally:
        engine.dispose()


def test_migration_0008_fills_the_incident_place_columns_from_the_json(db_url: str) -> None:
    """Incidents opened before 0008 get their district, street, grid, building and device columns from
    their JSON, so filters, counts and street/district scopes find them after the upgrade."""
    migrate(db_url, revision="0007_users")
    engine = make_engine(db_url)
    try:
        table = sa.table(
            "incidents",
            *(sa.column(c) for c in ("incident_id", "dedup_key", "rule_id", "status", "urgency")),
            sa.column("commissioning", sa.Boolean()),
            sa.column("community"),
            sa.column("data", sa.JSON()),
            sa.column("opened_at", sa.DateTime(timezone=True)),
            sa.column("updated_at", sa.DateTime(timezone=True)),
        )
        place = {"district": "东城区", "street": "东华门街道", "community": "东华门社区"}
        rows = [
            ("INC-20261121-000001", {"id": "mc-1", "type": "manhole_cover"}, {**place, "grid_code": "g1"}),
            ("INC-20261121-000002", {"id": None, "type": "streetlight"}, {**place, "building": "3号楼"}),
        ]
        with engine.begin() as conn:
            for incident_id, device, location in rows:
                conn.execute(
                    sa.insert(table).values(
                        incident_id=incident_id,
                        dedup_key=incident_id,
                        rule_id="r",
                        status="open",
                        urgency="P2",
                        commissioning=False,
                        community=place["community"],
                        data={
                            "incident_id": incident_id,
                            "device": device,
                            "location": location,
                            "acknowledged_at": "2026-11-21T08:05:00Z" if device["id"] else None,
                        },
                        opened_at=T0,
                        updated_at=T0,
                    )
                )
        migrate(db_url)
        with engine.connect() as conn:
            got = conn.execute(
                text(
                    "SELECT incident_id, district, street, grid_code, building, device_id, device_type "
                    "FROM incidents ORDER BY incident_id"
                )
            ).all()
        assert [tuple(r) for r in got] == [
            ("INC-20261121-000001", "东城区", "东华门街道", "g1", None, "mc-1", "manhole_cover"),
            ("INC-20261121-000002", "东城区", "东华门街道", None, "3号楼", None, "streetlight"),
        ]
        store = IncidentStore(engine, [])
        counts = store.open_counts(["device_type"])
        assert sorted(counts) == [(("manhole_cover",), "P2", 1), (("streetlight",), "P2", 1)]
        states = store.status_counts(["device_type"], resolved_since=T0)
        assert sorted(states) == [
            (("manhole_cover",), "acknowledged", 1),
            (("streetlight",), "unacknowledged", 1),
        ]
    finally:
        engine.dispose()


def test_sqlite_engine_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'dir' / 'r.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Registry


def test_add_and_get(registry: Registry) -> None:
    registry.add(
        record(
            "mh-0001",
            device_type="manhole_cover",
            district="东城区",
            street="东华门街道",
            building="3",
            responsible_unit="自来水公司",
            component_code="3205080101000001",
            lat=39.91,
            attributes={"owner_class": "0101", "depth_cm": 180},
        )
    )
    info = registry.get("mh-0001")
    assert info is not None
    assert (info.device_type, info.community, info.grid_code, info.lifecycle) == (
        "manhole_cover",
        "东华门社区",
        "110101001001001",
        "registered",
    )
    assert (info.district, info.street, info.building, info.responsible_unit) == (
        "东城区",
        "东华门街道",
        "3",
        "自来水公司",
    )
    assert info.component_code == "3205080101000001"
    assert dict(info.attributes) == {"owner_class": "0101", "depth_cm": 180.0}
    assert registry.get("nope") is None

    device = registry.describe("mh-0001")
    assert device is not None
    assert device.created_at.tzinfo == dt.UTC and device.updated_at == device.created_at
    assert device.lat == pytest.approx(39.91) and device.lon is None
    assert device.version == registry.current_version() == 1


def test_duplicate_add_is_an_error_and_changes_nothing(registry: Registry) -> None:
    registry.add(record("pk-1"))
    with pytest.raises(DeviceExistsError, match="pk-1"):
        registry.add(record("pk-1", community="elsewhere"))
    info = registry.get("pk-1")
    assert info is not None and info.community == "东华门社区"
    assert registry.current_version() == 1


def test_list_filters(registry: Registry) -> None:
    registry.upsert_many(
        [
            record("a-1", device_type="streetlight"),
            record("a-2", community="other"),
            record("a-3"),
        ]
    )
    assert [d.device_id for d in registry.list()] == ["a-1", "a-2", "a-3"]
    assert [d.device_id for d in registry.list(device_type="parking_sensor")] == ["a-2", "a-3"]
    assert [d.device_id for d in registry.list(community="other")] == ["a-2"]
    assert [d.device_id for d in registry.list(limit=1, offset=1)] == ["a-2"]
    assert registry.count() == 3


def test_import_with_good_and_bad_rows(registry: Registry) -> None:
    registry.add(record("pk-0", building="old"))
    report = registry.import_csv(
        csv_text(
            [
                ["pk-0", "parking_sensor", "东华门社区", "110101001001001", "new", "", "", ""],
                [
                    "pk-1",
                    "parking_sensor",
                    "东华门社区",
                    "110101001001001",
                    "B1",
                    "39.9",
                    "116.4",
                    "fire_lane",
                ],
                ["pk-2", "parking_sensr", "东华门社区", "110101001001001", "", "", "", ""],
                ["pk-3", "parking_sensor", "东华门社区", "12345", "", "", "", ""],
                ["pk-1", "parking_sensor", "东华门社区", "110101001001001", "B2", "", "", ""],
                ["pk-4", "smoke_detector", "东华门社区", "11010100100101", "B4", "", "", ""],
            ]
        )
    )
    outcomes = [(r.row, r.device_id, r.outcome) for r in report.rows]
    assert outcomes == [
        (2, "pk-0", "updated"),
        (3, "pk-1", "created"),
        (4, "pk-2", "error"),
        (5, "pk-3", "error"),
        (6, "pk-1", "error"),
        (7, "pk-4", "created"),
    ]
    errors = {r.row: r.error for r in report.errors}
    assert "device_type" in str(errors[4]) and "grid_code" in str(errors[5]) and "duplicate" in str(errors[6])
    assert report.version == registry.current_version() == 2  # one batch: one version for all its changes

    pk1 = registry.describe("pk-1")
    assert pk1 is not None and pk1.building == "B1" and dict(pk1.attributes) == {"bay_kind": "fire_lane"}
    pk0 = registry.describe("pk-0")
    assert pk0 is not None and pk0.building == "new" and pk0.lifecycle == "registered"
    assert registry.get("pk-2") is None and registry.get("pk-3") is None


def test_reimport_unchanged_does_not_bump_the_version(registry: Registry) -> None:
    rows = [
        [f"pk-{i}", "parking_sensor", "东华门社区", "110101001001001", "B1", "39.9", "116.4", "normal"]
        for i in range(25)
    ]
    first = registry.import_csv(csv_text(rows), batch_size=10)
    assert first.counts["created"] == 25
    version = registry.current_version()
    assert version == 3  # three batches

    again = registry.import_csv(csv_text(rows), batch_size=10)
    assert again.counts == {"created": 0, "updated": 0, "unchanged": 25, "error": 0}
    assert registry.current_version() == version
    assert registry.changed_since(version) == []

    rows[7][4] = "B2"
    rows[8][7] = ""  # attribute removed
    changed = registry.import_csv(csv_text(rows), batch_size=10)
    assert changed.counts == {"created": 0, "updated": 2, "unchanged": 23, "error": 0}
    assert registry.current_version() == version + 1
    assert sorted(i.device_id for i in registry.changed_since(version)) == ["pk-7", "pk-8"]
    pk8 = registry.get("pk-8")
    assert pk8 is not None and dict(pk8.attributes) == {}


def test_dry_run_reports_and_writes_nothing(registry: Registry) -> None:
    registry.add(record("pk-1"))
    report = registry.import_csv(
        csv_text(
            [
                ["pk-1", "parking_sensor", "东华门社区", "110101001001001", "", "", "", ""],
                ["pk-2", "parking_sensor", "东华门社区", "110101001001001", "", "", "", ""],
            ]
        ),
        dry_run=True,
    )
    assert [r.outcome for r in report.rows] == ["unchanged", "created"]
    assert report.dry_run and report.version is None
    assert registry.get("pk-2") is None and registry.current_version() == 1


def test_progress_is_reported_per_batch(registry: Registry) -> None:
    calls: list[tuple[int, int]] = []
    registry.upsert_many(
        [record(f"d-{i}") for i in range(5)], batch_size=2, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_set_lifecycle(registry: Registry) -> None:
    registry.add(record("pk-1"))
    assert registry.set_lifecycle("pk-1", "disabled") is True
    assert registry.set_lifecycle("pk-1", "disabled") is False
    assert registry.current_version() == 2
    info = registry.get("pk-1")
    assert info is not None and info.lifecycle == "disabled" and not info.active
    with pytest.raises(DeviceNotFoundError):
        registry.set_lifecycle("nope", "retired")
    with pytest.raises(ValueError, match="unknown lifecycle"):
        registry.set_lifecycle("pk-1", "broken")  # type: ignore[arg-type]


def test_mark_online_moves_only_registered_devices(engine: Engine, registry: Registry) -> None:
    registry.upsert_many([record("a"), record("b"), record("c")])
    registry.set_lifecycle("c", "disabled")
    version = registry.current_version()
    states = DeviceStateStore(engine)
    assert states.mark_online(["a", "c", "unknown"]) == ["a"]
    assert registry.current_version() == version + 1
    assert [i.device_id for i in registry.changed_since(version)] == ["a"]
    a, c = registry.get("a"), registry.get("c")
    assert a is not None and a.lifecycle == "online"
    assert c is not None and c.lifecycle == "disabled"

    statements = count_statements(engine)
    assert states.mark_online(["a", "c"]) == []
    assert [s.split()[0] for s in statements if not s.startswith("BEGIN")] == ["SELECT"]  # no lock taken
    assert registry.current_version() == version + 1


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_refresh_picks_up_added_moved_and_disabled_devices(engine: Engine, registry: Registry) -> None:
    registry.upsert_many([record("stay"), record("move"), record("disable")])
    cache = RegistryCache(registry)
    assert cache.load() == 3 and cache.version == 1
    assert cache.refresh() == 0

    registry.add(record("new", device_type="smoke_detector", building="7"))
    registry.upsert_many([record("move", community="西华门社区", grid_code="110101001002003")])
    registry.set_lifecycle("disable", "disabled")

    assert cache.refresh() == 3
    assert cache.version == registry.current_version() == 4
    new, moved, disabled = cache.get("new"), cache.get("move"), cache.get("disable")
    assert new is not None and new.device_type == "smoke_detector" and new.building == "7"
    assert moved is not None and (moved.community, moved.grid_code) == ("西华门社区", "110101001002003")
    assert disabled is not None and disabled.lifecycle == "disabled" and not disabled.active
    assert cache.get("stay") is not None and len(cache) == 4 and "new" in cache

    statements = count_statements(engine)
    assert cache.refresh() == 0
    queries = [s for s in statements if not s.startswith("BEGIN")]  # SQLite's BEGIN is sent as a statement
    assert len(queries) == 1 and "registry_version" in queries[0]


def test_cache_accepts_an_engine_and_loads_on_first_refresh(engine: Engine, registry: Registry) -> None:
    registry.add(record("pk-1"))
    cache = RegistryCache(engine)
    assert cache.version is None and cache.get("pk-1") is None
    assert cache.refresh() == 1
    assert cache.get("pk-1") is not None
    assert dict(cache.snapshot()).keys() == {"pk-1"}


def test_cache_reloads_when_the_database_went_back(engine: Engine, registry: Registry) -> None:
    registry.upsert_many([record("a"), record("b")])
    cache = RegistryCache(registry)
    cache.load()
    with engine.begin() as conn:  # as if restored from an older backup
        conn.execute(text("DELETE FROM devices WHERE device_id = 'b'"))
        conn.execute(text("UPDATE registry_version SET version = 0"))
    assert cache.refresh() == 1
    assert cache.get("b") is None and cache.get("a") is not None


def test_concurrent_writers_and_a_refreshing_cache_stay_consistent(
    engine: Engine, registry: Registry
) -> None:
    cache = RegistryCache(registry)
    cache.load()
    errors: list[BaseException] = []

    def writer(prefix: str) -> None:
        try:
            for i in range(10):
                registry.add(record(f"{prefix}-{i}"))
                registry.upsert_many([record(f"{prefix}-{i}", building=str(i))])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def refresher(stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                cache.refresh()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(p,)) for p in ("x", "y", "z")]
    poller = threading.Thread(target=refresher, args=(stop,))
    poller.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    poller.join()
    assert errors == []
    assert registry.current_version() == 60  # every change got its own version, none lost
    cache.refresh()
    assert len(cache) == 30
    assert all(info.building == info.device_id.split("-")[1] for info in cache.snapshot().values())


# ---------------------------------------------------------------------------------------------
# Dead letters


def letter(minute: int, reason: str, device_id: str | None, payload: bytes = b"{}", **kw: Any) -> DeadLetter:
    device_type = kw.pop("device_type", "parking_sensor")
    return DeadLetter(
        received_at=T0 + dt.timedelta(minutes=minute),
        topic=kw.pop("topic", f"sc/v1/{device_type}/{device_id}/telemetry"),
        device_id=device_id,
        device_type=device_type,
        reason=reason,
        detail=kw.pop("detail", f"{reason} for {device_id}"),
        payload=payload,
    )


def test_dead_letters_add_count_recent_with_truncation(engine: Engine) -> None:
    store = DeadLetterStore(engine, max_payload_bytes=100)
    big = b'{"x": "' + b"a" * 1000 + b'"}'
    assert store.add_many([]) == 0
    assert (
        store.add_many(
            [
                letter(0, "unknown_field", "pk-1", big),
                letter(1, "unknown_field", "pk-2"),
                letter(2, "out_of_range", "pk-1"),
                letter(3, "not_json", None, b"\xff\xfe binary", topic="sc/v1/x", device_type=None),
                letter(
                    4, "bad_topic", "x" * 300, detail="nul \x00 and a lone \udcff surrogate", topic="t" * 1000
                ),
            ]
        )
        == 5
    )

    assert store.count_by_reason() == {"unknown_field": 2, "out_of_range": 1, "not_json": 1, "bad_topic": 1}
    assert store.count_by_reason(since=T0 + dt.timedelta(minutes=2)) == {
        "out_of_range": 1,
        "not_json": 1,
        "bad_topic": 1,
    }

    newest = store.recent(limit=2)
    assert [d.reason for d in newest] == ["bad_topic", "not_json"]
    hostile = newest[0]
    assert len(hostile.topic) == 512 and hostile.device_id is not None and len(hostile.device_id) == 128
    assert "\x00" not in hostile.detail and "nul" in hostile.detail

    first = store.recent(reason="unknown_field", device_id="pk-1")
    assert len(first) == 1
    assert first[0].payload == big[:100] and first[0].payload_size == len(big) and first[0].truncated
    assert first[0].received_at == T0
    assert first[0].as_dict()["payload"] == big[:100].decode()
    binary = store.recent(reason="not_json")[0]
    assert binary.as_dict()["payload"] is None and not binary.truncated
    assert [d.reason for d in store.recent(device_id="pk-1")] == ["out_of_range", "unknown_field"]

    assert store.prune(T0 + dt.timedelta(minutes=2)) == 2
    assert sum(store.count_by_reason().values()) == 3


def test_unknown_devices_lists_unregistered_publishers(engine: Engine, registry: Registry) -> None:
    registry.add(record("registered-now"))
    store = DeadLetterStore(engine, max_payload_bytes=4096)
    store.add_many(
        [
            letter(0, "unregistered_device", "ghost-1", b'{"occupied": true}'),
            letter(5, "unregistered_device", "ghost-1", b'{"occupied": false}'),
            letter(3, "unregistered_device", "ghost-1", b'{"occupied": null}'),
            letter(1, "unregistered_device", "ghost-2", b'{"alarm": false}', device_type="smoke_detector"),
            letter(2, "unregistered_device", "registered-now"),  # registered since: not listed
            letter(4, "unknown_field", "ghost-3"),  # another reason: not listed
        ]
    )
    found = store.unknown_devices()
    assert [(u.device_id, u.count) for u in found] == [("ghost-1", 3), ("ghost-2", 1)]
    ghost1 = found[0]
    assert ghost1.last_payload == b'{"occupied": false}' and ghost1.last_payload_size == len(
        ghost1.last_payload
    )
    assert ghost1.first_seen == T0 and ghost1.last_seen == T0 + dt.timedelta(minutes=5)
    assert ghost1.topic == "sc/v1/parking_sensor/ghost-1/telemetry"
    assert found[1].device_type == "smoke_detector"

    recent = store.unknown_devices(since=T0 + dt.timedelta(minutes=2))
    assert [(u.device_id, u.count) for u in recent] == [("ghost-1", 2)]


# ---------------------------------------------------------------------------------------------
# Device state


def seen(
    device_id: str, minute: int, online: bool | None = None, *, status: bool = False, **kw: Any
) -> StatusUpdate:
    return StatusUpdate(
        device_id=device_id,
        online=online,
        seen_at=T0 + dt.timedelta(minutes=minute),
        fw=kw.get("fw"),
        is_status_message=status,
        seq=kw.get("seq"),
    )


def test_device_state_upsert_keeps_the_newest(engine: Engine) -> None:
    states = DeviceStateStore(engine)
    assert states.record_many([]) == 0
    assert (
        states.record_many([seen("a", 10, True, status=True, fw="1.0"), seen("a", 12, seq=7), seen("b", 1)])
        == 2
    )
    a = states.get("a")
    assert a is not None
    assert (a.online, a.last_seen, a.last_status_at, a.fw, a.last_seq) == (
        True,
        T0 + dt.timedelta(minutes=12),
        T0 + dt.timedelta(minutes=10),
        "1.0",
        7,
    )

    # Late, out-of-order messages: last_seen does not go back, an older status does not win.
    states.record_many([seen("a", 5, False, status=True, fw="0.9"), seen("a", 6, seq=3)])
    a = states.get("a")
    assert a is not None
    assert (a.online, a.last_seen, a.last_status_at, a.fw, a.last_seq) == (
        True,
        T0 + dt.timedelta(minutes=12),
        T0 + dt.timedelta(minutes=10),
        "1.0",
        7,
    )

    # A newer status (the last will) goes offline; a newer firmware is recorded.
    states.record_many([seen("a", 20, False, status=True), seen("a", 21, True, status=True, fw="2.0")])
    a = states.get("a")
    assert a is not None
    assert (a.online, a.last_status_at, a.fw) == (True, T0 + dt.timedelta(minutes=21), "2.0")
    states.record_many([seen("a", 30, False, status=True)])
    a = states.get("a")
    assert (
        a is not None and a.online is False and a.fw == "2.0" and a.last_seen == T0 + dt.timedelta(minutes=30)
    )

    b = states.get("b")
    assert b is not None and b.online is None and b.last_status_at is None
    assert states.get("nobody") is None


def test_online_counts(engine: Engine, registry: Registry) -> None:
    registry.upsert_many(
        [
            record("p-1"),
            record("p-2"),
            record("p-3"),
            record("p-4"),
            record("s-1", device_type="smoke_detector"),
        ]
    )
    registry.set_lifecycle("p-4", "retired")
    DeviceStateStore(engine).record_many(
        [
            seen("p-1", 1, True, status=True),
            seen("p-2", 1, False, status=True),
            seen("p-4", 1, True, status=True),
            seen("s-1", 1, True, status=True),
        ]
    )
    assert DeviceStateStore(engine).online_counts() == {
        "parking_sensor": OnlineCounts(online=1, offline=1, unknown=1),
        "smoke_detector": OnlineCounts(online=1, offline=0, unknown=0),
    }


# ---------------------------------------------------------------------------------------------
# Scale


@pytest.mark.slow
def test_import_100k_devices_and_load_them_all_into_the_cache(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'big.db'}"
    path = tmp_path / "devices.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*HEADER, "district", "street", "responsible_unit", "component_code"])
        for i in range(100_000):
            writer.writerow(
                [
                    f"dev-{i:06d}",
                    DEVICE_TYPES[i % 5],
                    f"社区-{i % 84}",
                    f"110101{i % 15:03d}{i % 84:03d}{i % 486:03d}",
                    f"B{i % 50}",
                    39.9 + i * 1e-6,
                    116.4,
                    "normal" if DEVICE_TYPES[i % 5] == "parking_sensor" and i % 2 else "",
                    "东城区",
                    f"街道-{i % 15}",
                    "物业",
                    # a streetlight's component class is 0118 路灯, a cover's 0101 上水井盖
                    f"320508{'0118' if DEVICE_TYPES[i % 5] == 'streetlight' else '0101'}{i:06d}",
                ]
            )
    migrate(url)
    engine = make_engine(url)
    try:
        registry = Registry(engine)
        report = registry.import_csv(path, batch_size=2000)
        assert report.ok and report.counts["created"] == 100_000
        cache = RegistryCache(registry)
        assert cache.load() == 100_000
        info = cache.get("dev-099999")
        assert info is not None and info.device_type == DEVICE_TYPES[99_999 % 5]
        assert registry.import_csv(path, batch_size=2000).counts["unchanged"] == 100_000
        assert cache.refresh() == 0
    finally:
        engine.dispose()
