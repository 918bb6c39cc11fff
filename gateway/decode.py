"""Decode stage: raw MQTT bytes -> Reading, Rejection or Duplicate.

Pure: no I/O, the clock is the message's.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from devices import DEVICE_ID_RE, MAX_PAYLOAD_BYTES, THING_MODELS
from devices.model import STATUS_ADAPTER, ThingModel
from gateway.messages import DeviceLike, Duplicate, Outcome, RawMessage, Reading, Reason, Rejection

_CREDENTIAL_RE = re.compile(rb'("credential"\s*:\s*")((?:[^"\\\\]|\\\\.)*)(")')
TOPIC_KINDS = ("telemetry", "event", "status")
INACTIVE_LIFECYCLES = frozenset({"disabled", "retired"})
# RFC 3339 date-time (section 5.6; "T"/"Z" may be lower case, a space may stand for "T"). The offset is
# optional here only so that a missing one gets its own message. datetime.fromisoformat alone also takes
# ISO 8601 forms that are not RFC 3339 (basic format, week dates), hence the gate.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?", re.ASCII
)
# Names pydantic gives the branches of the ts union (int | str) in an error's location.
_UNION_BRANCHES = frozenset({"int", "str", "constrained-int", "constrained-str"})

# pydantic error type -> our reason. The first error of a message decides its reason.
_ERROR_REASONS: dict[str, Reason] = {
    "extra_forbidden": Reason.UNKNOWN_FIELD,
    "bool_type": Reason.WRONG_TYPE,
    "float_type": Reason.WRONG_TYPE,
    "int_type": Reason.WRONG_TYPE,
    "string_type": Reason.WRONG_TYPE,
    "int_from_float": Reason.WRONG_TYPE,
    "greater_than_equal": Reason.OUT_OF_RANGE,
    "less_than_equal": Reason.OUT_OF_RANGE,
    "finite_number": Reason.OUT_OF_RANGE,
    "literal_error": Reason.BAD_VALUE,
    "string_too_short": Reason.BAD_VALUE,
    "string_too_long": Reason.BAD_VALUE,
    "missing": Reason.MISSING_FIELD,
    "union_tag_not_found": Reason.MISSING_FIELD,
    "union_tag_invalid": Reason.UNKNOWN_EVENT,
    "dict_type": Reason.NOT_OBJECT,
    "json_invalid": Reason.NOT_JSON,
    "json_type": Reason.NOT_JSON,
}


def credential_hash(key: bytes, credential: str) -> str:
    """Keyed hash of an access credential: the same card gives the same hash, the raw id is never kept."""
    return hmac.new(key, credential.encode(), hashlib.sha256).hexdigest()[:32]


def _describe(exc: ValidationError) -> tuple[Reason, str]:
    errors = exc.errors(include_url=False)
    first = errors[0]
    etype = first["type"]
    reason = _ERROR_REASONS.get(etype, Reason.BAD_VALUE)
    if etype == "json_invalid" and "unicode" in str(first.get("ctx", {}).get("error", "")).lower():
        reason = Reason.NOT_UTF8
    # Any problem with ts (wrong JSON type, text too short, negative) is a bad timestamp; an event's
    # location starts with its tag, hence the first two elements.
    if "ts" in first["loc"][:2]:
        reason = Reason.BAD_TIMESTAMP
    # A union over ts (int | str) reports one error per branch; name the field once.
    parts: list[str] = []
    for e in errors[:4]:
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) and p not in _UNION_BRANCHES)
        inp = e.get("input")
        got = f" (got {inp!r:.40})" if loc and not isinstance(inp, dict) and "credential" not in loc else ""
        parts.append(f"{loc + ': ' if loc else ''}{e['msg']}{got}")
    if len(errors) > 4:
        parts.append(f"... {len(errors) - 4} more")
    return reason, "; ".join(parts)


def parse_ts(value: int | str) -> int:
    """Device timestamp -> Unix epoch ms. Raises ValueError for text that is not RFC 3339 with an offset."""
    if isinstance(value, int):
        return value
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise ValueError(f"ts {value!r} is not an RFC 3339 timestamp")
    if m["offset"] is None:
        raise ValueError(f"ts {value!r} has no UTC offset")
    try:
        dt = datetime.fromisoformat(value.upper())
    except ValueError:  # shaped right but not a real date or time, e.g. month 13
        raise ValueError(f"ts {value!r} is not an RFC 3339 timestamp") from None
    return int(dt.timestamp() * 1000)


class Decoder:
    """Turns raw messages into readings. Holds only in-memory state: the recent `seq` window per device."""

    SEQ_WINDOW = 8
    TOPIC_CACHE = 400_000

    def __init__(
        self,
        lookup: Callable[[str], DeviceLike | None],
        *,
        credential_key: bytes,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        future_tolerance_ms: int = 5 * 60 * 1000,
        past_tolerance_ms: int = 7 * 24 * 3600 * 1000,
    ) -> None:
        self._lookup = lookup
        self._key = credential_key
        self._max = max_payload_bytes
        self._future = future_tolerance_ms
        self._past = past_tolerance_ms
        # device_id -> {seq: device ts or None}; a few recent entries, insertion ordered
        self._seen: dict[str, dict[int, int | None]] = {}
        self._topics: dict[str, tuple[str, str, str, ThingModel]] = {}
        self.skewed = 0

    def decode(self, raw: RawMessage) -> Outcome:
        out = self._decode(raw)
        if isinstance(out, Rejection) and b"credential" in raw.payload:
            return self._redacted(out)
        return out

    def _redacted(self, rej: Rejection) -> Rejection:
        """A rejected message keeps no raw access credential: the value becomes its keyed hash."""
        secrets: list[str] = []

        def sub(m: re.Match[bytes]) -> bytes:
            value = m.group(2).decode("utf-8", "replace")
            secrets.append(value)
            return m.group(1) + b"hash:" + credential_hash(self._key, value).encode() + m.group(3)

        payload = _CREDENTIAL_RE.sub(sub, rej.raw.payload)
        detail = rej.detail
        for value in secrets:
            if value:
                detail = detail.replace(value, "***")
        return replace(rej, raw=replace(rej.raw, payload=payload), detail=detail)

    def _decode(self, raw: RawMessage) -> Outcome:
        cached = self._topics.get(raw.topic)
        if cached is None:
            parsed = self._parse_topic(raw)
            if isinstance(parsed, Rejection):
                return parsed
            cached = parsed
        dtype, device_id, kind, model = cached
        if len(raw.payload) > self._max:
            return Rejection(
                raw,
                Reason.OVERSIZE,
                f"payload is {len(raw.payload)} bytes, limit {self._max}",
                device_id,
                dtype,
            )
        device = self._lookup(device_id)
        if device is None:
            return Rejection(
                raw, Reason.UNREGISTERED_DEVICE, f"device {device_id!r} is not registered", device_id, dtype
            )
        if device.device_type != dtype:
            return Rejection(
                raw,
                Reason.TYPE_MISMATCH,
                f"device {device_id!r} is registered as {device.device_type}, topic says {dtype}",
                device_id,
                dtype,
            )
        if device.lifecycle in INACTIVE_LIFECYCLES:
            return Rejection(
                raw, Reason.DEVICE_DISABLED, f"device {device_id!r} is {device.lifecycle}", device_id, dtype
            )
        # Checked apart from JSON parsing: the parser reports bytes that are not UTF-8 outside a string
        # (b"\xff\xfe{}") as a plain syntax error.
        try:
            raw.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejection(
                raw,
                Reason.NOT_UTF8,
                f"payload is not UTF-8: {exc.reason} at byte {exc.start}",
                device_id,
                dtype,
            )

        try:
            if kind == "telemetry":
                values: dict[str, Any] = model.telemetry_adapter.validate_json(raw.payload)
            elif kind == "event":
                if model.event_adapter is None:
                    return Rejection(
                        raw, Reason.UNKNOWN_EVENT, f"{dtype} declares no events", device_id, dtype
                    )
                values = model.event_adapter.validate_json(raw.payload)
            else:
                values = dict(STATUS_ADAPTER.validate_json(raw.payload))
        except ValidationError as exc:
            reason, detail = _describe(exc)
            return Rejection(raw, reason, detail, device_id, dtype)
        # Before the seq window is touched: a rejected message must not make a later good one a duplicate.
        if kind == "telemetry" and not values.keys() - {"ts", "seq"}:
            return Rejection(raw, Reason.EMPTY, "telemetry carries no measured field", device_id, dtype)

        ts = values.pop("ts", None)
        seq = values.pop("seq", None)
        device_ts: int | None = None
        if ts is None:
            ts_ms, trusted = raw.received_ms, True
        else:
            try:
                device_ts = ts_ms = parse_ts(ts)
            except ValueError as exc:
                return Rejection(raw, Reason.BAD_TIMESTAMP, str(exc), device_id, dtype)
            trusted = raw.received_ms - self._past <= ts_ms <= raw.received_ms + self._future
            if not trusted:
                self.skewed += 1
                ts_ms = raw.received_ms

        if seq is not None and self._is_duplicate(device_id, seq, device_ts):
            return Duplicate(raw, device_id, seq)

        event = None
        if kind == "event":
            event = values.pop("event")
            cred = values.pop("credential", None)
            if cred is not None:
                values["credential_hash"] = credential_hash(self._key, cred)
        return Reading(device, kind, ts_ms, values, seq, event, trusted, raw.received_ms)  # type: ignore[arg-type]

    def forget(self, device_id: str, seq: int) -> None:
        """Drop a seq from the window: its message was not stored, so its redelivery must be taken again,
        not discarded as a duplicate. (At worst a later resend is stored twice, at the same time.)"""
        window = self._seen.get(device_id)
        if window is not None:
            window.pop(seq, None)

    def _parse_topic(self, raw: RawMessage) -> tuple[str, str, str, ThingModel] | Rejection:
        """Split and check a topic; good ones are remembered (a device uses the same few topics)."""
        parts = raw.topic.split("/")
        if len(parts) != 5 or parts[0] != "sc" or parts[1] != "v1" or parts[4] not in TOPIC_KINDS:
            return Rejection(
                raw, Reason.BAD_TOPIC, f"topic {raw.topic!r} is not sc/v1/{{type}}/{{id}}/{{kind}}"
            )
        _, _, dtype, device_id, kind = parts
        model = THING_MODELS.get(dtype)
        if model is None:
            return Rejection(raw, Reason.UNKNOWN_TYPE, f"unknown device type {dtype!r}", device_id, dtype)
        if not DEVICE_ID_RE.match(device_id):
            return Rejection(raw, Reason.BAD_TOPIC, f"device id {device_id!r} is not 1-64 of A-Za-z0-9_-")
        if len(self._topics) >= self.TOPIC_CACHE:
            self._topics.clear()  # bounded: a flood of random topics cannot grow it without limit
        parsed = self._topics[raw.topic] = (dtype, device_id, kind, model)
        return parsed

    def _is_duplicate(self, device_id: str, seq: int, ts_ms: int | None) -> bool:
        """Same seq with the same device time seen recently: a QoS 1 redelivery or a device resend.

        The device time is part of the key so that a device whose counter restarted after a reboot
        is not mistaken for a resend.
        """
        window = self._seen.get(device_id)
        if window is None:
            self._seen[device_id] = {seq: ts_ms}
            return False
        if seq in window and window[seq] == ts_ms:
            return True
        window[seq] = ts_ms
        if len(window) > self.SEQ_WINDOW:
            del window[next(iter(window))]
        return False
