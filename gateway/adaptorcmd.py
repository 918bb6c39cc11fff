"""`sc-gateway adaptors ...`: adaptor accounts (svc.adaptor.<name>) and the devices each may publish for.

An adaptor (an NB-IoT platform's push, a LoRaWAN network server) publishes for many devices over one MQTT
connection, or several: client id svc.adaptor.<name> or svc.adaptor.<name>.<suffix>. Its account is in
the broker's device accounts plugin and allows uplink only for the devices assigned to it; a device has
at most one adaptor, so assigning it elsewhere moves it. The broker is reached with the installers'
settings (SC_MQTT_HOST, SC_MQTT_PORT, SC_MQTT_ADMIN_USERNAME / _PASSWORD / _FILE, SC_MQTT_ADMIN_TIMEOUT_S).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from gateway.broker_admin import (
    Assignment,
    BrokerAdmin,
    BrokerAdminError,
    BrokerAdminTimeoutError,
    Credentials,
    adaptor_username,
)
from gateway.cli import (
    CommandError,
    Handler,
    SubParsers,
    add_command,
    add_group,
    format_table,
    installer_settings,
    print_json,
)

# Errors printed one per line before "... and N more".
_SHOWN_ERRORS = 20


@contextlib.contextmanager
def open_admin() -> Iterator[BrokerAdmin]:
    """A connected BrokerAdmin from the installers' settings; the broker's refusals become CommandError."""
    settings = installer_settings()
    creds = settings.admin_credentials()
    if creds is None:
        raise CommandError(
            "no broker admin credentials: set SC_MQTT_ADMIN_PASSWORD, or SC_MQTT_ADMIN_FILE "
            f"(now {settings.mqtt_admin_file}, which cannot be read)"
        )
    admin = BrokerAdmin(
        settings.mqtt_host, settings.mqtt_port, *creds, timeout_s=settings.mqtt_admin_timeout_s
    )
    try:
        admin.connect()
    except BrokerAdminError as exc:
        raise CommandError(f"the broker cannot be reached: {exc}") from None
    try:
        yield admin
    except BrokerAdminTimeoutError as exc:
        raise CommandError(f"the broker did not answer (the change may or may not be made): {exc}") from None
    except BrokerAdminError as exc:
        raise CommandError(f"the broker refused {exc.command}: {exc.error}") from None
    finally:
        admin.close()


def _username(name: str) -> str:
    try:
        return adaptor_username(name)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


@contextlib.contextmanager
def _credentials_out(path: str | None) -> Iterator[Callable[[Credentials], None]]:
    """Where a new password goes: `path` (a new file, mode 0600, refused if it exists), opened BEFORE the
    broker is asked, so a password is never made that cannot be written; removed again if the broker
    refuses. Without a path, the password is printed."""
    if path is None:
        yield lambda _c: None
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} exists: credentials go to a new file (move the old one away)") from None
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror}") from None
    os.fchmod(fd, 0o600)
    written = False

    def write(credentials: Credentials) -> None:
        nonlocal written
        doc = {
            "username": credentials.username,
            "password": credentials.password,
            "client_id": credentials.username,
        }
        os.write(fd, (json.dumps(doc, indent=2) + "\n").encode())
        os.fsync(fd)
        written = True

    try:
        yield write
    finally:
        os.close(fd)
        if not written:
            os.unlink(path)


def _show_credentials(args: argparse.Namespace, credentials: Credentials, what: str) -> None:
    username = credentials.username
    if args.credentials_out:
        if args.json:
            print_json({"username": username, "credentials_file": args.credentials_out})
        else:
            print(f"{username}: {what}; credentials written to {args.credentials_out} (mode 0600)")
        return
    if args.json:
        print_json({"username": username, "password": credentials.password, "client_id": username})
        return
    print(f"{username}: {what}")
    print(
        f"MQTT username {username}, client id {username} (or {username}.<suffix> per connection), password:"
    )
    print(f"\n  {credentials.password}\n")
    print("Shown once: only the broker's hash of it is kept.")


def _read_device_ids(path: str) -> list[str]:
    """Device ids from a CSV file: its device_id column if the first row names one (the registry's export
    and import format), else the first column of every row. Blank rows and rows starting with # are
    skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and r[0].strip() and not r[0].lstrip().startswith("#")]
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: not a CSV file: {exc}") from None
    column = 0
    header = [c.strip() for c in rows[0]] if rows else []
    if "device_id" in header:
        column = header.index("device_id")
        rows = rows[1:]
    return [r[column].strip() for r in rows if len(r) > column and r[column].strip()]


def _device_ids(args: argparse.Namespace) -> list[str]:
    ids = _read_device_ids(args.devices_csv) if args.devices_csv else list(args.device)
    if not ids:
        raise CommandError("no device ids given")
    return ids


# ---- handlers ------------------------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    username = _username(args.name)
    with _credentials_out(args.credentials_out) as write, open_admin() as admin:
        credentials = admin.create_adaptor(username)
        write(credentials)
    _show_credentials(args, credentials, "adaptor account created, no devices assigned yet")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    username = _username(args.name)
    with _credentials_out(args.credentials_out) as write, open_admin() as admin:
        admin.get_adaptor(username)  # "Client not found" rather than a dynsec account's rotation
        credentials = Credentials(username, admin.rotate_password(username))
        write(credentials)
    _show_credentials(args, credentials, "new password; its connections were cut and the old one stopped")
    return 0


def _report(args: argparse.Namespace, username: str, verb: str, result: Assignment) -> int:
    if args.json:
        print_json(
            {
                "username": username,
                verb: result.changed,
                "unchanged": result.unchanged,
                "moved": result.moved,
                "errors": result.errors,
            }
        )
        return 0 if result.ok else 1
    line = f"{username}: {result.changed} device(s) {verb}"
    if result.unchanged:
        line += f", {result.unchanged} already assigned to it"
    if result.moved:
        line += f", {len(result.moved)} of them moved from another adaptor"
    print(line)
    for device_id, previous in list(result.moved.items())[:_SHOWN_ERRORS]:
        print(f"  moved {device_id} from {previous}")
    if len(result.moved) > _SHOWN_ERRORS:
        print(f"  ... and {len(result.moved) - _SHOWN_ERRORS} more moved")
    for device_id, error in list(result.errors.items())[:_SHOWN_ERRORS]:
        print(f"  not {verb}: {device_id}: {error}")
    if len(result.errors) > _SHOWN_ERRORS:
        print(f"  ... and {len(result.errors) - _SHOWN_ERRORS} more not {verb}")
    return 0 if result.ok else 1


def _assign(args: argparse.Namespace) -> int:
    username = _username(args.name)
    ids = _device_ids(args)
    with open_admin() as admin:
        try:
            result = admin.assign_devices(username, ids)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    return _report(args, username, "assigned", result)


def _unassign(args: argparse.Namespace) -> int:
    username = _username(args.name)
    ids = _device_ids(args)
    with open_admin() as admin:
        try:
            result = admin.unassign_devices(username, ids)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    return _report(args, username, "unassigned", result)


def _show(args: argparse.Namespace) -> int:
    username = _username(args.name)
    with open_admin() as admin:
        adaptor = admin.get_adaptor(username)
        device_ids = admin.list_adaptor_devices(username) if args.devices else None
    if args.json:
        out: dict[str, Any] = dict(adaptor)
        if device_ids is not None:
            out["device_ids"] = device_ids
        print_json(out)
        return 0
    state = "DISABLED" if adaptor.get("disabled") else "enabled"
    print(f"{adaptor.get('username')}: {state}, {adaptor.get('devices', 0)} device(s) assigned")
    for device_id in device_ids or []:
        print(f"  {device_id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_admin() as admin:
        adaptors = [admin.get_adaptor(u) for u in admin.list_adaptors()]
    if args.json:
        print_json(adaptors)
        return 0
    if not adaptors:
        print("no adaptors")
        return 0
    rows = [(a.get("username"), "yes" if a.get("disabled") else "", a.get("devices", 0)) for a in adaptors]
    print(format_table(["adaptor", "disabled", "devices"], rows))
    return 0


def _change(action: str, done: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        username = _username(args.name)
        with open_admin() as admin:
            admin.get_adaptor(username)  # only adaptor accounts here: "Client not found" otherwise
            getattr(admin, action)(username)
        if args.json:
            print_json({"username": username, "done": action})
        else:
            print(f"{username}: {done}")
        return 0

    return handler


def add_adaptor_commands(sub: SubParsers) -> None:
    group = add_group(sub, "adaptors", "adaptor accounts and the devices each may publish for")

    p = add_command(group, "create", "a new adaptor account (its password shown once)", _create)
    p.add_argument("name", help="svc.adaptor.NAME: 1-52 of A-Z a-z 0-9 _ -")
    p.add_argument("--credentials-out", metavar="FILE", help="write the credentials to this new file (0600)")

    p = add_command(group, "list", "every adaptor with its number of devices", _list)

    p = add_command(group, "show", "an adaptor's state and number of devices", _show)
    p.add_argument("name")
    p.add_argument("--devices", action="store_true", help="also list the ids of its devices")

    for name, text, handler in (
        ("assign", "let the adaptor publish for these devices (moved from another adaptor if any)", _assign),
        ("unassign", "stop the adaptor publishing for these devices", _unassign),
    ):
        p = add_command(group, name, text, handler)
        p.add_argument("name")
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument(
            "--devices-csv",
            metavar="FILE",
            help="CSV with a device_id column (the registry's export), or one id per row",
        )
        source.add_argument("--device", nargs="+", action="extend", metavar="ID", help="device id(s)")

    for name, text, action, done in (
        ("disable", "cut the adaptor off: every connection closed, logins refused", "disable", "disabled"),
        ("enable", "let a disabled adaptor log in again", "enable", "enabled"),
        ("delete", "delete the adaptor account (its devices are unassigned)", "delete", "deleted"),
    ):
        p = add_command(group, name, text, _change(action, done))
        p.add_argument("name")

    p = add_command(group, "rotate", "a new password; the old one stops, connections are cut", _rotate)
    p.add_argument("name")
    p.add_argument("--credentials-out", metavar="FILE", help="write the credentials to this new file (0600)")
