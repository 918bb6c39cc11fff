"""The installers' operations: a device's registry row and its broker account, changed together.

Used by the REST API (api/) and the CLI alike. The broker side goes through a `CredentialIssuer`
(`gateway.broker_admin.BrokerAdmin` in production, a fake in tests).

Orderings, so that no failure leaves a device half-made:

- register: under `Registry.credentials_lock()` (serialises whoever creates broker accounts, across
  processes, WITHOUT the registry's write lock that the gateway needs): the id is checked free, the
  broker account created, then the row inserted and committed in a short transaction. The broker
  failing leaves nothing registered; the insert failing (or the id registered meanwhile by a
  registration without credentials) deletes the account again. Since every account creator holds the
  lock until its rows are committed, an account found without a registry row is a leftover of a crash:
  it is deleted and made anew.
- bulk import: the same per batch (`import_batch_size` devices, one batched `create_devices` and one
  transaction per batch). Devices the broker refuses one by one are error rows; the broker going away
  stops the import there (the rows not done are error rows "not imported: ..."), and what was committed
  keeps its credentials.
- disable / retire: the broker first (the device is cut off at once), then the registry; enable: the
  broker, then the registry. A failure in between leaves the device cut off but marked active, and
  doing it again completes it.
- Devices registered without credentials (an import with credentials off, or from before) have no
  broker account: disable/enable/retire skip the missing account; rotating credentials issues one.

Mosquitto's dynamic security plugin rewrites its whole JSON file after every command, so issuing is
slow in bulk (about 40 devices/s at a few thousand accounts, slower as the file grows); holding only
the credentials lock, not the registry's, keeps that from stalling the gateway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.broker_admin import BrokerAdmin, BrokerAdminError, BrokerAdminTimeoutError, DeviceBatchError
from gateway.registry import (
    Change,
    CodeScheme,
    DeviceNotFoundError,
    DeviceRecord,
    DeviceRetiredError,
    ImportAbortedError,
    ImportReport,
    ParsedCsv,
    ProgressCallback,
    RegisteredDevice,
    Registry,
    RowResult,
)

log = logging.getLogger("gateway.installers")

CLIENT_NOT_FOUND: Final = "Client not found"
CLIENT_EXISTS: Final = "Client already exists"
DEFAULT_ADMIN_FILE: Final = Path(".var/mosquitto/admin.json")


class CredentialsUnavailableError(RuntimeError):
    """The broker cannot issue or change credentials now (down, not configured, not answering)."""


class CredentialsRefusedError(RuntimeError):
    """The broker answered but refused the command (the message says what it said)."""


class CredentialIssuer(Protocol):
    """What the installers need of the broker's account administration (BrokerAdmin's methods).

    Failures raise gateway.broker_admin.BrokerAdminError; its `error` "Client not found" and
    "Client already exists" are the plugin's own words and are handled here.
    """

    def create_device(self, device_id: str, device_type: str) -> str: ...

    def create_devices(self, devices: Iterable[tuple[str, str]]) -> dict[str, str]: ...

    def rotate_password(self, username: str) -> str: ...

    def disable(self, username: str) -> None: ...

    def enable(self, username: str) -> None: ...

    def delete(self, username: str) -> None: ...

    def exists(self, username: str) -> bool: ...


class InstallerSettings(BaseSettings):
    """The installers' tools' settings (SC_* variables): the broker's account administration, the
    component code split, the import batch size. Shared by the CLI and the API."""

    model_config = SettingsConfigDict(env_prefix="SC_", extra="ignore", validate_default=True)

    mqtt_host: str = Field("127.0.0.1", description="Mosquitto host")
    mqtt_port: int = Field(1883, ge=1, le=65535, description="Mosquitto port")
    mqtt_admin_username: str = Field("svc.admin", description="the broker's dynamic-security admin account")
    mqtt_admin_password: SecretStr | None = Field(
        None, description="its password (else read from SC_MQTT_ADMIN_FILE)"
    )
    mqtt_admin_file: Path = Field(
        DEFAULT_ADMIN_FILE,
        description="JSON file with the admin's username and password, as the stack writes it",
    )
    mqtt_admin_timeout_s: float = Field(5.0, gt=0, description="how long to wait for the broker's answer")
    component_code_split: str = Field(
        "6+2+2+6", description="component code split: admin+major+minor+serial digits (or 6+2+3+5)"
    )
    import_batch_size: int = Field(
        1000, ge=1, le=10000, description="devices per transaction and per broker batch when importing"
    )

    @field_validator("component_code_split")
    @classmethod
    def _check_split(cls, value: str) -> str:
        CodeScheme.parse(value)
        return value

    @property
    def code_scheme(self) -> CodeScheme:
        return CodeScheme.parse(self.component_code_split)

    def admin_credentials(self) -> tuple[str, str] | None:
        """(username, password) of the broker admin, from the settings or the admin file; None if neither."""
        if self.mqtt_admin_password is not None:
            return self.mqtt_admin_username, self.mqtt_admin_password.get_secret_value()
        import json

        try:
            doc = json.loads(self.mqtt_admin_file.read_text())
            return str(doc["username"]), str(doc["password"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


class BrokerIssuer:
    """A CredentialIssuer over one BrokerAdmin connection, made on first use and kept.

    Connection failures and timeouts become CredentialsUnavailableError, so callers see one error for
    "the broker cannot do it now". Thread-safe (BrokerAdmin is).
    """

    def __init__(self, settings: InstallerSettings) -> None:
        self._settings = settings
        self._admin: BrokerAdmin | None = None
        self._lock = threading.Lock()

    def _connected(self) -> BrokerAdmin:
        with self._lock:
            if self._admin is None:
                creds = self._settings.admin_credentials()
                if creds is None:
                    raise CredentialsUnavailableError(
                        "no broker admin credentials: set SC_MQTT_ADMIN_PASSWORD, or SC_MQTT_ADMIN_FILE "
                        f"(now {self._settings.mqtt_admin_file}, which cannot be read)"
                    )
                admin = BrokerAdmin(
                    self._settings.mqtt_host,
                    self._settings.mqtt_port,
                    creds[0],
                    creds[1],
                    timeout_s=self._settings.mqtt_admin_timeout_s,
                )
                try:
                    admin.connect()
                except BrokerAdminError as exc:
                    raise CredentialsUnavailableError(
                        f"the broker cannot issue credentials now: {exc}"
                    ) from exc
                self._admin = admin
            return self._admin

    def connect(self) -> None:
        """Connect now (CredentialsUnavailableError if the broker cannot be reached)."""
        self._connected()

    def close(self) -> None:
        with self._lock:
            if self._admin is not None:
                self._admin.close()
                self._admin = None

    def _call(self, name: str, *args: Any) -> Any:
        admin = self._connected()
        try:
            return getattr(admin, name)(*args)
        except BrokerAdminTimeoutError as exc:
            raise CredentialsUnavailableError(f"the broker did not answer: {exc}") from exc

    def create_device(self, device_id: str, device_type: str) -> str:
        return str(self._call("create_device", device_id, device_type))

    def create_devices(self, devices: Iterable[tuple[str, str]]) -> dict[str, str]:
        return dict(self._call("create_devices", list(devices)))

    def rotate_password(self, username: str) -> str:
        return str(self._call("rotate_password", username))

    def disable(self, username: str) -> None:
        self._call("disable", username)

    def enable(self, username: str) -> None:
        self._call("enable", username)

    def delete(self, username: str) -> None:
        self._call("delete", username)

    def exists(self, username: str) -> bool:
        return bool(self._call("exists", username))


@dataclass(frozen=True)
class DeviceCredentials:
    """A device's MQTT login, shown once: username and client id are the device id."""

    username: str
    password: str = field(repr=False)
    client_id: str

    @classmethod
    def of(cls, device_id: str, password: str) -> DeviceCredentials:
        return cls(username=device_id, password=password, client_id=device_id)

    def as_dict(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password, "client_id": self.client_id}


@dataclass(frozen=True)
class ImportResult:
    """An import's per-row report and the credentials issued to the devices it created."""

    report: ImportReport
    credentials: Mapping[str, DeviceCredentials]


CredentialsSink = Callable[[Mapping[str, DeviceCredentials]], None]


def _missing(exc: BrokerAdminError) -> bool:
    return exc.error == CLIENT_NOT_FOUND


def _unavailable_or_refused(exc: BrokerAdminError) -> RuntimeError:
    if isinstance(exc, BrokerAdminTimeoutError) or exc.command == "connect":
        return CredentialsUnavailableError(f"the broker did not answer: {exc}")
    return CredentialsRefusedError(f"the broker refused {exc.command}: {exc.error}")


class Installers:
    """Register, change, cut off and retire devices, keeping the broker's accounts in step.

    With `issuer` None the broker is left alone (registry only): for devices reached through an
    adaptor, or a registry without a broker.
    """

    def __init__(self, registry: Registry, issuer: CredentialIssuer | None) -> None:
        self.registry = registry
        self.issuer = issuer

    def _need_issuer(self) -> CredentialIssuer:
        """The issuer, connected: a broker that cannot be reached fails here, before any lock is
        taken (an issuer with a `connect()` connects now)."""
        if self.issuer is None:
            raise CredentialsUnavailableError("no broker is configured to issue credentials")
        connect = getattr(self.issuer, "connect", None)
        if callable(connect):
            connect()
        return self.issuer

    def _broker(self, action: Callable[[], object]) -> None:
        """Run a broker command whose target account may not exist (a device without credentials)."""
        try:
            action()
        except BrokerAdminError as exc:
            if not _missing(exc):
                raise _unavailable_or_refused(exc) from exc

    def _broker_if_any(self, command: Callable[[CredentialIssuer], object]) -> None:
        """`command` through `_broker` when there is a broker (registry-only installers have none)."""
        issuer = self.issuer
        if issuer is not None:
            self._broker(lambda: command(issuer))

    def _existing(self, device_id: str) -> RegisteredDevice:
        device = self.registry.describe(device_id)
        if device is None:
            raise DeviceNotFoundError(f"device {device_id!r} is not registered")
        return device

    # -- one device -------------------------------------------------------------------------------------

    def register(
        self, record: DeviceRecord, *, actor: str, issue_credentials: bool = True
    ) -> tuple[RegisteredDevice, DeviceCredentials | None]:
        """Register a device and, unless told not to, create its broker account (module docstring)."""
        if not issue_credentials:
            return self.registry.add(record, actor=actor), None
        self.registry.ensure_absent(record.device_id)  # 409 before 503: no broker needed to say so
        try:
            issuer = self._need_issuer()
            with self.registry.credentials_lock():
                self.registry.ensure_absent(record.device_id)
                password = self._create_account(issuer, record.device_id, record.device_type)
                try:
                    device = self.registry.add(record, actor=actor, detail={"credentials": "issued"})
                except BaseException:
                    self._undo_accounts(issuer, [record.device_id])
                    raise
        except (CredentialsUnavailableError, CredentialsRefusedError) as exc:
            why = f"could not issue its MQTT credentials ({exc})"
            raise type(exc)(f"device {record.device_id!r} was not registered: {why}") from exc
        return device, DeviceCredentials.of(device.device_id, password)

    def _create_account(self, issuer: CredentialIssuer, device_id: str, device_type: str) -> str:
        try:
            return issuer.create_device(device_id, device_type)
        except BrokerAdminError as exc:
            if exc.error != CLIENT_EXISTS:
                raise _unavailable_or_refused(exc) from exc
        # Called under the credentials lock, for an id the registry does not have (or had no account
        # for a moment ago): an account there is a leftover of a crash.
        log.warning("replacing a broker account left without a registry row", extra={"device_id": device_id})
        try:
            issuer.delete(device_id)
            return issuer.create_device(device_id, device_type)
        except BrokerAdminError as exc:
            raise _unavailable_or_refused(exc) from exc

    @staticmethod
    def _undo_accounts(issuer: CredentialIssuer, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            try:
                issuer.delete(device_id)
            except Exception:  # the registration failed already; report that, log this
                log.exception("could not delete the broker account of an unregistered device %s", device_id)

    def update(self, device_id: str, changes: Mapping[str, Any], *, actor: str) -> Change:
        return self.registry.update(device_id, changes, actor=actor)

    def move(self, device_id: str, place: Mapping[str, Any], *, actor: str) -> Change:
        return self.registry.move(device_id, place, actor=actor)

    def confirm(self, device_id: str, *, actor: str) -> Change:
        return self.registry.confirm(device_id, actor=actor)

    def disable(self, device_id: str, *, actor: str) -> Change:
        """Cut the device off at the broker (at once: its connection is closed, its logins refused),
        then mark it disabled (the gateway sets aside whatever still comes in its name)."""
        device = self._existing(device_id)
        if device.lifecycle == "retired":
            raise DeviceRetiredError(f"device {device_id!r} is retired: nothing can be done with it")
        self._broker_if_any(lambda issuer: issuer.disable(device_id))
        return self.registry.disable(device_id, actor=actor)

    def enable(self, device_id: str, *, actor: str) -> Change:
        device = self._existing(device_id)
        if device.lifecycle == "disabled":
            self._broker_if_any(lambda issuer: issuer.enable(device_id))
        return self.registry.enable(device_id, actor=actor)

    def retire(self, device_id: str, *, actor: str) -> Change:
        """Delete the broker account, then retire the device for good."""
        device = self._existing(device_id)
        if device.lifecycle != "retired":
            self._broker_if_any(lambda issuer: issuer.delete(device_id))
        return self.registry.retire(device_id, actor=actor)

    def rotate_credentials(self, device_id: str, *, actor: str) -> tuple[RegisteredDevice, DeviceCredentials]:
        """A new password (the old one stops working, a connected device is disconnected); a device
        without an account gets one. A disabled device's new account is disabled too."""
        device = self._existing(device_id)
        if device.lifecycle == "retired":
            raise DeviceRetiredError(f"device {device_id!r} is retired: it gets no credentials")
        issuer = self._need_issuer()
        action = "credentials_rotated"
        try:
            password = issuer.rotate_password(device_id)
        except BrokerAdminError as exc:
            if not _missing(exc):
                raise _unavailable_or_refused(exc) from exc
            action = "credentials_issued"
            with self.registry.credentials_lock():
                password = self._create_account(issuer, device_id, device.device_type)
            if device.lifecycle == "disabled":
                self._broker(lambda: issuer.disable(device_id))
        self.registry.note(device_id, action, actor=actor)
        return device, DeviceCredentials.of(device_id, password)

    # -- many devices -----------------------------------------------------------------------------------

    def import_records(
        self,
        parsed: ParsedCsv,
        *,
        actor: str,
        dry_run: bool = False,
        issue_credentials: bool = True,
        batch_size: int = 200,
        progress: ProgressCallback | None = None,
        on_credentials: CredentialsSink | None = None,
    ) -> ImportResult:
        """Import parsed rows; created devices get credentials (one batched broker call per batch).

        `on_credentials` receives each batch's credentials once that batch is committed (to write them
        to a file as the import goes: a crash loses none of those already registered).
        """
        if dry_run or not issue_credentials or not parsed.records:
            report = self.registry.import_parsed(
                parsed, dry_run=dry_run, batch_size=batch_size, progress=progress, actor=actor
            )
            return ImportResult(report, {})
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        issuer = self._need_issuer()
        items = parsed.records
        rows: list[RowResult] = list(parsed.errors)
        credentials: dict[str, DeviceCredentials] = {}
        version: int | None = None
        aborted: str | None = None
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            try:
                batch_rows, batch_version, issued = self._import_batch(issuer, chunk, actor)
            except ImportAbortedError as exc:
                aborted = str(exc)
                rows.extend(
                    RowResult(row, r.device_id, "error", f"not imported: {exc}") for row, r in items[start:]
                )
                break
            rows.extend(batch_rows)
            version = batch_version
            if issued:
                credentials.update(issued)
                if on_credentials is not None:
                    on_credentials(issued)
            if progress is not None:
                progress(min(start + batch_size, len(items)), len(items))
        rows.sort(key=lambda r: r.row)
        report = ImportReport(
            rows=tuple(rows),
            version=self.registry.current_version() if version is None else version,
            aborted=aborted,
        )
        return ImportResult(report, credentials)

    def _import_batch(
        self, issuer: CredentialIssuer, chunk: Sequence[tuple[int, DeviceRecord]], actor: str
    ) -> tuple[list[RowResult], int | None, dict[str, DeviceCredentials]]:
        """One batch: accounts for its new devices, then its rows in one short transaction."""
        with self.registry.credentials_lock():
            new = set(self.registry.absent(r.device_id for _, r in chunk))
            created, refused = self._create_accounts(
                issuer, [(r.device_id, r.device_type) for _, r in chunk if r.device_id in new]
            )

            def only_with_accounts(records: Sequence[DeviceRecord]) -> dict[str, str]:
                # Under the registry lock: create only the devices whose accounts were made.
                return {
                    r.device_id: refused.get(r.device_id, "could not issue credentials: registered meanwhile")
                    for r in records
                    if r.device_id not in created
                }

            try:
                report = self.registry.import_parsed(
                    ParsedCsv(tuple(chunk), ()),
                    batch_size=len(chunk),
                    actor=actor,
                    before_insert=only_with_accounts,
                )
            except BaseException:
                self._undo_accounts(issuer, list(created))
                raise
            inserted = {r.device_id for r in report.rows if r.outcome == "created"}
            # Registered meanwhile by an import without credentials: the account made for it goes again.
            self._undo_accounts(issuer, [d for d in created if d not in inserted])
        issued = {d: DeviceCredentials.of(d, p) for d, p in created.items() if d in inserted}
        return list(report.rows), report.version, issued

    def _create_accounts(
        self, issuer: CredentialIssuer, devices: list[tuple[str, str]]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Create accounts for devices the registry does not have, under the credentials lock:
        ({id: password}, {id: why not}). Leftover accounts are replaced; the broker going away aborts
        the import."""
        if not devices:
            return {}, {}
        try:
            return issuer.create_devices(devices), {}
        except DeviceBatchError as exc:
            return dict(exc.created), {d: f"could not issue credentials: {e}" for d, e in exc.errors.items()}
        except BrokerAdminError as exc:
            if not exc.error.startswith(CLIENT_EXISTS):
                raise ImportAbortedError(
                    f"could not issue credentials: {_unavailable_or_refused(exc)}"
                ) from exc
        except CredentialsUnavailableError as exc:
            raise ImportAbortedError(str(exc)) from exc
        try:
            leftovers = [d for d, _ in devices if issuer.exists(d)]
            log.warning("replacing %d broker account(s) left without a registry row", len(leftovers))
            for device_id in leftovers:
                issuer.delete(device_id)
            return issuer.create_devices(devices), {}
        except DeviceBatchError as exc:
            return dict(exc.created), {d: f"could not issue credentials: {e}" for d, e in exc.errors.items()}
        except BrokerAdminError as exc:
            raise ImportAbortedError(f"could not issue credentials: {_unavailable_or_refused(exc)}") from exc
        except CredentialsUnavailableError as exc:
            raise ImportAbortedError(str(exc)) from exc
