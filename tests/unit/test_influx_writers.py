"""InfluxDB writers over httpx.MockTransport: the requests they make and how every answer is classified."""

from __future__ import annotations

import email.utils
import socket
import types
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import gateway.influx as influx_mod
from gateway.influx import Outcome, V1Writer, V2Writer, WriteResult, classify

BODY = (
    "manhole_cover,community=阳光\\ 花园\\,二期,device_id=mh-0001,device_type=manhole_cover "
    'tilt_deg=12.5,note="say \\"hi\\" \\\\ bye",open=true,seq=17i 1795239454000\n'
    "streetlight,device_id=sl-0001,device_type=streetlight power_w=87.0 1795239454001\n"
).encode()


class Recorder:
    """A MockTransport handler that keeps every request and answers from a list (or one answer for all)."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def writes(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith("/write")]

    @property
    def queries(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/query"]


def query(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(urlsplit(str(request.url)).query, keep_blank_values=True)


def v1(rec: Recorder, **kwargs: Any) -> V1Writer:
    kwargs.setdefault("create_db", False)
    return V1Writer("http://influx.test:8086/", "sc", transport=httpx.MockTransport(rec), **kwargs)


def v2(rec: Recorder) -> V2Writer:
    return V2Writer(
        "http://influx.test:8086", "sc-org", "telemetry", "s3cr3t", transport=httpx.MockTransport(rec)
    )


@pytest.fixture
async def closing() -> AsyncIterator[list[V1Writer | V2Writer]]:
    writers: list[V1Writer | V2Writer] = []
    yield writers
    for w in writers:
        await w.aclose()


# ---- request shape ----------------------------------------------------------------------------------


async def test_v1_request_shape(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.Response(204))
    w = v1(rec)
    closing.append(w)
    assert (await w.write(BODY)).outcome is Outcome.OK

    (req,) = rec.requests
    assert req.method == "POST"
    assert req.url.scheme == "http" and req.url.host == "influx.test" and req.url.port == 8086
    assert req.url.path == "/write"
    assert query(req) == {"db": ["sc"], "precision": ["ms"]}
    assert req.headers["content-type"] == "text/plain; charset=utf-8"
    assert "authorization" not in req.headers
    assert req.content == BODY  # bytes intact: escapes, UTF-8 and the final newline


async def test_v1_credentials_and_retention_policy_go_in_the_query(
    closing: list[V1Writer | V2Writer],
) -> None:
    rec = Recorder(httpx.Response(204))
    w = v1(rec, rp="one_year", username="gw", password="p&ss=word")
    closing.append(w)
    await w.write(BODY)
    assert query(rec.requests[0]) == {
        "db": ["sc"],
        "precision": ["ms"],
        "rp": ["one_year"],
        "u": ["gw"],
        "p": ["p&ss=word"],
    }


async def test_v1_username_without_password_sends_an_empty_one(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.Response(204))
    w = v1(rec, username="gw")
    closing.append(w)
    await w.write(BODY)
    assert query(rec.requests[0])["p"] == [""]


async def test_v2_request_shape(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.Response(204))
    w = v2(rec)
    closing.append(w)
    assert (await w.write(BODY)).outcome is Outcome.OK
    (req,) = rec.requests
    assert (req.method, req.url.path) == ("POST", "/api/v2/write")
    assert query(req) == {"org": ["sc-org"], "bucket": ["telemetry"], "precision": ["ms"]}
    assert req.headers["authorization"] == "Token s3cr3t"
    assert req.headers["content-type"] == "text/plain; charset=utf-8"
    assert req.headers["accept"] == "application/json"
    assert req.content == BODY


# ---- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, "", Outcome.OK),
        (204, "", Outcome.OK),
        (400, '{"error":"unable to parse \'m v=\': missing field value"}', Outcome.REJECTED),
        (422, '{"code":"unprocessable entity","message":"partial write: ... dropped=1"}', Outcome.REJECTED),
        (401, '{"error":"authorization failed"}', Outcome.CONFIG),
        (403, '{"error":"\\"gw\\" user is not authorized to write to database \\"sc\\""}', Outcome.CONFIG),
        (404, '{"error":"database not found: \\"sc\\""}', Outcome.CONFIG),
        (413, '{"error":"Request Entity Too Large"}', Outcome.TOO_LARGE),
        (429, "", Outcome.RETRY),
        (500, '{"error":"timeout"}', Outcome.RETRY),
        (502, "<html>bad gateway</html>", Outcome.RETRY),
        (503, "", Outcome.RETRY),
        (504, "", Outcome.RETRY),
    ],
)
async def test_v1_classifies_each_status(
    status: int, body: str, outcome: Outcome, closing: list[V1Writer | V2Writer]
) -> None:
    rec = Recorder(httpx.Response(status, text=body))
    w = v1(rec)
    closing.append(w)
    result = await w.write(BODY)
    assert result.outcome is outcome
    assert result.status == status
    assert result.retry_after_s is None
    if outcome is not Outcome.OK:
        assert result.detail == body[:500]


async def test_the_error_detail_is_bounded(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.Response(400, text="x" * 10_000))
    w = v1(rec)
    closing.append(w)
    assert len((await w.write(BODY)).detail) == 500


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_in_seconds(status: int, closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.Response(status, headers={"Retry-After": "7"}))
    w = v1(rec)
    closing.append(w)
    assert await w.write(BODY) == WriteResult(Outcome.RETRY, status, "", 7.0)


async def test_retry_after_as_an_http_date(
    monkeypatch: pytest.MonkeyPatch, closing: list[V1Writer | V2Writer]
) -> None:
    now = 1_795_239_454.0
    monkeypatch.setattr(influx_mod, "time", types.SimpleNamespace(time=lambda: now))
    when = email.utils.formatdate(now + 120, usegmt=True)  # e.g. "Sat, 21 Nov 2026 05:39:34 GMT"
    rec = Recorder(httpx.Response(429, headers={"Retry-After": when}))
    w = v1(rec)
    closing.append(w)
    result = await w.write(BODY)
    assert result.outcome is Outcome.RETRY
    assert result.retry_after_s == pytest.approx(120.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),  # never negative
        ("Sat, 01 Jan 2000 00:00:00 GMT", 0.0),  # a date in the past: now
        ("soon", None),  # unreadable: our own back-off applies
        ("", None),
    ],
)
def test_retry_after_edge_cases(header: str, expected: float | None) -> None:
    result = classify(httpx.Response(503, headers={"Retry-After": header}))
    assert result.outcome is Outcome.RETRY and result.retry_after_s == expected


async def test_a_timeout_is_retried(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.ReadTimeout("timed out"))
    w = v1(rec)
    closing.append(w)
    result = await w.write(BODY)
    assert result.outcome is Outcome.RETRY
    assert result.status is None and result.retry_after_s is None
    assert result.detail.startswith("timeout: ")


async def test_a_refused_connection_is_retried(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.ConnectError("[Errno 111] Connection refused"))
    w = v1(rec)
    closing.append(w)
    result = await w.write(BODY)
    assert result == WriteResult(Outcome.RETRY, None, "ConnectError: [Errno 111] Connection refused")


async def test_a_really_refused_connection_is_retried() -> None:
    """Not a mock: a loopback port nobody listens on (bound, then closed, so it is free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = V1Writer(f"http://127.0.0.1:{port}", "sc", timeout_s=2.0, create_db=False)
    try:
        result = await w.write(BODY)
    finally:
        await w.aclose()
    assert result.outcome is Outcome.RETRY and result.status is None
    assert result.detail.startswith("ConnectError")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (204, Outcome.OK),
        (400, Outcome.REJECTED),
        (401, Outcome.CONFIG),
        (404, Outcome.CONFIG),
        (413, Outcome.TOO_LARGE),
        (503, Outcome.RETRY),
    ],
)
async def test_v2_classifies_like_v1(
    status: int, outcome: Outcome, closing: list[V1Writer | V2Writer]
) -> None:
    rec = Recorder(httpx.Response(status, json={"code": "x", "message": "y"} if status >= 300 else None))
    w = v2(rec)
    closing.append(w)
    assert (await w.write(BODY)).outcome is outcome


# ---- v1: CREATE DATABASE ----------------------------------------------------------------------------


def _db_not_found() -> httpx.Response:
    return httpx.Response(404, json={"error": 'database not found: "sc"'})


def _query_ok() -> httpx.Response:
    return httpx.Response(200, json={"results": [{"statement_id": 0}]})


async def test_ensure_ready_creates_the_database(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(_query_ok())
    w = v1(rec, create_db=True, username="gw", password="pw")
    closing.append(w)
    await w.ensure_ready()
    (req,) = rec.queries
    assert req.method == "POST"
    assert query(req) == {"q": ['CREATE DATABASE "sc"'], "u": ["gw"], "p": ["pw"]}
    await w.ensure_ready()  # done once: not again
    assert len(rec.queries) == 1


async def test_404_triggers_create_database_once(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(_db_not_found(), _query_ok(), _db_not_found(), httpx.Response(204))
    w = v1(rec, create_db=True)
    closing.append(w)

    first = await w.write(BODY)
    assert (first.outcome, first.status) == (Outcome.CONFIG, 404)  # the batch itself is not written: spooled
    assert [r.url.path for r in rec.requests] == ["/write", "/query"]
    assert query(rec.queries[0]) == {"q": ['CREATE DATABASE "sc"']}

    second = await w.write(BODY)  # created once already: a second 404 does not create again
    assert second.outcome is Outcome.CONFIG
    assert [r.url.path for r in rec.requests] == ["/write", "/query", "/write"]
    assert (await w.write(BODY)).outcome is Outcome.OK


async def test_a_failed_create_database_is_tried_again_on_the_next_404(
    closing: list[V1Writer | V2Writer],
) -> None:
    rec = Recorder(
        _db_not_found(),
        httpx.Response(403, json={"error": "requires admin privilege"}),
        _db_not_found(),
        httpx.ConnectError("[Errno 111] Connection refused"),
        _db_not_found(),
        _query_ok(),
        _db_not_found(),
    )
    w = v1(rec, create_db=True)
    closing.append(w)
    for _ in range(4):
        assert (await w.write(BODY)).outcome is Outcome.CONFIG  # never raises
    assert [r.url.path for r in rec.requests] == ["/write", "/query"] * 3 + ["/write"]


async def test_no_create_database_when_not_asked(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(_db_not_found())
    w = v1(rec, create_db=False)
    closing.append(w)
    await w.ensure_ready()
    assert (await w.write(BODY)).outcome is Outcome.CONFIG
    assert rec.queries == []


async def test_v2_404_does_not_try_to_create_anything(closing: list[V1Writer | V2Writer]) -> None:
    rec = Recorder(httpx.Response(404, json={"code": "not found", "message": 'bucket "telemetry" not found'}))
    w = v2(rec)
    closing.append(w)
    await w.ensure_ready()
    assert (await w.write(BODY)).outcome is Outcome.CONFIG
    assert [r.url.path for r in rec.requests] == ["/api/v2/write"]
