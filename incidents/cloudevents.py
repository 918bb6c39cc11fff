"""The wire form of an incident change: a CloudEvents 1.0 structured-JSON envelope, signed the Standard
Webhooks way (incident-delivery v1). `verify` is what a receiver does; examples/verify_webhook.py is the
same in plain stdlib for receivers that do not install this package."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import time as _time
from collections.abc import Mapping
from typing import Any, Final

from incidents.model import EVENT_TYPES, Incident, rfc3339

SPECVERSION: Final = "1.0"
CONTENT_TYPE: Final = "application/cloudevents+json"
SECRET_PREFIX: Final = "whsec_"
TOLERANCE_S: Final = 300


class WebhookVerificationError(ValueError):
    """A delivery a receiver must reject; `reason` is one of missing_header, bad_timestamp, stale,
    future, bad_secret, bad_signature."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def envelope(
    incident: Incident, event_type: str, instance: str, event_id: str, time: dt.datetime
) -> dict[str, Any]:
    """The CloudEvent of one incident change; `event_id` becomes the `webhook-id` of every retry."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event type {event_type!r}: expected one of {', '.join(EVENT_TYPES)}")
    return {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": f"urn:sc-gateway:{instance}",
        "type": event_type,
        "subject": incident.incident_id,
        "time": rfc3339(time),
        "datacontenttype": "application/json",
        "data": incident.to_json(),
    }


def secret_key(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookVerificationError("bad_secret", f"a secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("bad_secret", "the secret after whsec_ is not base64") from None
    if not key:
        raise WebhookVerificationError("bad_secret", "empty secret")
    return key


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,` + base64(HMAC-SHA256(key, `{webhook_id}.{timestamp}.{body}`))."""
    msg = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret_key(secret), msg, hashlib.sha256).digest()).decode()


def delivery_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt."""
    return {
        "content-type": CONTENT_TYPE,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def _header(hs: Mapping[str, str], name: str) -> str:
    for k, v in hs.items():
        if k.lower() == name:
            return v
    raise WebhookVerificationError("missing_header", f"no {name} header")


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: int = TOLERANCE_S,
    now: float | None = None,
) -> str:
    """Check a delivery; returns its webhook-id (de-duplicate on it) or raises WebhookVerificationError.

    The timestamp must be within `tolerance_s` of `now` (either way); `webhook-signature` may hold
    several space-separated `v1,<sig>` entries (secret rotation): one matching is enough."""
    webhook_id = _header(headers, "webhook-id")
    raw_ts = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    try:
        ts = int(raw_ts)
    except ValueError:
        msg = f"webhook-timestamp {raw_ts!r} is not Unix seconds"
        raise WebhookVerificationError("bad_timestamp", msg) from None
    now = _time.time() if now is None else now
    if ts < now - tolerance_s:
        raise WebhookVerificationError("stale", f"timestamp {ts} is more than {tolerance_s} s old")
    if ts > now + tolerance_s:
        raise WebhookVerificationError("future", f"timestamp {ts} is more than {tolerance_s} s ahead")
    expected = sign(secret, webhook_id, ts, body).split(",", 1)[1].encode()
    for entry in signatures.split():
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return webhook_id
    raise WebhookVerificationError("bad_signature", "no v1 signature matches")
