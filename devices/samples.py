"""Sample payloads from the thing models: valid ones for docs and simulators, invalid ones for tests."""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any, Literal, NamedTuple

from devices import THING_MODELS
from devices.model import MAX_PAYLOAD_BYTES, Field, ThingModel

PayloadKind = Literal["telemetry", "event", "status"]

# A field declared without an upper (or lower) bound still needs a finite span to draw from.
_OPEN_SPAN = 10_000.0


def _bounds(f: Field) -> tuple[float, float]:
    lo, hi = f.minimum, f.maximum
    if lo is None and hi is None:
        return 0.0, _OPEN_SPAN
    if hi is None:
        assert lo is not None
        return float(lo), float(lo) + _OPEN_SPAN
    if lo is None:
        return float(hi) - _OPEN_SPAN, float(hi)
    return float(lo), float(hi)


def example_value(f: Field, rng: random.Random) -> Any:
    """A value a working sensor could send for `f`: inside the plausible range, of the declared kind."""
    if f.kind is bool:
        return rng.random() < 0.5
    if f.kind is str:
        if f.choices:
            return rng.choice(f.choices)
        return f"{f.name[:16]}-{rng.getrandbits(32):08x}"[: f.max_length]
    lo, hi = _bounds(f)
    if f.kind is int:
        return rng.randint(math.ceil(lo), math.floor(hi))
    # Round like a device would; narrow ranges (power factor) keep more digits. Clamp so rounding
    # never steps outside a bound that has more digits than we keep.
    digits = 3 if hi - lo <= 1 else 2 if hi - lo <= 20 else 1
    return min(hi, max(lo, round(rng.uniform(lo, hi), digits)))


def _pick(fields: tuple[Field, ...], rng: random.Random, partial: bool) -> list[Field]:
    if not partial or len(fields) <= 1:
        return list(fields)
    chosen = set(rng.sample(range(len(fields)), rng.randint(1, len(fields))))
    return [f for i, f in enumerate(fields) if i in chosen]


def example_payload(
    model: ThingModel,
    rng: random.Random,
    kind: PayloadKind = "telemetry",
    *,
    event: str | None = None,
    partial: bool = False,
    ts: int | str | None = None,
    seq: int | None = None,
) -> dict[str, Any]:
    """A valid payload for `model` on the `kind` topic, as a dict ready for json.dumps.

    telemetry: every declared field, or with `partial` a random non-empty subset (devices often send
    only what changed). event: `event` (random when not given) with its required extra fields, plus
    every optional one, or with `partial` a random subset of them. status: online with a firmware
    version. `ts` and `seq` are added when given; the same `rng` state gives the same payload.
    """
    payload: dict[str, Any] = {}
    if ts is not None:
        payload["ts"] = ts
    if seq is not None:
        payload["seq"] = seq
    if kind == "telemetry":
        for f in _pick(model.telemetry, rng, partial):
            payload[f.name] = example_value(f, rng)
    elif kind == "event":
        if not model.events:
            raise ValueError(f"{model.type} declares no events")
        ev = model.events_by_name[event] if event is not None else rng.choice(model.events)
        payload["event"] = ev.name
        optional = tuple(f for f in ev.fields if not f.required)
        keep = set(_pick(optional, rng, partial)) if not partial or rng.random() < 0.7 else set()
        for f in ev.fields:
            if f.required or f in keep:
                payload[f.name] = example_value(f, rng)
    elif kind == "status":
        payload["online"] = True
        if not partial or rng.random() < 0.5:
            payload["fw"] = f"{rng.randint(1, 4)}.{rng.randint(0, 9)}.{rng.randint(0, 20)}"
    else:
        raise ValueError(f"unknown payload kind {kind!r}")
    return payload


class InvalidCase(NamedTuple):
    """A payload the gateway must reject. `reason` is the gateway's rejection code (a Reason value)."""

    description: str
    device_type: str
    topic_kind: PayloadKind
    payload: bytes
    reason: str

    @property
    def field(self) -> str | None:
        """The offending field, written in backquotes in the description; None for whole-message faults."""
        m = re.search(r"`([^`]+)`", self.description)
        return m[1] if m else None


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


def _ranged_float(fields: tuple[Field, ...]) -> Field | None:
    return next(
        (f for f in fields if f.kind is float and f.minimum is not None and f.maximum is not None), None
    )


def _telemetry_cases(model: ThingModel) -> list[InvalidCase]:
    t = model.type
    num = _ranged_float(model.telemetry)
    flag = next(f for f in model.telemetry if f.kind is bool)
    assert num is not None and num.minimum is not None and num.maximum is not None, t
    good = float(num.minimum + num.maximum) / 2
    base = {num.name: good}
    n = num.name

    def case(description: str, payload: bytes | dict[str, Any], reason: str) -> InvalidCase:
        raw = payload if isinstance(payload, bytes) else _dumps(payload)
        return InvalidCase(description, t, "telemetry", raw, reason)

    valid = _dumps(base)
    oversize = valid[:-1] + b" " * (MAX_PAYLOAD_BYTES + 1 - len(valid)) + b"}"
    assert len(oversize) == MAX_PAYLOAD_BYTES + 1
    return [
        case(f"unknown field `{n}_raw`", {**base, f"{n}_raw": 1.0}, "unknown_field"),
        case(f"string for a float `{n}`", {n: str(good)}, "wrong_type"),
        case(f"bool for a float `{n}`", {n: True}, "wrong_type"),
        case(f"number for a bool `{flag.name}`", {flag.name: 1}, "wrong_type"),
        case(f"string for a bool `{flag.name}`", {flag.name: "true"}, "wrong_type"),
        case(f"null for a float `{n}`", {n: None}, "wrong_type"),
        case(f"above max `{n}`", {n: float(num.maximum) + 0.5}, "out_of_range"),
        case(f"below min `{n}`", {n: float(num.minimum) - 0.5}, "out_of_range"),
        case(f"NaN `{n}`", f'{{"{n}": NaN}}'.encode(), "out_of_range"),
        case(f"Infinity `{n}`", f'{{"{n}": Infinity}}'.encode(), "out_of_range"),
        case(f"-Infinity `{n}`", f'{{"{n}": -Infinity}}'.encode(), "out_of_range"),
        case("non-RFC 3339 text `ts`", {"ts": "21/11/2026 08:00", **base}, "bad_timestamp"),
        case("short text `ts`", {"ts": "yesterday", **base}, "bad_timestamp"),
        case("ISO 8601 basic format `ts`", {"ts": "20261121T080000Z", **base}, "bad_timestamp"),
        case("no UTC offset `ts`", {"ts": "2026-11-21T08:00:00", **base}, "bad_timestamp"),
        case("impossible date `ts`", {"ts": "2026-13-45T08:00:00Z", **base}, "bad_timestamp"),
        case("float seconds `ts`", {"ts": 1795239454.5, **base}, "bad_timestamp"),
        case("negative `ts`", {"ts": -1, **base}, "bad_timestamp"),
        case("negative `seq`", {"seq": -1, **base}, "out_of_range"),
        case("string `seq`", {"seq": "17", **base}, "wrong_type"),
        case("not JSON", f"{n}={good}".encode(), "not_json"),
        case("truncated JSON", valid[:-3], "not_json"),
        case("not UTF-8", b"\xff\xfe{}", "not_utf8"),
        case("Latin-1 byte in a key", b'{"caf\xe9": 1}', "not_utf8"),
        case("JSON array instead of object", b"[" + valid + b"]", "not_object"),
        case("JSON string instead of object", b'"hello"', "not_object"),
        case("oversize (16 KiB + 1 byte)", oversize, "oversize"),
        case("empty object", b"{}", "empty"),
        case("only ts and seq", {"ts": 1795239454000, "seq": 1}, "empty"),
    ]


def _event_cases(model: ThingModel) -> list[InvalidCase]:
    t = model.type

    def case(description: str, payload: bytes | dict[str, Any], reason: str) -> InvalidCase:
        raw = payload if isinstance(payload, bytes) else _dumps(payload)
        return InvalidCase(description, t, "event", raw, reason)

    if not model.events:
        return [case("event on a type that declares none", {"event": "tamper"}, "unknown_event")]
    first = model.events[0]
    rng = random.Random(f"invalid-{t}")
    out = [
        case("unknown event `event`", {"event": "explode"}, "unknown_event"),
        case("missing `event`", {"ts": 1795239454000, "seq": 3}, "missing_field"),
        case("number for `event`", {"event": 5}, "unknown_event"),
        case(
            f"unknown extra field `colour` on {first.name}",
            {**example_payload(model, rng, "event", event=first.name), "colour": "red"},
            "unknown_field",
        ),
        case("JSON array instead of object", b'[{"event": "' + first.name.encode() + b'"}]', "not_object"),
        case("not UTF-8", b"\xff\xfe{}", "not_utf8"),
        case(
            "bad `ts`",
            {**example_payload(model, rng, "event", event=first.name), "ts": "2026-11-21 08:00"},
            "bad_timestamp",
        ),
    ]
    for ev in model.events:
        full = example_payload(model, rng, "event", event=ev.name)
        for f in ev.fields:
            if f.required:
                short = {k: v for k, v in full.items() if k != f.name}
                out.append(case(f"{ev.name} without `{f.name}`", short, "missing_field"))
            if f.choices:
                out.append(
                    case(f"{ev.name} bad choice `{f.name}`", {**full, f.name: "telepathy"}, "bad_value")
                )
            if f.kind is float and f.minimum is not None:
                out.append(
                    case(f"{ev.name} below min `{f.name}`", {**full, f.name: f.minimum - 1}, "out_of_range")
                )
            if f.kind is float:
                out.append(
                    case(f"{ev.name} string for a float `{f.name}`", {**full, f.name: "1"}, "wrong_type")
                )
            if f.kind is str and not f.choices:
                out.append(case(f"{ev.name} empty `{f.name}`", {**full, f.name: ""}, "bad_value"))
    return out


def _status_cases(model: ThingModel) -> list[InvalidCase]:
    t = model.type
    return [
        InvalidCase("status missing `online`", t, "status", b'{"fw": "2.1.7"}', "missing_field"),
        InvalidCase("status string for a bool `online`", t, "status", b'{"online": "yes"}', "wrong_type"),
        InvalidCase(
            "status unknown field `battery`", t, "status", b'{"online": true, "battery": 5}', "unknown_field"
        ),
        InvalidCase(
            "status number for a string `fw`", t, "status", b'{"online": true, "fw": 2}', "wrong_type"
        ),
    ]


def invalid_cases(model: ThingModel) -> list[InvalidCase]:
    """Every kind of bad payload for one device type, built from its thing model."""
    return [*_telemetry_cases(model), *_event_cases(model), *_status_cases(model)]


INVALID_CASES: list[InvalidCase] = [c for m in THING_MODELS.values() for c in invalid_cases(m)]
"""(description, device_type, topic_kind, payload, reason) for every device type; see invalid_cases()."""
