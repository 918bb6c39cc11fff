"""A real incident-system webhook receiver on 127.0.0.1, for tests: it verifies every delivery with
incidents.cloudevents.verify, records what arrived in order, de-duplicates on webhook-id, and can be told to
answer 503 / 410 / 500, to close the connection without answering, to answer late, or be stopped and started
again on the same port."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from incidents.cloudevents import WebhookVerificationError, verify
from stack.services import free_port

#: what to do with one request: an HTTP status, "close" (hang up without answering), or
#: ("slow", seconds, status) (answer after a pause)
Reply = int | str | tuple[str, float, int]


@dataclass(frozen=True, slots=True)
class Arrival:
    """One verified request: its webhook-id, CloudEvent type, subject, data and what it was answered."""

    webhook_id: str
    timestamp: int
    type: str
    subject: str
    data: dict[str, Any]
    answered: int | None  # None: the connection was closed without an answer


class WebhookReceiver:
    """Start with `start()` (or `with`); `url` stays the same across stop()/start()."""

    def __init__(self, secret: str, port: int | None = None, tolerance_s: int = 300) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.tolerance_s = tolerance_s
        self.arrivals: list[Arrival] = []
        self.rejections: list[str] = []
        self._replies: deque[Reply] = deque()
        self.default: Reply = 204
        self.retry_after: str | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/incidents"

    # -- control

    def answer(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order, then with `default` again."""
        with self._lock:
            self._replies.extend(replies)

    def always(self, reply: Reply) -> None:
        with self._lock:
            self._replies.clear()
            self.default = reply

    def scripted(self) -> int:
        """Replies given with answer() not used yet."""
        with self._lock:
            return len(self._replies)

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._replies.popleft() if self._replies else self.default

    def start(self) -> WebhookReceiver:
        assert self._server is None, "already running"
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- what arrived

    def _record(self, arrival: Arrival) -> None:
        with self._lock:
            self.arrivals.append(arrival)

    def _reject(self, reason: str) -> None:
        with self._lock:
            self.rejections.append(reason)

    def accepted(self) -> list[Arrival]:
        """Deliveries answered 2xx, de-duplicated on webhook-id (the first acceptance of each), in order."""
        with self._lock:
            seen: set[str] = set()
            out = []
            for a in self.arrivals:
                if a.answered is not None and 200 <= a.answered < 300 and a.webhook_id not in seen:
                    seen.add(a.webhook_id)
                    out.append(a)
            return out

    def attempts(self, webhook_id: str) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if a.webhook_id == webhook_id]

    def all(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so a stopped receiver has no connection left answering
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                webhook_id = verify(
                    receiver.secret, dict(self.headers.items()), body, tolerance_s=receiver.tolerance_s
                )
            except WebhookVerificationError as exc:
                receiver._reject(exc.reason)
                self._answer(401, str(exc).encode())
                return
            reply = receiver._next_reply()
            event = json.loads(body)
            status: int | None
            if reply == "close":
                status = None
            elif isinstance(reply, tuple):
                time.sleep(reply[1])
                status = reply[2]
            else:
                assert isinstance(reply, int)
                status = reply
            receiver._record(
                Arrival(
                    webhook_id,
                    int(self.headers["webhook-timestamp"]),
                    event["type"],
                    event["subject"],
                    event["data"],
                    status,
                )
            )
            if status is None:
                self.close_connection = True
                return
            self._answer(status)

        def _answer(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            if status in (429, 503) and receiver.retry_after is not None:
                self.send_header("Retry-After", receiver.retry_after)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
