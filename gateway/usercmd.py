"""`sc-gateway users create|list|disable|enable|passwd`: the people who log in to the API.

A password is typed twice at a prompt (never an argument: it would stay in the shell history and show in
`ps`), or read from standard input with --password-stdin (the first line) for scripts.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from gateway.cli import (
    CommandError,
    SubParsers,
    add_command,
    add_group,
    format_table,
    open_engine,
    print_json,
)

if TYPE_CHECKING:
    from api.auth import Scope, User, UserStore

_ROLES = ("admin", "installer", "manager", "viewer")


def add_user_commands(sub: SubParsers) -> None:
    users = add_group(sub, "users", "people who log in to the API (machines get API keys)")
    p = add_command(users, "create", "add a user; the password is asked for (or --password-stdin)", _create)
    p.add_argument("username", help="a-z 0-9 . _ @ - (stored lowercase)")
    p.add_argument("--role", required=True, choices=_ROLES)
    p.add_argument("--display-name", help="how people see the user (default: the username)")
    _scope_options(p)
    _password_option(p)
    p = add_command(users, "list", "every user with role, scope and last login (never passwords)", _list)
    p.add_argument("--active", action="store_true", help="only users not disabled")
    p = add_command(users, "disable", "disable a user: logins refused, open sessions end at once", _disable)
    p.add_argument("username")
    p = add_command(users, "enable", "enable a disabled user again", _enable)
    p.add_argument("username")
    p = add_command(users, "passwd", "set a user's password; their open sessions end", _passwd)
    p.add_argument("username")
    _password_option(p)


def _scope_options(p: argparse.ArgumentParser) -> None:
    for flag, dest, what in (
        ("--community", "communities", "a community"),
        ("--street", "streets", "a street (街道)"),
        ("--district", "districts", "a district (区)"),
    ):
        p.add_argument(
            flag,
            action="append",
            dest=dest,
            metavar="NAME",
            help=f"limit the user to {what}, as devices name it (repeatable)",
        )


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise CommandError("no terminal to ask for the password: use --password-stdin")
    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        raise CommandError("the two passwords differ")
    return password


def _scope(args: argparse.Namespace) -> Scope:
    from api.auth import Scope

    given = {
        field: tuple(values)
        for field in ("communities", "streets", "districts")
        if (values := getattr(args, field, None))
    }
    return Scope(**given)


def _store(engine: Engine) -> UserStore:
    from api.auth import UserStore

    return UserStore(engine)


def _show(args: argparse.Namespace, user: User, what: str) -> int:
    if args.json:
        print_json(user.as_dict())
    else:
        print(
            f"user {user.username} ({user.display_name}), role {user.role}, {user.scope.describe()}: {what}"
        )
    return 0


def _create(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from api.auth import UserExistsError

    try:
        scope = _scope(args)
    except ValidationError as exc:
        raise CommandError(f"bad scope: {exc.errors()[0]['msg']}") from None
    password = _password(args)
    with open_engine(args) as engine:
        try:
            user = _store(engine).create(
                args.username,
                role=args.role,
                password=password,
                display_name=args.display_name,
                scope=scope,
            )
        except (ValueError, UserExistsError) as exc:
            raise CommandError(str(exc)) from None
    return _show(args, user, "created")


def _list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        found = _store(engine).list(include_disabled=not args.active)
    if args.json:
        print_json([u.as_dict() for u in found])
        return 0
    if not found:
        print("no users (add one with `sc-gateway users create NAME --role manager --community C`)")
        return 0
    rows = [
        (
            u.username,
            u.display_name,
            u.role,
            u.scope.describe(),
            "disabled" if u.disabled else "active",
            u.last_login_at and u.last_login_at.strftime("%Y-%m-%d %H:%M"),
        )
        for u in found
    ]
    print(format_table(["username", "name", "role", "scope", "state", "last login (UTC)"], rows))
    return 0


def _change(
    args: argparse.Namespace, what: str, *, disabled: bool | None = None, password: str | None = None
) -> int:
    from api.auth import UserNotFoundError

    with open_engine(args) as engine:
        try:
            user = _store(engine).update(args.username, disabled=disabled, password=password)
        except (ValueError, UserNotFoundError) as exc:
            raise CommandError(str(exc)) from None
    return _show(args, user, what)


def _disable(args: argparse.Namespace) -> int:
    return _change(args, "disabled (open sessions ended)", disabled=True)


def _enable(args: argparse.Namespace) -> int:
    return _change(args, "enabled", disabled=False)


def _passwd(args: argparse.Namespace) -> int:
    return _change(args, "password set (open sessions ended)", password=_password(args))
