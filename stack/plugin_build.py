"""Build the project's Mosquitto plugin (mosquitto/plugin/sc_device_auth.c) into .var/build/ with gcc.

The plugin is compiled against Debian's headers (mosquitto-dev, libmosquitto-dev, libcjson-dev,
libssl-dev: see PLUGIN_PACKAGES). A build is reused while the source and the compiler flags are
unchanged (a stamp next to the .so holds their digest, so a checkout that moves mtimes back still
rebuilds), and replaces the .so atomically: a running broker keeps the file it loaded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCE = REPO_ROOT / "mosquitto" / "plugin" / "sc_device_auth.c"
BUILD_DIR = REPO_ROOT / ".var" / "build"
PLUGIN_NAME = "sc_device_auth.so"

# What compiling it needs, for stack.services.REQUIRED_PACKAGES (`./manage setup` installs them).
PLUGIN_PACKAGES = ["gcc", "libc6-dev", "mosquitto-dev", "libmosquitto-dev", "libcjson-dev", "libssl-dev"]

CC = "gcc"
CFLAGS = [
    *("-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-fPIC", "-shared"),
    *("-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-Wl,-z,relro,-z,now"),
]
LIBS = ["-lcjson", "-lcrypto"]


class PluginBuildError(RuntimeError):
    """The plugin could not be compiled (the message holds the compiler's output)."""


def _digest(source: Path) -> str:
    h = hashlib.sha256(source.read_bytes())
    h.update("\0".join([CC, *CFLAGS, *LIBS]).encode())
    return h.hexdigest()


def build_device_auth_plugin(build_dir: Path = BUILD_DIR, *, source: Path = PLUGIN_SOURCE) -> Path:
    """The compiled plugin's path, (re)built if the source or the flags changed since the last build."""
    out = build_dir / PLUGIN_NAME
    stamp = build_dir / (PLUGIN_NAME + ".sha256")
    digest = _digest(source)
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".{PLUGIN_NAME}.{os.getpid()}.tmp"
    argv = [CC, *CFLAGS, "-o", str(tmp), str(source), *LIBS]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as exc:
        raise PluginBuildError(
            f"{CC} not found: install the Debian packages {' '.join(PLUGIN_PACKAGES)}"
        ) from exc
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PluginBuildError(
            f"compiling {source} failed (status {result.returncode}; it needs the Debian packages "
            f"{' '.join(PLUGIN_PACKAGES)}):\n{' '.join(argv)}\n{result.stderr.strip()}"
        )
    # The broker runs as its own user: it must be able to read the plugin.
    tmp.chmod(0o755)
    os.replace(tmp, out)
    stamp.write_text(digest + "\n")
    return out
