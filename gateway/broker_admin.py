"""Broker accounts at run time through Mosquitto's dynamic security plugin: devices, the gateway, adaptors.

The plugin is administered by publishing JSON commands to ``$CONTROL/dynamic-security/v1``; it answers
on ``$CONTROL/dynamic-security/v1/response`` (to every admin subscribed there, so each command carries a
``correlationData`` of ours and only our answers are taken). `BrokerAdmin` keeps one admin connection
(paho-mqtt 2.x on its own network thread) and offers a synchronous API.

What Mosquitto 2.0.11 does, checked on the real broker (and pinned by tests/integration/test_credentials.py):

- ``%u`` / ``%c`` in a role's ACL topic are NOT substituted: they match a literal ``%u`` topic level.
  A role shared by every device of a type cannot say "its own topics", so each device gets a role of its
  own, ``sc-device-{device_id}``, with literal topics.
- A shared subscription is checked with its whole filter, ``$share/<group>/sc/v1/...``: the gateway's
  role allows both ``sc/v1/+/+/{kind}`` and ``$share/+/sc/v1/+/+/{kind}``.
- disableClient, setClientPassword and deleteClient disconnect that username's clients at once
  (reason "administrative action"); a disabled client's CONNECT is refused with "not authorized".
- modifyRole does not disconnect the role's holders.
- The plugin rewrites its whole JSON file after every changing command, also inside a batch: a batch
  saves round trips, not file writes (figures in mosquitto/README.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
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

# Service accounts' usernames carry a "." that device ids (A-Z a-z 0-9 _ -) cannot have: a device can
# never be registered under the name of the gateway's or the admin's account.
SERVICE_PREFIX = "svc."
ADMIN_USERNAME = "svc.admin"
ADMIN_ROLE = "admin"
GATEWAY_ROLE = "sc-gateway"
ADAPTOR_ROLE = "sc-adaptor"
DEVICE_ROLE_PREFIX = "sc-device-"

UPLINK_KINDS = ("telemetry", "event", "status")

# Below max_packet_size in mosquitto/mosquitto.conf (262144): a bigger command message would make the
# broker drop the connection. 100 devices (200 commands) take about 45 KB.
MAX_MESSAGE_BYTES = 250_000

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
    return DEVICE_ROLE_PREFIX + device_id


def device_acls(device_id: str, device_type: str) -> list[Acl]:
    """A device publishes on its own uplink topics, subscribes to and receives its own cmd: nothing else."""
    base = f"sc/v1/{device_type}/{device_id}"
    return [
        *(_acl("publishClientSend", f"{base}/{kind}") for kind in UPLINK_KINDS),
        _acl("subscribeLiteral", f"{base}/cmd"),
        _acl("publishClientReceive", f"{base}/cmd"),
    ]


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

    For now for ANY device: restricting an adaptor to the devices assigned to it comes with the adaptor
    issue (one role per adaptor listing its devices' topics, like the device roles).
    """
    return [_acl("publishClientSend", f"sc/v1/+/+/{kind}") for kind in UPLINK_KINDS]


def admin_acls() -> list[Acl]:
    """The same rights `mosquitto_ctrl dynsec init` gives its admin: the control API, $SYS, read all."""
    return [
        _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
        _acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
        _acl("subscribePattern", "$CONTROL/dynamic-security/#"),
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
    """A password for a device or service account: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


class BrokerAdminError(RuntimeError):
    """The dynamic security plugin refused a command (or did not answer, or we could not connect)."""

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


class BrokerAdmin:
    """One admin connection to the broker's dynamic security plugin; synchronous and thread-safe.

    ``with BrokerAdmin(host, port, username, password) as admin: admin.create_device(...)``.
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
        batch_size: int = 100,
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
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._cond = threading.Condition()
        self._ready = False
        self._refused: str | None = None
        self._subscribe_mid: int | None = None
        self._pending: dict[str, _Pending] = {}
        self._started = False

    # -- connection ------------------------------------------------------------------------------------

    def connect(self) -> Self:
        """Connect and subscribe to the plugin's answers; raise BrokerAdminError if that fails."""
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
        # A clean session each time: subscribe again after every (re)connect.
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
        """Send the commands in one message and return the plugin's responses in the same order.

        Errors are returned, not raised (each response may hold an "error"); no answer in time raises
        BrokerAdminTimeoutError.
        """
        if not commands:
            return []
        if not self._started:
            raise BrokerAdminError(str(commands[0].get("command")), "not connected (use connect() or with)")
        batch = uuid.uuid4().hex
        ids = [f"{batch}:{i}" for i in range(len(commands))]
        body = json.dumps(
            {"commands": [{**c, "correlationData": k} for c, k in zip(commands, ids, strict=True)]}
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
        try:
            self._client.publish(CONTROL_TOPIC, body.encode(), qos=1)
            with self._cond:
                done = self._cond.wait_for(
                    lambda: len(pending.responses) == len(ids), max(0.0, deadline - time.monotonic())
                )
        finally:
            with self._cond:
                self._pending.pop(batch, None)
        if not done:
            raise BrokerAdminTimeoutError(
                str(commands[0].get("command")),
                f"{len(ids) - len(pending.responses)} of {len(ids)} command(s) unanswered "
                f"after {timeout:.0f} s",
            )
        return [pending.responses[k] for k in ids]

    def command(self, command: str, **args: Any) -> dict[str, Any]:
        """One command; its "data" (or {}) on success, BrokerAdminError on the plugin's error."""
        (response,) = self.execute([{"command": command, **args}])
        if "error" in response:
            raise BrokerAdminError(command, str(response["error"]))
        data = response.get("data")
        return data if isinstance(data, dict) else {}

    # -- roles -----------------------------------------------------------------------------------------

    def ensure_roles(self) -> None:
        """Idempotent: the default ACL access and the service roles, created or corrected.

        Nothing is written when all is as it should be: every write rewrites the plugin's whole file.
        """
        current = self.command("getDefaultACLAccess").get("acls", [])
        have = {a["acltype"]: bool(a["allow"]) for a in current}
        if any(have.get(a["acltype"]) != a["allow"] for a in DEFAULT_ACL_ACCESS):
            self.command("setDefaultACLAccess", acls=list(DEFAULT_ACL_ACCESS))
            log.info("broker default ACL access set")
        for role, acls in SERVICE_ROLES.items():
            self._ensure_role(role, acls)

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

    # -- devices ---------------------------------------------------------------------------------------

    def create_device(self, device_id: str, device_type: str) -> str:
        """Create the device's account and role; return its password (shown once, never stored here).

        Username and client id are the device id (a CONNECT with another client id is refused).
        BrokerAdminError("createClient", "Client already exists") if the device already has one.
        """
        _check_device(device_id, device_type)
        created, errors = self._create_chunk([(device_id, device_type)])
        if errors:
            raise BrokerAdminError("createClient", errors[device_id])
        log.info("broker device account created", extra={"device_id": device_id})
        return created[device_id]

    def create_devices(self, devices: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Create many device accounts, `batch_size` devices per message; return {device id: password}.

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
            raise BrokerAdminError("createClient", f"Client already exists: {shown}")
        created: dict[str, str] = {}
        errors: dict[str, str] = {}
        for start in range(0, len(items), self.batch_size):
            chunk_created, chunk_errors = self._create_chunk(items[start : start + self.batch_size])
            created.update(chunk_created)
            errors.update(chunk_errors)
        if errors:
            raise DeviceBatchError(errors, created)
        log.info("broker device accounts created", extra={"count": len(created)})
        return created

    def _existing(self, usernames: Sequence[str]) -> list[str]:
        """Those of `usernames` that have an account (reads only: the plugin writes nothing)."""
        found = []
        for start in range(0, len(usernames), 10 * self.batch_size):
            chunk = usernames[start : start + 10 * self.batch_size]
            responses = self.execute([{"command": "getClient", "username": u} for u in chunk])
            for username, response in zip(chunk, responses, strict=True):
                if "error" not in response:
                    found.append(username)
                elif response["error"] != "Client not found":
                    raise BrokerAdminError("getClient", f"{username}: {response['error']}")
        return found

    def _create_chunk(self, chunk: Sequence[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
        passwords = {device_id: new_password() for device_id, _ in chunk}
        commands: list[dict[str, Any]] = []
        for device_id, device_type in chunk:
            role = device_role(device_id)
            commands.append(
                {"command": "createRole", "rolename": role, "acls": device_acls(device_id, device_type)}
            )
            commands.append(
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": passwords[device_id],
                    "clientid": device_id,
                    "roles": [{"rolename": role}],
                }
            )
        responses = self.execute(commands)
        created: dict[str, str] = {}
        errors: dict[str, str] = {}
        for i, (device_id, device_type) in enumerate(chunk):
            role_resp, client_resp = responses[2 * i], responses[2 * i + 1]
            if "error" in client_resp:
                errors[device_id] = str(client_resp["error"])
                continue
            created[device_id] = passwords[device_id]
            if "error" in role_resp:
                # The client was created with the role, so the role exists: left behind by an interrupted
                # delete. Make sure it says what this device needs.
                self._ensure_role(device_role(device_id), device_acls(device_id, device_type))
        return created, errors

    def rotate_password(self, username: str) -> str:
        """A new password; the old one stops working and connected clients are disconnected at once."""
        password = new_password()
        self.command("setClientPassword", username=username, password=password)
        log.info("broker password rotated", extra={"username": username})
        return password

    def disable(self, username: str) -> None:
        """Disconnect the account's clients at once and refuse its logins until enable()."""
        self.command("disableClient", username=username)
        log.info("broker account disabled", extra={"username": username})

    def enable(self, username: str) -> None:
        self.command("enableClient", username=username)
        log.info("broker account enabled", extra={"username": username})

    def delete(self, username: str) -> None:
        """Delete the account (its clients are disconnected) and, for a device, its role."""
        commands: list[dict[str, Any]] = [{"command": "deleteClient", "username": username}]
        if not username.startswith(SERVICE_PREFIX):
            commands.append({"command": "deleteRole", "rolename": device_role(username)})
        client_resp, *role_resp = self.execute(commands)
        if "error" in client_resp:
            raise BrokerAdminError("deleteClient", str(client_resp["error"]))
        for r in role_resp:
            if r.get("error") not in (None, "Role not found"):
                raise BrokerAdminError("deleteRole", str(r["error"]))
        log.info("broker account deleted", extra={"username": username})

    def get_client(self, username: str) -> dict[str, Any]:
        """The plugin's view of an account: username, clientid, roles, groups, disabled (if so)."""
        client = self.command("getClient", username=username).get("client", {})
        return client if isinstance(client, dict) else {}

    def exists(self, username: str) -> bool:
        try:
            self.command("getClient", username=username)
        except BrokerAdminError as exc:
            if exc.error == "Client not found":
                return False
            raise
        return True

    def is_disabled(self, username: str) -> bool:
        return bool(self.get_client(username).get("disabled", False))

    def list_clients(self) -> list[str]:
        """Every account's username (devices, service accounts and the admin)."""
        data = self.command("listClients", verbose=False, count=-1, offset=0)
        return [str(c) for c in data.get("clients", [])]

    # -- service accounts ------------------------------------------------------------------------------

    def create_service_account(self, username: str, role: str) -> str:
        """An account for the gateway (role sc-gateway) or an adaptor (sc-adaptor); returns its password.

        Not bound to a client id: the gateway's workers and an adaptor's connections each use their own
        (the plugin binds to one exact client id, not a prefix). Usernames start with "svc.".
        """
        if (
            not username.startswith(SERVICE_PREFIX)
            or len(username) > 64
            or any(c.isspace() for c in username)
        ):
            raise ValueError(f"a service account's username starts with {SERVICE_PREFIX!r}: {username!r}")
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
