"""Markdown generated from the thing models: each type's README and docs/device-protocol.md.

python -m devices.docs           rewrite the files that differ
python -m devices.docs --check   exit 1 naming the files that differ (CI, the contract tests)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from devices import DEVICE_TYPES, THING_MODELS
from devices.model import MAX_PAYLOAD_BYTES, Event, Field, ThingModel
from devices.samples import PayloadKind, example_payload

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_DOC = Path("docs/device-protocol.md")

# The gateway's default skew tolerances (gateway.decode.Decoder); devices may not import the gateway,
# so the contract tests check that these agree.
FUTURE_TOLERANCE_S = 5 * 60
PAST_TOLERANCE_S = 7 * 24 * 3600

# Fixed inputs so that the generated examples never change unless the model does.
EXAMPLE_TS_MS = 1795239454000  # 2026-11-21T05:37:34Z
EXAMPLE_TS_TEXT = "2026-11-21T13:37:34+08:00"
EXAMPLE_SEQ = 17

TOPIC_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("telemetry", "device → gateway", "1", "readings, periodically and on change"),
    ("event", "device → gateway", "1", "discrete events"),
    ("status", "device → gateway", "1, retained", 'online state; last will `{"online": false}`, retained'),
    ("cmd", "gateway → device", "1", "commands (downlink); the gateway never accepts messages on it"),
)

# The examples the upstream protocol text gives, kept verbatim: the contract tests decode every example
# in the generated documents, so these stay accepted.
PROTOCOL_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "sc/v1/manhole_cover/mh-0001/telemetry",
        '{"ts": 1795239454000, "seq": 17, "tilt_deg": 1.4, "cover_open": false, "water_level_cm": 182.0, '
        '"battery_pct": 87, "rssi_dbm": -91}',
    ),
    ("sc/v1/smoke_detector/sd-0420/event", '{"ts": "2026-11-21T02:14:09Z", "event": "smoke_alarm"}'),
    (
        "sc/v1/parking_sensor/pk-0077/telemetry",
        '{"occupied": true, "mag_x": 12.5, "mag_y": -40.1, "mag_z": 88.0, "battery_pct": 64}',
    ),
    (
        "sc/v1/access_control/ac-0012/event",
        '{"ts": "2026-11-21T08:00:00+08:00", "seq": 812, "event": "door_held_open", "open_s": 95}',
    ),
    ("sc/v1/access_control/ac-0012/status", '{"online": true, "fw": "2.1.7", "ts": 1795239454000}'),
)

GENERATED_NOTE = (
    "<!-- Generated from the thing model by `python -m devices.docs`; edit {source}, not this file. -->"
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _duration(seconds: int) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}" + ("s" if unit == "day" and n > 1 else "")
    return f"{seconds} s"


def _field_rows(fields: Iterable[Field]) -> list[tuple[str, str, str, str, str]]:
    return [(f"`{f.name}`", f.unit, f.type_name, f.range_text, f.description) for f in fields]


def _extra_fields(ev: Event) -> str:
    parts = []
    for f in ev.fields:
        spec = [("required" if f.required else "optional")]
        if f.choices:
            spec.append("one of " + ", ".join(f.choices))
        else:
            spec.append(f.type_name)
            if f.unit:
                spec.append(f.unit)
            if f.range_text:
                spec.append(f.range_text)
        parts.append(f"`{f.name}` ({'; '.join(spec)}): {f.description}".rstrip(": "))
    return "<br>".join(parts)


def telemetry_table(model: ThingModel) -> list[str]:
    return _table(("field", "unit", "type", "plausible range", "meaning"), _field_rows(model.telemetry))


def events_table(model: ThingModel) -> list[str]:
    return _table(
        ("event", "extra fields", "meaning"),
        ((f"`{e.name}`", _extra_fields(e), e.description) for e in model.events),
    )


def example_device_id(model: ThingModel) -> str:
    return f"{model.type.replace('_', '-')}-0001"


def examples(model: ThingModel) -> list[tuple[str, dict[str, Any]]]:
    """One example per topic the device publishes on, from a generator seeded with the type name."""
    rng = random.Random(f"docs:{model.type}")
    kinds: list[tuple[PayloadKind, int | str]] = [("telemetry", EXAMPLE_TS_MS)]
    if model.events:
        kinds.append(("event", EXAMPLE_TS_TEXT))
    kinds.append(("status", EXAMPLE_TS_MS))
    out = []
    # The event with the most extra fields shows the most of the contract.
    event = max(model.events, key=lambda e: len(e.fields)).name if model.events else None
    for i, (kind, ts) in enumerate(kinds):
        seq = EXAMPLE_SEQ + i if kind != "status" else None
        payload = example_payload(model, rng, kind, event=event, ts=ts, seq=seq)
        out.append((f"sc/v1/{model.type}/{example_device_id(model)}/{kind}", payload))
    return out


def _example_block(topic: str, payload: str) -> list[str]:
    return ["```text", f"topic   {topic}", f"payload {payload}", "```"]


def render_readme(model: ThingModel) -> str:
    """The README of one device type (devices/<type>/README.md)."""
    t = model.type
    lines = [
        f"# {t}: {model.name_en} ({model.name_zh})",
        "",
        GENERATED_NOTE.format(source=f"`devices/{t}/__init__.py`"),
        "",
        model.description,
        "",
        "## Topics",
        "",
        *_table(
            ("topic", "direction", "QoS", "carries"),
            ((f"`sc/v1/{t}/{{device_id}}/{k}`", d, q, c) for k, d, q, c in TOPIC_ROWS),
        ),
        "",
        f"`{{device_id}}` is 1 to 64 characters of `A-Z a-z 0-9 _ -` and must be registered with type `{t}`.",
    ]
    if not model.events:
        lines.append(f"A `{t}` declares no events: the gateway rejects every message on its `event` topic.")
    lines += [
        "The payload rules common to all types (`ts`, `seq`, size, unknown fields, skew) are in",
        "[docs/device-protocol.md](../../docs/device-protocol.md).",
        "",
        "## Report interval",
        "",
        f"Telemetry every {_duration(model.report_interval_s)} ({model.report_interval_s} s), and on change.",
        "",
        "## Commissioning",
        "",
        "A newly registered device is *registered*, becomes *online* with its first valid message, and is",
        "*in service* once it has reported "
        + (", ".join(f"`{f}`" for f in model.commissioning_fields) or "any telemetry")
        + " (or an installer confirms it). Incidents of a device not yet in service are commissioning noise.",
        "",
        "## Telemetry",
        "",
        *telemetry_table(model),
        "",
        "A plausible range is what the sensor can mean, not an alarm threshold: a value outside it is",
        "rejected as a sensor fault. Alarm thresholds live in rules.",
        "",
    ]
    if model.events:
        lines += ["## Events", "", "The `event` field names the event.", "", *events_table(model), ""]
    if model.attributes:
        lines += [
            "## Registry attributes",
            "",
            "Set by the installer in the device registry, not reported by the device.",
            "",
            *_table(
                ("attribute", "unit", "type", "range", "meaning"),
                _field_rows(model.attributes),
            ),
            "",
        ]
    lines += [
        "## Example payloads",
        "",
        "Generated from the model: the values are draws from the plausible ranges, not typical readings.",
        "",
    ]
    for topic, payload in examples(model):
        lines += [
            f"### {topic.rsplit('/', 1)[1]}",
            "",
            *_example_block(topic, json.dumps(payload, ensure_ascii=False)),
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_protocol() -> str:
    """docs/device-protocol.md: the wire contract in the project's words, with every type's tables."""
    types = ", ".join(f"`{t}`" for t in DEVICE_TYPES)
    lines = [
        "# Device protocol v1",
        "",
        GENERATED_NOTE.format(source="`devices/docs.py` and the thing models in `devices/`"),
        "",
        "How field devices, vendor adaptors and simulators talk to the gateway. The gateway accepts",
        "exactly this and rejects (and counts) everything else, with a reason code, into its dead-letter",
        "store. Each device type has its own README under `devices/<type>/` with an example per topic.",
        "",
        "## Transport",
        "",
        "- MQTT 3.1.1 or 5 over TCP (port 1883 on loopback for development), TLS for devices off the host.",
        "- A device logs in with its own username (its `device_id`, also its client id) and the password",
        "  issued at registration. It may publish only under its own topics and subscribe only to its `cmd`.",
        "- An adaptor account (an NB-IoT platform push, a LoRaWAN network server) publishes on the same",
        "  per-device topics for the devices assigned to it.",
        "",
        "## Topics",
        "",
        *_table(
            ("topic", "direction", "QoS", "carries"),
            ((f"`sc/v1/{{device_type}}/{{device_id}}/{k}`", d, q, c) for k, d, q, c in TOPIC_ROWS),
        ),
        "",
        "- Exactly five segments: `sc`, `v1`, the device type, the device id, the kind. Anything else, and",
        "  any message the gateway receives on a `cmd` topic, is rejected as `bad_topic`.",
        f"- `device_type` is one of {types}; another value is `unknown_type`.",
        "- `device_id` is 1 to 64 characters of `A-Z a-z 0-9 _ -` (else `bad_topic`). It must be registered",
        "  (`unregistered_device`), registered as the type the topic names (`type_mismatch`: never silently",
        "  accepted), and not disabled or retired (`device_disabled`).",
        "- The type in the topic lets an operator give life-safety types (smoke detectors) their own",
        "  consumer, so a fire alarm never waits behind streetlight telemetry.",
        "",
        "## Payloads",
        "",
        "- A JSON object (`not_object`) in UTF-8 (`not_utf8`, `not_json`) of at most",
        f"  {MAX_PAYLOAD_BYTES} bytes (16 KiB; `oversize`).",
        "- Types are strict. A float field takes a JSON number (an integer too: `87` is stored as",
        "  `87.0`), not a string, a boolean or `null`; a bool field takes only `true` or `false`; `NaN`",
        "  and `Infinity` are refused (`wrong_type`, `out_of_range`).",
        "- A field that is absent was not measured in this message; it is not zero. Telemetry with no",
        "  measured field at all is rejected (`empty`).",
        "- Unknown fields are rejected (`unknown_field`), so a vendor's typo shows at commissioning",
        "  instead of as months of missing data.",
        "- Plausible ranges are inclusive. A value outside one is something the sensor cannot mean: it is",
        "  rejected as a sensor fault (`out_of_range`), not treated as an alarm.",
        "",
        "### Common fields",
        "",
        *_table(
            ("field", "type", "required", "meaning"),
            (
                (
                    "`ts`",
                    "integer (Unix epoch milliseconds) or string (RFC 3339 with offset)",
                    "no",
                    "when the device measured it; absent: the gateway's receive time",
                ),
                ("`seq`", "integer >= 0", "no", "per-device message counter, for gaps and duplicates"),
            ),
        ),
        "",
        "`ts` rules:",
        "",
        "- An integer is epoch milliseconds. (Seconds land in January 1970 and are not trusted, below.)",
        "- Text is an RFC 3339 date-time with an offset: `2026-11-21T02:14:09Z`,",
        "  `2026-11-21T10:14:09.250+08:00`. Fractions of a second are cut to the millisecond. Text without",
        "  an offset, other ISO 8601 forms (`20261121T021409Z`, week dates) and anything else are rejected",
        "  (`bad_timestamp`), as is a `ts` of the wrong JSON type.",
        f"- A time more than {_duration(FUTURE_TOLERANCE_S)} in the future or more than "
        f"{_duration(PAST_TOLERANCE_S)} in the past is not",
        "  trusted: the message is kept, the receive time is stored instead, the reading is marked untrusted",
        "  and the skew is counted.",
        "",
        "`seq` rules:",
        "",
        "- One counter per device, across its telemetry, event and status messages.",
        "- A message whose `seq` and `ts` (or lack of `ts`) equal those of one of the device's recent",
        "  messages is a duplicate (a QoS 1 redelivery or a resend): counted, not stored again.",
        "- The same `seq` with a different `ts` is a new message: the counter restarted after a reboot.",
        "",
        "### Events",
        "",
        "An `event` payload carries the common fields, `event` (required; one of the type's events,",
        "else `unknown_event`; absent: `missing_field`) and the extra fields declared for that event.",
        "A required extra field that is absent is `missing_field`; a value outside its choices is",
        "`bad_value`.",
        "",
        "Credentials are personal data: the gateway replaces `credential` with a keyed hash,",
        "`credential_hash`, and never stores the raw value.",
        "",
        "### Status",
        "",
        *_table(
            ("field", "type", "required", "meaning"),
            (
                ("`online`", "bool", "yes", "the device is connected"),
                ("`fw`", "string, 1 to 64 characters", "no", "firmware version"),
                ("`ts`, `seq`", "as above", "no", "as above"),
            ),
        ),
        "",
        'Published retained. The device sets its last will to `{"online": false}` on the same topic,',
        "retained, so the broker announces a lost connection.",
        "",
        "## Device types",
        "",
    ]
    for model in THING_MODELS.values():
        t = model.type
        lines += [
            f"### {t}: {model.name_en} ({model.name_zh})",
            "",
            f"{model.description} Telemetry every {_duration(model.report_interval_s)};"
            f" see [devices/{t}/README.md](../devices/{t}/README.md).",
            "",
            *telemetry_table(model),
            "",
        ]
        if model.events:
            lines += [f"Events of `{t}`:", "", *events_table(model), ""]
    lines += [
        "## Examples",
        "",
        "The contract tests decode every example in this document and in the device READMEs.",
        "",
    ]
    for topic, payload in PROTOCOL_EXAMPLES:
        lines += [*_example_block(topic, payload), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def readme_path(root: Path, device_type: str) -> Path:
    return root / "devices" / device_type / "README.md"


def rendered(root: Path = ROOT) -> dict[str, tuple[Path, str]]:
    """name -> (file, content it should have): one entry per device type plus the protocol document."""
    out = {t: (readme_path(root, t), render_readme(m)) for t, m in THING_MODELS.items()}
    out[str(PROTOCOL_DOC)] = (root / PROTOCOL_DOC, render_protocol())
    return out


def stale(root: Path = ROOT) -> list[str]:
    """Names (device types, the protocol document) whose file is missing or differs from its model."""
    return [
        name
        for name, (path, text) in rendered(root).items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def write_all(root: Path = ROOT) -> list[Path]:
    """Rewrite every generated document that differs; return the files written."""
    written = []
    for path, text in rendered(root).values():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devices.docs",
        description="Regenerate the device READMEs and docs/device-protocol.md.",
    )
    parser.add_argument(
        "--check", action="store_true", help="only report the documents that differ; exit 1 if any"
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        names = stale(args.root)
        for name in names:
            print(f"out of date: {name}", file=sys.stderr)
        if names:
            print("run `python -m devices.docs` to regenerate", file=sys.stderr)
        return 1 if names else 0
    for path in write_all(args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
