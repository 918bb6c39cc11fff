"""Stack fixtures: real Mosquitto, InfluxDB and PostgreSQL on free loopback ports, one of each per session.

Tests that stop, kill or restart a service should start a private one in `service_dir` (see
tests/integration/test_stack.py), so the session services stay up for everyone else. A service that cannot
start fails the tests that need it, with the service's log tail; it never skips them.
"""

from __future__ import annotations

import re
import shutil
import tempfile
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


def _make_service_dir(root: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


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
def stack_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The parent of the services' data dirs (and logs): a fresh `sc-stack-*` dir in the system temp dir.

    Not one of pytest's temp dirs: as root, the services run as their own system users, which must be
    able to enter every directory on the way to their data, and pytest's are private (0700). Opening
    them up does not last either: every pytest run that starts resets /tmp/pytest-of-<user> to 0700,
    which locks the services of any run still going out of their files. Removed after a run without
    failures, kept with the logs otherwise.
    """
    root = Path(tempfile.mkdtemp(prefix="sc-stack-"))
    root.chmod(0o711)
    yield root
    if request.session.testsfailed == 0:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mosquitto(stack_packages: None, stack_root: Path) -> Iterator[MosquittoService]:
    """The session's broker, with the shipped mosquitto/mosquitto.conf: `.host`, `.port`, `.log_path`.

    It refuses anonymous clients. Ready accounts: `.gateway_account` (role sc-gateway) and
    `.publisher_account` (role sc-adaptor: publishes uplink for any device); `.admin()` for the rest.
    """
    service = _start_or_fail(lambda: start_mosquitto(_make_service_dir(stack_root, "mosquitto")))
    with service:
        # Made now, so a failure shows as the fixture's, not inside the first test that uses one.
        service.gateway_account  # noqa: B018
        service.publisher_account  # noqa: B018
        yield service


@pytest.fixture(scope="session")
def influxdb(stack_packages: None, stack_root: Path) -> Iterator[InfluxService]:
    """The session's influxd 1.x: `.url` is the HTTP API (v1: /ping, /write, /query)."""
    service = _start_or_fail(lambda: start_influxdb(_make_service_dir(stack_root, "influxdb")))
    with service:
        yield service


@pytest.fixture(scope="session")
def postgres(stack_packages: None, stack_root: Path) -> Iterator[PostgresService]:
    """The session's PostgreSQL cluster (fsync off): `.dsn`, `.create_database()`, `.drop_database()`."""
    service = _start_or_fail(
        lambda: start_postgres(_make_service_dir(stack_root, "postgres"), for_tests=True)
    )
    with service:
        yield service


@pytest.fixture
def service_dir(stack_packages: None, stack_root: Path) -> Path:
    """A fresh data dir that the services' system users can reach, for a private service in one test."""
    return _make_service_dir(stack_root, "service")


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
