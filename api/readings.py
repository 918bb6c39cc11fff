"""Readings from InfluxDB for the managers: one device's fields over a time range, downsampled.

The gateway writes one measurement per device type, tagged device_id (gateway/lineproto.py). A chart
needs a few hundred points, not every message, so a range is cut into `points` equal buckets and each
field summarised per bucket: `mean` for numbers, `last` for booleans and text (InfluxQL has no mean of
a boolean; "what was it at the end of the bucket" is what a chart of a state shows). Buckets are aligned
to the start of the range, so there are at most `points` of them; empty buckets are left out.

Reads go through the v1 HTTP API (`/query`, InfluxQL), which InfluxDB 1.x serves and 2.x/3.x keep for
compatibility. Errors: InfluxDB unreachable or failing → ReadingsUnavailableError (the API answers 503);
InfluxDB refusing the query or the credentials → ReadingsQueryError (502).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import httpx

from devices.model import Field

Aggregate: TypeAlias = Literal["mean", "last"]

#: the most buckets one request may ask for (a chart is a few hundred pixels wide)
MAX_POINTS: Final = 2000
#: the longest range one request may cover
MAX_RANGE: Final = dt.timedelta(days=400)
#: the shortest bucket (InfluxDB keeps ms, devices report every few seconds at most)
MIN_INTERVAL_MS: Final = 1000


class ReadingsUnavailableError(Exception):
    """InfluxDB cannot answer now (unreachable, timed out, 5xx)."""


class ReadingsQueryError(Exception):
    """InfluxDB refused the query or our credentials (a configuration or programming error)."""


def aggregate_for(field: Field) -> Aggregate:
    """How a field is summarised per bucket: the mean of a number, the last value of anything else."""
    return "mean" if field.kind in (float, int) else "last"


@dataclass(frozen=True, slots=True)
class Window:
    """A range cut into buckets of `interval_ms`, the first starting at `since`."""

    since: dt.datetime
    until: dt.datetime
    interval_ms: int

    @property
    def offset_ms(self) -> int:
        """GROUP BY time()'s offset that puts a bucket boundary at `since` (InfluxDB aligns to the epoch)."""
        return _ms(self.since) % self.interval_ms

    @property
    def buckets(self) -> int:
        return math.ceil((_ms(self.until) - _ms(self.since)) / self.interval_ms)


def plan(since: dt.datetime, until: dt.datetime, points: int) -> Window:
    """The window of at most `points` buckets over [since, until); ValueError saying what is wrong."""
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("times must name their offset")
    if until <= since:
        raise ValueError(f"the range is empty: since ({_iso(since)}) must be before until ({_iso(until)})")
    if until - since > MAX_RANGE:
        raise ValueError(f"the range is longer than {MAX_RANGE.days} days")
    if not 1 <= points <= MAX_POINTS:
        raise ValueError(f"points must be 1 to {MAX_POINTS}")
    span = _ms(until) - _ms(since)
    return Window(since, until, max(MIN_INTERVAL_MS, math.ceil(span / points)))


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def downsample_query(
    measurement: str,
    device_id: str,
    fields: Mapping[str, Aggregate],
    window: Window,
    *,
    rp: str | None = None,
) -> str:
    """The InfluxQL of one device's `fields` (name → aggregate) per bucket of `window`."""
    if not fields:
        raise ValueError("no fields to read")
    selected = ", ".join(f"{agg}({_ident(name)}) AS {_ident(name)}" for name, agg in fields.items())
    source = f"{_ident(rp)}.{_ident(measurement)}" if rp else _ident(measurement)
    return (
        f"SELECT {selected} FROM {source} "
        f"WHERE device_id = {_literal(device_id)} "
        f"AND time >= {_literal(_iso(window.since))} AND time < {_literal(_iso(window.until))} "
        f"GROUP BY time({window.interval_ms}ms, {window.offset_ms}ms) fill(none)"
    )


@dataclass(frozen=True, slots=True)
class Series:
    """A device's downsampled readings: one row per bucket that has data, `time` its start (UTC)."""

    window: Window
    fields: Mapping[str, Aggregate]
    rows: tuple[dict[str, Any], ...]


class InfluxReader:
    """Queries over InfluxDB's v1 HTTP API. One client (a small connection pool) for the API's lifetime;
    `transport` is for tests (httpx.MockTransport)."""

    def __init__(
        self,
        url: str,
        db: str,
        *,
        rp: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.db = db
        self.rp = rp
        self._auth = {"u": username, "p": password or ""} if username else {}
        self._client = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def query(self, q: str) -> list[dict[str, Any]]:
        """Rows of one SELECT ({column: value}, `time` in epoch ms, plus the series' tags); none when the
        database or the measurement does not exist yet (nothing was written)."""
        params = {"db": self.db, "q": q, "epoch": "ms", **self._auth}
        try:
            resp = self._client.post("/query", data=params)
        except httpx.HTTPError as exc:
            raise ReadingsUnavailableError(f"InfluxDB is unreachable: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise ReadingsUnavailableError(f"InfluxDB answered {resp.status_code}: {resp.text[:200]}")
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200:
            error = body.get("error") if isinstance(body, dict) else None
            raise ReadingsQueryError(
                f"InfluxDB refused the query ({resp.status_code}): {error or resp.text[:200]}"
            )
        results = body.get("results") or [{}]
        result = results[0]
        if "error" in result:
            if str(result["error"]).startswith("database not found"):
                return []
            raise ReadingsQueryError(f"InfluxDB refused the query: {result['error']}")
        rows = []
        for series in result.get("series", []):
            tags = series.get("tags", {})
            for values in series.get("values", []):
                rows.append({**tags, **dict(zip(series["columns"], values, strict=True))})
        return rows

    def downsampled(
        self,
        measurement: str,
        device_id: str,
        fields: Mapping[str, Aggregate],
        since: dt.datetime,
        until: dt.datetime,
        points: int,
    ) -> Series:
        """`fields` of one device over [since, until) in at most `points` buckets (ValueError for a bad
        range or count, before anything is asked of InfluxDB)."""
        window = plan(since, until, points)
        rows = self.query(downsample_query(measurement, device_id, fields, window, rp=self.rp))
        out = []
        for row in rows:
            t = dt.datetime.fromtimestamp(int(row["time"]) / 1000, dt.UTC)
            out.append({"time": t, **{name: row.get(name) for name in fields}})
        return Series(window, dict(fields), tuple(out))


def reader_fields(fields: Sequence[Field]) -> dict[str, Aggregate]:
    """Field name → aggregate, in the given order."""
    return {f.name: aggregate_for(f) for f in fields}
