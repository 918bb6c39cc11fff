"""Local stack: install, start and stop the real Mosquitto, InfluxDB and PostgreSQL with project-local data.

Used by the dev "run everything" script and by the pytest fixtures. Every service:

- listens on 127.0.0.1 only, on a port given or picked free;
- keeps its data, rendered config and log in the data dir it is given, so a restart on the same data dir
  is the same service (used to simulate outages);
- runs in its own session (process group), so a Ctrl-C in the parent's terminal does not reach it and the
  parent stops it in order, and so ``kill()`` takes the whole group down like a crash would;
- when we are root, runs as its Debian system user (``mosquitto``, ``influxdb``, ``postgres``): PostgreSQL
  refuses to run as root, Mosquitto would drop to its own user anyway, and InfluxDB follows for symmetry.
  The data dir is chowned to that user, and every directory above it must let that user through.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import grp
import json
import logging
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from devices import DEVICE_TYPES
from gateway.broker_admin import (
    ADAPTOR_ROLE,
    ADMIN_ROLE,
    ADMIN_USERNAME,
    GATEWAY_ROLE,
    BrokerAdmin,
    Credentials,
    admin_acls,
    initial_config,
    missing_acls,
    new_password,
    write_private,
)
from stack.plugin_build import PLUGIN_PACKAGES, PluginBuildError, build_device_auth_plugin

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF_TEMPLATE = REPO_ROOT / "mosquitto" / "mosquitto.conf"

REQUIRED_PACKAGES = [
    *("mosquitto", "mosquitto-clients", "influxdb", "influxdb-client", "postgresql"),
    # To compile the broker's device accounts plugin (mosquitto/plugin/, stack/plugin_build.py).
    *PLUGIN_PACKAGES,
    "chromium",  # the managers' web page's browser tests (tests/e2e/test_webpage.py, Playwright)
    "fonts-wqy-microhei",  # a Chinese font, so the headless browser draws the page's labels in screenshots
]

LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 30

MOSQUITTO_BIN = Path("/usr/sbin/mosquitto")
DYNSEC_PLUGIN_DIR = Path("/usr/lib")
INFLUXD_BIN = Path("/usr/bin/influxd")
POSTGRES_LIB = Path("/usr/lib/postgresql")

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")

# The longest path a Unix socket may have (sun_path is 108 bytes including the NUL).
_MAX_UNIX_SOCKET_PATH = 107
_PG_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class StackError(RuntimeError):
    """A service of the local stack could not be installed, started or reached."""


# --------------------------------------------------------------------------------------------------------
# Ports and packages
# --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    # Holding all sockets open until every port is known keeps the ports distinct.
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _dpkg_installed(package: str) -> bool:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise StackError("dpkg-query not found: the local stack needs a Debian-based machine") from exc
    return result.returncode == 0 and result.stdout.strip() == "install ok installed"


@contextlib.contextmanager
def _services_not_started_by_dpkg() -> Iterator[None]:
    """Stop maintainer scripts from starting system-wide brokers that would take ports 1883 and 8086.

    invoke-rc.d asks /usr/sbin/policy-rc.d; exit status 101 means "action forbidden". An existing file is
    the machine owner's policy and is left alone.
    """
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# Written by stack/services.py during apt-get install.\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def ensure_debian_packages(packages: list[str]) -> None:
    """Install the Debian packages that are missing; no-op (a few dpkg-query calls) when all are there."""
    missing = [package for package in packages if not _dpkg_installed(package)]
    if not missing:
        return
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise StackError(
            f"missing Debian packages: {' '.join(missing)}. Install them as root: sudo {' '.join(install)}"
        )
    log.info("installing Debian packages: %s", " ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _services_not_started_by_dpkg():
        if subprocess.run(install, env=env, check=False).returncode != 0:
            # The package lists are missing or stale (a fresh machine has none): refresh once, retry.
            subprocess.run(["apt-get", "update"], env=env, check=False)
            if subprocess.run(install, env=env, check=False).returncode != 0:
                raise StackError(f"apt-get could not install: {' '.join(missing)}")
    still_missing = [package for package in missing if not _dpkg_installed(package)]
    if still_missing:
        raise StackError(f"apt-get finished but these packages are still not installed: {still_missing}")


def _require_binary(path: Path, package: str) -> Path:
    if not path.is_file():
        raise StackError(
            f"{path} not found: install the Debian package {package!r} "
            f"(apt-get install {package}, or ensure_debian_packages(REQUIRED_PACKAGES))"
        )
    return path


def _postgres_bindir() -> Path:
    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))

    candidates = sorted(
        (p.parent for p in POSTGRES_LIB.glob("*/bin/postgres") if (p.parent / "initdb").is_file()),
        key=version,
    )
    if not candidates:
        raise StackError(
            f"no PostgreSQL server under {POSTGRES_LIB}/*/bin: install the Debian package 'postgresql' "
            "(apt-get install postgresql, or ensure_debian_packages(REQUIRED_PACKAGES))"
        )
    return candidates[-1]


# --------------------------------------------------------------------------------------------------------
# Running as a service user, data dirs, logs
# --------------------------------------------------------------------------------------------------------


def _service_account(name: str) -> pwd.struct_passwd | None:
    """The system user a service runs as when we are root (created if missing); None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    log.info("creating system user %s", name)
    subprocess.run(
        [
            *("useradd", "--system", "--user-group", "--no-create-home"),
            *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name),
        ],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def _run_as(account: pwd.struct_passwd | None) -> dict[str, Any]:
    if account is None:
        return {}
    groups = [g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem]
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": groups}


def _child_env(home: Path) -> dict[str, str]:
    # A clean environment: PG*, INFLUXDB_* and locale variables of the caller would change behaviour.
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LC_ALL": "C",
    }


def _blocking_dirs(path: Path, account: pwd.struct_passwd) -> list[str]:
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem}
    blocking = []
    for directory in reversed(path.parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            blocking.append(f"{directory} (mode {stat.S_IMODE(st.st_mode):04o})")
    return blocking


def _prepare_data_dir(data_dir: Path, account: pwd.struct_passwd | None, service: str) -> Path:
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if account is None:
        return data_dir
    if data_dir.stat().st_uid != account.pw_uid:
        # A fresh dir, or one copied or created by another user: hand all of it to the service user.
        for root, dirs, files in os.walk(data_dir):
            for name in [*dirs, *files]:
                os.chown(Path(root) / name, account.pw_uid, account.pw_gid, follow_symlinks=False)
        os.chown(data_dir, account.pw_uid, account.pw_gid)
    data_dir.chmod(0o700)
    probe = subprocess.run(
        ["test", "-w", str(data_dir)], env=_child_env(data_dir.parent), check=False, **_run_as(account)
    )
    if probe.returncode != 0:
        blocking = ", ".join(_blocking_dirs(data_dir, account)) or "a directory above it"
        raise StackError(
            f"{service} runs as the system user {account.pw_name!r}, which cannot reach its data dir "
            f"{data_dir}: {blocking} does not let that user through. Use a data dir below directories "
            "that others may enter (mode o+x), or chmod o+x those directories."
        )
    return data_dir


@contextlib.contextmanager
def _open_log(log_path: Path, account: pwd.struct_passwd | None, banner: str) -> Iterator[Any]:
    with log_path.open("ab") as log_file:
        if account is not None:
            os.chown(log_path, account.pw_uid, account.pw_gid)
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        log_file.write(f"--- stack/services.py {stamp}: {banner} ---\n".encode())
        log_file.flush()
        yield log_file


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------------------------

_RUNNING: set[Service] = set()


@atexit.register
def _stop_all() -> None:
    """A script that forgets to stop its services (or dies on an exception) must not leave them behind."""
    for service in list(_RUNNING):
        with contextlib.suppress(Exception):
            service.stop()


class Service:
    """One running server process: started by the start_* functions, stopped by stop() or kill()."""

    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    ready_timeout: ClassVar[float] = 15.0
    # The process's umask (-1: inherit ours).
    umask: ClassVar[int] = -1

    proc: subprocess.Popen[bytes]

    def __init__(
        self, name: str, argv: list[str], data_dir: Path, log_path: Path, account: pwd.struct_passwd | None
    ) -> None:
        self.name = name
        self.argv = argv
        self.data_dir = data_dir
        self.log_path = log_path
        self._account = account

    def __repr__(self) -> str:
        state = f"pid={self.proc.pid}" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.name} {state} data_dir={self.data_dir}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> Self:
        """Launch the process and wait until it serves; on failure raise StackError with the log tail."""
        if self.is_running():
            raise StackError(f"{self.name} is already running (pid {self.proc.pid})")
        self._before_start()
        with _open_log(self.log_path, self._account, f"starting {' '.join(self.argv)}") as log_file:
            self.proc = subprocess.Popen(
                self.argv, start_new_session=True, umask=self.umask, **self._child_options(log_file)
            )
        _RUNNING.add(self)
        try:
            self._wait_ready()
            self._after_start()
        except BaseException:
            self.kill()
            raise
        log.info("%s started: pid %d, %s", self.name, self.proc.pid, self.describe())
        return self

    def _child_options(self, log_file: Any) -> dict[str, Any]:
        """How the service's processes run: no stdin, output to the log, in the data dir, as its user."""
        return {
            "stdin": subprocess.DEVNULL,
            "stdout": log_file,
            "stderr": subprocess.STDOUT,
            "cwd": self.data_dir,
            "env": _child_env(self.data_dir),
            **_run_as(self._account),
        }

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            returncode = self.proc.poll()
            if returncode is not None:
                raise self.start_error(f"it exited with status {returncode} before it was ready")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise self.start_error(f"it was not ready after {self.ready_timeout:.0f} s")
            time.sleep(0.05)

    def start_error(self, reason: str) -> StackError:
        return StackError(
            f"{self.name} failed to start: {reason}.\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10) -> None:
        """Ask the server to shut down cleanly (it saves its state); SIGKILL it if it takes too long."""
        if not hasattr(self, "proc"):
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", self.name, timeout)
                self.kill()
                return
            log.info("%s stopped", self.name)
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL the server and everything it started, as a crash would: nothing is saved on the way out."""
        if not hasattr(self, "proc"):
            return
        if self.proc.poll() is None:
            # PostgreSQL backends put themselves in sessions of their own: find them through their parent.
            stragglers = _descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in stragglers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            deadline = time.monotonic() + 5
            while any(_alive(pid) for pid in stragglers) and time.monotonic() < deadline:
                time.sleep(0.02)
            log.info("%s killed", self.name)
        _RUNNING.discard(self)

    def restart(self, timeout: float = 10) -> Self:
        """Stop (if running) and start again on the same port(s) and data dir."""
        self.stop(timeout)
        return self.start()

    def is_running(self) -> bool:
        return hasattr(self, "proc") and self.proc.poll() is None

    def describe(self) -> str:
        return f"data dir {self.data_dir}"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # Hooks for the subclasses.
    def _before_start(self) -> None:
        pass

    def _ready(self) -> bool:
        raise NotImplementedError

    def _after_start(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------
# Mosquitto
# --------------------------------------------------------------------------------------------------------


class MosquittoService(Service):
    ready_timeout = 15.0
    # What the broker writes (the accounts file with its password hashes, the persistence database, the
    # log) is for its own user only.
    umask = 0o077

    def __init__(
        self,
        argv: list[str],
        data_dir: Path,
        log_path: Path,
        account: pwd.struct_passwd | None,
        *,
        port: int,
        conf_path: Path,
        admin: Credentials,
    ) -> None:
        super().__init__("mosquitto", argv, data_dir, log_path, account)
        self.host = LOOPBACK
        self.port = port
        self.conf_path = conf_path
        self.dynsec_path = data_dir / DYNSEC_FILE
        self.devices_path = data_dir / DEVICES_FILE
        self.admin_username = admin.username
        self.admin_password = admin.password
        self._accounts: dict[str, Credentials] = {}

    def describe(self) -> str:
        return f"mqtt://{self.host}:{self.port}, data dir {self.data_dir}"

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def admin(self, **kwargs: Any) -> BrokerAdmin:
        """A BrokerAdmin logged in as this broker's admin (connects on `with`, or on .connect())."""
        return BrokerAdmin(self.host, self.port, self.admin_username, self.admin_password, **kwargs)

    def account(self, username: str, role: str) -> Credentials:
        """A service account ("svc.*") with `role`, created on first use (with the roles it needs).

        Its password is kept in <data_dir>/accounts/<username>.json (0600), so the same data dir gives the
        same credentials on the next run.
        """
        if username not in self._accounts:
            store = self.data_dir / "accounts" / f"{username}.json"
            with self.admin() as admin:
                admin.ensure_roles()
                self._accounts[username] = admin.ensure_service_account(username, role, store)
        return self._accounts[username]

    @property
    def gateway_account(self) -> Credentials:
        """The gateway's account, role sc-gateway (SC_MQTT_USERNAME / SC_MQTT_PASSWORD)."""
        return self.account(GATEWAY_ACCOUNT, GATEWAY_ROLE)

    @property
    def publisher_account(self) -> Credentials:
        """An adaptor account, role sc-adaptor: publishes uplink for any device (simulators, tests, bench)."""
        return self.account(PUBLISHER_ACCOUNT, ADAPTOR_ROLE)


_MOSQUITTO_PLACEHOLDERS = (
    *("{port}", "{data_dir}", "{log_path}", "{device_auth_plugin}", "{device_types}", "{dynsec_plugin}"),
)
DYNSEC_FILE = "dynamic-security.json"
# The device accounts plugin's journal (its name is in mosquitto/mosquitto.conf).
DEVICES_FILE = "device-accounts.journal"
ADMIN_FILE = "admin.json"
GATEWAY_ACCOUNT = "svc.gateway"
PUBLISHER_ACCOUNT = "svc.publisher"


def render_mosquitto_conf(
    template: str,
    *,
    port: int,
    data_dir: Path,
    log_path: Path,
    dynsec_plugin: Path,
    device_auth_plugin: Path,
    device_types: Iterable[str] = DEVICE_TYPES,
) -> str:
    """Fill the placeholders of the shipped config ({port}, {data_dir}, {log_path}, {dynsec_plugin},
    {device_auth_plugin}, {device_types})."""
    missing = [p for p in _MOSQUITTO_PLACEHOLDERS if p not in template]
    if missing:
        raise StackError(f"mosquitto config template lacks the placeholders {missing}")
    for value in (data_dir, log_path, dynsec_plugin, device_auth_plugin):
        # mosquitto.conf values end at the first whitespace.
        if any(ch.isspace() for ch in str(value)):
            raise StackError(f"mosquitto cannot use a path with whitespace: {value!r}")
    return (
        template.replace("{port}", str(port))
        .replace("{data_dir}", str(data_dir))
        .replace("{log_path}", str(log_path))
        .replace("{device_auth_plugin}", str(device_auth_plugin))
        .replace("{device_types}", ",".join(device_types))
        .replace("{dynsec_plugin}", str(dynsec_plugin))
    )


def _dynsec_plugin() -> Path:
    """The dynamic security plugin of Debian's mosquitto package (its directory depends on the arch)."""
    found = sorted(DYNSEC_PLUGIN_DIR.glob("*/mosquitto_dynamic_security.so"))
    found += sorted(DYNSEC_PLUGIN_DIR.glob("mosquitto_dynamic_security.so"))
    if not found:
        raise StackError(
            f"mosquitto_dynamic_security.so not found under {DYNSEC_PLUGIN_DIR}: "
            "install the Debian package 'mosquitto' (2.0 or later)"
        )
    return found[0]


def _device_auth_plugin(account: pwd.struct_passwd | None) -> Path:
    """The device accounts plugin, built if needed, and readable by the user the broker runs as."""
    try:
        plugin = build_device_auth_plugin()
    except PluginBuildError as exc:
        raise StackError(str(exc)) from exc
    if account is not None:
        probe = subprocess.run(
            ["test", "-r", str(plugin)], env=_child_env(plugin.parent), check=False, **_run_as(account)
        )
        if probe.returncode != 0:
            blocking = ", ".join(_blocking_dirs(plugin, account)) or "a directory above it"
            raise StackError(
                f"mosquitto runs as the system user {account.pw_name!r}, which cannot read its plugin "
                f"{plugin}: {blocking} does not let that user through (chmod o+x those directories)."
            )
    return plugin


def _grant_admin_acls(dynsec_path: Path, account: pwd.struct_passwd | None) -> None:
    """Give the admin role of an existing accounts file the rights it lacks (those of admin_acls(): the
    device accounts plugin's control topic came later). Written only if something is missing; the
    broker is not running yet, so its own rewrite cannot race this one."""
    try:
        doc = json.loads(dynsec_path.read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"{dynsec_path} cannot be read: {exc}") from exc
    for role in doc.get("roles", []):
        if isinstance(role, dict) and role.get("rolename") == ADMIN_ROLE:
            lacking = missing_acls(role.get("acls", []), admin_acls())
            if not lacking:
                return
            role["acls"] = [*role.get("acls", []), *lacking]
            owner = (account.pw_uid, account.pw_gid) if account is not None else (-1, -1)
            write_private(dynsec_path, json.dumps(doc, indent=1), uid=owner[0], gid=owner[1])
            log.info("mosquitto: admin role granted %s", ", ".join(a["topic"] for a in lacking))
            return


def _broker_admin(data_dir: Path, account: pwd.struct_passwd | None) -> Credentials:
    """The admin account of the broker in data_dir: made on first start, read back afterwards.

    First start: a random admin password goes to admin.json (0600, ours: the broker does not need it),
    then dynamic-security.json (0600, the broker's user's) is written with that admin only, the
    equivalent of `mosquitto_ctrl dynsec init` without the password on a command line. Later starts
    give the admin role any right of admin_acls() it lacks.
    """
    dynsec_path, admin_path = data_dir / DYNSEC_FILE, data_dir / ADMIN_FILE
    if dynsec_path.exists():
        try:
            doc = json.loads(admin_path.read_text())
            admin = Credentials(str(doc["username"]), str(doc["password"]))
        except (OSError, ValueError, KeyError) as exc:
            raise StackError(
                f"{dynsec_path} exists but its admin credentials cannot be read from {admin_path} ({exc}). "
                f"Restore {admin_path}, or remove {dynsec_path} to start over (every account is lost)."
            ) from exc
        _grant_admin_acls(dynsec_path, account)
        return admin
    admin = Credentials(ADMIN_USERNAME, new_password())
    write_private(admin_path, json.dumps({"username": admin.username, "password": admin.password}))
    owner = (account.pw_uid, account.pw_gid) if account is not None else (-1, -1)
    config = json.dumps(initial_config(admin.username, admin.password), indent=1)
    write_private(dynsec_path, config, uid=owner[0], gid=owner[1])
    log.info("mosquitto: accounts file %s created with the admin account %s", dynsec_path, admin.username)
    return admin


def start_mosquitto(
    data_dir: Path,
    port: int | None = None,
    *,
    conf_template: Path = MOSQUITTO_CONF_TEMPLATE,
    extra_conf: str = "",
) -> MosquittoService:
    """Start Mosquitto on 127.0.0.1:port with its persistence, accounts, rendered config and log in data_dir.

    Anonymous clients are refused. The device accounts plugin (mosquitto/plugin/) is compiled first if
    needed (stack/plugin_build.py); devices' accounts go to its journal `.devices_path`. On the first
    start in data_dir the dynamic security plugin's file is written with an admin account only
    (`.admin_username` / `.admin_password`, also in admin.json); a restart keeps every account.
    `.gateway_account` / `.publisher_account` / `.account()` make the service accounts, `.admin()` gives
    a BrokerAdmin for the rest.
    extra_conf is appended to the rendered config (for a test that needs another limit, say).
    """
    binary = _require_binary(MOSQUITTO_BIN, "mosquitto")
    plugin = _dynsec_plugin()
    account = _service_account("mosquitto")
    device_plugin = _device_auth_plugin(account)
    data_dir = _prepare_data_dir(data_dir, account, "mosquitto")
    port = free_port() if port is None else port
    log_path = data_dir / "mosquitto.log"
    conf_path = data_dir / "mosquitto.conf"
    rendered = render_mosquitto_conf(
        Path(conf_template).read_text(),
        port=port,
        data_dir=data_dir,
        log_path=log_path,
        dynsec_plugin=plugin,
        device_auth_plugin=device_plugin,
    )
    if extra_conf:
        rendered += "\n# --- extra_conf from start_mosquitto() ---\n" + extra_conf.strip() + "\n"
    conf_path.write_text(rendered)
    admin = _broker_admin(data_dir, account)
    service = MosquittoService(
        [str(binary), "-c", str(conf_path)],
        data_dir,
        log_path,
        account,
        port=port,
        conf_path=conf_path,
        admin=admin,
    )
    return service.start()


# --------------------------------------------------------------------------------------------------------
# InfluxDB 1.x
# --------------------------------------------------------------------------------------------------------


class InfluxService(Service):
    ready_timeout = 30.0

    def __init__(
        self,
        argv: list[str],
        data_dir: Path,
        log_path: Path,
        account: pwd.struct_passwd | None,
        *,
        http_port: int,
        rpc_port: int,
        conf_path: Path,
    ) -> None:
        super().__init__("influxdb", argv, data_dir, log_path, account)
        self.host = LOOPBACK
        self.http_port = http_port
        self.port = http_port
        self.rpc_port = rpc_port
        self.conf_path = conf_path
        self.url = f"http://{LOOPBACK}:{http_port}"

    def describe(self) -> str:
        return f"{self.url}, data dir {self.data_dir}"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as response:
                return bool(response.status == 204)
        except (OSError, urllib.error.URLError):
            return False

    def query(self, q: str, db: str | None = None) -> dict[str, Any]:
        """Run an InfluxQL statement through POST /query; raise StackError on an HTTP or statement error."""
        params = {"q": q} | ({"db": db} if db else {})
        request = urllib.request.Request(
            f"{self.url}/query", data=urllib.parse.urlencode(params).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise StackError(f"influxdb rejected {q!r}: {exc.code} {exc.read()[:500]!r}") from exc
        errors = [r["error"] for r in body.get("results", []) if "error" in r]
        if errors:
            raise StackError(f"influxdb rejected {q!r}: {errors}")
        return body

    def create_database(self, name: str) -> None:
        self.query(f"CREATE DATABASE {_influx_ident(name)}")

    def drop_database(self, name: str) -> None:
        self.query(f"DROP DATABASE {_influx_ident(name)}")


def _influx_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_str(value: object) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(str(value))


def render_influxdb_conf(data_dir: Path, *, http_port: int, rpc_port: int) -> str:
    """An influxd 1.6 config: everything under data_dir, HTTP and RPC on loopback, nothing else listening."""
    return f"""\
# Written by stack/services.py; rewritten on every start_influxdb().
# Upstream's key is reporting-disabled; Debian's build renamed it reporting-enabled. influxd ignores
# unknown keys, so both are set to keep usage reporting off with either build.
reporting-disabled = true
reporting-enabled = false
# The RPC service (backup/restore); influxd binds 127.0.0.1:8088 by default, which would collide
# between two instances.
bind-address = {_toml_str(f"{LOOPBACK}:{rpc_port}")}

[meta]
  dir = {_toml_str(data_dir / "meta")}
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = {_toml_str(data_dir / "data")}
  wal-dir = {_toml_str(data_dir / "wal")}
  # One log line per query would drown the state changes we want to see in the log.
  query-log-enabled = false

[monitor]
  # No _internal database: it adds a write every 10 s and shows up in SHOW DATABASES.
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = {_toml_str(f"{LOOPBACK}:{http_port}")}
  auth-enabled = false
  # No access log line per write.
  log-enabled = false
  pprof-enabled = false
  https-enabled = false
  unix-socket-enabled = false

[ifql]
  enabled = false

[continuous_queries]
  enabled = true
  log-enabled = false

[logging]
  level = "info"
  suppress-logo = true

# No [[graphite]], [[collectd]], [[opentsdb]] or [[udp]] sections: those listeners stay off.
"""


def start_influxdb(data_dir: Path, http_port: int | None = None) -> InfluxService:
    """Start influxd 1.x with its HTTP API on 127.0.0.1:http_port and its meta, data and WAL in data_dir."""
    binary = _require_binary(INFLUXD_BIN, "influxdb")
    account = _service_account("influxdb")
    data_dir = _prepare_data_dir(data_dir, account, "influxdb")
    if http_port is None:
        http_port, rpc_port = _free_ports(2)
    else:
        rpc_port = next(p for p in iter(free_port, None) if p != http_port)
    conf_path = data_dir / "influxdb.conf"
    conf_path.write_text(render_influxdb_conf(data_dir, http_port=http_port, rpc_port=rpc_port))
    service = InfluxService(
        [str(binary), "-config", str(conf_path)],
        data_dir,
        data_dir / "influxd.log",
        account,
        http_port=http_port,
        rpc_port=rpc_port,
        conf_path=conf_path,
    )
    return service.start()


# --------------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------------


class PostgresService(Service):
    # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to disconnect: a connection
    # pool left open by a test would hold it until the SIGKILL. SIGINT is the "fast" shutdown: clients
    # are disconnected, and the cluster is still shut down cleanly.
    stop_signal = signal.SIGINT
    ready_timeout = 30.0

    superuser = "postgres"

    def __init__(
        self,
        argv: list[str],
        data_dir: Path,
        log_path: Path,
        account: pwd.struct_passwd | None,
        *,
        port: int,
        bindir: Path,
        database: str,
        for_tests: bool,
    ) -> None:
        super().__init__("postgres", argv, data_dir, log_path, account)
        self.host = LOOPBACK
        self.port = port
        self.bindir = bindir
        self.pgdata = data_dir / "pgdata"
        self.database = database
        self.for_tests = for_tests
        self.dsn = self.dsn_for(database)

    def describe(self) -> str:
        return f"{self.dsn}, data dir {self.data_dir}"

    def dsn_for(self, database: str) -> str:
        """The SQLAlchemy URL of a database of this cluster."""
        return f"postgresql+psycopg://{self.superuser}@{self.host}:{self.port}/{database}"

    def _before_start(self) -> None:
        if (self.pgdata / "PG_VERSION").is_file():
            return
        argv = [str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", self.superuser]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-locale"]
        if self.for_tests:
            argv.append("--no-sync")
        with _open_log(self.log_path, self._account, f"initdb: {' '.join(argv)}") as log_file:
            result = subprocess.run(argv, timeout=120, check=False, **self._child_options(log_file))
        if result.returncode != 0:
            raise self.start_error(f"initdb exited with status {result.returncode}")

    def _ready(self) -> bool:
        probe = subprocess.run(
            [
                *(str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)),
                *("-U", self.superuser, "-d", "postgres", "-t", "1"),
            ],
            env=_child_env(self.data_dir),
            check=False,
        )
        return probe.returncode == 0

    def _after_start(self) -> None:
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"):
            self.psql(f'CREATE DATABASE "{self.database}"')

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL statement as the superuser through psql (no driver needed); return its output."""
        result = subprocess.run(
            [
                *(str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *("-h", self.host, "-p", str(self.port), "-U", self.superuser, "-d", database, "-c", sql),
            ],
            env=_child_env(self.data_dir),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"postgres rejected {sql!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """Create a new, empty database and return its SQLAlchemy URL."""
        _check_pg_name(name)
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected to it."""
        _check_pg_name(name)
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _check_pg_name(name: str) -> None:
    if not _PG_NAME.match(name):
        raise StackError(f"database name {name!r} must match {_PG_NAME.pattern}")


def start_postgres(
    data_dir: Path, port: int | None = None, *, for_tests: bool = False, database: str = "sc_gateway"
) -> PostgresService:
    """Start a PostgreSQL cluster in data_dir (initdb on first use) on 127.0.0.1:port.

    The cluster trusts every connection (it only listens on loopback) from the superuser "postgres";
    `database` is created if missing and is what `.dsn` points at. for_tests=True turns fsync (and full
    page writes) off: faster, still safe against a killed server, but a machine crash may then corrupt
    the cluster, which a test cluster can afford.
    """
    _check_pg_name(database)
    bindir = _postgres_bindir()
    account = _service_account("postgres")
    data_dir = _prepare_data_dir(data_dir, account, "postgres")
    port = free_port() if port is None else port
    socket_dir = data_dir / "run"
    socket_dir.mkdir(exist_ok=True)
    if account is not None:
        os.chown(socket_dir, account.pw_uid, account.pw_gid)
    if len(f"{socket_dir}/.s.PGSQL.{port}") > _MAX_UNIX_SOCKET_PATH:
        log.info("postgres: %s is too long a path for a Unix socket; TCP only", socket_dir)
        socket_arg = ""
    else:
        socket_arg = str(socket_dir)
    argv = [str(bindir / "postgres"), "-D", str(data_dir / "pgdata"), "-p", str(port), "-k", socket_arg]
    argv += ["-c", f"listen_addresses={LOOPBACK}"]
    if for_tests:
        # Both only matter when the machine itself crashes; a killed server (what crash tests do) loses
        # nothing. synchronous_commit stays on: with it off, a kill loses the last commits.
        argv += ["-c", "fsync=off", "-c", "full_page_writes=off"]
    service = PostgresService(
        argv,
        data_dir,
        data_dir / "postgres.log",
        account,
        port=port,
        bindir=bindir,
        database=database,
        for_tests=for_tests,
    )
    return service.start()


def stop_all(services: Iterable[Service]) -> None:
    """Stop services in reverse start order, carrying on past failures (for a script's finally block)."""
    for service in reversed(list(services)):
        try:
            service.stop()
        except Exception:
            log.exception("stopping %s failed", service.name)
