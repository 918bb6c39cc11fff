"""People: password hashing, scopes, logging in and out, session tokens, the login lockout, the admins'
user routes and `sc-gateway users ...`, against a real SQLite database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from api.app import create_app
from api.auth import (
    LOGIN_FAILED,
    SCRYPT,
    TOKEN_TTL,
    ApiKeyStore,
    LoginFailedError,
    LoginLimiter,
    LoginLockedError,
    Scope,
    ScryptParams,
    UserExistsError,
    UserStore,
    check_role_scope,
    hash_password,
    scope_from_doc,
    verify_password,
)
from api.settings import ApiSettings
from gateway.cli import main
from gateway.db import devices, make_engine, migrate, user_tokens, users
from gateway.registry import DeviceRecord, Registry

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

T0 = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)
#: Cheap scrypt for the tests that log in a lot (the default's cost is checked on its own).
FAST = ScryptParams(n=2**10, r=8, p=1)
PASSWORD = "correct horse battery"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'users.db'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine: Engine, clock: Clock) -> UserStore:
    return UserStore(engine, clock=clock, password_params=FAST)


@pytest.fixture
def client(engine: Engine, store: UserStore) -> Iterator[TestClient]:
    app = create_app(ApiSettings(), engine=engine, issuer=None)
    app.state.services = dataclasses.replace(app.state.services, users=store)
    with TestClient(app) as c:
        yield c


def login(client: TestClient, username: str, password: str = PASSWORD) -> dict[str, str]:
    r = client.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def admin_key(engine: Engine) -> dict[str, str]:
    return {"X-API-Key": ApiKeyStore(engine).create("ops", "admin")[1]}


# ---------------------------------------------------------------------------------------------
# Passwords


def test_a_password_hash_is_scrypt_with_its_parameters_and_a_salt_of_its_own() -> None:
    a, b = hash_password(PASSWORD, FAST), hash_password(PASSWORD, FAST)
    assert a.startswith("scrypt$1024$8$1$") and a != b  # a new salt every time
    assert PASSWORD not in a
    assert verify_password(PASSWORD, a) and verify_password(PASSWORD, b)
    assert not verify_password(PASSWORD + "!", a)
    assert not verify_password("", a)


def test_the_default_cost_is_owasps_scrypt_minimum() -> None:
    assert (SCRYPT.n, SCRYPT.r, SCRYPT.p) == (2**14, 8, 5)
    assert hash_password(PASSWORD).startswith("scrypt$16384$8$5$")


def test_the_same_password_typed_differently_is_the_same() -> None:
    # full-width digits from a Chinese input method are the ASCII ones after NFKC
    assert verify_password("password１２３４", hash_password("password1234", FAST))


@pytest.mark.parametrize(
    "stored", ["", "plain", "scrypt$1024$8$1$!!$!!", "scrypt$1000$8$1$AAAA$AAAA", "bcrypt$x$y$z$a$b"]
)
def test_a_hash_this_version_cannot_read_matches_nothing(stored: str) -> None:
    assert not verify_password(PASSWORD, stored)


def test_scrypt_parameters_are_bounded() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        ScryptParams(n=1000)
    with pytest.raises(ValueError, match="power of 2 up to 2\\^20"):
        ScryptParams(n=2**21)


# ---------------------------------------------------------------------------------------------
# Scope


def test_a_scope_reaches_the_places_it_names_at_any_level() -> None:
    s = Scope(communities=("东华门社区",), streets=("西长安街街道",))
    assert s.allows(community="东华门社区")
    assert s.allows(district="西城区", street="西长安街街道", community="西长安街社区")
    assert not s.allows(district="东城区", street="东华门街道", community="景山社区")
    assert not s.allows()
    assert Scope().allows() and Scope().unrestricted
    assert s.describe() == "communities 东华门社区; streets 西长安街街道"


def test_communities_is_never_wider_than_the_scope() -> None:
    # code that reads `communities` alone (None: all) must not take a street scope for "everything"
    street = Scope(streets=("东华门街道",))
    assert street.communities == () and not street.allows_community("东华门社区")
    assert street.model_dump(mode="json", exclude_none=True) == {"streets": ["东华门街道"]}
    assert Scope.model_validate(street.model_dump(mode="json", exclude_none=True)) == street
    assert Scope(districts=("东城区",)).communities == ()
    assert Scope().communities is None


def test_a_scope_as_sql(engine: Engine) -> None:
    registry = Registry(engine)
    for device_id, district, street, community in [
        ("a", "东城区", "东华门街道", "东华门社区"),
        ("b", "东城区", "景山街道", "景山社区"),
        ("c", "西城区", "西长安街街道", "西长安街社区"),
        ("d", None, None, "其他社区"),
    ]:
        registry.add(
            DeviceRecord.model_validate(
                {
                    "device_id": device_id,
                    "device_type": "parking_sensor",
                    "district": district,
                    "street": street,
                    "community": community,
                    "grid_code": "110101001001001",
                }
            )
        )

    def ids(scope: Scope) -> list[str]:
        stmt = select(devices.c.device_id).where(scope.devices_where()).order_by(devices.c.device_id)
        with engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    assert ids(Scope()) == ["a", "b", "c", "d"]
    assert ids(Scope(communities=("东华门社区",))) == ["a"]
    assert ids(Scope(streets=("景山街道",))) == ["b"]
    assert ids(Scope(districts=("东城区",))) == ["a", "b"]
    assert ids(Scope(communities=("西长安街社区",), streets=("景山街道",))) == ["b", "c"]
    assert ids(Scope(communities=())) == []
    assert ids(scope_from_doc({"buildings": ["3"]})) == []


@pytest.mark.parametrize(
    ("role", "scope", "message"),
    [
        ("admin", Scope(communities=("a",)), "an admin reaches everything"),
        ("manager", Scope(), "a manager is scoped to one or more communities"),
        ("manager", Scope(streets=("s",)), "a manager is scoped to one or more communities"),
        ("installer", Scope(districts=("d",)), "not to streets or districts"),
        ("viewer", Scope(streets=()), "names no place"),
        ("incident_system", Scope(), "is for machines: make an API key"),
        ("root", Scope(), "unknown role 'root'"),
    ],
)
def test_the_role_decides_the_scope_a_person_may_have(role: str, scope: Scope, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_role_scope(role, scope)


@pytest.mark.parametrize(
    ("role", "scope"),
    [
        ("admin", Scope()),
        ("installer", Scope()),
        ("installer", Scope(communities=("a",))),
        ("manager", Scope(communities=("a", "b"))),
        ("viewer", Scope()),
        ("viewer", Scope(streets=("s",))),
        ("viewer", Scope(districts=("d",))),
    ],
)
def test_scopes_a_role_may_have(role: str, scope: Scope) -> None:
    check_role_scope(role, scope)


# ---------------------------------------------------------------------------------------------
# The store


def test_create_validates_and_stores_only_a_hash(store: UserStore, engine: Engine) -> None:
    user = store.create(
        " Wang.Fang ", role="manager", password=PASSWORD, display_name="王芳", scope=Scope(communities=("c",))
    )
    assert (user.username, user.display_name, user.role, user.disabled) == (
        "wang.fang",
        "王芳",
        "manager",
        False,
    )
    assert user.created_at == T0 and user.last_login_at is None
    with engine.connect() as conn:
        row = conn.execute(select(users)).one()
    assert row.password_hash.startswith("scrypt$") and PASSWORD not in str(tuple(row))
    with pytest.raises(UserExistsError, match=r"a user named 'wang\.fang' exists already"):
        store.create("WANG.FANG", role="viewer", password=PASSWORD)
    for name, password, message in [
        ("x y", PASSWORD, "a username is 1 to 64 characters"),
        ("-x", PASSWORD, "starting with a letter or digit"),
        ("li", "short", "at least 10 characters"),
        ("li.wei.1234", "Li.Wei.1234", "must not be the username"),
    ]:
        with pytest.raises(ValueError, match=message):
            store.create(name, role="viewer", password=password)


def test_login_gives_a_token_kept_only_as_its_sha256(store: UserStore, engine: Engine, clock: Clock) -> None:
    store.create("li", role="viewer", password=PASSWORD, scope=Scope(districts=("东城区",)))
    session = store.login("LI ", PASSWORD)
    assert session.token.startswith("sct_") and session.expires_at == T0 + TOKEN_TTL
    with engine.connect() as conn:
        row = conn.execute(select(user_tokens)).one()
    assert row.token_hash == hashlib.sha256(session.token.encode()).hexdigest()
    assert session.token not in str(tuple(row))
    principal = store.authenticate(session.token)
    assert (principal.username, principal.role, principal.key_id) == ("li", "viewer", None)
    assert principal.scope == Scope(districts=("东城区",))
    assert principal.actor == "user:li" and principal.person_actor == "user:li"
    assert store.get("li").last_login_at == T0  # type: ignore[union-attr]


def test_a_stored_hash_with_weaker_parameters_is_upgraded_at_login(engine: Engine, clock: Clock) -> None:
    weak = UserStore(engine, clock=clock, password_params=ScryptParams(n=2**8, r=8, p=1))
    weak.create("li", role="viewer", password=PASSWORD)
    stronger = UserStore(engine, clock=clock, password_params=FAST)
    stronger.login("li", PASSWORD)
    with engine.connect() as conn:
        assert conn.execute(select(users.c.password_hash)).scalar_one().startswith("scrypt$1024$8$1$")
    stronger.login("li", PASSWORD)


def test_a_session_ends_when_it_expires_is_logged_out_or_the_user_changes(
    store: UserStore, clock: Clock
) -> None:
    from api.auth import AuthError

    store.create("li", role="installer", password=PASSWORD)
    expiring = store.login("li", PASSWORD)
    clock.advance(seconds=TOKEN_TTL.total_seconds())
    with pytest.raises(AuthError, match=r"the session expired at .*: log in again"):
        store.authenticate(expiring.token)

    out = store.login("li", PASSWORD)
    assert store.logout(store.authenticate(out.token).session_id or "")
    with pytest.raises(AuthError, match="the session was logged out"):
        store.authenticate(out.token)

    a, b = store.login("li", PASSWORD), store.login("li", PASSWORD)
    store.update("li", password="another long one")
    for session in (a, b):
        with pytest.raises(AuthError, match="logged out"):
            store.authenticate(session.token)

    c = store.login("li", "another long one")
    store.update("li", disabled=True)
    with pytest.raises(AuthError):
        store.authenticate(c.token)
    with pytest.raises(LoginFailedError):
        store.login("li", "another long one")
    with pytest.raises(AuthError, match="unknown session token"):
        store.authenticate("sct_" + "x" * 43)
    with pytest.raises(AuthError, match="malformed session token"):
        store.authenticate("sct_short")


def test_a_new_role_or_scope_applies_to_open_sessions_at_once(store: UserStore) -> None:
    store.create("li", role="manager", password=PASSWORD, scope=Scope(communities=("a",)))
    token = store.login("li", PASSWORD).token
    store.update("li", role="viewer", scope=Scope(streets=("s",)))
    principal = store.authenticate(token)
    assert principal.role == "viewer" and principal.scope == Scope(streets=("s",))
    with pytest.raises(ValueError, match="a manager is scoped"):
        store.update("li", role="manager")


def test_wrong_user_and_wrong_password_are_the_same_failure(store: UserStore) -> None:
    store.create("li", role="viewer", password=PASSWORD)
    for username, password in [("li", "wrong password"), ("nobody", PASSWORD)]:
        with pytest.raises(LoginFailedError) as exc:
            store.login(username, password)
        assert str(exc.value) == LOGIN_FAILED


def test_a_few_failures_lock_a_username_for_a_while_known_or_not(store: UserStore, clock: Clock) -> None:
    store.create("li", role="viewer", password=PASSWORD)
    for username in ("li", "nobody"):
        for _ in range(store.limiter.max_failures):
            with pytest.raises(LoginFailedError):
                store.login(username, "wrong password")
        with pytest.raises(LoginLockedError) as exc:
            store.login(username, PASSWORD)  # even the right password
        assert exc.value.retry_after_s == int(store.limiter.lockout.total_seconds())
    clock.advance(seconds=store.limiter.lockout.total_seconds())
    assert store.login("li", PASSWORD).token


def test_failures_spread_beyond_the_window_do_not_lock(clock: Clock) -> None:
    limiter = LoginLimiter(max_failures=3, clock=clock)
    for _ in range(5):
        limiter.failed("li")
        limiter.failed("li")
        clock.advance(seconds=limiter.window.total_seconds() + 1)
    assert limiter.retry_after("li") == 0
    limiter.failed("li")
    limiter.succeeded("li")
    limiter.failed("li")
    limiter.failed("li")
    assert limiter.retry_after("li") == 0


def test_the_limiter_forgets_the_oldest_names_beyond_its_bound(clock: Clock) -> None:
    limiter = LoginLimiter(max_failures=1, clock=clock, max_names=10)
    for i in range(50):
        limiter.failed(f"user{i}")
    assert limiter.retry_after("user0") == 0 and limiter.retry_after("user49") > 0


# ---------------------------------------------------------------------------------------------
# Over HTTP


def test_login_over_http(client: TestClient, store: UserStore) -> None:
    store.create("li", role="installer", password=PASSWORD, display_name="李伟")
    r = client.post("/api/v1/auth/login", json={"username": "li", "password": PASSWORD})
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == int(TOKEN_TTL.total_seconds())
    assert body["access_token"].startswith("sct_")
    assert r.headers["cache-control"] == "no-store"
    h = {"Authorization": f"Bearer {body['access_token']}"}
    assert client.get("/api/v1/me", headers=h).json() == {
        "kind": "user",
        "username": "li",
        "key_id": None,
        "name": "李伟",
        "role": "installer",
        "scope": {},
    }
    assert client.get("/api/v1/devices", headers=h).status_code == 200
    # the same token in the other header works too
    assert client.get("/api/v1/me", headers={"X-API-Key": body["access_token"]}).status_code == 200


def test_failed_logins_over_http_say_nothing_about_which_part_was_wrong(
    client: TestClient, store: UserStore
) -> None:
    store.create("li", role="viewer", password=PASSWORD)
    store.create("zhao", role="viewer", password=PASSWORD)
    store.update("zhao", disabled=True)
    answers = [
        client.post("/api/v1/auth/login", json={"username": u, "password": p})
        for u, p in [("li", "wrong password"), ("nobody", PASSWORD), ("zhao", PASSWORD)]
    ]
    assert {r.status_code for r in answers} == {401}
    assert {r.content for r in answers} == {answers[0].content}
    assert answers[0].json() == {"detail": LOGIN_FAILED}
    for _ in range(store.limiter.max_failures - 1):
        client.post("/api/v1/auth/login", json={"username": "li", "password": "wrong password"})
    r = client.post("/api/v1/auth/login", json={"username": "li", "password": PASSWORD})
    assert r.status_code == 429 and r.headers["retry-after"] == "300"
    assert r.json()["detail"] == "too many failed logins for this username: try again in 300 s"
    r = client.post("/api/v1/auth/login", json={"username": "li", "password": PASSWORD, "x": 1})
    assert r.status_code == 422


def test_logout_ends_the_session_sent(client: TestClient, store: UserStore, engine: Engine) -> None:
    store.create("li", role="manager", password=PASSWORD, scope=Scope(communities=("c",)))
    first, second = login(client, "li"), login(client, "li")
    assert client.post("/api/v1/auth/logout", headers=first).status_code == 204
    r = client.get("/api/v1/me", headers=first)
    assert r.status_code == 401 and r.json()["detail"] == "the session was logged out: log in again"
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/v1/me", headers=second).status_code == 200
    r = client.post("/api/v1/auth/logout", headers=admin_key(engine))
    assert r.status_code == 400 and "apikeys revoke" in r.json()["detail"]


def test_api_keys_keep_working_beside_logins(client: TestClient, engine: Engine) -> None:
    key, full = ApiKeyStore(engine).create("case system", "incident_system")
    h = {"Authorization": f"Bearer {full}"}
    assert client.get("/api/v1/me", headers=h).status_code == 403  # the back-channel only
    key, full = ApiKeyStore(engine).create("script", "installer", Scope(communities=("c",)))
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {full}"}).json() == {
        "kind": "apikey",
        "username": None,
        "key_id": key.key_id,
        "name": "script",
        "role": "installer",
        "scope": {"communities": ["c"]},
    }


def test_admins_manage_users(client: TestClient, engine: Engine, store: UserStore) -> None:
    h = admin_key(engine)
    new = {
        "username": "Wang.Fang",
        "display_name": "王芳",
        "role": "manager",
        "scope": {"communities": ["东华门社区"]},
        "password": PASSWORD,
    }
    r = client.post("/api/v1/users", headers=h, json=new)
    assert r.status_code == 201, r.text
    assert r.json()["username"] == "wang.fang" and r.json()["scope"] == {"communities": ["东华门社区"]}
    assert "password" not in r.text and "scrypt" not in r.text
    assert client.post("/api/v1/users", headers=h, json=new).status_code == 409
    r = client.post("/api/v1/users", headers=h, json={**new, "username": "x", "scope": {}})
    assert r.status_code == 422 and "a manager is scoped to one or more communities" in r.json()["detail"]
    r = client.post("/api/v1/users", headers=h, json={**new, "username": "x", "role": "incident_system"})
    assert r.status_code == 422
    r = client.post("/api/v1/users", headers=h, json={**new, "username": "x", "scope": {"buildings": ["3"]}})
    assert r.status_code == 422

    session = login(client, "wang.fang")
    r = client.patch(
        "/api/v1/users/wang.fang", headers=h, json={"role": "viewer", "scope": {"streets": ["东华门街道"]}}
    )
    assert r.status_code == 200 and r.json()["role"] == "viewer"
    assert client.get("/api/v1/me", headers=session).json()["scope"] == {"streets": ["东华门街道"]}

    assert client.patch(
        "/api/v1/users/wang.fang", headers=h, json={"password": "new long password"}
    ).is_success
    assert client.get("/api/v1/me", headers=session).status_code == 401
    session = login(client, "wang.fang", "new long password")
    r = client.patch("/api/v1/users/wang.fang", headers=h, json={"disabled": True})
    assert r.json()["disabled"] is True
    assert client.get("/api/v1/me", headers=session).status_code == 401
    r = client.post("/api/v1/auth/login", json={"username": "wang.fang", "password": "new long password"})
    assert r.status_code == 401

    listed = client.get("/api/v1/users", headers=h).json()
    assert [(u["username"], u["disabled"]) for u in listed] == [("wang.fang", True)]
    assert client.get("/api/v1/users?include_disabled=false", headers=h).json() == []
    assert client.get("/api/v1/users/wang.fang", headers=h).json()["display_name"] == "王芳"
    r = client.get("/api/v1/users/nobody", headers=h)
    assert r.status_code == 404 and r.json()["detail"] == "no user is named 'nobody'"
    assert client.patch("/api/v1/users/nobody", headers=h, json={}).status_code == 404
    r = client.patch("/api/v1/users/wang.fang", headers=h, json={"password": "short"})
    assert r.status_code == 422 and "at least 10 characters" in r.json()["detail"]


def test_an_admin_cannot_lock_themselves_out(client: TestClient, store: UserStore) -> None:
    store.create("root", role="admin", password=PASSWORD)
    h = login(client, "root")
    for change in ({"disabled": True}, {"role": "viewer"}):
        r = client.patch("/api/v1/users/root", headers=h, json=change)
        assert r.status_code == 409 and "another admin" in r.json()["detail"]
    assert client.patch("/api/v1/users/root", headers=h, json={"display_name": "运维"}).status_code == 200


def test_what_a_person_does_is_attributed_to_them(
    client: TestClient, store: UserStore, engine: Engine
) -> None:
    store.create("li", role="installer", password=PASSWORD)
    h = login(client, "li")
    r = client.post(
        "/api/v1/devices?issue_credentials=false",
        headers=h,
        json={
            "device_id": "pk-1",
            "device_type": "parking_sensor",
            "community": "c",
            "grid_code": "110101001001001",
        },
    )
    assert r.status_code == 201, r.text
    history = client.get("/api/v1/devices/pk-1/history", headers=h).json()
    assert history[0]["actor"] == "user:li"


# ---------------------------------------------------------------------------------------------
# sc-gateway users ...


def run(
    capsys: pytest.CaptureFixture[str], db: str, *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    if stdin is not None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdin", io.StringIO(stdin))
            code = main(["--db", db, *argv])
    else:
        code = main(["--db", db, *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)
    return url


def test_cli_create_list_disable_enable_passwd(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, out, _ = run(
        capsys,
        db,
        "users",
        "create",
        "wang.fang",
        "--role",
        "manager",
        "--community",
        "东华门社区",
        "--community",
        "景山社区",
        "--display-name",
        "王芳",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert code == 0
    assert out == "user wang.fang (王芳), role manager, communities 东华门社区, 景山社区: created\n"
    code, out, _ = run(
        capsys, db, "users", "create", "zhao", "--role", "viewer", "--street", "东华门街道", "--json",
        "--password-stdin", stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["scope"] == {"streets": ["东华门街道"]}

    engine = make_engine(db)
    try:
        assert UserStore(engine).login("wang.fang", PASSWORD).token
    finally:
        engine.dispose()

    code, out, _ = run(capsys, db, "users", "list")
    assert code == 0 and "wang.fang" in out and "streets 东华门街道" in out
    code, out, _ = run(capsys, db, "users", "disable", "wang.fang")
    assert code == 0 and out.endswith("disabled (open sessions ended)\n")
    code, out, _ = run(capsys, db, "users", "list", "--active", "--json")
    assert [u["username"] for u in json.loads(out)] == ["zhao"]
    assert run(capsys, db, "users", "enable", "wang.fang")[0] == 0
    code, out, _ = run(
        capsys, db, "users", "passwd", "wang.fang", "--password-stdin", stdin="another long one\n"
    )
    assert code == 0 and out.endswith("password set (open sessions ended)\n")
    engine = make_engine(db)
    try:
        assert UserStore(engine).login("wang.fang", "another long one").token
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["create", "li", "--role", "manager", "--password-stdin"], PASSWORD, "a manager is scoped"),
        (["create", "li", "--role", "viewer", "--password-stdin"], "short", "at least 10 characters"),
        (["create", "li", "--role", "viewer", "--password-stdin"], "", "no password on standard input"),
        (
            ["create", "li", "--role", "viewer"],
            "",
            "no terminal to ask for the password: use --password-stdin",
        ),
        (["disable", "nobody"], None, "no user is named 'nobody'"),
        (["passwd", "nobody", "--password-stdin"], PASSWORD, "no user is named 'nobody'"),
    ],
)
def test_cli_errors(
    capsys: pytest.CaptureFixture[str], db: str, argv: list[str], stdin: str | None, message: str
) -> None:
    code, _, err = run(capsys, db, "users", *argv, stdin=stdin)
    assert code == 1 and message in err


def test_cli_refuses_a_taken_username(capsys: pytest.CaptureFixture[str], db: str) -> None:
    args = ["users", "create", "li", "--role", "viewer", "--password-stdin"]
    assert run(capsys, db, *args, stdin=PASSWORD)[0] == 0
    code, _, err = run(capsys, db, *args, stdin=PASSWORD)
    assert code == 1 and "a user named 'li' exists already" in err
