"""Generated broker passwords: long, random, and usable after `--password` on any command line."""

from __future__ import annotations

import argparse

from gateway.broker_admin import new_password


def test_passwords_never_start_with_a_dash_and_argparse_takes_them_as_values() -> None:
    passwords = [new_password() for _ in range(3000)]  # one in 64 token_urlsafe strings starts with "-"
    assert len(set(passwords)) == len(passwords)
    assert all(len(p) == 43 and not p.startswith("-") for p in passwords)
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--password")
    assert all(parser.parse_args(["--password", p]).password == p for p in passwords[:200])
