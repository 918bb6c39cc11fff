"""API keys: their form, how they are stored, and what each role and scope gets (401 / 403)."""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from api.app import create_app
from api.auth import (
    ApiKeyStore,
    AuthError,
    KeyNotFoundError,
    Scope,
    hash_secret,
    new_key,
    parse_key,
)
from api.settings import ApiSettings
from gateway.db import api_keys, make_engine, migrate

with warnings.catch_warnings():
    # starlette asks for httpx2 instead of httpx; the TestClient works the same with httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

T0 = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


# ---------------------------------------------------------------------------------------------
# Keys


def test_a_new_key_parses_back_to_its_id_and_secret() -> None:
    key_id, secret, full = new_key()
    assert full == f"sck_{key_id}_{secret}"
    assert len(key_id) == 12 and len(secret) == 43
    assert parse_key(full) == (key_id, secret)
    assert parse_key(f"  {full}\n") == (key_id, secret)


def test_a_secret_may_contain_underscores() -> None:
    secret = "a_b-" + "x" * 39
    assert parse_key(f"sck_0123456789ab_{secret}") == ("0123456789ab", secret)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sck_0123456789ab",
        "sk_0123456789ab_" + "x" * 43,
        "sck_0123456789AB_" + "x" * 43,  # the id is lowercase hex
        "sck_0123456789a_" + "x" * 43,
        "sck_0123456789ab_" + "x" * 42,
        "sck_0123456789ab_" + "x" * 42 + "!",
        "Bearer sck_0123456789ab_" + "x" * 43,
    ],
)
def test_malformed_keys_say_what_a_key_looks_like(text: str) -> None:
    with pytest.raises(AuthError, match="malformed API key: expected sck_<key id>_<secret>"):
        parse_key(text)


def test_only_the_sha256_of_the_secret_is_stored(engine: Engine) -> None:
    key, full = ApiKeyStore(engine).create("installer Li", "installer")
    _, secret = parse_key(full)
    assert hash_secret(secret) == hashlib.sha256(secret.encode()).hexdigest()
    with engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.key_id == key.key_id)).one()
    assert row.secret_hash == hash_secret(secret)
    assert secret not in str(tuple(row))


def test_authenticate_gives_the_principal(engine: Engine) -> None:
    store = ApiKeyStore(engine)
    key, full = store.create("site team 3", "installer", Scope(communities=("东华门社区",)))
    principal = store.authenticate(full)
    assert (principal.key_id, principal.name, principal.role) == (key.key_id, "site team 3", "installer")
    assert principal.scope.communities == ("东华门社区",)
    assert principal.actor == f"apikey:{key.key_id} site team 3"


def test_unknown_id_and_wrong_secret_get_the_same_answer(engine: Engine) -> None:
    store = ApiKeyStore(engine)
    _, full = store.create("x", "admin")
    wrong_secret = full[:-1] + ("A" if full[-1] != "A" else "B")
    for presented in (wrong_secret, "sck_000000000000_" + full.split("_", 2)[2]):
        with pytest.raises(AuthError, match=r"^unknown API key$"):
            store.authenticate(presented)


def test_a_revoked_key_stops_working_at_once(engine: Engine) -> None:
    store = ApiKeyStore(engine)
    key, full = store.create("x", "installer")
    revoked, changed = store.revoke(key.key_id)
    assert changed and revoked.revoked_at is not None and not revoked.active
    with pytest.raises(AuthError, match=f"API key {key.key_id} was revoked at "):
        store.authenticate(full)
    assert store.revoke(key.key_id)[1] is False
    with pytest.raises(KeyNotFoundError, match="no API key has the id 'nope'"):
        store.revoke("nope")
    assert [k.key_id for k in store.list(include_revoked=False)] == []
    assert [k.key_id for k in store.list()] == [key.key_id]


def test_last_used_is_written_at_most_once_a_minute(engine: Engine) -> None:
    clock = Clock()
    store = ApiKeyStore(engine, clock=clock)
    key, full = store.create("x", "installer")
    assert store.get(key.key_id).last_used_at is None  # type: ignore[union-attr]
    store.authenticate(full)
    assert store.get(key.key_id).last_used_at == T0  # type: ignore[union-attr]
    clock.now = T0 + dt.timedelta(seconds=30)
    store.authenticate(full)
    assert store.get(key.key_id).last_used_at == T0  # type: ignore[union-attr]
    clock.now = T0 + dt.timedelta(minutes=2)
    store.authenticate(full)
    assert store.get(key.key_id).last_used_at == clock.now  # type: ignore[union-attr]


def test_create_refuses_unknown_roles_and_empty_names(engine: Engine) -> None:
    store = ApiKeyStore(engine)
    with pytest.raises(ValueError, match="unknown role 'root'; roles: admin, installer, manager"):
        store.create("x", "root")
    with pytest.raises(ValueError, match="name must be 1 to 128 characters"):
        store.create("  ", "admin")


def test_a_scope_this_version_cannot_read_reaches_nothing(engine: Engine) -> None:
    store = ApiKeyStore(engine)
    _, full = store.create("x", "manager")
    with engine.begin() as conn:
        conn.execute(update(api_keys).values(scope={"buildings": ["3"]}))
    principal = store.authenticate(full)
    assert principal.scope.communities == ()
    assert not principal.scope.allows_community("东华门社区")


def test_scope() -> None:
    assert Scope().allows_community("any") and Scope().allows_community(None)
    assert Scope().describe() == "all communities"
    scoped = Scope(communities=("a", "b"))
    assert scoped.allows_community("a") and not scoped.allows_community("c")
    assert not scoped.allows_community(None)
    assert scoped.describe() == "communities a, b"


# ---------------------------------------------------------------------------------------------
# Over HTTP


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    app = create_app(ApiSettings(), engine=engine, issuer=None)
    with TestClient(app) as c:
        yield c


def key(engine: Engine, role: str, scope: Scope | None = None) -> str:
    return ApiKeyStore(engine).create(f"{role} key", role, scope)[1]


def test_no_key_is_401_saying_how_to_send_one(client: TestClient) -> None:
    r = client.get("/api/v1/devices")
    assert r.status_code == 401
    assert r.json() == {
        "detail": "missing credentials: send 'Authorization: Bearer sck_<key id>_<secret>' "
        "or 'X-API-Key: sck_<key id>_<secret>' (an API key), or 'Authorization: Bearer sct_...' "
        "(the token of POST /api/v1/auth/login)"
    }
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {"Authorization": "Basic dXNlcjpwdw=="},
            "the Authorization header must be 'Bearer sck_<key id>_<secret>' (an API key) or "
            "'Bearer sct_...' (a login token)",
        ),
        (
            {"Authorization": "Bearer"},
            "the Authorization header must be 'Bearer sck_<key id>_<secret>' (an API key) or "
            "'Bearer sct_...' (a login token)",
        ),
        (
            {"Authorization": "Bearer not-a-key"},
            "malformed API key: expected sck_<key id>_<secret> (or a login token, sct_...)",
        ),
        ({"X-API-Key": "sck_0123456789ab_" + "x" * 43}, "unknown API key"),
    ],
)
def test_bad_keys_are_401_with_what_is_wrong(
    client: TestClient, headers: dict[str, str], message: str
) -> None:
    r = client.get("/api/v1/devices", headers=headers)
    assert r.status_code == 401 and r.json() == {"detail": message}


def test_a_revoked_key_is_401(client: TestClient, engine: Engine) -> None:
    store = ApiKeyStore(engine)
    k, full = store.create("x", "installer")
    store.revoke(k.key_id)
    r = client.get("/api/v1/devices", headers={"Authorization": f"Bearer {full}"})
    assert r.status_code == 401 and r.json()["detail"].startswith(f"API key {k.key_id} was revoked at ")


@pytest.mark.parametrize("role", ["admin", "installer"])
def test_installers_and_admins_get_in_by_either_header(client: TestClient, engine: Engine, role: str) -> None:
    full = key(engine, role)
    assert client.get("/api/v1/devices", headers={"Authorization": f"Bearer {full}"}).status_code == 200
    assert client.get("/api/v1/devices", headers={"X-API-Key": full}).status_code == 200


@pytest.mark.parametrize("role", ["manager", "viewer", "incident_system"])
def test_other_roles_are_403_on_every_installers_route(client: TestClient, engine: Engine, role: str) -> None:
    headers = {"X-API-Key": key(engine, role)}
    for method, path in [
        ("GET", "/api/v1/devices"),
        ("POST", "/api/v1/devices"),
        ("GET", "/api/v1/devices/x"),
        ("POST", "/api/v1/devices/import"),
        ("GET", "/api/v1/devices/export"),
        ("GET", "/api/v1/commissioning"),
        ("GET", "/api/v1/unknown-devices"),
        ("GET", "/api/v1/deadletters"),
        ("GET", "/api/v1/places"),
        ("POST", "/api/v1/responsible-units"),
    ]:
        r = client.request(method, path, headers=headers, json={})
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["detail"].endswith(f"has the role {role}; this needs one of: admin, installer")


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_the_openapi_document_declares_both_ways_to_send_a_key(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer" and schemes["APIKeyHeader"]["name"] == "X-API-Key"
    assert {t["name"] for t in doc["tags"]} >= {"devices", "commissioning", "places", "responsible units"}
    create = doc["paths"]["/api/v1/devices"]["post"]
    assert create["tags"] == ["devices"]
    assert create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "DeviceCreated"
    )
    assert {"409", "503", "422", "401", "403"} <= set(create["responses"])
