"""Stack fixtures: real Mosquitto, InfluxDB and PostgreSQL on free loopback ports, one of each per session.

Tests that stop, kill or restart a service should start a private one in `service_dir` (see
tests/integration/test_stack.py), so the session services stay up for everyone else. A service that cannot
start fails the tests that need it, with the service's log tail; it never skips them.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from stack.services import (
    REQUIRED_PACKAGES,
    InfluxService,
    MosquittoService,
    PostgresService,
    StackError,
    ensure_debian_packages,
    start_influxdb,
    start_mosquitto,
    start_postgres,
)

INTEGRATION_DIR = Path(__file__).parent / "integration"

T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


def _let_services_through(path: Path, basetemp: Path) -> None:
    """Let the services' system users enter pytest's private temp dirs on the way to their data dir.

    As root, the services run as `mosquitto`, `influxdb` and `postgres`, but pytest creates its temp dirs
    with mode 0700. Only the search bit is added (no listing), and only on the dirs pytest made for this
    run: from `path` up to the basetemp, and pytest's per-user root, which pytest makes private again at
    the start of the next run.
    """
    if os.geteuid() != 0:
        return
    dirs = [path, *(p for p in path.parents if p.is_relative_to(basetemp))]
    if basetemp.parent.name.startswith("pytest-of-"):
        dirs.append(basetemp.parent)
    for directory in dirs:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def _make_service_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    path = tmp_path_factory.mktemp(name)
    _let_services_through(path, tmp_path_factory.getbasetemp())
    return path


def _start_or_fail(start: Callable[[], T]) -> T:
    try:
        return start()
    except StackError as exc:
        error = str(exc)
    # Outside the except block, so the report shows the message once, without a chained traceback.
    pytest.fail(error, pytrace=False)


@pytest.fixture(scope="session")
def stack_packages() -> None:
    """The Debian packages of the stack, installed if missing (needs root on a fresh machine)."""
    _start_or_fail(lambda: ensure_debian_packages(REQUIRED_PACKAGES))


@pytest.fixture(scope="session")
def mosquitto(stack_packages: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoService]:
    """The session's broker, with the shipped mosquitto/mosquitto.conf: `.host`, `.port`, `.log_path`."""
    service = _start_or_fail(lambda: start_mosquitto(_make_service_dir(tmp_path_factory, "mosquitto")))
    with service:
        yield service


@pytest.fixture(scope="session")
def influxdb(stack_packages: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxService]:
    """The session's influxd 1.x: `.url` is the HTTP API (v1: /ping, /write, /query)."""
    service = _start_or_fail(lambda: start_influxdb(_make_service_dir(tmp_path_factory, "influxdb")))
    with service:
        yield service


@pytest.fixture(scope="session")
def postgres(stack_packages: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresService]:
    """The session's PostgreSQL cluster (fsync off): `.dsn`, `.create_database()`, `.drop_database()`."""
    service = _start_or_fail(
        lambda: start_postgres(_make_service_dir(tmp_path_factory, "postgres"), for_tests=True)
    )
    with service:
        yield service


@pytest.fixture
def service_dir(stack_packages: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data dir that the services' system users can reach, for a private service in one test."""
    return _make_service_dir(tmp_path_factory, "service")


@pytest.fixture
def influx_db_name(influxdb: InfluxService) -> Iterator[str]:
    """A fresh InfluxDB database name (not created); the database is dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    if influxdb.is_running():
        influxdb.drop_database(name)


@pytest.fixture(scope="module")
def postgres_dsn(postgres: PostgresService, request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLAlchemy URL of a new, empty database for this test module; dropped after the module."""
    module = re.sub(r"[^a-z0-9_]", "_", request.module.__name__.rpartition(".")[2].lower())
    name = f"m_{module[:40]}_{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_database(name)
    yield dsn
    if postgres.is_running():
        postgres.drop_database(name)
