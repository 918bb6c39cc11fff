"""Who calls the API: machines with API keys, people with a password and a session token.

**API keys** `sck_<key id>_<secret>` (made with `sc-gateway apikeys create`) are for machines: the incident
system, scripts, adaptors. The secret is 256 random bits, stored as its SHA-256 (a slow hash is for
guessable secrets), compared in constant time; the key id is public, keys are listed and revoked by it.

**People** (`users`, made with `sc-gateway users create` or `POST /api/v1/users`) log in with
`POST /api/v1/auth/login {username, password}` and get a session token `sct_<secret>` (256 random bits,
stored as its SHA-256, valid for TOKEN_TTL, revoked by `POST /api/v1/auth/logout`, by a new password or by
disabling the user). Passwords are hashed with scrypt (stdlib, a per-user random salt, parameters kept in
the hash so they can be raised later), verified in constant time; a wrong username and a wrong password
get the same answer, and after LOGIN_MAX_FAILURES failures a username is locked for LOGIN_LOCKOUT (429),
whether it exists or not.

Both are sent as `Authorization: Bearer <key or token>` (or `X-API-Key: <key or token>`) and arrive at
the routes as one `Principal` (role and scope) through the same `authenticate` dependency;
`require_roles(...)` adds the role check. A missing, malformed, unknown, expired or revoked credential is
401, a role the route does not allow is 403.

Roles (gateway.db.API_ROLES): admin (everything, unscoped), installer (devices, places, commissioning;
may be limited to communities), manager (property manager: their communities' incidents and devices),
viewer (grid member or command centre: read-only, limited to communities, streets or districts, or
the whole city), incident_system (the case system's back-channel only; API keys, not people).

A **scope** narrows what a principal reaches: `{"communities": [...], "streets": [...], "districts":
[...]}`, matched against the place fields as the registry stores them on devices (and incidents copy
from devices): a device is inside when its community, its street or its district is listed. No field:
everything. Routes decide with `Scope.allows(district=, street=, community=)` for one object (outside:
404, as if it did not exist) and filter listings with `Scope.where(...)` / `Scope.devices_where()` /
`Scope.incidents_where()` in SQL. `Scope.communities` is never wider than the scope: None only when the
scope is unrestricted, `()` for a scope of streets or districts only.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeAlias, get_args

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from sqlalchemy import ColumnElement, Engine, delete, false, insert, or_, select, true, update

from gateway.db import (
    API_ROLES,
    USERNAME_LEN,
    api_keys,
    devices,
    incidents,
    user_tokens,
    users,
    write_transaction,
)

Role: TypeAlias = Literal["admin", "installer", "manager", "viewer", "incident_system"]
assert get_args(Role) == API_ROLES

KEY_PREFIX: Final = "sck"
KEY_FORMAT: Final = "sck_<key id>_<secret>"
_KEY_RE: Final = re.compile(r"sck_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
TOKEN_PREFIX: Final = "sct"
_TOKEN_RE: Final = re.compile(r"sct_[A-Za-z0-9_-]{43}")
#: last_used_at is written at most this often per key or token, so authenticating is a read, not a write.
LAST_USED_RESOLUTION: Final = dt.timedelta(minutes=1)
#: How long a session token is valid (a working day), whatever is done with it.
TOKEN_TTL: Final = dt.timedelta(hours=12)

INSTALLER_ROLES: Final = ("admin", "installer")
#: The roles a person may have (incident_system is a machine: it gets an API key).
USER_ROLES: Final = ("admin", "installer", "manager", "viewer")

USERNAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")
PASSWORD_MIN_LENGTH: Final = 10
PASSWORD_MAX_LENGTH: Final = 1024

#: Failed logins for one username within LOGIN_WINDOW that lock it for LOGIN_LOCKOUT.
LOGIN_MAX_FAILURES: Final = 5
LOGIN_WINDOW: Final = dt.timedelta(minutes=15)
LOGIN_LOCKOUT: Final = dt.timedelta(minutes=5)
#: The one answer to a wrong username, a wrong password and a disabled user.
LOGIN_FAILED: Final = "wrong username or password"
#: Password hashes computed at once (each takes 16 MiB and a fraction of a second): a flood of logins
#: queues instead of taking the API's memory.
HASHING_CONCURRENCY: Final = 4


class AuthError(Exception):
    """The credential is missing, malformed, unknown, expired or revoked (401); the message says which."""


class KeyNotFoundError(Exception):
    """No API key has that id."""


class UserNotFoundError(LookupError):
    """No user has that username."""


class UserExistsError(Exception):
    """A user has that username already."""


class LoginFailedError(Exception):
    """Wrong username or password, or a disabled user: the caller is not told which."""


class LoginLockedError(Exception):
    """Too many failed logins for this username: `retry_after_s` until it may try again."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed logins for this username: try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------------------------
# Scope

PlaceNames = tuple[str, ...] | None


class Scope(BaseModel):
    """What a key or user reaches: the places named (by whatever the registry stores: names or codes),
    any level matching. No field given: everything."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    communities: PlaceNames = Field(
        default=None, description="communities reached (as devices store them); absent: see the class"
    )
    streets: PlaceNames = Field(default=None, description="streets (街道) reached: every device in them")
    districts: PlaceNames = Field(default=None, description="districts (区) reached: every device in them")

    @field_validator("communities", "streets", "districts")
    @classmethod
    def _clean(cls, value: PlaceNames) -> PlaceNames:
        if value is None:
            return None
        out: list[str] = []
        for name in value:
            name = name.strip()
            if not 1 <= len(name) <= 128:
                raise ValueError("a place in a scope is 1 to 128 characters")
            if name not in out:
                out.append(name)
        return tuple(out)

    @model_validator(mode="after")
    def _never_wider(self) -> Scope:
        # Code that reads `communities` alone (None: all) must not take a street scope for "everything".
        if self.communities is None and (self.streets is not None or self.districts is not None):
            object.__setattr__(self, "communities", ())
        return self

    @model_serializer(mode="wrap")
    def _without_implied(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        doc: dict[str, Any] = handler(self)
        implied = self.communities == () and (self.streets is not None or self.districts is not None)
        if implied and doc.get("communities") in ([], ()):
            del doc["communities"]
        return doc

    @property
    def unrestricted(self) -> bool:
        return self.communities is None and self.streets is None and self.districts is None

    @property
    def communities_only(self) -> bool:
        """True when the scope can be told by community alone (unrestricted, or communities only)."""
        return self.streets is None and self.districts is None

    def allows(
        self, *, district: str | None = None, street: str | None = None, community: str | None = None
    ) -> bool:
        """Whether something at this place (as the registry stores it) is inside the scope."""
        if self.unrestricted:
            return True
        return any(
            value is not None and names is not None and value in names
            for value, names in (
                (community, self.communities),
                (street, self.streets),
                (district, self.districts),
            )
        )

    def allows_community(self, community: str | None) -> bool:
        return self.allows(community=community)

    def where(
        self,
        *,
        community: ColumnElement[Any] | None = None,
        street: ColumnElement[Any] | None = None,
        district: ColumnElement[Any] | None = None,
    ) -> ColumnElement[bool]:
        """The scope as a SQL condition on the given place columns (true() when unrestricted). A level
        the scope names but no column is given for matches nothing: narrower, never wider."""
        if self.unrestricted:
            return true()
        parts = [
            column.in_(list(names))
            for column, names in (
                (community, self.communities),
                (street, self.streets),
                (district, self.districts),
            )
            if column is not None and names
        ]
        return or_(*parts) if parts else false()

    def devices_where(self) -> ColumnElement[bool]:
        """The scope as a condition on `devices`."""
        return self.where(community=devices.c.community, street=devices.c.street, district=devices.c.district)

    def incidents_where(self) -> ColumnElement[bool]:
        """The scope as a condition on `incidents` (street and district from the incident's location)."""
        return self.where(
            community=incidents.c.community, street=incidents.c.street, district=incidents.c.district
        )

    def describe(self) -> str:
        if self.unrestricted:
            return "all communities"
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (
                ("communities", self.communities),
                ("streets", self.streets),
                ("districts", self.districts),
            )
            if names
        ]
        return "; ".join(parts) or "nothing"


def scope_from_doc(doc: Any) -> Scope:
    """A stored scope; one this version cannot read reaches nothing (never everything)."""
    try:
        return Scope.model_validate(doc or {})
    except ValidationError:
        return Scope(communities=())


def check_role_scope(role: str, scope: Scope) -> None:
    """ValueError unless a person with `role` may have `scope`."""
    if role not in API_ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(USER_ROLES)}")
    if role not in USER_ROLES:
        raise ValueError(f"the role {role} is for machines: make an API key (sc-gateway apikeys create)")
    if role == "admin" and not scope.unrestricted:
        raise ValueError("an admin reaches everything: give no scope")
    if role == "manager" and (not scope.communities or not scope.communities_only):
        raise ValueError("a manager is scoped to one or more communities (and no streets or districts)")
    if role == "installer" and not scope.communities_only:
        raise ValueError("an installer may be limited to communities, not to streets or districts")
    if not scope.unrestricted and not (scope.communities or scope.streets or scope.districts):
        raise ValueError("the scope names no place: give a community, a street or a district")


# ---------------------------------------------------------------------------------------------
# Principal


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a route: an API key (key_id) or a person (username), with a role and a scope."""

    key_id: str | None
    name: str
    role: str
    scope: Scope
    username: str | None = None
    #: the SHA-256 of the session token a person called with (what logout revokes)
    session_id: str | None = None

    @property
    def who(self) -> str:
        """How error messages name the caller."""
        return f"user {self.username}" if self.username is not None else f"API key {self.key_id}"

    @property
    def whose(self) -> str:
        """ "this API key's" or "this user's" (as in: outside this API key's scope)."""
        return "this user's" if self.username is not None else "this API key's"

    @property
    def actor(self) -> str:
        """How the registry's history names what this caller did."""
        if self.username is not None:
            return f"user:{self.username}"
        return f"apikey:{self.key_id} {self.name}"[:128]

    @property
    def person_actor(self) -> str:
        """How an incident's history names a person's action (`user:...`)."""
        return self.actor if self.username is not None else f"user:{self.actor}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "user" if self.username is not None else "apikey",
            "username": self.username,
            "key_id": self.key_id,
            "name": self.name,
            "role": self.role,
            "scope": self.scope.model_dump(mode="json", exclude_none=True),
        }


# ---------------------------------------------------------------------------------------------
# API keys


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored (never its secret)."""

    key_id: str
    name: str
    role: str
    scope: Scope
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "role": self.role,
            "scope": self.scope.model_dump(mode="json", exclude_none=True),
            "created_at": _iso(self.created_at),
            "last_used_at": _iso(self.last_used_at),
            "revoked_at": _iso(self.revoked_at),
        }


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret or a session token: SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(key id, secret, the full key to hand out once)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key(text: str) -> tuple[str, str]:
    """(key id, secret) of a presented key; AuthError if it is not of the form sck_<key id>_<secret>."""
    m = _KEY_RE.fullmatch(text.strip())
    if m is None:
        raise AuthError(f"malformed API key: expected {KEY_FORMAT} (or a login token, {TOKEN_PREFIX}_...)")
    return m.group(1), m.group(2)


class ApiKeyStore:
    """API keys in SQL (`api_keys`)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def create(self, name: str, role: str, scope: Scope | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and the full key text, which is shown once and stored nowhere."""
        name = name.strip()
        if not 1 <= len(name) <= 128:
            raise ValueError("the key's name must be 1 to 128 characters")
        if role not in API_ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(API_ROLES)}")
        key_id, secret, full = new_key()
        scope = scope or Scope()
        with write_transaction(self._engine) as conn:
            conn.execute(
                insert(api_keys),
                [
                    {
                        "key_id": key_id,
                        "name": name,
                        "secret_hash": hash_secret(secret),
                        "role": role,
                        "scope": scope.model_dump(mode="json", exclude_none=True),
                        "created_at": self._clock(),
                    }
                ],
            )
        key = self.get(key_id)
        assert key is not None
        return key, full

    def get(self, key_id: str) -> ApiKey | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return None if row is None else _key_from_row(row._mapping)

    def list(self, *, include_revoked: bool = True) -> list[ApiKey]:
        stmt = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
        if not include_revoked:
            stmt = stmt.where(api_keys.c.revoked_at.is_(None))
        with self._engine.connect() as conn:
            return [_key_from_row(row._mapping) for row in conn.execute(stmt)]

    def revoke(self, key_id: str) -> tuple[ApiKey, bool]:
        """Revoke a key (it stops working at once); (the key, whether it was active). KeyNotFoundError."""
        with write_transaction(self._engine) as conn:
            revoked = conn.execute(select(api_keys.c.revoked_at).where(api_keys.c.key_id == key_id)).first()
            if revoked is None:
                raise KeyNotFoundError(f"no API key has the id {key_id!r}")
            changed = revoked.revoked_at is None
            if changed:
                conn.execute(
                    update(api_keys).where(api_keys.c.key_id == key_id).values(revoked_at=self._clock())
                )
        key = self.get(key_id)
        assert key is not None
        return key, changed

    def authenticate(self, presented: str) -> Principal:
        """The principal of a presented key; AuthError saying what is wrong with it."""
        key_id, secret = parse_key(presented)
        with self._engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        # The same answer for an unknown id and a wrong secret: the id is not a secret, but a caller
        # should learn nothing from trying.
        if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
            raise AuthError("unknown API key")
        if row.revoked_at is not None:
            raise AuthError(f"API key {key_id} was revoked at {row.revoked_at.isoformat()}")
        now = self._clock()
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            with self._engine.begin() as conn:
                conn.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(last_used_at=now))
        return Principal(key_id=key_id, name=row.name, role=row.role, scope=scope_from_doc(row.scope))


def _key_from_row(m: Any) -> ApiKey:
    return ApiKey(
        key_id=m["key_id"],
        name=m["name"],
        role=m["role"],
        scope=scope_from_doc(m["scope"]),
        created_at=m["created_at"],
        last_used_at=m["last_used_at"],
        revoked_at=m["revoked_at"],
    )


# ---------------------------------------------------------------------------------------------
# Passwords


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost: n (CPU and memory, a power of 2), r (block size), p (parallelism). The default is
    one of OWASP's equivalent minimums (N=2^14, r=8, p=5: 16 MiB per hash)."""

    n: int = 2**14
    r: int = 8
    p: int = 5

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1) or self.n > 2**20:
            raise ValueError("scrypt n must be a power of 2 up to 2^20")
        if not 1 <= self.r <= 32 or not 1 <= self.p <= 16:
            raise ValueError("scrypt r must be 1 to 32 and p 1 to 16")

    @property
    def maxmem(self) -> int:
        return 128 * self.r * self.n * 2 + (1 << 20)


SCRYPT: Final = ScryptParams()
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _password_bytes(password: str) -> bytes:
    # The same password typed on another keyboard (full-width digits, composed characters) is the same.
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _scrypt(password: str, salt: bytes, params: ScryptParams) -> bytes:
    return hashlib.scrypt(
        _password_bytes(password),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=_HASH_BYTES,
    )


def hash_password(password: str, params: ScryptParams = SCRYPT) -> str:
    """`scrypt$<n>$<r>$<p>$<salt>$<hash>` (base64) with a new random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, salt, params)
    return f"scrypt${params.n}${params.r}${params.p}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[ScryptParams, bytes, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        params = ScryptParams(int(parts[1]), int(parts[2]), int(parts[3]))
        return params, _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error):
        return None


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` is the one `encoded` was made from (constant-time comparison)."""
    parsed = _parse_hash(encoded)
    if parsed is None:
        return False
    params, salt, expected = parsed
    return hmac.compare_digest(_scrypt(password, salt, params), expected)


def check_password(password: str, *, username: str | None = None) -> None:
    """ValueError unless `password` is acceptable: PASSWORD_MIN_LENGTH to PASSWORD_MAX_LENGTH characters,
    not the username. (Length, not character classes: NIST SP 800-63B.)"""
    if len(password) < PASSWORD_MIN_LENGTH:
        raise ValueError(f"the password must be at least {PASSWORD_MIN_LENGTH} characters")
    if len(password) > PASSWORD_MAX_LENGTH:
        raise ValueError(f"the password must be at most {PASSWORD_MAX_LENGTH} characters")
    if username is not None and password.strip().lower() == username.lower():
        raise ValueError("the password must not be the username")


def normalize_username(username: str) -> str:
    """A username as stored: lowercase, trimmed."""
    return username.strip().lower()


def check_username(username: str) -> str:
    """The normalized username; ValueError unless it is 1 to 64 of a-z 0-9 . _ @ - (a letter or digit
    first)."""
    name = normalize_username(username)
    if USERNAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"a username is 1 to {USERNAME_LEN} characters: a-z, 0-9, '.', '_', '@', '-', "
            "starting with a letter or digit"
        )
    return name


# ---------------------------------------------------------------------------------------------
# Login rate limit


class LoginLimiter:
    """Failed logins per username, in memory (one API process): LOGIN_MAX_FAILURES within LOGIN_WINDOW
    lock the username for LOGIN_LOCKOUT. Unknown usernames are counted like known ones, so the lockout
    does not tell which exist. At most `max_names` usernames are tracked (the oldest are forgotten)."""

    def __init__(
        self,
        *,
        max_failures: int = LOGIN_MAX_FAILURES,
        window: dt.timedelta = LOGIN_WINDOW,
        lockout: dt.timedelta = LOGIN_LOCKOUT,
        clock: Callable[[], dt.datetime] = _utcnow,
        max_names: int = 10_000,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self._clock = clock
        self._max_names = max_names
        # username → (failures in the window, when the window began, locked until)
        self._state: dict[str, tuple[int, dt.datetime, dt.datetime | None]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(username: str) -> str:
        return normalize_username(username)[: USERNAME_LEN + 1]

    def retry_after(self, username: str) -> int:
        """Seconds until `username` may try again; 0 when it is not locked."""
        now = self._clock()
        with self._lock:
            entry = self._state.get(self._key(username))
        if entry is None or entry[2] is None or entry[2] <= now:
            return 0
        return max(1, int((entry[2] - now).total_seconds() + 0.999))

    def failed(self, username: str) -> None:
        now = self._clock()
        key = self._key(username)
        with self._lock:
            count, since, _ = self._state.pop(key, (0, now, None))
            if now - since > self.window:
                count, since = 0, now
            count += 1
            if count >= self.max_failures:
                self._state[key] = (0, now, now + self.lockout)
            else:
                self._state[key] = (count, since, None)
            if len(self._state) > self._max_names:
                self._forget(now)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._state.pop(self._key(username), None)

    def _forget(self, now: dt.datetime) -> None:
        for key, (_count, since, until) in list(self._state.items()):
            if (until is None or until <= now) and now - since > self.window:
                del self._state[key]
        while len(self._state) > self._max_names:
            del self._state[next(iter(self._state))]


# ---------------------------------------------------------------------------------------------
# Users and their sessions


@dataclass(frozen=True, slots=True)
class User:
    """A person who logs in, as stored (never the password hash)."""

    username: str
    display_name: str
    role: str
    scope: Scope
    disabled: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    last_login_at: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "display_name": self.display_name,
            "role": self.role,
            "scope": self.scope.model_dump(mode="json", exclude_none=True),
            "disabled": self.disabled,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_login_at": _iso(self.last_login_at),
        }


@dataclass(frozen=True, slots=True)
class Session:
    """A session token handed out by a login (shown once) and when it expires."""

    token: str
    expires_at: dt.datetime
    ttl: dt.timedelta


def new_token() -> str:
    return f"{TOKEN_PREFIX}_{secrets.token_urlsafe(32)}"


_UNSET: Final[Any] = object()


class UserStore:
    """Users (`users`) and their session tokens (`user_tokens`) in SQL; logins rate-limited in memory."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        token_ttl: dt.timedelta = TOKEN_TTL,
        password_params: ScryptParams = SCRYPT,
        limiter: LoginLimiter | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self.token_ttl = token_ttl
        self._params = password_params
        self.limiter = limiter or LoginLimiter(clock=clock)
        self._dummy: str | None = None
        self._hashing = threading.BoundedSemaphore(HASHING_CONCURRENCY)

    # -- people ----------------------------------------------------------------------------------

    def create(
        self,
        username: str,
        *,
        role: str,
        password: str,
        display_name: str | None = None,
        scope: Scope | None = None,
    ) -> User:
        """A new user; ValueError naming what is wrong, UserExistsError."""
        name = check_username(username)
        scope = scope or Scope()
        display = _display_name(display_name if display_name is not None else name)
        check_role_scope(role, scope)
        check_password(password, username=name)
        now = self._clock()
        password_hash = hash_password(password, self._params)
        with write_transaction(self._engine) as conn:
            if conn.execute(select(users.c.username).where(users.c.username == name)).first() is not None:
                raise UserExistsError(f"a user named {name!r} exists already")
            conn.execute(
                insert(users),
                [
                    {
                        "username": name,
                        "display_name": display,
                        "role": role,
                        "scope": scope.model_dump(mode="json", exclude_none=True),
                        "password_hash": password_hash,
                        "disabled": False,
                        "created_at": now,
                        "updated_at": now,
                    }
                ],
            )
        return self._must_get(name)

    def get(self, username: str) -> User | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.username == normalize_username(username))).first()
        return None if row is None else _user_from_row(row._mapping)

    def _must_get(self, username: str) -> User:
        user = self.get(username)
        if user is None:
            raise UserNotFoundError(f"no user is named {normalize_username(username)!r}")
        return user

    def list(self, *, include_disabled: bool = True) -> list[User]:
        stmt = select(users).order_by(users.c.username)
        if not include_disabled:
            stmt = stmt.where(users.c.disabled.is_(False))
        with self._engine.connect() as conn:
            return [_user_from_row(row._mapping) for row in conn.execute(stmt)]

    def update(
        self,
        username: str,
        *,
        display_name: str | None = None,
        role: str | None = None,
        scope: Scope | None = None,
        disabled: bool | None = None,
        password: str | None = None,
    ) -> User:
        """Change what is given (None: unchanged). A new password or disabling revokes the user's sessions;
        a new role or scope applies to them at once. UserNotFoundError, ValueError."""
        current = self._must_get(username)
        name = current.username
        values: dict[str, Any] = {}
        if display_name is not None:
            values["display_name"] = _display_name(display_name)
        new_role = role if role is not None else current.role
        new_scope = scope if scope is not None else current.scope
        if role is not None or scope is not None:
            check_role_scope(new_role, new_scope)
            values["role"] = new_role
            values["scope"] = new_scope.model_dump(mode="json", exclude_none=True)
        if password is not None:
            check_password(password, username=name)
            values["password_hash"] = hash_password(password, self._params)
        if disabled is not None:
            values["disabled"] = disabled
        if not values:
            return current
        now = self._clock()
        with write_transaction(self._engine) as conn:
            conn.execute(update(users).where(users.c.username == name).values(**values, updated_at=now))
            if password is not None or disabled:
                self._revoke_all(conn, name, now)
        if password is not None or disabled is False:
            self.limiter.succeeded(name)
        return self._must_get(name)

    def revoke_sessions(self, username: str) -> int:
        """Log the user out everywhere; how many sessions were open."""
        with write_transaction(self._engine) as conn:
            return self._revoke_all(conn, self._must_get(username).username, self._clock())

    @staticmethod
    def _revoke_all(conn: Any, username: str, now: dt.datetime) -> int:
        result = conn.execute(
            update(user_tokens)
            .where(
                user_tokens.c.username == username,
                user_tokens.c.revoked_at.is_(None),
                user_tokens.c.expires_at > now,
            )
            .values(revoked_at=now)
        )
        return int(result.rowcount or 0)

    # -- logging in and out ------------------------------------------------------------------------

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = hash_password(secrets.token_urlsafe(16), self._params)
        return self._dummy

    def login(self, username: str, password: str) -> Session:
        """A new session for the right username and password. LoginFailedError (the same for a wrong
        username, a wrong password and a disabled user), LoginLockedError after too many failures."""
        wait = self.limiter.retry_after(username)
        if wait:
            raise LoginLockedError(wait)
        name = normalize_username(username)
        with self._engine.connect() as conn:
            row = conn.execute(
                select(users.c.username, users.c.password_hash, users.c.disabled).where(
                    users.c.username == name
                )
            ).first()
        # Hash even for an unknown user, so the time taken does not tell either.
        with self._hashing:
            ok = verify_password(password, row.password_hash if row is not None else self._dummy_hash())
        if row is None or not ok or row.disabled:
            self.limiter.failed(name)
            raise LoginFailedError(LOGIN_FAILED)
        self.limiter.succeeded(name)
        now = self._clock()
        token = new_token()
        expires_at = now + self.token_ttl
        values: dict[str, Any] = {"last_login_at": now}
        parsed = _parse_hash(row.password_hash)
        if parsed is not None and parsed[0] != self._params:
            values["password_hash"] = hash_password(password, self._params)  # stronger parameters now
        with write_transaction(self._engine) as conn:
            conn.execute(update(users).where(users.c.username == name).values(**values))
            conn.execute(
                insert(user_tokens),
                [
                    {
                        "token_hash": hash_secret(token),
                        "username": name,
                        "created_at": now,
                        "expires_at": expires_at,
                    }
                ],
            )
            # Housekeeping: tokens long expired are of no use to anyone.
            conn.execute(delete(user_tokens).where(user_tokens.c.expires_at < now - dt.timedelta(days=7)))
        return Session(token=token, expires_at=expires_at, ttl=self.token_ttl)

    def logout(self, session_id: str) -> bool:
        """Revoke the session whose token hashes to `session_id`; whether it was open."""
        now = self._clock()
        with write_transaction(self._engine) as conn:
            result = conn.execute(
                update(user_tokens)
                .where(user_tokens.c.token_hash == session_id, user_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return bool(result.rowcount)

    def authenticate(self, presented: str) -> Principal:
        """The principal of a presented session token; AuthError saying what is wrong with it."""
        token = presented.strip()
        if _TOKEN_RE.fullmatch(token) is None:
            raise AuthError(f"malformed session token: expected {TOKEN_PREFIX}_<secret> from a login")
        token_hash = hash_secret(token)
        stmt = (
            select(user_tokens, users.c.display_name, users.c.role, users.c.scope, users.c.disabled)
            .join(users, users.c.username == user_tokens.c.username)
            .where(user_tokens.c.token_hash == token_hash)
        )
        with self._engine.connect() as conn:
            row = conn.execute(stmt).first()
        now = self._clock()
        if row is None:
            raise AuthError("unknown session token: log in again")
        if row.revoked_at is not None:
            raise AuthError("the session was logged out: log in again")
        if row.expires_at <= now:
            raise AuthError(f"the session expired at {row.expires_at.isoformat()}: log in again")
        if row.disabled:
            raise AuthError(f"user {row.username} is disabled")
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            with self._engine.begin() as conn:
                conn.execute(
                    update(user_tokens).where(user_tokens.c.token_hash == token_hash).values(last_used_at=now)
                )
        return Principal(
            key_id=None,
            name=row.display_name,
            role=row.role,
            scope=scope_from_doc(row.scope),
            username=row.username,
            session_id=token_hash,
        )


def _display_name(text: str) -> str:
    name = text.strip()
    if not 1 <= len(name) <= 128:
        raise ValueError("the display name must be 1 to 128 characters")
    return name


def _user_from_row(m: Any) -> User:
    return User(
        username=m["username"],
        display_name=m["display_name"],
        role=m["role"],
        scope=scope_from_doc(m["scope"]),
        disabled=bool(m["disabled"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        last_login_at=m["last_login_at"],
    )


# ---------------------------------------------------------------------------------------------
# FastAPI dependencies

_bearer = HTTPBearer(
    auto_error=False, description=f"Authorization: Bearer {KEY_FORMAT} (machines) or a login's token"
)
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"X-API-Key: {KEY_FORMAT}")

_HOW: Final = (
    f"send 'Authorization: Bearer {KEY_FORMAT}' or 'X-API-Key: {KEY_FORMAT}' (an API key), or "
    f"'Authorization: Bearer {TOKEN_PREFIX}_...' (the token of POST /api/v1/auth/login)"
)


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"})


def key_store(request: Request) -> ApiKeyStore:
    store = request.app.state.services.keys
    assert isinstance(store, ApiKeyStore)
    return store


def user_store(request: Request) -> UserStore:
    store = request.app.state.services.users
    assert isinstance(store, UserStore)
    return store


def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
    keys: Annotated[ApiKeyStore, Depends(key_store)],
    people: Annotated[UserStore, Depends(user_store)],
) -> Principal:
    """The caller's principal (an API key's or a logged-in person's), or 401 with what is wrong."""
    authorization = request.headers.get("authorization")
    if authorization is not None and bearer is None:
        raise _unauthorized(
            f"the Authorization header must be 'Bearer {KEY_FORMAT}' (an API key) or "
            f"'Bearer {TOKEN_PREFIX}_...' (a login token)"
        )
    presented = bearer.credentials if bearer is not None else header_key
    if not presented:
        raise _unauthorized(f"missing credentials: {_HOW}")
    try:
        if presented.strip().startswith(TOKEN_PREFIX + "_"):
            return people.authenticate(presented)
        return keys.authenticate(presented)
    except AuthError as exc:
        raise _unauthorized(str(exc)) from None


def require_roles(*roles: str) -> Callable[..., Principal]:
    """A dependency that lets through only callers with one of `roles` (403 otherwise)."""
    allowed = tuple(roles)
    unknown = set(allowed) - set(API_ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}")

    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in allowed:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"{principal.who} has the role {principal.role}; "
                f"this needs one of: {', '.join(allowed)}",
            )
        return principal

    return check


def require_unscoped(principal: Principal, what: str) -> None:
    """403 unless the caller reaches everything: for what spans every community."""
    if not principal.scope.unrestricted:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"{what} spans every community: {principal.who} is limited to "
            f"{principal.scope.describe()}",
        )


def check_listing_community(principal: Principal, community: str | None) -> None:
    """403 when a listing is asked for a community its caller's scope of communities does not hold. A
    street's or district's scope cannot tell from the name alone (communities are not known to be in a
    street without their devices): the listing's scope condition leaves such a community's rows out."""
    scope = principal.scope
    if community is not None and scope.communities_only and not scope.allows_community(community):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"community {community!r} is outside this key's scope ({scope.describe()})",
        )


#: The caller of an installers' route: an installer or an admin.
Installer = Annotated[Principal, Depends(require_roles(*INSTALLER_ROLES))]
#: People (and their machines) who may look at their own identity: every role but incident_system.
PEOPLE_ROLES: Final = USER_ROLES
