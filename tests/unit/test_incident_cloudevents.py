"""Signing and verifying deliveries (Standard Webhooks), and the CloudEvents envelope field by field."""

from __future__ import annotations

import base64
import datetime as dt
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from incidents.cloudevents import (
    CONTENT_TYPE,
    WebhookVerificationError,
    delivery_headers,
    envelope,
    sign,
    verify,
)
from tests.unit.test_incident_lifecycle import NOW, device, firing, open_incident

# The reference vector of the Standard Webhooks specification (also Svix's documented example).
REF_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REF_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
REF_TS = 1614265330
REF_BODY = b'{"test": 2432232314}'
REF_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
REF_HEADERS = {"webhook-id": REF_ID, "webhook-timestamp": str(REF_TS), "webhook-signature": REF_SIG}

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"x" * 32).decode()


def _example() -> ModuleType:
    path = Path(__file__).parents[2] / "examples" / "verify_webhook.py"
    spec = importlib.util.spec_from_file_location("verify_webhook_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()
VERIFIERS = [
    pytest.param(verify, WebhookVerificationError, id="incidents"),
    pytest.param(EXAMPLE.verify, EXAMPLE.WebhookVerificationError, id="example"),
]


def test_sign_reproduces_the_reference_vector() -> None:
    assert sign(REF_SECRET, REF_ID, REF_TS, REF_BODY) == REF_SIG


@pytest.mark.parametrize(("check", "error"), VERIFIERS)
def test_verify_accepts_the_reference_vector(check: Any, error: Any) -> None:
    assert check(REF_SECRET, REF_HEADERS, REF_BODY, now=REF_TS) == REF_ID
    # header names are case-insensitive; several signatures (rotation): one matching is enough
    rotated = {k.title(): v for k, v in REF_HEADERS.items()}
    rotated["Webhook-Signature"] = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v2,xyz " + REF_SIG
    assert check(REF_SECRET, rotated, REF_BODY, now=REF_TS + 299) == REF_ID


def _reasons(check: Any, error: Any) -> dict[str, str]:
    """What each kind of bad delivery is rejected as."""
    ts = 1_800_000_000
    good = delivery_headers(SECRET, "evt-1", ts, b"{}")
    cases: dict[str, tuple[str, dict[str, str], bytes, float]] = {
        "forged body": (SECRET, good, b'{"x":1}', ts),
        "other secret": (OTHER, good, b"{}", ts),
        "other id": (SECRET, {**good, "webhook-id": "evt-2"}, b"{}", ts),
        "stale": (SECRET, good, b"{}", ts + 301),
        "future": (SECRET, good, b"{}", ts - 301),
        "bad timestamp": (SECRET, {**good, "webhook-timestamp": "soon"}, b"{}", ts),
        "no v1": (SECRET, {**good, "webhook-signature": good["webhook-signature"][1:]}, b"{}", ts),
        "bad secret": ("MfKQ9r8G", good, b"{}", ts),
    }
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        cases[f"missing {name}"] = (SECRET, {k: v for k, v in good.items() if k != name}, b"{}", ts)
    out = {}
    for case, (secret, hs, body, now) in cases.items():
        with pytest.raises(error) as info:
            check(secret, hs, body, now=now)
        out[case] = info.value.reason
    assert check(SECRET, good, b"{}", now=ts) == "evt-1"
    return out


@pytest.mark.parametrize(("check", "error"), VERIFIERS)
def test_bad_deliveries_are_rejected_with_a_reason(check: Any, error: Any) -> None:
    assert _reasons(check, error) == {
        "forged body": "bad_signature",
        "other secret": "bad_signature",
        "other id": "bad_signature",
        "stale": "stale",
        "future": "future",
        "bad timestamp": "bad_timestamp",
        "no v1": "bad_signature",
        "bad secret": "bad_secret",
        "missing webhook-id": "missing_header",
        "missing webhook-timestamp": "missing_header",
        "missing webhook-signature": "missing_header",
    }


def test_the_example_receiver_answers_as_the_package_does() -> None:
    assert _reasons(verify, WebhookVerificationError) == _reasons(
        EXAMPLE.verify, EXAMPLE.WebhookVerificationError
    )


def test_example_receiver_deduplicates_on_webhook_id() -> None:
    seen = EXAMPLE.Seen(size=2)
    assert [seen.add(i) for i in ("a", "a", "b", "c", "a")] == [True, False, True, True, True]


def test_envelope_is_the_contracts_shape() -> None:
    incident, event_type = open_incident(firing(), device())
    sent = dt.datetime(2026, 11, 21, 8, 0, 1, 250_000, tzinfo=dt.UTC)
    ev = envelope(incident, event_type, "gw-1", "0c4f5d0e-9a0b-4c1e-8d53-2f7b7e2e7c11", sent)
    assert list(ev) == ["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"]
    assert ev["specversion"] == "1.0"
    assert ev["id"] == "0c4f5d0e-9a0b-4c1e-8d53-2f7b7e2e7c11"
    assert ev["source"] == "urn:sc-gateway:gw-1"
    assert ev["type"] == "sc.incident.opened"
    assert ev["subject"] == incident.incident_id
    assert ev["time"] == "2026-11-21T08:00:01.250Z"
    assert ev["datacontenttype"] == "application/json"
    data = ev["data"]
    spec_fields = [
        "incident_id", "dedup_key", "rule_id", "title", "description", "urgency", "case_type",
        "class_code", "class_name", "status", "device", "location", "responsible_unit", "evidence",
        "occurrences", "opened_at", "updated_at", "resolved_at", "respond_by", "resolve_by",
    ]  # fmt: skip
    assert list(data)[: len(spec_fields)] == spec_fields
    assert set(data["device"]) == {"id", "type", "component_code"}
    assert set(data["location"]) == {
        "district", "street", "community", "grid_code", "building", "address", "lat", "lon"
    }  # fmt: skip
    assert set(data["evidence"]) == {"ts", "values", "threshold"}
    assert data["opened_at"] == "2026-11-21T07:30:00.000Z" == NOW.isoformat().replace("+00:00", ".000Z")
    assert data["resolved_at"] is None
    # the body is plain JSON, Chinese as is
    body = json.dumps(ev, ensure_ascii=False).encode()
    assert json.loads(body) == ev
    assert (
        delivery_headers(SECRET, ev["id"], 1, body)["content-type"]
        == CONTENT_TYPE
        == ("application/cloudevents+json")
    )


def test_envelope_refuses_an_unknown_type() -> None:
    incident, _ = open_incident(firing(), device())
    with pytest.raises(ValueError, match="event type"):
        envelope(incident, "sc.incident.deleted", "gw", "id", NOW)
