"""People over the API: log in and out, who am I, and the admins' user management.

| route | who |
|---|---|
| `POST /api/v1/auth/login` | anyone (username and password) |
| `POST /api/v1/auth/logout`, `GET /api/v1/me` | admin, installer, manager, viewer |
| `POST /api/v1/users`, `GET /api/v1/users`, `GET/PATCH /api/v1/users/{username}` | admin |
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.auth import (
    PASSWORD_MAX_LENGTH,
    PEOPLE_ROLES,
    LoginFailedError,
    LoginLockedError,
    Principal,
    Scope,
    User,
    UserExistsError,
    UserStore,
    require_roles,
    user_store,
)
from api.errors import ERROR_RESPONSES
from api.schemas import ErrorOut

router = APIRouter(prefix="/api/v1", tags=["users"], responses=ERROR_RESPONSES)
Users = Annotated[UserStore, Depends(user_store)]
Person = Annotated[Principal, Depends(require_roles(*PEOPLE_ROLES))]
Admin = Annotated[Principal, Depends(require_roles("admin"))]
UserRole = Literal["admin", "installer", "manager", "viewer"]

_404: Final[dict[int | str, dict[str, Any]]] = {404: {"model": ErrorOut, "description": "no such user"}}


class LoginIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"username": "li.wei", "password": "…"}]}
    )

    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH)


class TokenOut(BaseModel):
    access_token: str = Field(description="send it as 'Authorization: Bearer <access_token>'; shown once")
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="seconds the token is valid for")
    expires_at: dt.datetime


class UserOut(BaseModel):
    username: str
    display_name: str
    role: str
    scope: dict[str, list[str]] = Field(description="the places the user reaches; {} for everything")
    disabled: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    last_login_at: dt.datetime | None

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            username=user.username,
            display_name=user.display_name,
            role=user.role,
            scope=user.scope.model_dump(mode="json", exclude_none=True),
            disabled=user.disabled,
            created_at=user.created_at,
            updated_at=user.updated_at,
            last_login_at=user.last_login_at,
        )


class UserIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "username": "wang.fang",
                    "display_name": "王芳 (东华门物业)",
                    "role": "manager",
                    "scope": {"communities": ["东华门社区"]},
                    "password": "a long passphrase",
                }
            ]
        },
    )

    username: str = Field(description="a-z 0-9 . _ @ -, up to 64; stored lowercase")
    display_name: str | None = Field(None, description="how people see the user (default: the username)")
    role: UserRole
    scope: Scope = Field(
        default_factory=Scope,
        description="a manager: communities; a viewer: communities, streets or districts (none: all); "
        "an installer: communities (none: all); an admin: none",
    )
    password: str = Field(max_length=PASSWORD_MAX_LENGTH, description="at least 10 characters")


class UserPatch(BaseModel):
    """Only the fields sent change. A new password or `disabled: true` logs the user out everywhere."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = None
    role: UserRole | None = None
    scope: Scope | None = None
    disabled: bool | None = None
    password: str | None = Field(None, max_length=PASSWORD_MAX_LENGTH)


class MeOut(BaseModel):
    kind: Literal["user", "apikey"]
    username: str | None = None
    key_id: str | None = None
    name: str = Field(description="the user's display name or the API key's name")
    role: str
    scope: dict[str, list[str]]


def _unprocessable(exc: ValueError) -> HTTPException:
    return HTTPException(422, detail=str(exc))


@router.post(
    "/auth/login",
    summary="Log in with a username and password: a bearer token for the other routes",
    responses={
        401: {"model": ErrorOut, "description": "wrong username or password (the same answer for both)"},
        429: {"model": ErrorOut, "description": "too many failed logins for this username; Retry-After"},
    },
)
def login(body: LoginIn, store: Users, response: Response) -> TokenOut:
    """The token is valid for `expires_in` seconds, until logout, a new password or the user being
    disabled. After a few failed logins the username is locked for a few minutes (429)."""
    try:
        session = store.login(body.username, body.password)
    except LoginLockedError as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=str(exc),
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except LoginFailedError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None
    response.headers["Cache-Control"] = "no-store"
    return TokenOut(
        access_token=session.token,
        expires_in=int(session.ttl.total_seconds()),
        expires_at=session.expires_at,
    )


@router.post(
    "/auth/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Log out: the token sent stops working at once",
    responses={400: {"model": ErrorOut, "description": "an API key was sent, not a login's token"}},
)
def logout(principal: Person, store: Users) -> Response:
    if principal.session_id is None:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="an API key is not a session: revoke it with `sc-gateway apikeys revoke KEY_ID`",
        )
    store.logout(principal.session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/me", summary="Who the credential sent belongs to: role and scope")
def me(principal: Person) -> MeOut:
    return MeOut(
        kind="user" if principal.username is not None else "apikey",
        username=principal.username,
        key_id=principal.key_id,
        name=principal.name,
        role=principal.role,
        scope=principal.scope.model_dump(mode="json", exclude_none=True),
    )


@router.post(
    "/users",
    status_code=status.HTTP_201_CREATED,
    summary="Add a user (admins)",
    responses={409: {"model": ErrorOut, "description": "a user has that username already"}},
)
def create_user(body: UserIn, _admin: Admin, store: Users) -> UserOut:
    """The role decides the scope a user may have (422 otherwise): a manager is scoped to communities, a
    viewer to communities, streets or districts (or none: the whole city), an installer to communities
    or none, an admin to none. The incident system is a machine: it gets an API key."""
    try:
        user = store.create(
            body.username,
            role=body.role,
            password=body.password,
            display_name=body.display_name,
            scope=body.scope,
        )
    except UserExistsError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except ValueError as exc:
        raise _unprocessable(exc) from None
    return UserOut.of(user)


@router.get("/users", summary="Every user, disabled ones too (admins)")
def list_users(
    _admin: Admin, store: Users, role: UserRole | None = None, include_disabled: bool = True
) -> list[UserOut]:
    return [
        UserOut.of(u) for u in store.list(include_disabled=include_disabled) if role is None or u.role == role
    ]


def _user(store: UserStore, username: str) -> User:
    user = store.get(username)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no user is named {username!r}")
    return user


@router.get("/users/{username}", summary="One user (admins)", responses=_404)
def get_user(username: str, _admin: Admin, store: Users) -> UserOut:
    return UserOut.of(_user(store, username))


@router.patch(
    "/users/{username}",
    summary="Change a user's role, scope, name, password, or disable them (admins)",
    responses={**_404, 409: {"model": ErrorOut, "description": "an admin disabling or demoting themselves"}},
)
def update_user(username: str, body: UserPatch, admin: Admin, store: Users) -> UserOut:
    """A new role or scope applies to the user's open sessions at once; a new password or disabling logs
    them out everywhere; enabling again clears a login lockout."""
    user = _user(store, username)
    changes = body.model_dump(exclude_unset=True)
    if admin.username == user.username and (
        changes.get("disabled") is True or changes.get("role") not in (None, "admin")
    ):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail="you cannot disable or demote yourself: another admin must do it",
        )
    try:
        updated = store.update(
            user.username,
            display_name=body.display_name,
            role=body.role,
            scope=body.scope,
            disabled=body.disabled,
            password=body.password,
        )
    except ValueError as exc:
        raise _unprocessable(exc) from None
    return UserOut.of(updated)
