"""Broker accounts at run time: devices and adaptors in the project's device accounts plugin, the gateway,
the stack's publisher and the admin in Mosquitto's dynamic security plugin.

Both plugins are administered by publishing JSON commands, ``{"commands": [...]}``, to their control topic
and answer on ``<topic>/response``; each command carries a ``correlationData`` of ours and only our
answers are taken. `BrokerAdmin` keeps one admin connection (paho-mqtt 2.x on its own network thread) and
offers a synchronous API that routes by username:

- a DEVICE (username = device id, never starting with ``svc.``) goes to ``$CONTROL/sc-device-auth/v1``,
  the plugin built from mosquitto/plugin/sc_device_auth.c: fixed per-device rights, a hash table and an
  append-only journal, so 1,000 new devices are one message and one fsync. A device it does not hold
  (registered in the dynamic security plugin before this plugin existed) is looked up there instead:
  such legacy devices keep working, and can be rotated, disabled, enabled and deleted as before.
- an ADAPTOR (``svc.adaptor.<name>``: an NB-IoT platform's push, a LoRaWAN network server) goes to the
  same plugin: it publishes uplink only for the devices assigned to it (create_adaptor, assign_devices).
  An adaptor name the plugin does not hold is looked up in the dynamic security plugin, like a device.
- any other SERVICE account (``svc.*``) goes to ``$CONTROL/dynamic-security/v1``.

What Mosquitto 2.0.11's dynamic security plugin does, checked on the real broker (and pinned by
tests/integration/test_credentials.py):

- ``%u`` / ``%c`` in a role's ACL topic are NOT substituted: they match a literal ``%u`` topic level.
  A role shared by every device of a type cannot say "its own topics": a legacy device has a role of its
  own, ``sc-device-{device_id}``, with literal topics (the device accounts plugin needs none).
- A shared subscription is checked with its whole filter, ``$share/<group>/sc/v1/...``: the gateway's
  role allows both ``sc/v1/+/+/{kind}`` and ``$share/+/sc/v1/+/+/{kind}``.
- disableClient, setClientPassword and deleteClient disconnect that username's clients at once
  (reason "administrative action"); a disabled client's CONNECT is refused with "not authorized". The
  device accounts plugin does the same for its devices.
- modifyRole does not disconnect the role's holders.
- The plugin rewrites its whole JSON file after every changing command, also inside a batch: a batch
  saves round trips, not file writes (figures in mosquitto/README.md). That is why devices moved out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devices import DEVICE_ID_RE, DEVICE_TYPES

log = logging.getLogger("gateway.broker_admin")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
# The device accounts plugin (mosquitto/plugin/sc_device_auth.c).
DEVICE_CONTROL_TOPIC = "$CONTROL/sc-device-auth/v1"
DEVICE_RESPONSE_TOPIC = DEVICE_CONTROL_TOPIC + "/response"

# Service accounts' usernames carry a "." that device ids (A-Z a-z 0-9 _ -) cannot have: a device can
# never be registered under the name of the gateway's or the admin's account.
SERVICE_PREFIX = "svc."
# Adaptor accounts, in the device accounts plugin: "svc.adaptor." + a name without "." (a client id is the
# username or the username + "." + a suffix, so no adaptor's name can continue another's client ids).
ADAPTOR_PREFIX = "svc.adaptor."
ADAPTOR_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,52}$")
ADMIN_USERNAME = "svc.admin"
ADMIN_ROLE = "admin"
GATEWAY_ROLE = "sc-gateway"
ADAPTOR_ROLE = "sc-adaptor"
# The role of a device registered in the dynamic security plugin (before the device accounts plugin).
DEVICE_ROLE_PREFIX = "sc-device-"
CLIENT_NOT_FOUND = "Client not found"
CLIENT_EXISTS = "Client already exists"
NOT_ASSIGNED = "Not assigned to this adaptor"

UPLINK_KINDS = ("telemetry", "event", "status")

# Below max_packet_size in mosquitto/mosquitto.conf (262144): a bigger command message would make the
# broker drop the connection. A new device takes 114 bytes plus its id and type in a createDevices
# command: 1,000 devices with 64-character ids take under 200 KB.
MAX_MESSAGE_BYTES = 250_000
DEVICE_BATCH_SIZE = 1000
# Usernames per findDevices, assignDevices or unassignDevices command (at most 67 bytes each) and per
# listDevices page.
_FIND_CHUNK = 2000
_LIST_PAGE = 10_000

Acl = dict[str, Any]


def _acl(acltype: str, topic: str, allow: bool = True) -> Acl:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": allow}


# What nobody's role allows is denied, receiving included: a client gets a message only through a role
# that lets it subscribe AND receive, so a subscription left in a persistent session after its right
# went away delivers nothing. Unsubscribing is always allowed.
DEFAULT_ACL_ACCESS: tuple[Acl, ...] = (
    {"acltype": "publishClientSend", "allow": False},
    {"acltype": "publishClientReceive", "allow": False},
    {"acltype": "subscribe", "allow": False},
    {"acltype": "unsubscribe", "allow": True},
)


def device_role(device_id: str) -> str:
    """The role of a legacy device (one registered in the dynamic security plugin)."""
    return DEVICE_ROLE_PREFIX + device_id


def is_device_username(username: str) -> bool:
    """Devices' usernames are their ids; service accounts' start with "svc." (no device id can)."""
    return not username.startswith(SERVICE_PREFIX)


def is_adaptor_username(username: str) -> bool:
    """Adaptors' usernames start with "svc.adaptor." (their accounts are in the device accounts plugin)."""
    return username.startswith(ADAPTOR_PREFIX)


def adaptor_username(name: str) -> str:
    """The username of adaptor `name` ("nbiot" -> "svc.adaptor.nbiot"; a username is returned as is).

    ValueError unless the name is 1-52 of A-Z a-z 0-9 _ - (no ".").
    """
    short = name[len(ADAPTOR_PREFIX) :] if is_adaptor_username(name) else name
    if not ADAPTOR_NAME_RE.match(short):
        raise ValueError(f"adaptor name {short!r} must be 1-52 characters of A-Z a-z 0-9 _ -")
    return ADAPTOR_PREFIX + short


def gateway_acls() -> list[Acl]:
    """Consume every device's uplink (plain or shared subscription); send downlink and incidents."""
    acls = []
    for kind in UPLINK_KINDS:
        acls += [
            _acl("subscribePattern", f"sc/v1/+/+/{kind}"),
            _acl("subscribePattern", f"$share/+/sc/v1/+/+/{kind}"),
            _acl("publishClientReceive", f"sc/v1/+/+/{kind}"),
        ]
    return [*acls, _acl("publishClientSend", "sc/v1/+/+/cmd"), _acl("publishClientSend", "sc/v1/incidents/#")]


def adaptor_acls() -> list[Acl]:
    """Publish uplink for devices that do not speak MQTT themselves (NB-IoT platforms, LNS).

    For ANY device: the role of the stack's simulator account (svc.publisher). Real adaptors are adaptor
    accounts (BrokerAdmin.create_adaptor), limited to the devices assigned to them.
    """
    return [_acl("publishClientSend", f"sc/v1/+/+/{kind}") for kind in UPLINK_KINDS]


def admin_acls() -> list[Acl]:
    """The rights `mosquitto_ctrl dynsec init` gives its admin (the control API, $SYS, read all), plus the
    device accounts plugin's control API (whose ACL check goes through the admin's role)."""
    return [
        _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
        _acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
        _acl("subscribePattern", "$CONTROL/dynamic-security/#"),
        _acl("publishClientSend", "$CONTROL/sc-device-auth/#"),
        _acl("publishClientReceive", "$CONTROL/sc-device-auth/#"),
        _acl("subscribePattern", "$CONTROL/sc-device-auth/#"),
        _acl("publishClientReceive", "$SYS/#"),
        _acl("subscribePattern", "$SYS/#"),
        _acl("publishClientReceive", "#"),
        _acl("subscribePattern", "#"),
        _acl("unsubscribePattern", "#"),
    ]


SERVICE_ROLES: dict[str, list[Acl]] = {GATEWAY_ROLE: gateway_acls(), ADAPTOR_ROLE: adaptor_acls()}

# The plugin's password hash: PBKDF2-HMAC-SHA512 over the raw salt bytes, 64 bytes, base64. 101
# iterations is what `mosquitto_ctrl dynsec init` and the 2.0 plugin use; every password we issue is 256
# random bits, which no work factor needs to protect.
_PBKDF2_ITERATIONS = 101


def initial_config(admin_username: str, admin_password: str) -> dict[str, Any]:
    """A dynamic-security.json equivalent to `mosquitto_ctrl dynsec init`, with our default ACL access.

    Written by the stack before the broker's first start, so the admin password never appears on a
    command line.
    """
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", admin_password.encode(), salt, _PBKDF2_ITERATIONS, 64)
    return {
        "clients": [
            {
                "username": admin_username,
                "textName": "sc-gateway broker admin",
                "password": base64.b64encode(digest).decode(),
                "salt": base64.b64encode(salt).decode(),
                "iterations": _PBKDF2_ITERATIONS,
                "roles": [{"rolename": ADMIN_ROLE}],
            }
        ],
        "roles": [{"rolename": ADMIN_ROLE, "acls": admin_acls()}],
        "defaultACLAccess": {a["acltype"]: a["allow"] for a in DEFAULT_ACL_ACCESS},
    }


def new_password() -> str:
    """A password for a device or service account: 32 random bytes, URL-safe base64 (43 characters),
    never starting with "-" (after `--password` on a command line, argparse would take one that does for
    an option: 1 in 64 did)."""
    while True:
        password = secrets.token_urlsafe(32)
        if not password.startswith("-"):
            return password


def device_password_fields(password: str) -> dict[str, str]:
    """What the device accounts plugin stores of a password: a 16-byte random salt and
    SHA-256(salt || password), both base64. The password itself never reaches the broker.

    One SHA-256 and no slow KDF: every password is 256 random bits (new_password()), which cannot be
    found from its hash by guessing, so a work factor would only slow down every device's CONNECT.
    """
    salt = secrets.token_bytes(16)
    digest = hashlib.sha256(salt + password.encode()).digest()
    return {"salt": base64.b64encode(salt).decode(), "hash": base64.b64encode(digest).decode()}


def missing_acls(existing: Iterable[Mapping[str, Any]], wanted: Iterable[Acl]) -> list[Acl]:
    """Those of `wanted` that `existing` (a role's ACLs) lacks."""
    have = {_acl_key(a) for a in existing}
    return [a for a in wanted if _acl_key(a) not in have]


class BrokerAdminError(RuntimeError):
    """A plugin refused a command (or did not answer, or we could not connect)."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


class BrokerAdminTimeoutError(BrokerAdminError):
    """No answer in time: whether the command took effect is unknown (read the state back to find out)."""


class DeviceBatchError(BrokerAdminError):
    """create_devices() could not create some devices; `created` holds the passwords of those it did."""

    def __init__(self, errors: Mapping[str, str], created: Mapping[str, str]) -> None:
        shown = ", ".join(f"{k} ({v})" for k, v in list(errors.items())[:10])
        more = f" and {len(errors) - 10} more" if len(errors) > 10 else ""
        super().__init__("createClient", f"{len(errors)} device(s) not created: {shown}{more}")
        self.errors = dict(errors)
        self.created = dict(created)


@dataclass(frozen=True)
class Credentials:
    """A broker account's username and password (the password is kept out of repr and logs)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Assignment:
    """What assign_devices() / unassign_devices() did.

    `changed`: devices assigned (or unassigned) by this call; `unchanged`: devices already assigned to
    the adaptor (assign only); `moved`: device -> the adaptor it was taken from (a device has at most one
    adaptor); `errors`: device -> why not ("Client not found": no such device in the device accounts
    plugin; "Not assigned to this adaptor": unassign of a device it does not hold).
    """

    changed: int = 0
    unchanged: int = 0
    moved: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class _Pending:
    expected: set[str]
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)


def _check_device(device_id: str, device_type: str) -> None:
    if not DEVICE_ID_RE.match(device_id):
        raise ValueError(f"device id {device_id!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"unknown device type {device_type!r}; known: {', '.join(DEVICE_TYPES)}")


def _acl_key(acl: Mapping[str, Any]) -> tuple[str, str, int, bool]:
    return (str(acl["acltype"]), str(acl["topic"]), int(acl.get("priority", 0)), bool(acl["allow"]))


# What a device command becomes for an adaptor's username.
_ADAPTOR_COMMANDS = {
    "setDevicePassword": "setAdaptorPassword",
    "disableDevice": "disableAdaptor",
    "enableDevice": "enableAdaptor",
    "deleteDevice": "deleteAdaptor",
    "getDevice": "getAdaptor",
}

# The bytes of one device in a createDevices command besides its id and type (compact JSON: keys,
# quotes, base64 salt and hash, separator).
_DEVICE_ENTRY_BYTES = 114


def _data(command: str, response: Mapping[str, Any]) -> dict[str, Any]:
    """A response's "data" (or {}); BrokerAdminError if it holds an error."""
    if "error" in response:
        raise BrokerAdminError(command, str(response["error"]))
    data = response.get("data")
    return data if isinstance(data, dict) else {}


class BrokerAdmin:
    """One admin connection to the broker's two account plugins; synchronous and thread-safe.

    ``with BrokerAdmin(host, port, username, password) as admin: admin.create_device(...)``.
    `batch_size` is how many devices create_devices() puts in one message (fewer if they would not fit).
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        timeout_s: float = 10.0,
        per_command_timeout_s: float = 1.0,
        batch_size: int = DEVICE_BATCH_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.timeout_s = timeout_s
        self.per_command_timeout_s = per_command_timeout_s
        self.batch_size = batch_size
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{username}-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(1, 5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._cond = threading.Condition()
        self._ready = False
        self._refused: str | None = None
        self._subscribe_mid: int | None = None
        # Command messages the broker refused (PUBACK "not authorized": the admin's role lacks the ACL):
        # message id -> (when, reason).
        self._refused_mids: dict[int, tuple[float, str]] = {}
        self._pending: dict[str, _Pending] = {}
        self._started = False

    # -- connection ------------------------------------------------------------------------------------

    def connect(self) -> Self:
        """Connect and subscribe to the plugins' answers; raise BrokerAdminError if that fails."""
        if self._started:
            return self
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise BrokerAdminError("connect", f"{self.host}:{self.port}: {exc}") from exc
        self._client.loop_start()
        self._started = True
        try:
            self._wait_ready(self.timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            with self._cond:
                self._refused = str(reason)
                self._cond.notify_all()
            return
        # A clean session each time: subscribe again after every (re)connect. The device accounts plugin
        # sends its answers to our client id, which needs no subscription.
        _, mid = client.subscribe(RESPONSE_TOPIC, qos=1)
        with self._cond:
            self._refused = None
            self._subscribe_mid = mid

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        with self._cond:
            if mid != self._subscribe_mid:
                return
            if any(r.is_failure for r in reasons):
                self._refused = f"subscribing to {RESPONSE_TOPIC}: {reasons[0]}"
            else:
                self._ready = True
            self._cond.notify_all()

    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            with self._cond:
                self._refused_mids[mid] = (time.monotonic(), str(reason))
                self._cond.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self._ready = False
        if self._started:
            log.warning("broker admin connection lost (%s); reconnecting", reason)

    def _wait_ready(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._refused is not None, timeout)
            if self._refused is not None:
                raise BrokerAdminError("connect", f"{self.username}@{self.host}:{self.port}: {self._refused}")
            if not self._ready:
                raise BrokerAdminTimeoutError(
                    "connect", f"{self.host}:{self.port} not ready after {timeout:.0f} s"
                )

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        responses = doc.get("responses") if isinstance(doc, dict) else None
        if not isinstance(responses, list):
            return
        with self._cond:
            for response in responses:
                if not isinstance(response, dict):
                    continue
                corr = response.get("correlationData")
                prefix = corr.partition(":")[0] if isinstance(corr, str) else ""
                pending = self._pending.get(prefix)
                if pending is not None and corr in pending.expected:
                    pending.responses[corr] = response
            self._cond.notify_all()

    # -- commands --------------------------------------------------------------------------------------

    def execute(self, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Send dynamic security commands in one message; return the responses in the same order.

        Errors are returned, not raised (each response may hold an "error"); no answer in time raises
        BrokerAdminTimeoutError.
        """
        return self._execute(CONTROL_TOPIC, commands)

    def execute_devices(self, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Send device accounts plugin commands in one message; like execute()."""
        return self._execute(DEVICE_CONTROL_TOPIC, commands)

    def _execute(self, topic: str, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if not commands:
            return []
        if not self._started:
            raise BrokerAdminError(str(commands[0].get("command")), "not connected (use connect() or with)")
        batch = uuid.uuid4().hex
        ids = [f"{batch}:{i}" for i in range(len(commands))]
        body = json.dumps(
            {"commands": [{**c, "correlationData": k} for c, k in zip(commands, ids, strict=True)]},
            separators=(",", ":"),
        )
        if len(body) > MAX_MESSAGE_BYTES:
            # The broker would drop the connection instead of answering (max_packet_size).
            raise ValueError(f"{len(commands)} commands make {len(body)} bytes; send fewer at once")
        timeout = self.timeout_s + self.per_command_timeout_s * len(commands)
        deadline = time.monotonic() + timeout
        pending = _Pending(expected=set(ids))
        self._wait_ready(self.timeout_s)
        with self._cond:
            self._pending[batch] = pending
        sent_at = time.monotonic()
        mid = -1
        refused: str | None = None

        def answered() -> bool:
            nonlocal refused
            when, reason = self._refused_mids.get(mid, (0.0, ""))
            if when >= sent_at:
                refused = reason
            return refused is not None or len(pending.responses) == len(ids)

        try:
            mid = self._client.publish(topic, body.encode(), qos=1).mid
            with self._cond:
                done = self._cond.wait_for(answered, max(0.0, deadline - time.monotonic()))
        finally:
            with self._cond:
                self._pending.pop(batch, None)
                self._refused_mids.pop(mid, None)
        if refused is not None:
            raise BrokerAdminError(
                str(commands[0].get("command")),
                f"the broker refused the message to {topic} ({refused}): the admin's role lacks the ACLs "
                "of admin_acls() (ensure_roles() grants them)",
            )
        if not done:
            raise BrokerAdminTimeoutError(
                str(commands[0].get("command")),
                f"{len(ids) - len(pending.responses)} of {len(ids)} command(s) unanswered "
                f"after {timeout:.0f} s",
            )
        return [pending.responses[k] for k in ids]

    def command(self, command: str, **args: Any) -> dict[str, Any]:
        """One dynamic security command; its "data" (or {}) on success, BrokerAdminError on its error."""
        (response,) = self.execute([{"command": command, **args}])
        return _data(command, response)

    def device_command(self, command: str, **args: Any) -> dict[str, Any]:
        """One device accounts plugin command; its "data" (or {}), BrokerAdminError on its error."""
        (response,) = self.execute_devices([{"command": command, **args}])
        return _data(command, response)

    def _device_or_legacy(self, username: str, command: str, **args: Any) -> dict[str, Any] | None:
        """A device command for a device username, its adaptor counterpart for an adaptor's; None if the
        plugin does not hold it (another service account, or a legacy device in the dynamic security
        plugin: the caller asks that one)."""
        if is_adaptor_username(username):
            command = _ADAPTOR_COMMANDS[command]
        elif not is_device_username(username):
            return None
        try:
            return self.device_command(command, username=username, **args)
        except BrokerAdminError as exc:
            if exc.error == CLIENT_NOT_FOUND:
                return None
            raise

    # -- roles -----------------------------------------------------------------------------------------

    def ensure_roles(self) -> None:
        """Idempotent: the default ACL access, the service roles, and the admin role's rights.

        Nothing is written when all is as it should be: every write rewrites the plugin's whole file.
        """
        current = self.command("getDefaultACLAccess").get("acls", [])
        have = {a["acltype"]: bool(a["allow"]) for a in current}
        if any(have.get(a["acltype"]) != a["allow"] for a in DEFAULT_ACL_ACCESS):
            self.command("setDefaultACLAccess", acls=list(DEFAULT_ACL_ACCESS))
            log.info("broker default ACL access set")
        for role, acls in SERVICE_ROLES.items():
            self._ensure_role(role, acls)
        self._ensure_admin_acls()

    def _ensure_role(self, role: str, acls: list[Acl]) -> None:
        try:
            existing = self.command("getRole", rolename=role)["role"].get("acls", [])
        except BrokerAdminError as exc:
            if exc.error != "Role not found":
                raise
            self.command("createRole", rolename=role, acls=acls)
            log.info("broker role created", extra={"role": role})
            return
        if sorted(map(_acl_key, existing)) != sorted(map(_acl_key, acls)):
            self.command("modifyRole", rolename=role, acls=acls)
            log.info("broker role corrected", extra={"role": role})

    def _ensure_admin_acls(self) -> None:
        """Add what the admin role lacks of admin_acls() (a data dir from before the device accounts
        plugin), keeping whatever else an operator gave it. Takes effect at once, also for this
        connection (the broker checks ACLs on every message)."""
        try:
            existing = self.command("getRole", rolename=ADMIN_ROLE)["role"].get("acls", [])
        except BrokerAdminError as exc:
            if exc.error == "Role not found":
                return  # an admin set up some other way: its rights are its operator's business
            raise
        lacking = missing_acls(existing, admin_acls())
        if lacking:
            # modifyRole, not addRoleACL: addRoleACL disconnects the role's holders, this connection too
            # (and paho then sends the command again on reconnecting, which fails as a duplicate).
            self.command("modifyRole", rolename=ADMIN_ROLE, acls=[*existing, *lacking])
            log.info("broker admin role granted", extra={"topics": sorted({a["topic"] for a in lacking})})

    # -- devices ---------------------------------------------------------------------------------------

    def create_device(self, device_id: str, device_type: str) -> str:
        """Create the device's account; return its password (shown once, never stored here).

        Username and client id are the device id (a CONNECT with another client id is refused).
        BrokerAdminError("createClient", "Client already exists") if the device already has one (in
        either plugin).
        """
        _check_device(device_id, device_type)
        if self._legacy_exists(device_id):
            raise BrokerAdminError("createClient", CLIENT_EXISTS)
        created, errors = self._create_chunk([(device_id, device_type)])
        if errors:
            raise BrokerAdminError("createClient", errors[device_id])
        log.info("broker device account created", extra={"device_id": device_id})
        return created[device_id]

    def create_devices(self, devices: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Create many device accounts, up to `batch_size` per message; return {device id: password}.

        Nothing is created if one of them already exists (checked first). If the broker refuses some
        on the way (one created meanwhile by someone else), DeviceBatchError tells which, and carries
        the passwords of those that were created.
        """
        items = list(devices)
        for device_id, device_type in items:
            _check_device(device_id, device_type)
        ids = [d for d, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError("the same device id appears more than once")
        existing = self._existing(ids)
        if existing:
            shown = ", ".join(existing[:10]) + (
                f" and {len(existing) - 10} more" if len(existing) > 10 else ""
            )
            raise BrokerAdminError("createClient", f"{CLIENT_EXISTS}: {shown}")
        created: dict[str, str] = {}
        errors: dict[str, str] = {}
        for chunk in self._device_chunks(items):
            chunk_created, chunk_errors = self._create_chunk(chunk)
            created.update(chunk_created)
            errors.update(chunk_errors)
        if errors:
            raise DeviceBatchError(errors, created)
        log.info("broker device accounts created", extra={"count": len(created)})
        return created

    def _device_chunks(self, items: Sequence[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
        """`batch_size` devices at a time, fewer if their createDevices command would not fit a message."""
        limit = MAX_MESSAGE_BYTES - 1000  # the command's own keys and correlation data
        chunk: list[tuple[str, str]] = []
        size = 0
        for device_id, device_type in items:
            entry = _DEVICE_ENTRY_BYTES + len(device_id) + len(device_type)
            if chunk and (len(chunk) >= self.batch_size or size + entry > limit):
                yield chunk
                chunk, size = [], 0
            chunk.append((device_id, device_type))
            size += entry
        if chunk:
            yield chunk

    def _legacy_exists(self, username: str) -> bool:
        """Whether the dynamic security plugin has an account of that name (a read: nothing is written)."""
        try:
            self.command("getClient", username=username)
        except BrokerAdminError as exc:
            if exc.error == CLIENT_NOT_FOUND:
                return False
            raise
        return True

    def _existing(self, usernames: Sequence[str]) -> list[str]:
        """Those of `usernames` that have an account in either plugin (reads only), in their order."""
        legacy = set(self.command("listClients", verbose=False, count=-1, offset=0).get("clients", []))
        found = {u for u in usernames if u in legacy}
        for start in range(0, len(usernames), _FIND_CHUNK):
            chunk = list(usernames[start : start + _FIND_CHUNK])
            found.update(self.device_command("findDevices", usernames=chunk).get("found", []))
        return [u for u in usernames if u in found]

    def _create_chunk(self, chunk: Sequence[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
        passwords = {device_id: new_password() for device_id, _ in chunk}
        entries = [
            {"username": device_id, "type": device_type, **device_password_fields(passwords[device_id])}
            for device_id, device_type in chunk
        ]
        data = self.device_command("createDevices", devices=entries)
        refused = data.get("errors", {})
        errors = {d: str(refused[d]) for d in passwords if d in refused}
        created = {d: p for d, p in passwords.items() if d not in refused}
        return created, errors

    def rotate_password(self, username: str) -> str:
        """A new password; the old one stops working and connected clients are disconnected at once."""
        password = new_password()
        if self._device_or_legacy(username, "setDevicePassword", **device_password_fields(password)) is None:
            self.command("setClientPassword", username=username, password=password)
        log.info("broker password rotated", extra={"username": username})
        return password

    def disable(self, username: str) -> None:
        """Disconnect the account's clients at once and refuse its logins until enable()."""
        if self._device_or_legacy(username, "disableDevice") is None:
            self.command("disableClient", username=username)
        log.info("broker account disabled", extra={"username": username})

    def enable(self, username: str) -> None:
        if self._device_or_legacy(username, "enableDevice") is None:
            self.command("enableClient", username=username)
        log.info("broker account enabled", extra={"username": username})

    def delete(self, username: str) -> None:
        """Delete the account (its clients are disconnected) and, for a legacy device, its role."""
        if self._device_or_legacy(username, "deleteDevice") is not None:
            log.info("broker account deleted", extra={"username": username})
            return
        commands: list[dict[str, Any]] = [{"command": "deleteClient", "username": username}]
        if is_device_username(username):
            commands.append({"command": "deleteRole", "rolename": device_role(username)})
        client_resp, *role_resp = self.execute(commands)
        if "error" in client_resp:
            raise BrokerAdminError("deleteClient", str(client_resp["error"]))
        for r in role_resp:
            if r.get("error") not in (None, "Role not found"):
                raise BrokerAdminError("deleteRole", str(r["error"]))
        log.info("broker account deleted", extra={"username": username})

    def get_client(self, username: str) -> dict[str, Any]:
        """An account as its plugin sees it. A device: username, clientid, type, disabled (and adaptor, if
        assigned). An adaptor: username, disabled, devices (how many are assigned). A service account or
        legacy device: the dynamic security plugin's username, clientid, roles, groups, disabled (if so)."""
        data = self._device_or_legacy(username, "getDevice")
        if data is not None:
            if "adaptor" in data:
                adaptor = data["adaptor"]
                return dict(adaptor) if isinstance(adaptor, dict) else {}
            device = data.get("device", {})
            return {**device, "clientid": username} if isinstance(device, dict) else {}
        client = self.command("getClient", username=username).get("client", {})
        return client if isinstance(client, dict) else {}

    def exists(self, username: str) -> bool:
        if self._device_or_legacy(username, "getDevice") is not None:
            return True
        return self._legacy_exists(username)

    def is_disabled(self, username: str) -> bool:
        return bool(self.get_client(username).get("disabled", False))

    def list_devices(self) -> list[str]:
        """Every device account of the device accounts plugin, sorted (legacy devices not included)."""
        usernames: list[str] = []
        while True:
            data = self.device_command("listDevices", offset=len(usernames), count=_LIST_PAGE)
            page = [str(u) for u in data.get("devices", [])]
            usernames += page
            if not page or len(usernames) >= int(data.get("totalCount", 0)):
                return usernames

    def list_clients(self) -> list[str]:
        """Every account's username: devices (either plugin), adaptors, service accounts and the admin."""
        data = self.command("listClients", verbose=False, count=-1, offset=0)
        return [str(c) for c in data.get("clients", [])] + self.list_adaptors() + self.list_devices()

    # -- adaptors --------------------------------------------------------------------------------------

    def create_adaptor(self, name: str) -> Credentials:
        """An adaptor account, svc.adaptor.<name>, in the device accounts plugin; its password is returned
        once (only a salted hash is kept).

        It may publish uplink only for the devices assigned to it (assign_devices), and connect with the
        client id svc.adaptor.<name> or svc.adaptor.<name>.<suffix> (several connections at once).
        BrokerAdminError "Client already exists" if either plugin holds the username.
        rotate_password, disable (kicks every connection), enable, delete, get_client and exists take
        its username like any other account's.
        """
        username = adaptor_username(name)
        if self._legacy_exists(username):
            raise BrokerAdminError("createAdaptor", CLIENT_EXISTS)
        password = new_password()
        self.device_command("createAdaptor", username=username, **device_password_fields(password))
        log.info("broker adaptor account created", extra={"username": username})
        return Credentials(username, password)

    def assign_devices(self, name: str, device_ids: Iterable[str]) -> Assignment:
        """Let the adaptor publish for these devices (taking each from the adaptor it had, if another).

        Devices must exist in the device accounts plugin; those that do not are in the result's `errors`
        (the others are assigned all the same). Sent 2,000 per message; BrokerAdminError ("Client not
        found") if the adaptor does not exist. If the broker stops answering half-way, the messages
        answered so far are in force: assigning again is harmless.
        """
        return self._assign("assignDevices", name, device_ids)

    def unassign_devices(self, name: str, device_ids: Iterable[str]) -> Assignment:
        """Stop the adaptor publishing for these devices (at once: every publish is checked).

        A device not assigned to this adaptor is an error "Not assigned to this adaptor" in the result.
        """
        return self._assign("unassignDevices", name, device_ids)

    def _assign(self, command: str, name: str, device_ids: Iterable[str]) -> Assignment:
        username = adaptor_username(name)
        ids = list(dict.fromkeys(device_ids))
        for device_id in ids:
            if not DEVICE_ID_RE.match(device_id):
                raise ValueError(f"device id {device_id!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
        changed = unchanged = 0
        moved: dict[str, str] = {}
        errors: dict[str, str] = {}
        # At least one message, so that an unknown adaptor is an error even with no devices.
        for start in range(0, max(len(ids), 1), _FIND_CHUNK):
            data = self.device_command(command, username=username, devices=ids[start : start + _FIND_CHUNK])
            changed += int(data.get("assigned", data.get("unassigned", 0)))
            unchanged += int(data.get("unchanged", 0))
            moved.update({str(k): str(v) for k, v in data.get("moved", {}).items()})
            errors.update({str(k): str(v) for k, v in data.get("errors", {}).items()})
        log.info(
            "broker adaptor devices %s",
            "assigned" if command == "assignDevices" else "unassigned",
            extra={"username": username, "changed": changed, "moved": len(moved), "errors": len(errors)},
        )
        return Assignment(changed, unchanged, moved, errors)

    def get_adaptor(self, name: str) -> dict[str, Any]:
        """{"username", "disabled", "devices": how many are assigned}; BrokerAdminError "Client not found"."""
        adaptor = self.device_command("getAdaptor", username=adaptor_username(name)).get("adaptor", {})
        return dict(adaptor) if isinstance(adaptor, dict) else {}

    def list_adaptor_devices(self, name: str) -> list[str]:
        """The ids of the devices assigned to the adaptor, sorted."""
        username = adaptor_username(name)
        ids: list[str] = []
        while True:
            data = self.device_command(
                "listAdaptorDevices", username=username, offset=len(ids), count=_LIST_PAGE
            )
            page = [str(u) for u in data.get("devices", [])]
            ids += page
            if not page or len(ids) >= int(data.get("totalCount", 0)):
                return ids

    def list_adaptors(self) -> list[str]:
        """Every adaptor account's username, sorted."""
        data = self.device_command("listAdaptors", offset=0, count=-1)
        return [str(u) for u in data.get("adaptors", [])]

    # -- service accounts ------------------------------------------------------------------------------

    def create_service_account(self, username: str, role: str) -> str:
        """An account for the gateway (role sc-gateway) or an adaptor (sc-adaptor); returns its password.

        Not bound to a client id: the gateway's workers and an adaptor's connections each use their own
        (the plugin binds to one exact client id, not a prefix). Usernames start with "svc.", but not
        "svc.adaptor." (adaptor accounts, limited to their devices: create_adaptor()).
        """
        if (
            not username.startswith(SERVICE_PREFIX)
            or len(username) > 64
            or any(c.isspace() for c in username)
        ):
            raise ValueError(f"a service account's username starts with {SERVICE_PREFIX!r}: {username!r}")
        if is_adaptor_username(username):
            raise ValueError(f"{username!r} is an adaptor's username: use create_adaptor()")
        password = new_password()
        self.command("createClient", username=username, password=password, roles=[{"rolename": role}])
        log.info("broker service account created", extra={"username": username, "role": role})
        return password

    def ensure_service_account(self, username: str, role: str, store: Path) -> Credentials:
        """The account's credentials, kept in `store` (a 0600 JSON file) so that a second run reuses them.

        Created if missing; if the account exists but `store` does not, its password is rotated and
        stored. The role is (re)assigned if the account lacks it.
        """
        if store.exists() and self.exists(username):
            doc = json.loads(store.read_text())
            if doc.get("username") == username and isinstance(doc.get("password"), str):
                roles = {r.get("rolename") for r in self.get_client(username).get("roles", [])}
                if role not in roles:
                    self.command("addClientRole", username=username, rolename=role)
                return Credentials(username, doc["password"])
        if self.exists(username):
            password = self.rotate_password(username)
            roles = {r.get("rolename") for r in self.get_client(username).get("roles", [])}
            if role not in roles:
                self.command("addClientRole", username=username, rolename=role)
        else:
            password = self.create_service_account(username, role)
        write_private(store, json.dumps({"username": username, "password": password, "role": role}))
        return Credentials(username, password)


def write_private(path: Path, text: str, *, uid: int = -1, gid: int = -1) -> None:
    """Write a file only its owner may read (0600), atomically; owner uid/gid if given (else ours)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd != -1:
            os.close(fd)
    os.replace(tmp, path)
