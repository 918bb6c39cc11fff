"""API keys: `sck_<key id>_<secret>`, stored as the SHA-256 of the secret, with a role and a scope.

A key is sent as `Authorization: Bearer sck_...` or `X-API-Key: sck_...`. Every route gets the caller as
a `Principal` (key id, name, role, scope) from `require_roles(...)`; a missing, malformed, unknown or
revoked key is 401, a key whose role the route does not allow is 403.

The secret is 256 random bits, so a plain SHA-256 protects it (a slow password hash is for guessable
secrets); the comparison is constant-time. The key id is public: keys are listed and revoked by it.

Roles (gateway.db.API_ROLES): admin and installer manage devices (the installers' routes); manager,
viewer and incident_system come with the managers' and the incident system's routes. A scope narrows
what a key reaches: `{"communities": ["东华门社区"]}` limits it to those communities' devices (absent or
null: all). Managers will be scoped like that; installers may be.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeAlias, get_args

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine, insert, select, update

from gateway.db import API_ROLES, api_keys, write_transaction

Role: TypeAlias = Literal["admin", "installer", "manager", "viewer", "incident_system"]
assert get_args(Role) == API_ROLES

KEY_PREFIX: Final = "sck"
KEY_FORMAT: Final = "sck_<key id>_<secret>"
_KEY_RE: Final = re.compile(r"sck_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
#: last_used_at is written at most this often per key, so authenticating is a read, not a write.
LAST_USED_RESOLUTION: Final = dt.timedelta(minutes=1)

INSTALLER_ROLES: Final = ("admin", "installer")


class AuthError(Exception):
    """The key is missing, malformed, unknown or revoked (401); the message says which."""


class KeyNotFoundError(Exception):
    """No API key has that id."""


class Scope(BaseModel):
    """What a key reaches. `communities` None means every community."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    communities: tuple[str, ...] | None = Field(
        default=None, description="the communities (by name) the key reaches; absent: all"
    )

    def allows_community(self, community: str | None) -> bool:
        return self.communities is None or (community is not None and community in self.communities)

    def describe(self) -> str:
        return "all communities" if self.communities is None else "communities " + ", ".join(self.communities)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a route: which key, its name, role and scope."""

    key_id: str
    name: str
    role: str
    scope: Scope

    @property
    def actor(self) -> str:
        """How the registry's history names what this caller did."""
        return f"apikey:{self.key_id} {self.name}"[:128]


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
        def iso(t: dt.datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "key_id": self.key_id,
            "name": self.name,
            "role": self.role,
            "scope": self.scope.model_dump(mode="json", exclude_none=True),
            "created_at": iso(self.created_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
        }


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret: SHA-256, hex."""
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
        raise AuthError(f"malformed API key: expected {KEY_FORMAT}")
    return m.group(1), m.group(2)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        return Principal(key_id=key_id, name=row.name, role=row.role, scope=_scope(row.scope))


def _scope(doc: Any) -> Scope:
    try:
        return Scope.model_validate(doc or {})
    except ValidationError:
        # A scope this version does not understand must not widen into "everything".
        return Scope(communities=())


def _key_from_row(m: Any) -> ApiKey:
    return ApiKey(
        key_id=m["key_id"],
        name=m["name"],
        role=m["role"],
        scope=_scope(m["scope"]),
        created_at=m["created_at"],
        last_used_at=m["last_used_at"],
        revoked_at=m["revoked_at"],
    )


# ---------------------------------------------------------------------------------------------
# FastAPI dependencies

_bearer = HTTPBearer(auto_error=False, description=f"Authorization: Bearer {KEY_FORMAT}")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"X-API-Key: {KEY_FORMAT}")

_HOW: Final = f"send 'Authorization: Bearer {KEY_FORMAT}' or 'X-API-Key: {KEY_FORMAT}'"


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"})


def key_store(request: Request) -> ApiKeyStore:
    store = request.app.state.services.keys
    assert isinstance(store, ApiKeyStore)
    return store


def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
    store: Annotated[ApiKeyStore, Depends(key_store)],
) -> Principal:
    """The caller's principal, or 401 with what is wrong."""
    authorization = request.headers.get("authorization")
    if authorization is not None and bearer is None:
        raise _unauthorized(f"the Authorization header must be 'Bearer {KEY_FORMAT}'")
    presented = bearer.credentials if bearer is not None else header_key
    if not presented:
        raise _unauthorized(f"missing API key: {_HOW}")
    try:
        return store.authenticate(presented)
    except AuthError as exc:
        raise _unauthorized(str(exc)) from None


def require_roles(*roles: str) -> Callable[..., Principal]:
    """A dependency that lets through only keys with one of `roles` (403 otherwise)."""
    allowed = tuple(roles)
    unknown = set(allowed) - set(API_ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}")

    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in allowed:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"API key {principal.key_id} has the role {principal.role}; "
                f"this needs one of: {', '.join(allowed)}",
            )
        return principal

    return check


#: The caller of an installers' route: an installer or an admin.
Installer = Annotated[Principal, Depends(require_roles(*INSTALLER_ROLES))]
