"""`sc-gateway run` and `sc-gateway settings`: start the gateway processes; list every setting."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from gateway.cli import SubParsers, add_command


def _run(args: argparse.Namespace) -> int:
    from gateway.service import run
    from gateway.settings import Settings

    overrides = {}
    if args.workers:
        overrides["workers"] = args.workers
    if args.db:
        overrides["database_url"] = args.db
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print("sc-gateway: bad settings:", file=sys.stderr)
        for err in exc.errors(include_url=False):
            name = "SC_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"  {name or 'settings'}: {err['msg']}", file=sys.stderr)
        return 2
    return run(settings)


def _settings(args: argparse.Namespace) -> int:
    from gateway.settings import describe

    print(describe())
    return 0


def add_run_commands(sub: SubParsers) -> None:
    p = add_command(sub, "run", "run the gateway (settings from SC_* environment variables)", _run)
    p.add_argument("--workers", type=int, default=0, help="processes sharing the subscription (SC_WORKERS)")
    add_command(
        sub, "settings", "list every setting with its environment variable, default and meaning", _settings
    )
