"""InfluxDB line protocol for readings: one measurement per device type, bounded tags only, ms precision."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from gateway.messages import DeviceLike, Reading

STATUS_MEASUREMENT = "device_status"


def event_measurement(device_type: str) -> str:
    return f"{device_type}_event"


# Line protocol has no way to carry a line break (or other control character) in a value; one in free
# text (a firmware string, a community name) would end the point early. They are written visibly
# escaped instead: "\n", "\r", "\t", or "\xNN".
_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}


def _escape_tag(value: str) -> str:
    return (
        value.replace("\\", "\\\\")
        .replace(",", "\\,")
        .replace("=", "\\=")
        .replace(" ", "\\ ")
        .translate(_CONTROL)
    )


def _escape_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').translate(_CONTROL) + '"'


@lru_cache(maxsize=262144)
def _tags(device_type: str, device_id: str, community: str | None, grid: str | None) -> str:
    # Tags sorted by key, as InfluxDB recommends for write performance.
    parts = []
    if community:
        parts.append("community=" + _escape_tag(community))
    parts.append("device_id=" + _escape_tag(device_id))
    parts.append("device_type=" + device_type)
    if grid:
        parts.append("grid=" + _escape_tag(grid))
    return ",".join(parts)


def tags_for(device: DeviceLike) -> str:
    return _tags(device.device_type, device.device_id, device.community, device.grid_code)


def format_value(v: Any) -> str:
    # bool before int: bool is an int in Python
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return f"{v}i"
    return _escape_str(str(v))


def to_line(r: Reading) -> str:
    """One line of line protocol for a reading (timestamp in ms: writes use precision=ms)."""
    tags = tags_for(r.device)
    fields = [f"{k}={format_value(v)}" for k, v in r.values.items()]
    if r.seq is not None:
        fields.append(f"seq={r.seq}i")
    if r.kind == "telemetry":
        return f"{r.device.device_type},{tags} {','.join(fields)} {r.ts_ms}"
    if r.kind == "event":
        fields.append("count=1i")  # every event line has at least one field
        # keep tags in key order (InfluxDB's fast path): event sorts between device_type and grid
        head, sep, grid = tags.partition(",grid=")
        tags = f"{head},event={r.event}{sep}{grid}"
        return f"{event_measurement(r.device.device_type)},{tags} {','.join(fields)} {r.ts_ms}"
    return f"{STATUS_MEASUREMENT},{tags} {','.join(fields)} {r.ts_ms}"
