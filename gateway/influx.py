"""InfluxDB HTTP writers (v1 /write and v2 /api/v2/write) that classify every response for the store stage."""

from __future__ import annotations

import email.utils
import enum
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import httpx

log = logging.getLogger("gateway.influx")


class Outcome(enum.Enum):
    OK = "ok"
    REJECTED = "rejected"  # 400: some point is bad; bisect to find it
    TOO_LARGE = "too_large"  # 413: split the body
    RETRY = "retry"  # 429/503/5xx/timeout/refused: wait and try again
    CONFIG = "config"  # 401/403/404: our settings are wrong; loud, keep the data, retry slowly


@dataclass(frozen=True)
class WriteResult:
    outcome: Outcome
    status: int | None = None
    detail: str = ""
    retry_after_s: float | None = None


class Writer(Protocol):
    async def write(self, body: bytes) -> WriteResult: ...
    async def ensure_ready(self) -> None: ...
    async def aclose(self) -> None: ...


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify(resp: httpx.Response) -> WriteResult:
    code = resp.status_code
    if 200 <= code < 300:
        return WriteResult(Outcome.OK, code)
    detail = resp.text[:500]
    if code == 400 or code == 422:
        return WriteResult(Outcome.REJECTED, code, detail)
    if code == 413:
        return WriteResult(Outcome.TOO_LARGE, code, detail)
    if code in (401, 403, 404):
        return WriteResult(Outcome.CONFIG, code, detail)
    return WriteResult(Outcome.RETRY, code, detail, _retry_after(resp.headers.get("retry-after")))


class _HttpWriter:
    path = ""

    def __init__(
        self,
        base_url: str,
        params: dict[str, str],
        headers: dict[str, str],
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # `transport` is for tests (httpx.MockTransport); None is httpx's own connection pool.
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s),
            headers={"Content-Type": "text/plain; charset=utf-8", **headers},
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
            transport=transport,
        )
        self._params = params

    async def write(self, body: bytes) -> WriteResult:
        try:
            resp = await self._client.post(self.path, params=self._params, content=body)
        except httpx.TimeoutException as exc:
            return WriteResult(Outcome.RETRY, None, f"timeout: {exc!r}")
        except httpx.HTTPError as exc:
            return WriteResult(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}")
        return classify(resp)

    async def ensure_ready(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


class V1Writer(_HttpWriter):
    """InfluxDB 1.x `/write` (also the v1-compatibility endpoint of 2.x and 3.x)."""

    path = "/write"

    def __init__(
        self,
        base_url: str,
        db: str,
        *,
        rp: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 10.0,
        create_db: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        params = {"db": db, "precision": "ms"}
        if rp:
            params["rp"] = rp
        if username:
            params["u"] = username
            params["p"] = password or ""
        super().__init__(base_url, params, {}, timeout_s, transport)
        self._db = db
        self._create_db = create_db

    async def ensure_ready(self) -> None:
        """Create the database if asked to; errors here are left to the write path (which spools)."""
        if not self._create_db:
            return
        params = {k: v for k, v in self._params.items() if k in ("u", "p")}
        params["q"] = f'CREATE DATABASE "{self._db}"'
        try:
            resp = await self._client.post("/query", params=params)
            if resp.status_code >= 300:
                log.warning(
                    "influx_create_db_failed", extra={"status": resp.status_code, "body": resp.text[:200]}
                )
            else:
                self._create_db = False
        except httpx.HTTPError as exc:
            log.warning("influx_unreachable_at_start", extra={"error": str(exc)})

    async def write(self, body: bytes) -> WriteResult:
        result = await super().write(body)
        if result.outcome is Outcome.CONFIG and result.status == 404 and self._create_db:
            await self.ensure_ready()
        return result


class V2Writer(_HttpWriter):
    """InfluxDB 2.x/3.x `/api/v2/write` with org, bucket and token."""

    path = "/api/v2/write"

    def __init__(
        self,
        base_url: str,
        org: str,
        bucket: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            {"org": org, "bucket": bucket, "precision": "ms"},
            {"Authorization": f"Token {token}", "Accept": "application/json"},
            timeout_s,
            transport,
        )
