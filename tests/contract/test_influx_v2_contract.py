"""Contract of InfluxDB 2.x `POST /api/v2/write`, replayed from recordings/influxdb-2.x-write.json.

Each recorded interaction is a request the gateway must make (method, path, org/bucket/precision, token,
body) and the answer the real server gives to it (status, headers, JSON error body), with sources in the
recording's "source" field. The replay asserts that V2Writer's request matches the recorded one and
answers with the recorded response; the test then checks how V2Writer classifies it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from gateway.influx import Outcome, V2Writer
from gateway.store import Rejected, Spool, Store

RECORDING_PATH = Path(__file__).parent / "recordings" / "influxdb-2.x-write.json"
RECORDING: dict[str, Any] = json.loads(RECORDING_PATH.read_text(encoding="utf-8"))
INTERACTIONS: dict[str, dict[str, Any]] = {i["name"]: i for i in RECORDING["interactions"]}
BASE_URL = "http://influxdb2.test:8086"


def recorded_response(recorded: dict[str, Any]) -> httpx.Response:
    body = recorded["body"]
    # Go's encoding/json writes compact JSON and leaves non-ASCII as UTF-8
    content = b"" if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return httpx.Response(recorded["status"], headers=recorded["headers"], content=content)


class Replay:
    """httpx.MockTransport handler for one recorded interaction.

    Asserts the request matches the recorded one: method, path, the query parameters the server requires
    (org, bucket) and precision, the token, the content type and, unless `respond` chooses the answer by
    body, the body itself. Answers with the recorded response (or what `respond` picks).
    """

    def __init__(
        self,
        interaction: dict[str, Any],
        respond: Callable[[list[str]], dict[str, Any]] | None = None,
    ) -> None:
        self.interaction = interaction
        self.respond = respond
        self.requests: list[httpx.Request] = []
        self.answers: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        want = self.interaction["request"]
        assert request.method == want["method"]
        assert request.url.path == want["path"]
        query = dict(parse_qsl(request.url.query.decode(), keep_blank_values=True))
        assert query == want["query"], f"query {query} is not the recorded {want['query']}"
        for name, value in want["headers"].items():
            assert request.headers.get(name) == value, f"header {name}: {request.headers.get(name)!r}"
        body = request.content.decode()
        if self.respond is None:
            assert body == want["body"], "body differs from the recorded request"
            recorded = self.interaction["response"]
        else:
            recorded = self.respond(body.splitlines())
        self.answers.append(recorded["status"])
        return recorded_response(recorded)


def writer_for(interaction: dict[str, Any], handler: Replay) -> V2Writer:
    req = interaction["request"]
    token = req["headers"]["Authorization"].removeprefix("Token ")
    return V2Writer(
        BASE_URL, req["query"]["org"], req["query"]["bucket"], token, transport=httpx.MockTransport(handler)
    )


# ---- the recording itself -----------------------------------------------------------------------------


def test_the_recording_covers_the_documented_responses() -> None:
    assert RECORDING["endpoint"] == "POST /api/v2/write"
    assert RECORDING["source"] and RECORDING["provenance"]
    statuses = {i["response"]["status"] for i in RECORDING["interactions"]}
    assert statuses >= {204, 400, 401, 403, 404, 413, 422, 429, 500, 503}
    for i in RECORDING["interactions"]:
        req, resp = i["request"], i["response"]
        assert (req["method"], req["path"]) == ("POST", "/api/v2/write")
        assert {"org", "bucket"} <= req["query"].keys() and req["query"]["precision"] == "ms"
        assert req["headers"]["Authorization"].startswith("Token ")
        assert req["headers"]["Content-Type"] in ("text/plain", "text/plain; charset=utf-8")
        assert req["body"].endswith("\n") and req["body"].strip()
        if resp["status"] == 204:
            assert resp["body"] is None
        else:  # the server's error JSON: {code, message}, code echoed in X-Platform-Error-Code
            assert set(resp["body"]) == {"code", "message"}
            assert resp["headers"]["X-Platform-Error-Code"] == resp["body"]["code"]
            assert resp["headers"]["Content-Type"].startswith("application/json")
        if resp["status"] in (429, 503):  # a non-negative integer of seconds
            assert resp["headers"]["Retry-After"].isdigit()


# ---- V2Writer against each interaction ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(INTERACTIONS))
async def test_v2_writer_request_and_classification(name: str) -> None:
    interaction = INTERACTIONS[name]
    replay = Replay(interaction)
    writer = writer_for(interaction, replay)
    try:
        result = await writer.write(interaction["request"]["body"].encode())
    finally:
        await writer.aclose()

    assert len(replay.requests) == 1
    expect = interaction["expect"]
    assert result.outcome is Outcome(expect["outcome"])
    assert result.status == interaction["response"]["status"]
    if "retry_after_s" in expect:
        assert result.retry_after_s == expect["retry_after_s"]
    if result.outcome is not Outcome.OK:  # the server's own words reach the log and the dead letters
        assert result.detail == recorded_response(interaction["response"]).text[:500]
        assert json.loads(result.detail) == interaction["response"]["body"]


async def test_the_replay_refuses_a_request_that_breaks_the_contract() -> None:
    interaction = INTERACTIONS["write_ok"]
    wrong = V2Writer(
        BASE_URL,
        "sc-community",
        "another_bucket",
        "sc-gateway-write-token",
        transport=httpx.MockTransport(Replay(interaction)),
    )
    try:
        with pytest.raises(AssertionError, match="query"):
            await wrong.write(interaction["request"]["body"].encode())
    finally:
        await wrong.aclose()


# ---- the store over V2Writer: a recorded rejection is bisected ----------------------------------------


@pytest.mark.parametrize("name", ["parse_error", "partial_write"])
async def test_store_over_v2_isolates_the_rejected_line(name: str, tmp_path: Path) -> None:
    rejection = INTERACTIONS[name]
    ok = INTERACTIONS["write_ok"]
    bad = rejection["bad_line"]
    lines = rejection["request"]["body"].splitlines()
    assert bad in lines and len(lines) > 2

    written: list[str] = []

    def respond(body_lines: list[str]) -> dict[str, Any]:
        # The same server, asked about part of the batch: the recorded rejection while the bad line is
        # in it, the recorded success once it is not.
        assert body_lines == [ln for ln in lines if ln in body_lines], "lines resent out of order"
        if bad in body_lines:
            return rejection["response"]  # type: ignore[no-any-return]
        written.extend(body_lines)
        return ok["response"]  # type: ignore[no-any-return]

    replay = Replay(rejection, respond=respond)
    writer = writer_for(rejection, replay)
    dead: Rejected = []

    async def on_rejected(rejected: Rejected) -> None:
        dead.extend(rejected)

    spool_dir = tmp_path / "spool"
    store = Store(writer, Spool(spool_dir, 1 << 20), on_rejected)
    try:
        await store.put(lines)
    finally:
        await writer.aclose()

    status = rejection["response"]["status"]
    detail = recorded_response(rejection["response"]).text
    assert dead == [(bad, f"{status}: {detail}")]
    assert written == [ln for ln in lines if ln != bad]
    assert replay.answers[0] == status and replay.answers.count(204) >= 2
    assert store.up and store.spooled_segments == 0 and list(spool_dir.iterdir()) == []
