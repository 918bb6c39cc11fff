"""`sc-gateway api` (serve the REST API) and `sc-gateway apikeys create|list|revoke`."""

from __future__ import annotations

import argparse
import sys

from gateway.cli import (
    CommandError,
    SubParsers,
    add_command,
    add_group,
    format_table,
    open_engine,
    print_json,
)

_ROLES = ("admin", "installer", "manager", "viewer", "incident_system")


def add_api_commands(sub: SubParsers) -> None:
    p = add_command(sub, "api", "serve the REST API (settings from SC_* variables; docs at /docs)", _serve)
    p.add_argument("--host", help="address to listen on (default $SC_API_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default $SC_API_PORT, else 8080)")

    keys = add_group(sub, "apikeys", "API keys: who may use the REST API, with which role")
    p = add_command(keys, "create", "make a key and print it once (only its hash is kept)", _create)
    p.add_argument("--name", required=True, help="whose key: a person or a system")
    p.add_argument("--role", required=True, choices=_ROLES)
    p.add_argument(
        "--community",
        action="append",
        dest="communities",
        metavar="NAME",
        help="limit the key to this community's devices (repeatable; default: all)",
    )
    p = add_command(keys, "list", "every key, revoked ones too (never the secrets)", _list)
    p.add_argument("--active", action="store_true", help="only keys not revoked")
    p = add_command(keys, "revoke", "revoke a key: it stops working at once", _revoke)
    p.add_argument("key_id")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from api.app import create_app
    from api.settings import ApiSettings
    from gateway.db import SchemaNotCurrentError

    overrides = {"database_url": args.db} if args.db else {}
    try:
        settings = ApiSettings(**overrides)
    except ValidationError as exc:
        print("sc-gateway: bad settings:", file=sys.stderr)
        for err in exc.errors(include_url=False):
            name = "SC_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"  {name or 'settings'}: {err['msg']}", file=sys.stderr)
        return 2
    try:
        app = create_app(settings)
    except SchemaNotCurrentError as exc:
        raise CommandError(str(exc)) from None
    host = args.host or settings.api_host
    port = args.port or settings.api_port
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


def _create(args: argparse.Namespace) -> int:
    from api.auth import ApiKeyStore, Scope

    scope = Scope(communities=tuple(args.communities)) if args.communities else Scope()
    with open_engine(args) as engine:
        try:
            key, secret = ApiKeyStore(engine).create(args.name, args.role, scope)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        print_json({**key.as_dict(), "key": secret})
    else:
        print(f"API key {key.key_id} for {key.name}, role {key.role}, {key.scope.describe()}:")
        print(f"\n  {secret}\n")
        print("Shown once: only its hash is kept. Send it as 'Authorization: Bearer <key>'.")
    return 0


def _list(args: argparse.Namespace) -> int:
    from api.auth import ApiKeyStore

    with open_engine(args) as engine:
        keys = ApiKeyStore(engine).list(include_revoked=not args.active)
    if args.json:
        print_json([k.as_dict() for k in keys])
        return 0
    if not keys:
        print("no API keys (make one with `sc-gateway apikeys create --name N --role installer`)")
        return 0
    rows = [
        (
            k.key_id,
            k.name,
            k.role,
            k.scope.describe(),
            k.created_at.strftime("%Y-%m-%d %H:%M"),
            k.last_used_at and k.last_used_at.strftime("%Y-%m-%d %H:%M"),
            "revoked " + k.revoked_at.strftime("%Y-%m-%d %H:%M") if k.revoked_at else "active",
        )
        for k in keys
    ]
    print(format_table(["key_id", "name", "role", "scope", "created (UTC)", "last used", "state"], rows))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from api.auth import ApiKeyStore, KeyNotFoundError

    with open_engine(args) as engine:
        try:
            key, changed = ApiKeyStore(engine).revoke(args.key_id)
        except KeyNotFoundError as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        print_json({**key.as_dict(), "changed": changed})
    else:
        print(f"API key {key.key_id} ({key.name}) " + ("revoked" if changed else "was already revoked"))
    return 0
