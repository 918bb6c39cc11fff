"""The delivery stage's retry rule: backoff bounds and jitter, Retry-After, when to give up; and how an HTTP
answer is classified (an httpx MockTransport stands in for the incident system)."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import random

import httpx
import pytest

from gateway.delivery import (
    RETRY_AFTER_CAP_S,
    HttpSender,
    RetryPolicy,
    backoff_s,
    gives_up,
    incident_topic,
    parse_retry_after,
    retry_delay_s,
)
from gateway.incident_store import OutboxRow
from gateway.settings import EndpointConfig, Settings

T0 = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)
SECRET = "whsec_dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXkhIQ=="


@pytest.mark.parametrize("attempts", [0, 1, 2, 5, 9, 10, 30, 1000, 10**9])
def test_backoff_doubles_up_to_the_cap_and_draws_in_its_upper_half(attempts: int) -> None:
    rng = random.Random(attempts)
    d = min(900.0, 1.0 * 2.0 ** min(attempts, 60))
    draws = [backoff_s(attempts, 1.0, 900.0, rng) for _ in range(200)]
    assert all(d / 2 <= x <= d for x in draws)
    # jitter: the draws spread over the range rather than repeat
    assert max(draws) - min(draws) > d / 4


def test_backoff_of_the_first_retry_and_of_nonsense_attempt_counts() -> None:
    rng = random.Random(1)
    assert 0.5 <= backoff_s(0, 1.0, 900.0, rng) <= 1.0
    assert 0.5 <= backoff_s(-3, 1.0, 900.0, rng) <= 1.0
    assert 450 <= backoff_s(10**6, 1.0, 900.0, rng) <= 900


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("1.5", None),
        ("-3", None),
        ("soon", None),
        ("", None),
        ("٣", None),  # a non-ASCII digit is not delta-seconds
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_dates() -> None:
    now = T0.timestamp()
    later = email.utils.format_datetime(T0 + dt.timedelta(seconds=90), usegmt=True)
    earlier = email.utils.format_datetime(T0 - dt.timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later, now) == pytest.approx(90)
    assert parse_retry_after(earlier, now) == 0.0
    assert parse_retry_after("Wed, 32 Foo 2026 99:00:00 GMT", now) is None


def test_retry_after_is_honoured_but_bounded() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=10.0)
    rng = random.Random(7)
    assert retry_delay_s(policy, 0, 600.0, rng) == 600.0
    assert retry_delay_s(policy, 0, 10.0**7, rng) == RETRY_AFTER_CAP_S
    # asked for less than the backoff: the backoff stands
    assert 5.0 <= retry_delay_s(policy, 5, 0.0, rng) <= 10.0
    assert 5.0 <= retry_delay_s(policy, 5, None, rng) <= 10.0


def test_give_up_only_once_the_row_is_as_old_as_the_window() -> None:
    window = dt.timedelta(hours=24)
    assert not gives_up(T0, T0, window)
    assert not gives_up(T0, T0 + window - dt.timedelta(seconds=1), window)
    assert gives_up(T0, T0 + window, window)
    assert gives_up(T0, T0 + 2 * window, window)


@pytest.mark.parametrize("seed", range(5))
def test_a_delivery_that_always_fails_is_retried_for_at_least_the_window(seed: int) -> None:
    policy = RetryPolicy(base_s=1.0, max_s=900.0, window=dt.timedelta(hours=24))
    rng = random.Random(seed)
    t, attempts = T0, 0
    while True:
        attempts += 1  # an attempt at t fails
        if gives_up(T0, t, policy.window):
            break
        t += dt.timedelta(seconds=retry_delay_s(policy, attempts - 1, None, rng))
    assert t - T0 >= policy.window
    assert t - T0 < policy.window + dt.timedelta(seconds=policy.max_s)
    # about a day of 7.5-15 minute pauses after the first few minutes of doubling
    assert 90 < attempts < 200


def test_the_policy_comes_from_the_settings() -> None:
    s = Settings(delivery_retry_hours=30, delivery_backoff_max_s=60)
    assert RetryPolicy.from_settings(s) == RetryPolicy(1.0, 60.0, dt.timedelta(hours=30))
    with pytest.raises(ValueError, match="greater than or equal to 24"):
        Settings(delivery_retry_hours=1)


# ---- classification of one attempt ---------------------------------------------------------------------


def _row(body: dict[str, object] | None = None) -> OutboxRow:
    data = body if body is not None else {"data": {"location": {"community": "110101001001"}}}
    return OutboxRow(
        id=1,
        event_id="0c4f5d0e-9a0b-4c1e-8d53-2f7b7e2e7c11",
        incident_id="INC-20261121-000001",
        endpoint="cases",
        seq=1,
        event_type="sc.incident.opened",
        body=json.dumps(data).encode(),
        state="pending",
        attempts=0,
        next_attempt_at=T0,
        last_status=None,
        last_error=None,
        created_at=T0,
        delivered_at=None,
    )


def test_incident_topic_uses_the_community_or_an_underscore() -> None:
    assert incident_topic(_row()) == "sc/v1/incidents/110101001001/INC-20261121-000001"
    for body in (
        {},
        {"data": {"location": {"community": None}}},
        {"data": {"location": {"community": "a/#"}}},
    ):
        assert incident_topic(_row(body)) == "sc/v1/incidents/_/INC-20261121-000001"


async def _attempt(handler: httpx.MockTransport) -> tuple[str, int | None, float | None]:
    sender = HttpSender(
        EndpointConfig(name="cases", url="http://cases.test/hook", secret=SECRET, timeout_s=1)
    )  # type: ignore[arg-type]
    await sender.aclose()
    sender._client = httpx.AsyncClient(transport=handler)
    try:
        a = await sender.send(_row())
    finally:
        await sender.aclose()
    return a.outcome, a.status, a.retry_after_s


async def test_http_answers_are_classified() -> None:
    seen: list[httpx.Request] = []

    def answer(status: int, **headers: str) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(status, headers=headers)

        return httpx.MockTransport(handle)

    assert await _attempt(answer(200)) == ("delivered", 200, None)
    assert await _attempt(answer(204)) == ("delivered", 204, None)
    assert await _attempt(answer(410)) == ("gone", 410, None)
    assert await _attempt(answer(503, **{"Retry-After": "30"})) == ("retry", 503, 30.0)
    assert await _attempt(answer(429, **{"Retry-After": "7"})) == ("retry", 429, 7.0)
    assert await _attempt(answer(500, **{"Retry-After": "30"})) == ("retry", 500, None)
    assert await _attempt(answer(301, location="http://elsewhere/")) == ("retry", 301, None)
    assert await _attempt(answer(404)) == ("retry", 404, None)
    request = seen[0]
    assert request.content == _row().body
    assert request.headers["webhook-id"] == _row().event_id
    assert request.headers["content-type"] == "application/cloudevents+json"
    assert request.headers["webhook-signature"].startswith("v1,")


async def test_no_answer_is_retried() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    outcome, status, _ = await _attempt(httpx.MockTransport(refuse))
    assert (outcome, status) == ("retry", None)
