"""Benchmark: the property managers' API over a city-sized registry, against the JSON-path baseline.

Builds, in a temp dir, a migrated SQLite registry with the devices of `--communities` communities (default
200: `--districts` 4 × `--streets` 20 × 10 communities, simulators.community rows imported with
Registry.import_csv, then put in service) and their liveness (device_state), and `--incidents` incidents
(default 100,000: about 85 % resolved, 10 % open, 5 % open and acknowledged, 1 % commissioning noise; the
urgency of each rule, a tenth raised one tier). The first `--via-store` (default 300) go through
IncidentStore.apply (opened, some resolved or acknowledged through the store); the rest are built by the
same pure lifecycle (incidents.lifecycle.apply) and inserted in bulk with every column filled as
IncidentStore._save fills it (checked against the rows the store wrote).

It then serves the API in-process (api.app.create_app, fastapi.testclient.TestClient, no broker) and
prints, for four API keys (an unscoped viewer, the manager of one community, the viewer of one street and
the viewer of one district, all of which reach one chosen grid), the median and p95 of `--reps` calls
(after `--warmup`) of:

- GET /api/v1/incidents?status=open&limit=50
- GET /api/v1/incidents?status=all&grid_code=<grid>&type=smoke_detector&limit=50
- GET /api/v1/overview?by=grid
- GET /api/v1/overview?by=community
- GET /api/v1/device-status?limit=100

with GET /api/v1/me (the same stack and authentication, no query) as the floor, and for each request
the SQL time of one profiled call (each SELECT run again with all its rows fetched) with the query plan
(EXPLAIN QUERY PLAN) of its slowest statement. The database has no planner statistics, as the gateway
never runs ANALYZE; `--analyze` runs it before measuring, to compare.

The baseline, in the same run and on the same data: the SQL-level filters as they were before migration
0008, reading the place, the device type and the acknowledgement from the incident's JSON (`data`, with
SQLAlchemy JSON paths) instead of the indexed columns (community stays a column: it has been one since
0006): IncidentStore.find / open_counts / status_counts with the column conditions against the same
queries with JSON paths, for a street scope on open incidents (a page of 50), a grid + device type filter
over all incidents (a page of 50), and the counts by grid (open by urgency, and by status) for a district
scope. Both give the same rows (checked); the ratio json / columns is printed.

Not part of the test suite: `python -m bench.manager_api_bench [--incidents N] [--communities M]` from the
repository root. Nothing is left running; the temp dir is removed unless `--keep`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import ColumnElement, Engine, case, event, func, insert, or_, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.app import create_app
from api.auth import ApiKeyStore, Scope
from api.settings import ApiSettings
from devices import THING_MODELS
from gateway.db import device_state, devices, incident_counters, incidents, make_engine, migrate
from gateway.deadletter import DeviceStateStore, StatusUpdate
from gateway.incident_store import IncidentStore, incident_row
from gateway.registry import RegisteredDevice, Registry
from incidents.lifecycle import apply as lifecycle_apply
from incidents.model import Incident
from incidents.routing import default_router
from rules.loader import load_default_rules
from rules.model import URGENCIES, Evidence, Verdict
from simulators.community import DISTRICT_NAMES, generate_community, write_devices_csv

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

#: the device type of the grid + type filter
FILTER_TYPE = "smoke_detector"
#: share of incidents that are open, and open and acknowledged (the rest are resolved)
OPEN_SHARE, ACKED_SHARE = 0.10, 0.05
#: share raised while the device was still being commissioned (kept, filtered out by default)
COMMISSIONING_SHARE = 0.01
INSERT_BATCH = 5000


# -- the place: districts, streets, communities, devices -------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Place:
    district: str
    street: str
    community: str


def community_rows(
    n_communities: int, n_streets: int, n_districts: int
) -> tuple[list[dict[str, Any]], list[Place]]:
    """The registration rows of every community (distinct names, codes and device id prefixes)."""
    if n_communities % n_streets or n_streets % n_districts:
        raise SystemExit("--communities must be a multiple of --streets, and --streets of --districts")
    per_street, streets_per_district = n_communities // n_streets, n_streets // n_districts
    if per_street > 999 or streets_per_district > 999:
        raise SystemExit("at most 999 communities per street and 999 streets per district")
    admin_codes = list(DISTRICT_NAMES) + [f"{120101 + k:06d}" for k in range(max(0, n_districts - 8))]
    rows: list[dict[str, Any]] = []
    places: list[Place] = []
    for d in range(n_districts):
        code = admin_codes[d]
        district = DISTRICT_NAMES.get(code, f"{code}区")
        for s in range(1, streets_per_district + 1):
            street = f"{district[:-1]}{s:02d}街道"
            for c in range(1, per_street + 1):
                name = f"{district[:-1]}{s:02d}街{c:02d}社区"
                rows += generate_community(
                    name,
                    seed=1,
                    admin_code=code,
                    street=f"{s:03d}",
                    community=f"{c:03d}",
                    slug=f"d{d}s{s:02d}c{c:02d}",
                    district_name=district,
                    street_name=street,
                    component_serial_start=((s - 1) * per_street + c) * 100,
                )
                places.append(Place(district, street, name))
    return rows, places


def build_registry(
    engine: Engine, rows: list[dict[str, Any]], root: Path, rng: random.Random, now: dt.datetime
) -> tuple[list[RegisteredDevice], float]:
    """Import the rows (CSV, Registry.import_csv), put every device in service, record their liveness
    (80 % online, 10 % offline, 10 % never heard from; half of those heard from sent telemetry last)."""
    path = root / "devices.csv"
    write_devices_csv(rows, path)
    registry = Registry(engine)
    t0 = time.perf_counter()
    report = registry.import_csv(path, batch_size=2000, actor="bench")
    import_s = time.perf_counter() - t0
    if not report.ok:
        raise SystemExit(f"import failed: {report.errors[:3]}")
    ids = [r["device_id"] for r in rows]
    for start in range(0, len(ids), 2000):
        registry.mark_in_service(ids[start : start + 2000], by="bench")
    found = list(registry.iter_devices())
    updates = []
    for device in found:
        r = rng.random()
        if r >= 0.9:
            continue
        online = r < 0.8
        seen = now - dt.timedelta(seconds=rng.uniform(5, 3600))
        model = THING_MODELS[device.device_type]
        if online and rng.random() < 0.5:
            sample = {"bool": False, "int": 1, "str": "ok"}
            values = {f.name: sample.get(f.kind.__name__, 1.5) for f in model.telemetry}
            topic, body = "telemetry", {"ts": int(seen.timestamp() * 1000), "seq": 7, **values}
        else:
            topic, body = "status", {"online": online, "fw": "1.4.2"}
        updates.append(
            StatusUpdate(
                device_id=device.device_id,
                online=online,
                seen_at=seen,
                fw="1.4.2",
                is_status_message=topic == "status",
                last_topic=f"sc/v1/{device.device_type}/{device.device_id}/{topic}",
                last_payload=json.dumps(body).encode(),
            )
        )
    store = DeviceStateStore(engine)
    for start in range(0, len(updates), 2000):
        store.record_many(updates[start : start + 2000])
    return found, import_s


# -- incidents -------------------------------------------------------------------------------------------


def store_columns(incident: Incident) -> dict[str, Any]:
    """The row of an incident, every column as IncidentStore._save fills it (plus its id)."""
    return {"incident_id": incident.incident_id, **incident_row(incident)}


class IncidentMaker:
    """Verdicts of the default rules on the registry's devices, and incidents in the three states."""

    def __init__(self, found: Sequence[RegisteredDevice], rng: random.Random, now: dt.datetime) -> None:
        self.rng, self.now = rng, _ms(now)
        rules = [
            r
            for r in load_default_rules().rules
            if r.enabled and not r.silent and getattr(r.params, "kind", "") != "correlation"
        ]
        self.router = default_router()
        # (device, rule id, urgency) pairs a device-level alarm can be raised on
        self.pairs = [
            (d, r.id, r.urgency)
            for d in found
            for r in rules
            if r.device_type == d.device_type
            and all(d.attributes.get(k) in values for k, values in r.where.items())
        ]
        self.open_keys: set[str] = set()

    def verdict(
        self, device: RegisteredDevice, rule_id: str, urgency: str, at: dt.datetime, **kw: Any
    ) -> Verdict:
        ms = int(at.timestamp() * 1000)
        state = kw.pop("state", "firing")
        return Verdict(
            rule_id=rule_id,
            key=device.device_id,
            device_id=device.device_id,
            device_type=device.device_type,
            state=state,
            change="cleared" if state == "cleared" else "opened",
            urgency=urgency,  # type: ignore[arg-type]
            evidence=Evidence(ms, {"value": round(self.rng.uniform(0, 100), 1)}, "> 50"),
            message_zh=f"{rule_id} 告警",
            message_en=f"{rule_id} alarm",
            since_ms=ms,
            community=device.community,
            grid_code=device.grid_code,
            **kw,
        )

    def pick(self, want_open: bool) -> tuple[RegisteredDevice, str, str]:
        """A (device, rule, urgency); an open incident takes a dedup key that has no open one yet."""
        for _ in range(50):
            device, rule_id, urgency = self.rng.choice(self.pairs)
            key = f"{device.device_id}:{rule_id}"
            if not want_open or key not in self.open_keys:
                if want_open:
                    self.open_keys.add(key)
                if self.rng.random() < 0.1:  # raised one tier while firing
                    urgency = URGENCIES[max(0, URGENCIES.index(urgency) - 1)]
                return device, rule_id, urgency
        raise RuntimeError("no dedup key without an open incident left: use fewer incidents")

    def state(self) -> str:
        r = self.rng.random()
        return "open" if r < OPEN_SHARE else "acked" if r < OPEN_SHARE + ACKED_SHARE else "resolved"

    def times(self, state: str) -> tuple[dt.datetime, dt.datetime | None, dt.datetime | None]:
        """(opened, acknowledged, resolved): resolved ones over the last 90 days, open ones the last 14."""
        days = 14.0 if state != "resolved" else 90.0
        opened = _ms(self.now - dt.timedelta(days=self.rng.uniform(0, days), minutes=5))
        took = dt.timedelta(minutes=self.rng.expovariate(1 / 240))
        acked = _ms(opened + dt.timedelta(minutes=self.rng.uniform(1, 30)))
        if state == "open":
            return opened, None, None
        if state == "acked":
            return opened, min(acked, self.now), None
        resolved = _ms(min(opened + took, self.now - dt.timedelta(seconds=1)))
        return opened, (min(acked, resolved) if self.rng.random() < 0.6 else None), resolved

    def bulk(self, n: int, counters: dict[dt.date, int]) -> Iterator[dict[str, Any]]:
        """n incident rows, numbered per local day after `counters` (updated)."""

        def next_id(day: dt.date) -> int:
            counters[day] = counters.get(day, 0) + 1
            return counters[day]

        for _ in range(n):
            state = self.state()
            device, rule_id, urgency = self.pick(state != "resolved")
            opened, acked, resolved = self.times(state)
            if self.rng.random() < COMMISSIONING_SHARE:
                device = dataclasses.replace(device, lifecycle="online")
            out = lifecycle_apply(
                self.verdict(device, rule_id, urgency, opened), None, device, opened, next_id, self.router
            )
            assert out is not None
            incident = out[0]
            changes: dict[str, Any] = {}
            if acked is not None:
                who = "incident_system" if state == "resolved" else "user:apikey:bench manager"
                changes.update(acknowledged_at=acked, acknowledged_by=who, updated_at=acked)
            if resolved is not None:
                changes.update(
                    status="resolved", resolved_at=resolved, updated_at=resolved, resolution="cleared"
                )
            if changes:
                incident = incident.model_copy(update=changes)
            yield store_columns(incident)


def via_store(engine: Engine, maker: IncidentMaker, n: int) -> tuple[float, int]:
    """n incidents through IncidentStore.apply (opened; a third then resolved, a tenth acknowledged, through
    the store too); returns (seconds, store calls)."""
    store = IncidentStore(engine, [])
    calls = 0
    t0 = time.perf_counter()
    for k in range(n):
        device, rule_id, urgency = maker.pick(True)
        opened = _ms(maker.now - dt.timedelta(days=maker.rng.uniform(0, 14), minutes=5))
        done = store.apply(maker.verdict(device, rule_id, urgency, opened), device, opened)
        assert done is not None
        calls += 1
        if k % 3 == 0:
            cleared = maker.verdict(device, rule_id, urgency, opened, state="cleared")
            store.apply(cleared, device, opened + dt.timedelta(minutes=30))
            maker.open_keys.discard(f"{device.device_id}:{rule_id}")
            calls += 1
        elif k % 10 == 1:
            store.acknowledge(done[0].incident_id, "user:bench", opened + dt.timedelta(minutes=3))
            calls += 1
    return time.perf_counter() - t0, calls


def check_rows(engine: Engine, sample: int | None = None) -> int:
    """Every column of the incident rows (all, or a random `sample`) equals store_columns() of the
    incident's JSON. On the rows IncidentStore wrote: the bulk rows, made by store_columns, are what the
    store would have written; on the bulk rows: their columns agree with their JSON. Returns rows checked."""
    n = 0
    q = select(incidents)
    if sample is not None:
        q = q.order_by(func.random()).limit(sample)
    with engine.connect() as conn:
        for row in conn.execute(q).mappings():
            expected = store_columns(Incident.model_validate(row["data"]))
            diff = {k: (row[k], v) for k, v in expected.items() if row[k] != v}
            if diff:
                raise SystemExit(f"columns differ from the JSON's for {row['incident_id']}: {diff}")
            n += 1
    return n


def _ms(t: dt.datetime) -> dt.datetime:
    """To the millisecond, as the incident's JSON keeps times (so the columns and the JSON agree)."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def insert_bulk(engine: Engine, rows: Iterator[dict[str, Any]], counters: dict[dt.date, int]) -> int:
    """Insert the rows, a transaction per INSERT_BATCH; then the day counters, and a checkpoint that
    empties the WAL (as a database in use would be: not one 100,000-row transaction still in the WAL)."""
    n = 0
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == INSERT_BATCH:
            with engine.begin() as conn:
                conn.execute(insert(incidents), batch)
            n += len(batch)
            batch = []
    with engine.begin() as conn:
        if batch:
            conn.execute(insert(incidents), batch)
            n += len(batch)
        # the day counters as the store would have left them (a later apply numbers after them)
        for day, seq in counters.items():
            conn.execute(
                sqlite_insert(incident_counters)
                .values(local_date=day, last_seq=seq)
                .on_conflict_do_update(
                    index_elements=[incident_counters.c.local_date], set_={"last_seq": seq}
                )
            )
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return n


# -- timing and SQL profiling ----------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    samples: list[float]

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.samples)

    @property
    def p95_ms(self) -> float:
        s = sorted(self.samples)
        return 1000 * s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def timed(fn: Callable[[], Any], warmup: int, reps: int, budget_s: float) -> tuple[Timing, Any]:
    """`warmup` calls, then `reps` timed calls (fewer, but at least 5, if they take over `budget_s`)."""
    out = None
    for _ in range(warmup):
        out = fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < reps and (len(samples) < 5 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return Timing(samples), out


class SqlProfile:
    """While on: each statement run on the engine, its parameters and its time (any thread)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.on = False
        self.statements: list[tuple[float, str, Any]] = []
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, _cursor: Any, _stmt: str, _params: Any, _ctx: Any, _many: bool) -> None:
        if self.on:
            conn.info.setdefault("bench_t0", []).append(time.perf_counter())

    def _after(self, conn: Any, _cursor: Any, stmt: str, params: Any, _ctx: Any, _many: bool) -> None:
        if self.on and conn.info.get("bench_t0"):
            took = time.perf_counter() - conn.info["bench_t0"].pop()
            with self._lock:
                self.statements.append((took, stmt, params))

    @contextmanager
    def recording(self) -> Iterator[list[tuple[float, str, Any]]]:
        self.statements = []
        self.on = True
        try:
            yield self.statements
        finally:
            self.on = False

    def plan(self, stmt: str, params: Any) -> str:
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + stmt, params).all()
        return " | ".join(str(r[-1]) for r in rows)

    def rerun(self, stmt: str, params: Any) -> float:
        """The time of a SELECT with all its rows fetched (the execute hook sees only the first step)."""
        with self.engine.connect() as conn:
            t0 = time.perf_counter()
            conn.exec_driver_sql(stmt, params).all()
            return time.perf_counter() - t0


def profile_line(profile: SqlProfile, fn: Callable[[], Any]) -> str:
    """One call of fn: its SQL (each SELECT run again with every row fetched), and the query plan of the
    slowest statement."""
    t0 = time.perf_counter()
    with profile.recording() as stmts:
        fn()
    total = time.perf_counter() - t0
    if not stmts:
        return f"call {1000 * total:.1f} ms, no SQL"
    timed_stmts = [
        (profile.rerun(stmt, params) if stmt.lstrip().upper().startswith("SELECT") else took, stmt, params)
        for took, stmt, params in stmts
    ]
    sql = sum(t for t, _s, _p in timed_stmts)
    took, stmt, params = max(timed_stmts, key=lambda s: s[0])
    head = " ".join(stmt.split())[:48]
    plan = profile.plan(stmt, params) if stmt.lstrip().upper().startswith("SELECT") else "-"
    return (
        f"call {1000 * total:.1f} ms, SQL {1000 * sql:.1f} ms in {len(stmts)} stmts; slowest "
        f"{1000 * took:.1f} ms [{head}...]: {plan}"
    )


# -- the baseline: place and device from the incident's JSON --------------------------------------------

json_district = incidents.c.data[("location", "district")].as_string()
json_street = incidents.c.data[("location", "street")].as_string()
json_grid = incidents.c.data[("location", "grid_code")].as_string()
json_type = incidents.c.data[("device", "type")].as_string()
json_acked = incidents.c.data["acknowledged_at"].as_string()


def json_open_counts(engine: Engine, district: str) -> list[tuple[tuple[str | None, ...], str, int]]:
    """IncidentStore.open_counts(("community", "grid_code"), where=[district scope]) the old way."""
    q = (
        select(incidents.c.community, json_grid, incidents.c.urgency, func.count())
        .where(
            incidents.c.status == "open", json_district.in_([district]), incidents.c.commissioning.is_(False)
        )
        .group_by(incidents.c.community, json_grid, incidents.c.urgency)
    )
    with engine.connect() as conn:
        return [((r[0], r[1]), str(r[2]), int(r[3])) for r in conn.execute(q)]


def json_status_counts(
    engine: Engine, district: str, resolved_since: dt.datetime
) -> list[tuple[tuple[str | None, ...], str, int]]:
    """IncidentStore.status_counts(("community", "grid_code"), where=[district scope]) the old way."""
    state = case(
        (incidents.c.status == "resolved", "resolved"),
        (json_acked.is_not(None), "acknowledged"),
        else_="unacknowledged",
    )
    q = (
        select(incidents.c.community, json_grid, state, func.count())
        .where(
            or_(incidents.c.status == "open", incidents.c.resolved_at >= resolved_since),
            json_district.in_([district]),
            incidents.c.commissioning.is_(False),
        )
        .group_by(incidents.c.community, json_grid, state)
    )
    with engine.connect() as conn:
        return [((r[0], r[1]), str(r[2]), int(r[3])) for r in conn.execute(q)]


def baseline(
    engine: Engine, place: Place, grid: str, args: argparse.Namespace, profile: SqlProfile
) -> list[tuple[str, Timing, Timing, str, str, str]]:
    """(what, columns timing, json timing, rows, columns plan, json plan) per filter; the results of both
    ways are checked equal."""
    store = IncidentStore(engine, [])
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)
    street_scope: ColumnElement[bool] = Scope(streets=(place.street,)).incidents_where()
    district_scope: ColumnElement[bool] = Scope(districts=(place.district,)).incidents_where()
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (
            "street scope, open, page of 50 (find)",
            lambda: store.find(status="open", where=[street_scope], limit=50),
            lambda: store.find(status="open", where=[json_street.in_([place.street])], limit=50),
        ),
        (
            "grid + type, all statuses, page of 50 (find)",
            lambda: store.find(status=None, grid_code=grid, device_type=FILTER_TYPE, limit=50),
            lambda: store.find(status=None, where=[json_grid == grid, json_type == FILTER_TYPE], limit=50),
        ),
        (
            "district scope, open by grid (open_counts)",
            lambda: store.open_counts(("community", "grid_code"), where=[district_scope]),
            lambda: json_open_counts(engine, place.district),
        ),
        (
            "district scope, by status by grid (status_counts)",
            lambda: store.status_counts(
                ("community", "grid_code"), resolved_since=since, where=[district_scope]
            ),
            lambda: json_status_counts(engine, place.district, since),
        ),
    ]
    out = []
    for what, columns, by_json in cases:
        t_col, r_col = timed(columns, args.warmup, args.reps, args.budget_s)
        t_json, r_json = timed(by_json, args.warmup, args.reps, args.budget_s)
        if isinstance(r_col, tuple):  # find: (page, total)
            same = [i.incident_id for i in r_col[0]] == [i.incident_id for i in r_json[0]] and r_col[
                1
            ] == r_json[1]
            rows = f"{len(r_col[0])}/{r_col[1]}"
        else:
            same = sorted(r_col) == sorted(r_json)
            rows = f"{len(r_col)} groups"
        if not same:
            raise SystemExit(f"baseline {what!r}: the JSON way gives other rows than the columns")
        out.append(
            (what, t_col, t_json, rows, profile_line(profile, columns), profile_line(profile, by_json))
        )
    return out


# -- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--incidents", type=int, default=100_000, help="incidents in the database")
    ap.add_argument("--communities", type=int, default=200, help="communities (a multiple of --streets)")
    ap.add_argument("--streets", type=int, default=20, help="streets (a multiple of --districts)")
    ap.add_argument("--districts", type=int, default=4, help="districts")
    ap.add_argument(
        "--via-store", type=int, default=300, help="incidents written through IncidentStore.apply"
    )
    ap.add_argument("--reps", type=int, default=30, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    ap.add_argument("--budget-s", type=float, default=10.0, help="fewer calls (at least 5) past this time")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--analyze", action="store_true", help="run ANALYZE before measuring (the gateway never does)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (registry.db)")
    args = ap.parse_args(argv)
    if args.via_store > args.incidents:
        args.via_store = args.incidents

    rng = random.Random(args.seed)
    now = dt.datetime.now(dt.UTC)
    root = Path(tempfile.mkdtemp(prefix="sc-managerbench-"))
    url = f"sqlite:///{root / 'registry.db'}"
    engine: Engine | None = None
    try:
        t_all = time.perf_counter()
        migrate(url)
        engine = make_engine(url)
        rows, places = community_rows(args.communities, args.streets, args.districts)
        print(f"registering {len(rows):,} devices of {len(places)} communities ...", flush=True)
        found, import_s = build_registry(engine, rows, root, rng, now)
        print(f"  import_csv {import_s:.1f} s ({len(found) / import_s:,.0f} devices/s)", flush=True)

        maker = IncidentMaker(found, rng, now)
        print(f"incidents: {args.via_store} through IncidentStore.apply ...", flush=True)
        store_s, store_calls = via_store(engine, maker, args.via_store)
        checked = check_rows(engine)
        per_call_ms = 1000 * store_s / max(1, store_calls)
        print(
            f"  {store_calls} store calls in {store_s:.1f} s ({per_call_ms:.2f} ms per call); "
            f"{checked} rows checked: the bulk columns are the store's",
            flush=True,
        )
        with engine.connect() as conn:
            counters = {r.local_date: r.last_seq for r in conn.execute(select(incident_counters))}
        n_bulk = args.incidents - args.via_store
        print(
            f"incidents: {n_bulk:,} built by incidents.lifecycle.apply and inserted in bulk ...", flush=True
        )
        t0 = time.perf_counter()
        inserted = insert_bulk(engine, maker.bulk(n_bulk, counters), counters)
        bulk_s = time.perf_counter() - t0
        sampled = check_rows(engine, sample=2000)
        print(
            f"  {inserted:,} in {bulk_s:.1f} s ({inserted / max(bulk_s, 1e-9):,.0f}/s); "
            f"{sampled} random rows checked: columns agree with the JSON",
            flush=True,
        )
        if args.analyze:
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")

        # facts
        kind = case(
            (incidents.c.commissioning.is_(True), "commissioning"),
            (incidents.c.status == "resolved", "resolved"),
            (incidents.c.acknowledged_at.is_not(None), "open acknowledged"),
            else_="open",
        )
        with engine.connect() as conn:
            by_state = {str(k): int(n) for k, n in conn.execute(select(kind, func.count()).group_by(kind))}
            by_urgency = {
                str(u): int(n)
                for u, n in conn.execute(
                    select(incidents.c.urgency, func.count()).group_by(incidents.c.urgency)
                )
            }
            n_incidents = int(conn.execute(select(func.count()).select_from(incidents)).scalar_one())
            n_devices = int(conn.execute(select(func.count()).select_from(devices)).scalar_one())
            n_state = int(conn.execute(select(func.count()).select_from(device_state)).scalar_one())
        db_mb = (root / "registry.db").stat().st_size / 1e6

        # the callers: one grid reached by all four
        place = places[len(places) // 2]
        grids = sorted({d.grid_code for d in found if d.community == place.community and d.grid_code})
        grid = grids[0]
        keys = ApiKeyStore(engine)
        callers = {
            "unscoped viewer": keys.create("bench viewer", "viewer")[1],
            "manager (1 community)": keys.create(
                "bench manager", "manager", Scope(communities=(place.community,))
            )[1],
            "street viewer": keys.create("bench street", "viewer", Scope(streets=(place.street,)))[1],
            "district viewer": keys.create("bench district", "viewer", Scope(districts=(place.district,)))[1],
        }
        requests = {
            "me (floor)": "/api/v1/me",
            "incidents open": "/api/v1/incidents?status=open&limit=50",
            "incidents grid+type": (
                f"/api/v1/incidents?status=all&grid_code={grid}&type={FILTER_TYPE}&limit=50"
            ),
            "overview by=grid": "/api/v1/overview?by=grid",
            "overview by=community": "/api/v1/overview?by=community",
            "device-status": "/api/v1/device-status?limit=100",
        }

        cpus = os.cpu_count()
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
        print()
        print("machine and data")
        print(f"  cores: {cpus} ({affinity} usable), {platform.machine()}, {platform.platform()}")
        print(
            f"  Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"SQLAlchemy {sqlalchemy.__version__}"
        )
        print(
            f"  devices: {n_devices:,} ({n_state:,} with liveness) in {len(places)} communities, "
            f"{args.streets} streets, {args.districts} districts"
        )
        print(
            f"  incidents: {n_incidents:,}: "
            + ", ".join(
                f"{k} {by_state.get(k, 0):,}"
                for k in ("resolved", "open", "open acknowledged", "commissioning")
            )
            + "; "
            + ", ".join(f"{u} {by_urgency.get(u, 0):,}" for u in URGENCIES)
        )
        print(
            f"  database file: {db_mb:.0f} MB (WAL checkpointed); "
            f"set up in {time.perf_counter() - t_all:.0f} s"
        )
        print(
            f"  callers reach grid {grid} of {place.community} ({place.street}, {place.district}); "
            f"{args.reps} timed calls after {args.warmup} (at most {args.budget_s:.0f} s each, at least 5)"
        )

        profile = SqlProfile(engine)
        app = create_app(ApiSettings(incident_mqtt=False), engine=engine, issuer=None)
        results: list[tuple[str, str, Timing, str]] = []
        profiles: list[tuple[str, str, str]] = []
        with TestClient(app) as client:
            for req_name, path in requests.items():
                for caller, key in callers.items():
                    headers = {"Authorization": f"Bearer {key}"}

                    def call(path: str = path, headers: dict[str, str] = headers) -> Any:
                        r = client.get(path, headers=headers)
                        if r.status_code != 200:
                            raise SystemExit(f"GET {path}: {r.status_code} {r.text[:300]}")
                        return r.json()

                    timing, body = timed(call, args.warmup, args.reps, args.budget_s)
                    if "total" in body:
                        size = f"{len(body.get('incidents', body.get('items', [])))}/{body['total']:,}"
                    elif "rows" in body:
                        size = f"{len(body['rows'])} rows"
                    else:
                        size = "-"
                    results.append((req_name, caller, timing, size))
                    profiles.append((req_name, caller, profile_line(profile, call)))
                    print(f"  {req_name:24} {caller:22} median {timing.median_ms:8.2f} ms", flush=True)

        print("baseline: the same filters in SQL, columns vs JSON paths ...", flush=True)
        base = baseline(engine, place, grid, args, profile)

        floor = {caller: t for name, caller, t, _ in results if name == "me (floor)"}
        print()
        print("API, in-process (TestClient), per caller")
        print(
            f"{'request':24} {'caller':22} {'median ms':>10} {'p95 ms':>9} {'n':>4} {'x floor':>8}"
            "  rows/total"
        )
        for req_name, caller, t, size in results:
            ratio = t.median_ms / floor[caller].median_ms
            print(
                f"{req_name:24} {caller:22} {t.median_ms:>10.2f} {t.p95_ms:>9.2f} {len(t.samples):>4} "
                f"{ratio:>7.1f}x  {size}"
            )
        print()
        print("where the time goes (one profiled call each; plan of the slowest statement)")
        for req_name, caller, line in profiles:
            if req_name != "me (floor)":
                print(f"  {req_name} / {caller}: {line}")
        print()
        print("baseline: IncidentStore filters on the columns vs the same from the incident's JSON")
        print(f"{'filter':50} {'columns ms':>11} {'json ms':>9} {'json/columns':>13}  rows")
        for what, t_col, t_json, rows_, _pc, _pj in base:
            print(
                f"{what:50} {t_col.median_ms:>11.2f} {t_json.median_ms:>9.2f} "
                f"{t_json.median_ms / t_col.median_ms:>12.1f}x  {rows_}"
            )
        print(
            "  (median ms; p95 columns / json: "
            + "; ".join(f"{b[1].p95_ms:.1f} / {b[2].p95_ms:.1f}" for b in base)
            + ")"
        )
        for what, _tc, _tj, _r, plan_col, plan_json in base:
            print(f"  {what}\n    columns: {plan_col}\n    json:    {plan_json}")
        print()
        for req_name, caller, t, size in results:
            print(
                f"SUMMARY api {req_name} [{caller}]: median {t.median_ms:.2f} ms, p95 {t.p95_ms:.2f} ms, "
                f"n {len(t.samples)}, {t.median_ms / floor[caller].median_ms:.1f}x the floor, {size}"
            )
        for what, t_col, t_json, rows_, _pc, _pj in base:
            print(
                f"SUMMARY baseline {what}: columns {t_col.median_ms:.2f} ms, json {t_json.median_ms:.2f} ms, "
                f"json/columns {t_json.median_ms / t_col.median_ms:.1f}x, {rows_}"
            )
        print(f"total time {time.perf_counter() - t_all:.0f} s")
        return 0
    finally:
        if engine is not None:
            engine.dispose()
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
