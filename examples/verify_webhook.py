"""A receiver of sc-gateway incident webhooks, standard library only: verify, de-duplicate, accept.

    SC_WEBHOOK_SECRET=whsec_... python examples/verify_webhook.py [port]

Each delivery is a CloudEvents 1.0 JSON body with Standard Webhooks headers (webhook-id,
webhook-timestamp, webhook-signature; see shared/spec/incident-delivery.md). A receiver must:
- check the signature over the raw body (before parsing it) and that the timestamp is recent,
- answer 2xx once it has the event, and de-duplicate on webhook-id: a retry carries the same id,
- answer 410 only to ask the gateway to stop sending to this endpoint for good.
`verify` is a copy of incidents.cloudevents.verify (a test keeps the two giving the same answers).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookVerificationError(ValueError):
    """reason: missing_header, bad_timestamp, stale, future, bad_secret, bad_signature."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: int = 300, now: float | None = None
) -> str:
    """The delivery's webhook-id if it is authentic and recent; WebhookVerificationError if not."""
    lower = {k.lower(): v for k, v in headers.items()}
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        if name not in lower:
            raise WebhookVerificationError("missing_header", f"no {name} header")
    msg_id, raw_ts = lower["webhook-id"], lower["webhook-timestamp"]
    try:
        ts = int(raw_ts)
    except ValueError:
        msg = f"webhook-timestamp {raw_ts!r} is not Unix seconds"
        raise WebhookVerificationError("bad_timestamp", msg) from None
    now = time.time() if now is None else now
    if ts < now - tolerance_s:
        raise WebhookVerificationError("stale", f"timestamp {ts} is more than {tolerance_s} s old")
    if ts > now + tolerance_s:
        raise WebhookVerificationError("future", f"timestamp {ts} is more than {tolerance_s} s ahead")
    if not secret.startswith("whsec_"):
        raise WebhookVerificationError("bad_secret", "a secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[6:], validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("bad_secret", "the secret after whsec_ is not base64") from None
    if not key:
        raise WebhookVerificationError("bad_secret", "empty secret")
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(digest)
    for entry in lower["webhook-signature"].split():
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return msg_id
    raise WebhookVerificationError("bad_signature", "no v1 signature matches")


class Seen:
    """The last `size` webhook-ids (a retry of a delivery already handled is acknowledged, not redone)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, msg_id: str) -> bool:
        """True the first time an id is seen."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


def make_handler(secret: str, seen: Seen) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                msg_id = verify(secret, dict(self.headers.items()), body)
            except WebhookVerificationError as exc:
                self.send_response(401)
                self.end_headers()
                self.wfile.write(str(exc).encode())
                return
            if seen.add(msg_id):
                event = json.loads(body)
                data = event.get("data", {})
                fields = (event.get("type"), event.get("subject"), data.get("urgency"), data.get("title"))
                print(*fields, flush=True)
            self.send_response(204)
            self.end_headers()

    return Handler


def main() -> None:
    secret = os.environ.get("SC_WEBHOOK_SECRET", "")
    if not secret:
        sys.exit("set SC_WEBHOOK_SECRET=whsec_... (the endpoint's secret)")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(secret, Seen()))
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
