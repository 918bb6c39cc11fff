"""Thing models: the single declaration of a device type that validation, docs and simulators derive from."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Literal, Required, Union, cast

from pydantic import ConfigDict, StringConstraints, TypeAdapter
from pydantic import Field as PydField
from typing_extensions import TypedDict

# \Z, not $: $ also matches before a trailing newline, which would let "mh-1\n" through .match().
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MAX_PAYLOAD_BYTES = 16 * 1024

FieldKind = type[float] | type[bool] | type[int] | type[str]


@dataclass(frozen=True)
class Field:
    """One measured quantity. Its name carries the unit suffix; its kind and unit never change."""

    name: str
    kind: FieldKind = float
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""
    choices: tuple[str, ...] = ()
    max_length: int = 128
    required: bool = False

    def annotation(self) -> Any:
        """The pydantic type of this field: strict, with the plausible range as a constraint."""
        if self.kind is bool:
            return bool
        if self.kind is str:
            if self.choices:
                return Literal[self.choices]
            return Annotated[str, StringConstraints(min_length=1, max_length=self.max_length)]
        if self.kind is int:
            return Annotated[int, PydField(ge=self.minimum, le=self.maximum)]
        return Annotated[float, PydField(ge=self.minimum, le=self.maximum, allow_inf_nan=False)]

    def coerce(self, value: Any) -> Any:
        """An installer's value (often spreadsheet text) as this field's kind, checked; ValueError if not."""
        text = value.strip() if isinstance(value, str) else value
        if self.kind is bool:
            if isinstance(text, bool):
                return text
            truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if isinstance(text, str) and text.lower() in truth:
                return truth[text.lower()]
            raise ValueError(f"{self.name} must be true or false (got {value!r})")
        if self.kind is str:
            text = str(text)
            if self.choices and text not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(self.choices)} (got {value!r})")
            if not text or len(text) > self.max_length:
                raise ValueError(f"{self.name} must be 1 to {self.max_length} characters")
            return text
        try:
            number: float | int = int(text) if self.kind is int else float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a number (got {value!r})") from None
        if self.kind is float and not math.isfinite(number):
            raise ValueError(f"{self.name} must be a finite number (got {value!r})")
        if (self.minimum is not None and number < self.minimum) or (
            self.maximum is not None and number > self.maximum
        ):
            raise ValueError(
                f"{self.name} must be within {self.range_text} {self.unit}".rstrip() + f" (got {value!r})"
            )
        return number

    @property
    def range_text(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.minimum is None and self.maximum is None:
            return ""
        if self.maximum is None:
            return f">= {_num(self.minimum)}"
        if self.minimum is None:
            return f"<= {_num(self.maximum)}"
        return f"{_num(self.minimum)} – {_num(self.maximum)}"

    @property
    def type_name(self) -> str:
        return {float: "float", bool: "bool", int: "integer", str: "string"}[self.kind]


def _num(v: float | None) -> str:
    assert v is not None
    return str(int(v)) if float(v).is_integer() else str(v)


@dataclass(frozen=True)
class Event:
    """A discrete event a device reports on its `event` topic, with the extra fields it may carry."""

    name: str
    fields: tuple[Field, ...] = ()
    description: str = ""


# Common payload fields (device-protocol.md "Common payload fields").
TS_ANNOTATION = Union[  # noqa: UP007 - pydantic needs a runtime union here
    Annotated[int, PydField(ge=0, le=10**14)],
    Annotated[str, StringConstraints(min_length=10, max_length=40)],
]
SEQ_ANNOTATION = Annotated[int, PydField(ge=0, le=2**63 - 1)]

_STRICT = ConfigDict(extra="forbid", strict=True)


def _typed_dict(name: str, fields: dict[str, Any], required: set[str]) -> Any:
    """Build a TypedDict (total=False) so that validation returns only the keys that were sent."""
    from typing import NotRequired, Required

    annotations = {k: (Required[v] if k in required else NotRequired[v]) for k, v in fields.items()}
    # functional form with a runtime-built name and fields: mypy only accepts literals here
    td = cast(Any, TypedDict)(name, annotations)
    td.__pydantic_config__ = _STRICT
    return td


@dataclass(frozen=True)
class ThingModel:
    """A device type: telemetry fields with units and plausible ranges, events, report interval."""

    type: str
    name_zh: str
    name_en: str
    report_interval_s: int
    telemetry: tuple[Field, ...]
    events: tuple[Event, ...] = ()
    description: str = ""
    #: extra registry attributes a device of this type carries (documented, used by rules later)
    attributes: tuple[Field, ...] = field(default=())
    #: telemetry fields a new device must have reported before it counts as in service (commissioning)
    commissioning_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.telemetry]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.type}: duplicate telemetry field")
        if {"ts", "seq", "event"} & set(names):
            raise ValueError(f"{self.type}: telemetry may not redefine ts/seq/event")
        unknown = set(self.commissioning_fields) - set(names)
        if unknown:
            raise ValueError(f"{self.type}: commissioning fields {sorted(unknown)} are not telemetry fields")

    @cached_property
    def fields_by_name(self) -> dict[str, Field]:
        return {f.name: f for f in self.telemetry}

    @cached_property
    def events_by_name(self) -> dict[str, Event]:
        return {e.name: e for e in self.events}

    @cached_property
    def telemetry_adapter(self) -> TypeAdapter[dict[str, Any]]:
        fields: dict[str, Any] = {"ts": TS_ANNOTATION, "seq": SEQ_ANNOTATION}
        fields.update({f.name: f.annotation() for f in self.telemetry})
        return TypeAdapter(_typed_dict(f"{self.type}_telemetry", fields, set()))

    @cached_property
    def event_adapter(self) -> TypeAdapter[dict[str, Any]] | None:
        if not self.events:
            return None
        variants = []
        for ev in self.events:
            fields: dict[str, Any] = {
                "ts": TS_ANNOTATION,
                "seq": SEQ_ANNOTATION,
                "event": Literal[ev.name],
            }
            fields.update({f.name: f.annotation() for f in ev.fields})
            required = {"event"} | {f.name for f in ev.fields if f.required}
            variants.append(_typed_dict(f"{self.type}_{ev.name}", fields, required))
        if len(variants) == 1:
            return TypeAdapter(variants[0])
        union: Any = Annotated[Union[tuple(variants)], PydField(discriminator="event")]  # noqa: UP007
        return TypeAdapter(union)


class StatusPayload(TypedDict, total=False):
    """`status` topic payload: online state (the last will sends {"online": false}), firmware, time."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    online: Required[bool]
    fw: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    ts: TS_ANNOTATION
    seq: SEQ_ANNOTATION


STATUS_ADAPTER: TypeAdapter[StatusPayload] = TypeAdapter(StatusPayload)
