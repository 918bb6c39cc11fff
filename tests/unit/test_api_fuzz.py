"""The API fuzzed from its own OpenAPI document (schemathesis, in process over ASGI): every operation, with
an admin API key, a bounded number of generated requests each, and no answer may be a server error (5xx).

The world is a migrated SQLite registry with a device and an incident, so some generated ids hit; the
broker's account administration is an in-memory fake and InfluxDB a mock answering "no data" (what is
fuzzed is the API's own handling, not whether those outside systems are up: without them the API answers
502/503 by design). The incidents' live stream is left out: it never ends.
"""

from __future__ import annotations

import dataclasses
import secrets
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Final

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from api.app import create_app
from api.auth import ApiKeyStore, Scope, ScryptParams, UserStore
from api.readings import InfluxReader
from api.settings import ApiSettings
from gateway.db import make_engine, migrate
from gateway.incident_store import IncidentStore
from gateway.registry import DeviceRecord, Registry
from tests.integration.test_incident_store import at, verdict

#: generated requests per operation (about 40 operations: well under a minute in all)
EXAMPLES: Final = 25
#: endless: a generated request would never get its whole answer
LEFT_OUT: Final = ("/api/v1/incidents/stream",)


class FakeIssuer:
    """The broker's device accounts, in memory (gateway.installers.CredentialIssuer)."""

    def __init__(self) -> None:
        self.accounts: dict[str, bool] = {}

    def create_device(self, device_id: str, device_type: str) -> str:
        self.accounts[device_id] = True
        return secrets.token_urlsafe(16)

    def create_devices(self, devices: Iterable[tuple[str, str]]) -> dict[str, str]:
        return {device_id: self.create_device(device_id, device_type) for device_id, device_type in devices}

    def rotate_password(self, username: str) -> str:
        return secrets.token_urlsafe(16)

    def disable(self, username: str) -> None:
        self.accounts[username] = False

    def enable(self, username: str) -> None:
        self.accounts[username] = True

    def delete(self, username: str) -> None:
        self.accounts.pop(username, None)

    def exists(self, username: str) -> bool:
        return username in self.accounts


def _no_data(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"results": [{"statement_id": 0}]})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'api.db'}"
    migrate(url)
    engine = make_engine(url)
    registry = Registry(engine)
    device = DeviceRecord.model_validate(
        {
            "device_id": "mc-001",
            "device_type": "manhole_cover",
            "community": "110101001001",
            "grid_code": "110101001001001",
            "lat": 39.9,
            "lon": 116.4,
        }
    )
    registry.add(device)
    registry.confirm("mc-001")
    described = registry.describe("mc-001")
    assert described is not None
    assert IncidentStore(engine, []).apply(verdict(), described, at(0)) is not None

    app = create_app(ApiSettings(incident_mqtt=False), engine=engine, issuer=FakeIssuer())
    readings = InfluxReader("http://influxdb.invalid", "sc", transport=httpx.MockTransport(_no_data))
    users = UserStore(engine, password_params=ScryptParams(n=2**10, r=8, p=1))
    app.state.services = dataclasses.replace(app.state.services, users=users, readings=readings)
    key = ApiKeyStore(engine).create("fuzzer", "admin", Scope())[1]
    yield app, key
    readings.close()
    engine.dispose()


@pytest.fixture(scope="module")
def api_schema(world: tuple[Any, str]) -> Any:
    app, _ = world
    schema: Any = schemathesis.openapi.from_asgi("/openapi.json", app)
    for path in LEFT_OUT:
        schema = schema.exclude(path=path)
    return schema


@pytest.fixture(scope="module")
def admin(world: tuple[Any, str]) -> dict[str, str]:
    return {"X-API-Key": world[1]}


def test_no_server_errors(api_schema: Any, admin: dict[str, str]) -> None:
    """Each operation in turn (schemathesis' pytest plugin does not run under pytest 9: its
    `from_fixture` reads a private attribute pytest no longer has), every 5xx collected and reported
    together with the request that got it."""
    failures: list[str] = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(headers=admin, checks=[not_a_server_error])

        try:
            run()
        except Exception as exc:  # a failure's text names the request (a curl line) and the answer
            failures.append(f"{operation.label}: {exc}")
    assert operations > 30
    assert not failures, "\n\n".join(failures)


def test_the_stream_is_the_only_operation_left_out(api_schema: Any, world: tuple[Any, str]) -> None:
    app, _ = world
    documented = {path for path in app.openapi()["paths"]}
    assert set(LEFT_OUT) <= documented
    fuzzed = {op.ok().path for op in api_schema.get_all_operations()}
    assert documented - fuzzed == set(LEFT_OUT)


def test_a_bad_key_is_refused_not_crashed(world: tuple[Any, str]) -> None:
    """The fuzzer's requests carry a good key; a bad one is a 401 on every route family."""
    app, _ = world
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
        from fastapi.testclient import TestClient
    with TestClient(app) as client:
        for path in ("/api/v1/devices", "/api/v1/incidents", "/api/v1/overview", "/api/v1/users"):
            r = client.get(path, headers={"X-API-Key": "sck_000000000000_" + "A" * 43})
            assert r.status_code == 401, (path, r.text)
