"""The managers' web page as the API serves it: the page and its files with their content types, no
credential for them (they hold no data) while the data routes it calls need one, and nothing in the
files that points outside the API (the page must work on a closed network)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from api.app import create_app
from api.settings import ApiSettings
from api.webpage import ASSETS, INDEX, WEB_DIR
from gateway.db import make_engine, migrate

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

#: The API routes the page calls (the incidents' stream answers 401 before it starts streaming).
DATA_ROUTES: Final = [
    ("GET", "/api/v1/me"),
    ("GET", "/api/v1/incidents?status=open&limit=500"),
    ("GET", "/api/v1/incidents/stream"),
    ("POST", "/api/v1/incidents/INC-20261121-000001/ack"),
    ("GET", "/api/v1/device-status?limit=1000&offset=0"),
    ("GET", "/api/v1/device-status/mc-001"),
    ("GET", "/api/v1/devices/mc-001/readings?since=24h&points=200"),
    ("GET", "/api/v1/overview?by=community"),
    ("GET", "/api/v1/overview?by=grid"),
    ("POST", "/api/v1/auth/logout"),
]
#: Anything a browser would fetch from elsewhere: an absolute or protocol-relative URL, a CSS import.
EXTERNAL: Final = re.compile(
    r"(?i)(https?:|wss?:|ftp:)//|(?:src|href|action)\s*=\s*[\"']?//|@import|url\(\s*[\"']?(?!data:)[^)\"'\s]"
)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    engine = make_engine(url)
    with TestClient(create_app(ApiSettings(incident_mqtt=False), engine=engine, issuer=None)) as c:
        yield c
    engine.dispose()


def web_files() -> list[Path]:
    return sorted(p for p in WEB_DIR.rglob("*") if p.is_file())


def test_the_page_is_served_without_a_credential(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="/app/app.js"' in r.text and 'href="/app/app.css"' in r.text
    assert (
        "Content-Security-Policy" in r.headers
        and "default-src 'self'" in r.headers["Content-Security-Policy"]
    )


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("app.js", "text/javascript; charset=utf-8"), ("app.css", "text/css; charset=utf-8")],
)
def test_the_files_are_served_with_their_content_types(
    client: TestClient, name: str, content_type: str
) -> None:
    r = client.get(f"/app/{name}")
    assert r.status_code == 200
    assert r.headers["content-type"] == content_type
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == (WEB_DIR / name).read_bytes()


@pytest.mark.parametrize(
    "view", ["", "board", "site", "overview", "login", "devices/mc-001", "devices/a%20b"]
)
def test_the_views_are_the_page(client: TestClient, view: str) -> None:
    r = client.get(f"/app/{view}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.content == (WEB_DIR / INDEX).read_bytes()


@pytest.mark.parametrize(
    "path",
    ["/app/nope.js", "/app/index.html.bak", "/app/devices/a/b", "/app/%2e%2e/webpage.py", "/app/..%2Fapp.py"],
)
def test_nothing_else_is_served(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404, (path, r.text[:200])
    assert "import" not in r.text


def test_every_file_of_the_page_is_served(client: TestClient) -> None:
    served = {INDEX, *ASSETS}
    assert {p.relative_to(WEB_DIR).as_posix() for p in web_files()} == served
    for name in ASSETS:
        assert client.get(f"/app/{name}").status_code == 200


@pytest.mark.parametrize("path", [p.relative_to(WEB_DIR).as_posix() for p in web_files()])
def test_no_external_urls(path: str) -> None:
    text = (WEB_DIR / path).read_text(encoding="utf-8")
    found = [m.group(0) for m in EXTERNAL.finditer(text)]
    assert not found, f"{path} points outside the API: {found}"


def test_the_external_url_check_catches_them() -> None:
    for bad in (
        '<script src="https://cdn.example/x.js">',
        "fetch('http://example.com/api')",
        '<link href="//fonts.example/css">',
        "@import 'x.css';",
        "background: url(https://tiles.example/1.png)",
        "background: url(/app/x.png)",
    ):
        assert EXTERNAL.search(bad), bad
    for good in (
        '<script src="/app/app.js" defer>',
        "fetch(`/api/v1/incidents`)",
        "url(data:image/png;base64,AA)",
    ):
        assert not EXTERNAL.search(good), good


@pytest.mark.parametrize(("method", "url"), DATA_ROUTES, ids=[f"{m} {u}" for m, u in DATA_ROUTES])
def test_the_data_routes_need_a_credential(client: TestClient, method: str, url: str) -> None:
    r = client.request(method, url)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"


def test_the_page_calls_only_routes_the_api_has(client: TestClient) -> None:
    """Every `/api/v1/...` path in app.js is one of the app's routes (ids and queries aside)."""
    js = (WEB_DIR / "app.js").read_text(encoding="utf-8")
    called = set(re.findall(r"[`\"'](/api/v1/[^`\"'?$]*)", js))
    assert called, "no API calls found in app.js"
    app_paths = list(client.get("/openapi.json").json()["paths"])
    patterns = [re.compile(re.sub(r"\{[^}]+\}", "[^/]+", p) + "/?") for p in app_paths]
    for path in called:
        assert any(p.match(path) for p in patterns), f"app.js calls {path}, which the API does not have"
    for method, url in DATA_ROUTES:
        path = url.split("?")[0]
        assert any(p.fullmatch(path) for p in patterns), (method, url)


def test_the_page_is_chinese_first_with_english_labels() -> None:
    html = (WEB_DIR / INDEX).read_text(encoding="utf-8")
    assert '<html lang="zh-CN">' in html
    js = (WEB_DIR / "app.js").read_text(encoding="utf-8")
    zh_keys = _keys(js, "zh")
    en_keys = _keys(js, "en")
    assert zh_keys and zh_keys == en_keys, sorted(zh_keys ^ en_keys)
    for key in re.findall(r'data-i18n="([^"]+)"', html):
        assert key in zh_keys, f"index.html uses the label {key!r}, which app.js does not have"


def _keys(js: str, lang: str) -> set[str]:
    block = re.search(rf"\n    {lang}: \{{\n(.*?)\n    \}},", js, re.S)
    assert block, f"no {lang} labels in app.js"
    return {a or b for a, b in re.findall(r'(?:^|[{,])\s*(?:"([\w.]+)"|([a-z]\w*)):\s', block.group(1), re.M)}
