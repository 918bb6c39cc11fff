"""What the browser tests share: Debian's Chromium driven by Playwright (a fresh profile per test, no
request may leave 127.0.0.1, a script error fails the test), screenshots kept under
artifacts/screenshots/, and the API served by uvicorn on a free loopback port."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import uvicorn
from fastapi import FastAPI

from stack.services import StackError, ensure_debian_packages, free_port

REPO: Final = Path(__file__).resolve().parents[2]
SCREENSHOTS: Final = REPO / "artifacts" / "screenshots"
CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMIUM_FLAGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: how long the page may take to show something (a wait, not a timing assertion)
WAIT_MS: Final = 20_000


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium (installed here if missing: it is in stack.services.REQUIRED_PACKAGES)."""
    if not CHROMIUM.is_file():
        try:
            ensure_debian_packages(["chromium"])
        except StackError as exc:
            pytest.skip(f"{CHROMIUM} is missing and could not be installed: {exc}")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing after installing the Debian package chromium")
    return CHROMIUM


@pytest.fixture
def page(chromium: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is missing")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        # Playwright gives the browser a fresh, empty profile of its own
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        outside: list[str] = []
        page.on(
            "request",
            lambda req: outside.append(req.url) if not req.url.startswith("http://127.0.0.1:") else None,
        )
        yield page
        context.close()
        browser.close()
    assert not errors, f"the page threw: {errors}"
    assert not outside, f"the page asked for something outside the API: {outside}"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"webpage-{name}.png"), full_page=True)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve `app` on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    deadline = dt.datetime.now() + dt.timedelta(seconds=30)
    while not server.started:
        assert thread.is_alive(), "the API server stopped while starting"
        assert dt.datetime.now() < deadline, "the API server did not start within 30 s"
        threading.Event().wait(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
