"""Device registry: validated device records, bulk CSV import, and the gateway's in-memory cache.

Every change to `devices` happens in a transaction that first locks the single `registry_version`
row (SELECT ... FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite), stamps the changed rows with
the next version and stores that version. Registry writers are therefore serialised and versions
become visible in order, which is what lets RegistryCache.refresh fetch only `version > last seen`.

CSV import format (`Registry.import_csv`, `parse_csv`)
------------------------------------------------------
UTF-8 (a BOM, as Excel writes it, is fine), comma-separated, first row is the header. Columns,
in any order:

    device_id, device_type, community, grid_code           required
    district, street, building, address, lat, lon,
    responsible_unit, component_code,
    install_date (YYYY-MM-DD), firmware, batch              optional (empty cell = not set)
    attr.<name>                                             one column per attribute, e.g. attr.bay_kind

Attribute values are kept as the text in the cell (an empty cell means the device does not have
that attribute); whoever reads an attribute converts it with its own schema. Unknown columns are a
file error (a typo in the header must not silently drop a column). Row numbers in the report are
spreadsheet rows: the header is row 1, the first device row 2. A row's values replace the device's
place data and attributes entirely; the lifecycle is never changed by an import. A row for a retired
device, or one that changes a device's type, is an error (a type is bound into the device's broker
rights: retire it and register a new id). `Registry.export_csv` writes this same format.

Codes (../shared/spec/domain.md)
--------------------------------
- Unit grid code: 15 digits (6 administrative + 3 street + 3 community + 3 grid), or 14 (older systems).
- Component code: 16 digits split by a `CodeScheme`, by default 6 administrative + 2 major class +
  2 minor class + 6 serial; `CodeScheme.parse("6+2+3+5")` for the newer platforms' split. A minor
  class is compared by number, so class 0101 is major 01 with minor 01 (2 digits) or 001 (3 digits).
- A component code is optional (not every device is registered as a city component). When given:
  a manhole cover's class is one of the 01xx covers (`COMPONENT_CLASSES`), a streetlight's 0118 路灯 or
  0117 立杆; for the other types (access control, parking, smoke detectors are not a fixed component
  class: a city may file a parking sensor under its 0201 停车场 or a door under 07 扩展部件) any class
  whose major class is one of 01-07 is accepted. A manhole's `owner_class` attribute, when given, is
  one of the cover classes and equals its component code's class.

Places (`Places`)
-----------------
district (6 digits) → street (9 = district + 3) → community (12) → grid (15, or a 14-digit legacy
code). A place's level follows from its code's length and its parent is its code's prefix, which must
be registered first. Devices name their community and grid code; they are not required to reference a
registered place (imports from older systems come before their places do).
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import datetime as dt
import fcntl
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, Final, Literal, TypeAlias, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    Select,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from devices import THING_MODELS
from gateway.db import (
    LIFECYCLES,
    PLACE_LEVELS,
    device_events,
    device_state,
    devices,
    places,
    registry_version,
    responsible_units,
    write_transaction,
)

DeviceType: TypeAlias = Literal[
    "manhole_cover", "streetlight", "access_control", "parking_sensor", "smoke_detector"
]
Lifecycle: TypeAlias = Literal["registered", "online", "in_service", "disabled", "retired"]
Outcome: TypeAlias = Literal["created", "updated", "unchanged", "error"]
AttributeValue: TypeAlias = str | int | float | bool | None
ProgressCallback: TypeAlias = Callable[[int, int], None]

DEVICE_TYPES: Final[tuple[str, ...]] = get_args(DeviceType)
INACTIVE_LIFECYCLES: Final = frozenset({"disabled", "retired"})
assert get_args(Lifecycle) == LIFECYCLES

REQUIRED_COLUMNS: Final = ("device_id", "device_type", "community", "grid_code")
OPTIONAL_COLUMNS: Final = (
    "district",
    "street",
    "building",
    "address",
    "lat",
    "lon",
    "responsible_unit",
    "component_code",
    "install_date",
    "firmware",
    "batch",
)
ATTRIBUTE_PREFIX: Final = "attr."
#: The place of a device: what `Registry.move` replaces as a whole.
PLACE_FIELDS: Final = ("community", "grid_code", "district", "street", "building", "address", "lat", "lon")

_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GRID_CODE_RE: Final = re.compile(r"[0-9]{14,15}")
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_ATTRIBUTE_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_BATCH_RE: Final = re.compile(r"[^\x00-\x1f]{1,64}")

# ---------------------------------------------------------------------------------------------
# Component codes

#: Major component classes (部件大类).
MAJOR_CLASSES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "01": "公用设施",
        "02": "道路交通",
        "03": "市容环境",
        "04": "园林绿化",
        "05": "房屋土地",
        "06": "其他设施",
        "07": "扩展部件",
    }
)
#: Minor component classes this gateway's device types use (verify against GB/T 30428.2).
MINOR_CLASSES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "0101": "上水井盖",
        "0102": "污水井盖",
        "0103": "雨水井盖",
        "0105": "电力井盖",
        "0106": "路灯井盖",
        "0107": "通信井盖",
        "0110": "热力井盖",
        "0111": "燃气井盖",
        "0114": "无主井盖",
        "0117": "立杆",
        "0118": "路灯",
        "0201": "停车场",
    }
)
MANHOLE_COVER_CLASSES: Final = ("0101", "0102", "0103", "0105", "0106", "0107", "0110", "0111", "0114")
#: The component classes a device type's code must have; a type not listed accepts any known major class.
COMPONENT_CLASSES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"manhole_cover": MANHOLE_COVER_CLASSES, "streetlight": ("0118", "0117")}
)


@dataclass(frozen=True, slots=True)
class ComponentCode:
    """A component code cut into its parts by a `CodeScheme`."""

    admin: str
    major: str
    minor: str
    serial: str

    @property
    def component_class(self) -> str:
        """Major + minor class as the 4-digit class the standard lists (0101), whatever the minor's width."""
        return f"{self.major}{int(self.minor):02d}"


@dataclass(frozen=True, slots=True)
class CodeScheme:
    """How a component code (部件标识码) splits: administrative code, major class, minor class, serial."""

    admin: int = 6
    major: int = 2
    minor: int = 2
    serial: int = 6

    def __post_init__(self) -> None:
        if self.admin != 6 or self.major != 2:
            raise ValueError(
                "a component code starts with the 6-digit administrative code and a 2-digit major class"
            )
        if not 2 <= self.minor <= 4 or self.serial < 1 or self.length != 16:
            raise ValueError(
                f"component code split {self} must be 6+2+minor+serial = 16 digits"
                " with a 2 to 4 digit minor class"
            )

    @classmethod
    def parse(cls, text: str) -> CodeScheme:
        """`6+2+2+6` (the default) or `6+2+3+5`; ValueError naming what is wrong."""
        parts = text.replace(" ", "").split("+")
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError(f"component code split {text!r}: expected four numbers like 6+2+2+6")
        return cls(*(int(p) for p in parts))

    @property
    def length(self) -> int:
        return self.admin + self.major + self.minor + self.serial

    def __str__(self) -> str:
        return f"{self.admin}+{self.major}+{self.minor}+{self.serial}"

    def describe(self) -> str:
        return (
            f"{self.length} digits: {self.admin} administrative + {self.major} major class"
            f" + {self.minor} minor class + {self.serial} serial"
        )

    def split(self, code: str) -> ComponentCode:
        """The parts of a well-formed code; ValueError if it is not `length` ASCII digits."""
        if not (len(code) == self.length and _DIGITS_RE.fullmatch(code)):
            raise ValueError(f"must be {self.length} digits")
        a, b, c = self.admin, self.admin + self.major, self.admin + self.major + self.minor
        return ComponentCode(code[:a], code[a:b], code[b:c], code[c:])

    def check(self, code: str, device_type: str | None) -> ComponentCode:
        """Split `code` and check its class fits `device_type`; ValueError saying what is wrong."""
        parts = self.split(code)
        if parts.major not in MAJOR_CLASSES:
            known = ", ".join(f"{k} {v}" for k, v in MAJOR_CLASSES.items())
            raise ValueError(f"major class {parts.major} is not a component class (known: {known})")
        allowed = COMPONENT_CLASSES.get(device_type or "")
        if allowed is not None and parts.component_class not in allowed:
            expected = ", ".join(f"{c} {MINOR_CLASSES.get(c, '')}".rstrip() for c in allowed)
            got = parts.component_class
            name = f"{got} {MINOR_CLASSES[got]}" if got in MINOR_CLASSES else got
            raise ValueError(f"class {name} does not fit a {device_type}: expected one of {expected}")
        return parts


DEFAULT_CODE_SCHEME: Final = CodeScheme()
#: Key of the code scheme in a pydantic validation context: `model_validate(data, context={...})`.
CODE_SCHEME_CONTEXT: Final = "code_scheme"


def _scheme_of(info: ValidationInfo) -> CodeScheme:
    context = info.context
    scheme = context.get(CODE_SCHEME_CONTEXT) if isinstance(context, dict) else None
    return scheme if isinstance(scheme, CodeScheme) else DEFAULT_CODE_SCHEME


def validation_context(scheme: CodeScheme) -> dict[str, Any]:
    """The pydantic context that makes DeviceRecord validate component codes with `scheme`."""
    return {CODE_SCHEME_CONTEXT: scheme}


class RegistryError(Exception):
    """Base class of registry errors a caller is expected to handle."""


class DeviceExistsError(RegistryError):
    """The device id is already registered."""


class DeviceNotFoundError(RegistryError):
    """The device id is not registered."""


class DeviceRetiredError(RegistryError):
    """The device is retired: it cannot be changed, enabled or reused."""


class DeviceConflictError(RegistryError):
    """The change conflicts with the device's state (a type change, confirming a disabled device)."""


class CsvFormatError(RegistryError, ValueError):
    """The CSV file as a whole cannot be read (header, encoding); no row was imported."""


class DeviceRecord(BaseModel):
    """A device as an installer registers it: identity, place, responsible unit and attributes."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    device_id: str
    device_type: DeviceType
    community: str = Field(max_length=128)
    grid_code: str
    district: str | None = Field(default=None, max_length=128)
    street: str | None = Field(default=None, max_length=128)
    building: str | None = Field(default=None, max_length=128)
    address: str | None = Field(default=None, max_length=256)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    responsible_unit: str | None = Field(default=None, max_length=128)
    component_code: str | None = None
    install_date: dt.date | None = None
    firmware: str | None = Field(default=None, max_length=64)
    batch: str | None = Field(default=None, max_length=64)
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)

    @field_validator(*OPTIONAL_COLUMNS, mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("community", "district", "street", "building", "address", "responsible_unit")
    @classmethod
    def _no_control_characters(cls, value: str | None) -> str | None:
        # These names end up as InfluxDB tags, case fields and table cells: a line break in one is a
        # spreadsheet accident, never meant.
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain control characters (line breaks, tabs)")
        return value

    @field_validator("device_id", "community", "grid_code", mode="before")
    @classmethod
    def _required_not_blank(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("is required")
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # a grid code typed as a number
        return value

    @field_validator("device_id")
    @classmethod
    def _check_device_id(cls, value: str) -> str:
        if not _DEVICE_ID_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 characters of A-Z a-z 0-9 _ -")
        return value

    @field_validator("device_type", mode="before")
    @classmethod
    def _check_device_type(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value and value not in DEVICE_TYPES:
                raise ValueError(f"unknown device type (known: {', '.join(DEVICE_TYPES)})")
        if value is None or value == "":
            raise ValueError("is required")
        return value

    @field_validator("grid_code")
    @classmethod
    def _check_grid_code(cls, value: str) -> str:
        if not _GRID_CODE_RE.fullmatch(value):
            raise ValueError("must be 14 or 15 digits")
        return value

    @field_validator("component_code", mode="before")
    @classmethod
    def _component_code_as_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # typed as a number in a JSON import
        return value

    @field_validator("component_code")
    @classmethod
    def _check_component_code(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            _scheme_of(info).check(value, info.data.get("device_type"))
        return value

    @field_validator("batch")
    @classmethod
    def _check_batch(cls, value: str | None) -> str | None:
        if value is not None and not _BATCH_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 characters without control characters")
        return value

    @field_validator("attributes")
    @classmethod
    def _check_attributes(
        cls, value: dict[str, AttributeValue], info: ValidationInfo
    ) -> dict[str, AttributeValue]:
        """Attributes are the ones the type's thing model declares, in their declared kind and range."""
        bad = [name for name in value if not _ATTRIBUTE_NAME_RE.fullmatch(name)]
        if bad:
            raise ValueError(
                f"invalid attribute name(s) {', '.join(map(repr, bad))}: "
                "use a letter or _ then up to 63 of A-Z a-z 0-9 _ . -"
            )
        model = THING_MODELS.get(str(info.data.get("device_type", "")))
        if model is None:
            return value  # the device_type error is reported on its own
        declared = {f.name: f for f in model.attributes}
        typed: dict[str, AttributeValue] = {}
        errors: list[str] = []
        for name, raw in value.items():
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue
            f = declared.get(name)
            if f is None:
                errors.append(f"unknown attribute {name!r} for {model.type} (known: {', '.join(declared)})")
                continue
            try:
                typed[name] = f.coerce(raw)
            except ValueError as exc:
                errors.append(str(exc))
        owner = typed.get("owner_class")
        if model.type == "manhole_cover" and owner is not None:
            code = info.data.get("component_code")
            if owner not in MANHOLE_COVER_CLASSES:
                errors.append(
                    f"owner_class must be one of {', '.join(MANHOLE_COVER_CLASSES)} (got {owner!r})"
                )
            elif isinstance(code, str):
                with contextlib.suppress(ValueError):  # a bad code is reported on its own
                    got = _scheme_of(info).split(code).component_class
                    if got != owner:
                        errors.append(f"owner_class {owner} does not match the component code's class {got}")
        if errors:
            raise ValueError("; ".join(errors))
        return typed


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, what is wrong and the value given."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "record"
        kind, msg = err["type"], err["msg"]
        if kind == "missing":
            parts.append(f"{where}: is required")
            continue
        if kind == "extra_forbidden":
            parts.append(f"{where}: unknown field")
            continue
        msg = msg.removeprefix("Value error, ")
        if msg != "is required" and isinstance(err.get("input"), str | int | float):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _slots_as_dict(obj: Any, times: Iterable[str]) -> dict[str, Any]:
    """A slotted dataclass as a JSON-ready dict: the `times` (dates, timestamps) as ISO 8601 text."""
    out = {name: getattr(obj, name) for name in obj.__slots__}
    for name in times:
        value = out[name]
        out[name] = None if value is None else value.isoformat()
    return out


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the gateway needs about a device to accept, enrich and route its messages."""

    device_id: str
    device_type: str
    community: str | None
    grid_code: str | None
    district: str | None
    street: str | None
    building: str | None
    responsible_unit: str | None
    lifecycle: str
    component_code: str | None = None
    attributes: Mapping[str, AttributeValue] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def active(self) -> bool:
        """False for disabled and retired devices, whose messages the gateway should not accept."""
        return self.lifecycle not in INACTIVE_LIFECYCLES


@dataclass(frozen=True, slots=True)
class RegisteredDevice:
    """A full registry row, for listing and showing devices."""

    device_id: str
    device_type: str
    community: str | None
    grid_code: str | None
    district: str | None
    street: str | None
    building: str | None
    address: str | None
    lat: float | None
    lon: float | None
    responsible_unit: str | None
    component_code: str | None
    attributes: Mapping[str, AttributeValue]
    lifecycle: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int
    install_date: dt.date | None = None
    firmware: str | None = None
    batch: str | None = None
    in_service_at: dt.datetime | None = None

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            device_id=self.device_id,
            device_type=self.device_type,
            community=self.community,
            grid_code=self.grid_code,
            district=self.district,
            street=self.street,
            building=self.building,
            responsible_unit=self.responsible_unit,
            lifecycle=self.lifecycle,
            component_code=self.component_code,
            attributes=self.attributes,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: timestamps as RFC 3339 text, the install date as YYYY-MM-DD."""
        out = _slots_as_dict(self, ("created_at", "updated_at", "in_service_at", "install_date"))
        out["attributes"] = dict(self.attributes)
        return out

    def record(self) -> DeviceRecord:
        """The device as an installer's record (what an import row or a PATCH works on)."""
        return DeviceRecord.model_construct(
            **{name: getattr(self, name) for name in _RECORD_FIELDS if name != "attributes"},
            attributes=dict(self.attributes),
        )


@dataclass(frozen=True, slots=True)
class RowResult:
    """The outcome of one input row. `row` is the spreadsheet row (CSV) or 1-based position (API)."""

    row: int
    device_id: str | None
    outcome: Outcome
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ImportReport:
    """Per-row outcomes of an import, in input order."""

    rows: tuple[RowResult, ...]
    dry_run: bool = False
    version: int | None = None  # registry version after the import (None for a dry run)
    aborted: str | None = None  # why the import stopped before its end (ImportAbortedError)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.rows if r.outcome == outcome)

    @property
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(get_args(Outcome), 0)
        for r in self.rows:
            out[r.outcome] += 1
        return out

    @property
    def errors(self) -> builtins.list[RowResult]:
        return [r for r in self.rows if r.outcome == "error"]

    @property
    def ok(self) -> bool:
        return not any(r.outcome == "error" for r in self.rows)


@dataclass(frozen=True, slots=True)
class ParsedCsv:
    """Valid records with their row numbers, and the rows that failed validation."""

    records: tuple[tuple[int, DeviceRecord], ...]
    errors: tuple[RowResult, ...]


CsvSource: TypeAlias = str | os.PathLike[str] | IO[str]


def parse_csv(
    source: CsvSource, *, encoding: str = "utf-8-sig", scheme: CodeScheme = DEFAULT_CODE_SCHEME
) -> ParsedCsv:
    """Read and validate a device CSV without touching the database (see the module docstring).

    Raises CsvFormatError when the file as a whole is unusable: no header, unknown or duplicate
    columns, a required column missing, not text in `encoding`.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, encoding=encoding, newline="") as f:
            return _parse_csv_stream(f, encoding, scheme)
    return _parse_csv_stream(source, encoding, scheme)


#: Fields of a JSON export that an import of it ignores (the registry sets them).
READ_ONLY_FIELDS: Final = frozenset(
    {"lifecycle", "created_at", "updated_at", "version", "in_service_at", "state", "credentials"}
)


def parse_json_records(items: Any, *, scheme: CodeScheme = DEFAULT_CODE_SCHEME) -> ParsedCsv:
    """Validate a JSON import: a list of device objects (a JSON export's read-only fields are ignored,
    so an export imports again unchanged). Row numbers are 1-based positions. Raises CsvFormatError
    (the request as a whole is unusable) when `items` is not a list.
    """
    if not isinstance(items, list):
        raise CsvFormatError("expected a JSON array of device objects")
    context = validation_context(scheme)
    records: list[tuple[int, DeviceRecord]] = []
    errors: list[RowResult] = []
    first: dict[str, int] = {}
    for row, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            errors.append(RowResult(row, None, "error", "not a JSON object"))
            continue
        raw_id = item.get("device_id")
        device_id = raw_id.strip() or None if isinstance(raw_id, str) else None
        if device_id is not None and device_id in first:
            errors.append(
                RowResult(
                    row,
                    device_id,
                    "error",
                    f"duplicate device_id {device_id!r}: already at position {first[device_id]}",
                )
            )
            continue
        if device_id is not None:
            first[device_id] = row
        data = {k: v for k, v in item.items() if k not in READ_ONLY_FIELDS}
        try:
            records.append((row, DeviceRecord.model_validate(data, context=context)))
        except ValidationError as exc:
            errors.append(RowResult(row, device_id, "error", describe_validation_error(exc)))
    return ParsedCsv(tuple(records), tuple(errors))


def _parse_csv_stream(stream: IO[str], encoding: str, scheme: CodeScheme) -> ParsedCsv:
    context = validation_context(scheme)
    reader = csv.reader(stream)
    row_number = 1
    try:
        header = next(reader, None)
        if header is None:
            raise CsvFormatError("the file is empty: expected a header row naming the columns")
        columns = _check_header(header)
        records: list[tuple[int, DeviceRecord]] = []
        errors: list[RowResult] = []
        first_row: dict[str, int] = {}
        for row_number, cells in enumerate(reader, start=2):
            if not any(c.strip() for c in cells):
                continue
            data = _row_to_data(columns, cells)
            device_id = str(data.get("device_id") or "").strip() or None
            problem = None
            if len(cells) > len(columns) and any(c.strip() for c in cells[len(columns) :]):
                problem = f"the row has {len(cells)} cells but the header names {len(columns)} columns"
            elif device_id is not None:
                if device_id in first_row:
                    problem = f"duplicate device_id {device_id!r}: already on row {first_row[device_id]}"
                else:
                    first_row[device_id] = row_number
            if problem is not None:
                errors.append(RowResult(row_number, device_id, "error", problem))
                continue
            try:
                records.append((row_number, DeviceRecord.model_validate(data, context=context)))
            except ValidationError as exc:
                errors.append(RowResult(row_number, device_id, "error", describe_validation_error(exc)))
    except UnicodeDecodeError as exc:
        raise CsvFormatError(
            f"row {row_number + 1}: the file is not {encoding} text ({exc.reason}); save it as CSV UTF-8"
        ) from exc
    except csv.Error as exc:
        raise CsvFormatError(f"row {row_number}: unreadable CSV ({exc})") from exc
    return ParsedCsv(tuple(records), tuple(errors))


def _check_header(header: Sequence[str]) -> tuple[str, ...]:
    columns = tuple(h.strip() for h in header)
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    problems = []
    unknown = [
        c
        for c in columns
        if c not in known
        and not (c.startswith(ATTRIBUTE_PREFIX) and _ATTRIBUTE_NAME_RE.fullmatch(c[len(ATTRIBUTE_PREFIX) :]))
    ]
    if unknown:
        problems.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        problems.append(f"duplicate column(s) {', '.join(map(repr, duplicated))}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(f"missing required column(s) {', '.join(missing)}")
    if problems:
        raise CsvFormatError(
            "header row: "
            + "; ".join(problems)
            + f". Columns are {', '.join(REQUIRED_COLUMNS)} (required), {', '.join(OPTIONAL_COLUMNS)}"
            f" and {ATTRIBUTE_PREFIX}<name> for attributes"
        )
    return columns


def _row_to_data(columns: Sequence[str], cells: Sequence[str]) -> dict[str, Any]:
    """The row as DeviceRecord input; missing trailing cells are empty, `attr.` columns nest."""
    data: dict[str, Any] = {}
    attributes: dict[str, str] = {}
    for column, cell in zip(columns, cells, strict=False):
        if column.startswith(ATTRIBUTE_PREFIX):
            if cell.strip():
                attributes[column[len(ATTRIBUTE_PREFIX) :]] = cell.strip()
        else:
            data[column] = cell
    data["attributes"] = attributes
    return data


_RECORD_FIELDS: Final = tuple(DeviceRecord.model_fields)
_INFO_COLUMNS: Final = (
    devices.c.device_id,
    devices.c.device_type,
    devices.c.community,
    devices.c.grid_code,
    devices.c.district,
    devices.c.street,
    devices.c.building,
    devices.c.responsible_unit,
    devices.c.lifecycle,
    devices.c.component_code,
    devices.c.attributes,
)
_FULL_COLUMNS: Final = tuple(devices.c[name] for name in RegisteredDevice.__slots__)
_UPDATE_DEVICE: Final = update(devices).where(devices.c.device_id == bindparam("match_device_id"))


def _info_from_row(m: RowMapping) -> DeviceInfo:
    return DeviceInfo(
        device_id=m["device_id"],
        device_type=m["device_type"],
        community=m["community"],
        grid_code=m["grid_code"],
        district=m["district"],
        street=m["street"],
        building=m["building"],
        responsible_unit=m["responsible_unit"],
        lifecycle=m["lifecycle"],
        component_code=m["component_code"],
        attributes=MappingProxyType(m["attributes"] or {}),
    )


def _device_from_row(row: RowMapping) -> RegisteredDevice:
    m = dict(row)
    m["attributes"] = MappingProxyType(m["attributes"] or {})
    return RegisteredDevice(**m)


_T = TypeVar("_T")


def _first(engine: Engine, stmt: Select[Any], make: Callable[[RowMapping], _T]) -> _T | None:
    """`make` of the statement's first row, None when there is none."""
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    return None if row is None else make(row._mapping)


def _all(engine: Engine, stmt: Select[Any], make: Callable[[RowMapping], _T]) -> builtins.list[_T]:
    """`make` of each of the statement's rows, in order."""
    with engine.connect() as conn:
        return [make(row._mapping) for row in conn.execute(stmt)]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Key of the PostgreSQL advisory lock of `Registry.credentials_lock` ("sccr").
_CREDENTIALS_LOCK_KEY: Final = 0x73636372
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD: Final = threading.Lock()


def _process_lock(key: str) -> threading.Lock:
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


def _lock_version(conn: Connection) -> int:
    """Read the registry version holding its row lock until the transaction ends."""
    stmt = select(registry_version.c.version).where(registry_version.c.id == 1).with_for_update()
    return int(conn.execute(stmt).scalar_one())


def _store_version(conn: Connection, version: int) -> None:
    conn.execute(update(registry_version).where(registry_version.c.id == 1).values(version=version))


InsertHook: TypeAlias = Callable[[Sequence[DeviceRecord]], Mapping[str, str]]
"""Called inside an import's write transaction with the devices about to be created, after the checks
and before the insert: returns {device_id: reason} for devices that must not be created (they become
error rows). It may raise ImportAbortedError to stop the import; that batch is then rolled back. It
runs under the registry's write lock: keep it quick (no broker calls)."""


class ImportAbortedError(RegistryError):
    """Raised by an InsertHook to stop an import: the current batch and the rest are not imported."""


@dataclass(frozen=True, slots=True)
class Change:
    """A registry operation's result: the device as it is now, and whether anything changed."""

    device: RegisteredDevice
    changed: bool


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """One entry of a device's history: what happened, when, by whom, at which registry version."""

    id: int
    device_id: str
    at: dt.datetime
    action: str
    actor: str | None
    version: int | None
    detail: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device_id": self.device_id,
            "at": self.at.isoformat(),
            "action": self.action,
            "actor": self.actor,
            "version": self.version,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """A device as commissioning sees it: where it is, what it last sent, what it still has to send."""

    device_id: str
    device_type: str
    lifecycle: str
    community: str | None
    grid_code: str | None
    building: str | None
    batch: str | None
    online: bool | None
    last_seen: dt.datetime | None
    fw: str | None
    last_topic: str | None
    last_payload: bytes | None
    seen_fields: tuple[str, ...]
    missing_fields: tuple[str, ...]

    @property
    def heard_from(self) -> bool:
        return self.last_seen is not None


@dataclass(frozen=True, slots=True)
class Commissioning:
    """A site's or a batch's commissioning: counts per lifecycle and each device's progress."""

    total: int
    counts: Mapping[str, int]
    not_heard_from: int
    devices: tuple[DeviceProgress, ...]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{field: [old, new]} of the record fields that differ, JSON-ready."""
    return {
        name: [_jsonable(old[name]), _jsonable(new[name])]
        for name in _RECORD_FIELDS
        if old[name] != new[name]
    }


class Registry:
    """The device registry in SQL. Methods are blocking: call them from a worker thread in asyncio.

    Every change is one transaction that takes the registry lock (see the module docstring), bumps the
    version only when something changed, and appends to the device's history (`device_events`) with
    the actor that did it (an API key's name, `cli`, `gateway`).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        code_scheme: CodeScheme = DEFAULT_CODE_SCHEME,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._scheme = code_scheme

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def code_scheme(self) -> CodeScheme:
        return self._scheme

    def validate(self, data: Mapping[str, Any]) -> DeviceRecord:
        """A DeviceRecord checked with this registry's code scheme; raises pydantic's ValidationError."""
        return DeviceRecord.model_validate(data, context=validation_context(self._scheme))

    # -- creating ------------------------------------------------------------------------------------

    def add(
        self,
        record: DeviceRecord,
        *,
        actor: str = "registry",
        detail: Mapping[str, Any] | None = None,
    ) -> RegisteredDevice:
        """Register one new device (lifecycle `registered`); `detail` goes into its history's first
        entry. Raises DeviceExistsError."""
        now = self._clock()
        with write_transaction(self._engine) as conn:
            version = _lock_version(conn) + 1
            self._ensure_absent(conn, record.device_id)
            conn.execute(
                insert(devices),
                [{**record.model_dump(), "created_at": now, "updated_at": now, "version": version}],
            )
            event = (record.device_id, "created", dict(detail or {}))
            self._log(conn, [event], actor=actor, version=version, at=now)
            _store_version(conn, version)
            row = self._fetch(conn, record.device_id)
        return _device_from_row(row)

    @contextlib.contextmanager
    def credentials_lock(self) -> Iterator[None]:
        """Serialise the creation of broker accounts across threads and processes, without the
        registry's write lock (the gateway needs that one; the broker can take seconds per batch).

        Whoever creates accounts for new devices holds it from checking the ids are free until their
        rows are committed, so an account found without a registry row while holding it is a leftover.
        PostgreSQL: a session advisory lock; a SQLite file: an flock on `<file>.credentials.lock`.
        """
        url = self._engine.url
        with _process_lock(url.render_as_string(hide_password=False)):
            if url.get_backend_name() == "postgresql":
                with self._engine.connect() as conn:
                    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _CREDENTIALS_LOCK_KEY})
                    conn.commit()
                    try:
                        yield
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _CREDENTIALS_LOCK_KEY})
                        conn.commit()
                return
            database = url.database or ""
            if (
                url.get_backend_name() != "sqlite"
                or database in ("", ":memory:")
                or database.startswith("file:")
            ):
                yield
                return
            with open(f"{database}.credentials.lock", "a+b") as lock_file:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def absent(self, device_ids: Iterable[str]) -> builtins.list[str]:
        """Those of `device_ids` that are not registered, in the order given."""
        ids = builtins.list(device_ids)
        with self._engine.connect() as conn:
            present = set(
                conn.execute(select(devices.c.device_id).where(devices.c.device_id.in_(ids))).scalars()
            )
        return [d for d in ids if d not in present]

    def ensure_absent(self, device_id: str) -> None:
        """DeviceExistsError if the id is registered (retired ones included: an id is never reused)."""
        with self._engine.connect() as conn:
            self._ensure_absent(conn, device_id)

    @staticmethod
    def _ensure_absent(conn: Connection, device_id: str) -> None:
        lifecycle = conn.execute(
            select(devices.c.lifecycle).where(devices.c.device_id == device_id)
        ).scalar_one_or_none()
        if lifecycle is not None:
            state = " (retired: a retired id is not reused)" if lifecycle == "retired" else ""
            raise DeviceExistsError(f"device {device_id!r} is already registered{state}")

    def upsert_many(
        self,
        records: Iterable[DeviceRecord],
        *,
        batch_size: int = 1000,
        progress: ProgressCallback | None = None,
        dry_run: bool = False,
        actor: str = "registry",
        before_insert: InsertHook | None = None,
    ) -> ImportReport:
        """Create or update devices in batches, one transaction and one version per batch.

        Rows identical to what is stored are `unchanged` and do not bump the version. A device id
        repeated in `records` is an error on its later positions. Row numbers are 1-based positions.
        """
        items = list(enumerate(records, start=1))
        seen: dict[str, int] = {}
        unique: list[tuple[int, DeviceRecord]] = []
        errors: list[RowResult] = []
        for row, record in items:
            if record.device_id in seen:
                errors.append(
                    RowResult(
                        row,
                        record.device_id,
                        "error",
                        f"duplicate device_id: already at position {seen[record.device_id]}",
                    )
                )
            else:
                seen[record.device_id] = row
                unique.append((row, record))
        return self.import_parsed(
            ParsedCsv(tuple(unique), tuple(errors)),
            batch_size=batch_size,
            progress=progress,
            dry_run=dry_run,
            actor=actor,
            before_insert=before_insert,
        )

    def import_csv(
        self,
        source: CsvSource,
        *,
        dry_run: bool = False,
        batch_size: int = 1000,
        progress: ProgressCallback | None = None,
        encoding: str = "utf-8-sig",
        actor: str = "registry",
        before_insert: InsertHook | None = None,
    ) -> ImportReport:
        """Import a device CSV (format in the module docstring). Valid rows are imported even when
        other rows fail; re-importing the same file changes nothing. With `dry_run` the outcomes are
        computed against the database but nothing is written. Raises CsvFormatError for a bad header.
        """
        parsed = parse_csv(source, encoding=encoding, scheme=self._scheme)
        return self.import_parsed(
            parsed,
            batch_size=batch_size,
            progress=progress,
            dry_run=dry_run,
            actor=actor,
            before_insert=before_insert,
        )

    def import_parsed(
        self,
        parsed: ParsedCsv,
        *,
        batch_size: int = 1000,
        progress: ProgressCallback | None = None,
        dry_run: bool = False,
        actor: str = "registry",
        before_insert: InsertHook | None = None,
    ) -> ImportReport:
        """Import records already parsed (`parse_csv`, `parse_json_records`), with their row numbers."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        items = parsed.records
        results = list(parsed.errors)
        total = len(items)
        version: int | None = None
        aborted: str | None = None
        for start in range(0, total, batch_size):
            batch = items[start : start + batch_size]
            if dry_run:
                with self._engine.connect() as conn:
                    results.extend(self._classify(conn, batch)[0])
            else:
                try:
                    with write_transaction(self._engine) as conn:
                        version, written = self._write_batch(conn, batch, actor, before_insert)
                except ImportAbortedError as exc:
                    aborted = str(exc)
                    results.extend(
                        RowResult(row, record.device_id, "error", f"not imported: {exc}")
                        for row, record in items[start:]
                    )
                    break
                results.extend(written)
            if progress is not None:
                progress(min(start + batch_size, total), total)
        if not dry_run and version is None:
            version = self.current_version()
        results.sort(key=lambda r: r.row)
        return ImportReport(
            rows=tuple(results), dry_run=dry_run, version=None if dry_run else version, aborted=aborted
        )

    def _classify(
        self, conn: Connection, batch: Sequence[tuple[int, DeviceRecord]]
    ) -> tuple[builtins.list[RowResult], builtins.list[dict[str, Any]], builtins.list[dict[str, Any]]]:
        """Outcome of each row against the stored devices; the rows to insert, and those to update (each
        with the `_row` and `_diff` it came with)."""
        ids = [record.device_id for _, record in batch]
        stored = {
            row.device_id: row._mapping
            for row in conn.execute(
                select(devices.c.lifecycle, *(devices.c[name] for name in _RECORD_FIELDS)).where(
                    devices.c.device_id.in_(ids)
                )
            )
        }
        results: list[RowResult] = []
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for row, record in batch:
            values = record.model_dump()
            old = stored.get(record.device_id)
            if old is None:
                inserts.append({**values, "_row": row})
                results.append(RowResult(row, record.device_id, "created"))
            elif old["lifecycle"] == "retired":
                results.append(
                    RowResult(row, record.device_id, "error", "device is retired: a retired id is not reused")
                )
            elif old["device_type"] != record.device_type:
                results.append(
                    RowResult(
                        row,
                        record.device_id,
                        "error",
                        f"device_type cannot change (registered as {old['device_type']}): "
                        "retire the device and register a new id",
                    )
                )
            elif all(old[name] == values[name] for name in _RECORD_FIELDS):
                results.append(RowResult(row, record.device_id, "unchanged"))
            else:
                updates.append({**values, "_row": row, "_diff": _diff(dict(old), values)})
                results.append(RowResult(row, record.device_id, "updated"))
        return results, inserts, updates

    def _write_batch(
        self,
        conn: Connection,
        batch: Sequence[tuple[int, DeviceRecord]],
        actor: str,
        before_insert: InsertHook | None,
    ) -> tuple[int, builtins.list[RowResult]]:
        version = _lock_version(conn)
        results, inserts, updates = self._classify(conn, batch)
        if inserts and before_insert is not None:
            records = dict(batch)
            refused = before_insert([records[values["_row"]] for values in inserts])
            if refused:
                inserts = [v for v in inserts if v["device_id"] not in refused]
                results = [
                    RowResult(r.row, r.device_id, "error", refused[r.device_id])
                    if r.outcome == "created" and r.device_id is not None and r.device_id in refused
                    else r
                    for r in results
                ]
        if not inserts and not updates:
            return version, results
        version += 1
        now = self._clock()
        events: list[tuple[str, str, dict[str, Any]]] = []
        created_detail: dict[str, Any] = {"via": "import"}
        if before_insert is not None:
            created_detail["credentials"] = "issued"
        if inserts:
            for values in inserts:
                del values["_row"]
                values.update(created_at=now, updated_at=now, version=version)
                events.append((values["device_id"], "created", created_detail))
            conn.execute(insert(devices), inserts)
        if updates:
            for values in updates:
                del values["_row"]
                events.append(
                    (values["device_id"], "updated", {"via": "import", "changed": values.pop("_diff")})
                )
                values.update(match_device_id=values["device_id"], updated_at=now, version=version)
            conn.execute(_UPDATE_DEVICE, updates)
        self._log(conn, events, actor=actor, version=version, at=now)
        _store_version(conn, version)
        return version, results

    # -- changing one device ----------------------------------------------------------------------------

    def update(self, device_id: str, changes: Mapping[str, Any], *, actor: str = "registry") -> Change:
        """Change some of a device's fields (a JSON merge patch: a field set to None is cleared; in
        `attributes`, a key set to None is removed, others are added or replaced).

        The id and type cannot change (DeviceConflictError); a retired device cannot be changed. The
        result is validated like a new record: pydantic's ValidationError names the bad fields.
        """
        unknown = set(changes) - set(_RECORD_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")

        def patch(current: dict[str, Any]) -> dict[str, Any]:
            merged = {**current, **{k: v for k, v in changes.items() if k != "attributes"}}
            if "attributes" in changes:
                attributes = dict(current["attributes"])
                for key, value in (changes["attributes"] or {}).items():
                    if value is None:
                        attributes.pop(key, None)
                    else:
                        attributes[key] = value
                merged["attributes"] = attributes
            return merged

        return self._change(device_id, patch, "updated", actor)

    def move(self, device_id: str, place: Mapping[str, Any], *, actor: str = "registry") -> Change:
        """Put a device in another place: `place` gives the new community and grid code and, optionally,
        district, street, building, address, lat, lon; the place fields it does not give are cleared
        (the old building or coordinates are wrong at the new place). The history keeps the old place.
        """
        unknown = set(place) - set(PLACE_FIELDS)
        if unknown:
            raise ValueError(
                f"not a place field: {', '.join(sorted(unknown))} (place: {', '.join(PLACE_FIELDS)})"
            )

        def relocate(current: dict[str, Any]) -> dict[str, Any]:
            return {**current, **dict.fromkeys(PLACE_FIELDS), **place}

        return self._change(device_id, relocate, "moved", actor)

    def _change(
        self,
        device_id: str,
        mutate: Callable[[dict[str, Any]], dict[str, Any]],
        action: str,
        actor: str,
    ) -> Change:
        with write_transaction(self._engine) as conn:
            version = _lock_version(conn)
            old = self._fetch(conn, device_id)
            if old["lifecycle"] == "retired":
                raise DeviceRetiredError(f"device {device_id!r} is retired and cannot be changed")
            current = {name: old[name] for name in _RECORD_FIELDS}
            current["attributes"] = dict(old["attributes"] or {})
            data = mutate(current)
            for fixed in ("device_id", "device_type"):
                if data.get(fixed) != old[fixed]:
                    raise DeviceConflictError(
                        f"{fixed} cannot change (is {old[fixed]!r}): retire the device and register a new id"
                    )
            new = self.validate(data).model_dump()
            diff = _diff(current, new)
            if not diff:
                return Change(_device_from_row(old), False)
            version += 1
            now = self._clock()
            conn.execute(
                _UPDATE_DEVICE, [{**new, "match_device_id": device_id, "updated_at": now, "version": version}]
            )
            return self._changed(conn, device_id, action, {"changed": diff}, actor, version, now)

    def disable(self, device_id: str, *, actor: str = "registry") -> Change:
        """`disabled`: the gateway sets its messages aside. A retired device cannot be disabled."""
        return self._transition(device_id, lambda old, conn: "disabled", "disabled", actor)

    def enable(self, device_id: str, *, actor: str = "registry") -> Change:
        """Back from `disabled` to where it was: in service if it had been, online if it was ever heard
        from, registered otherwise. Enabling a device that is not disabled changes nothing."""

        def target(old: RowMapping, conn: Connection) -> str:
            if old["lifecycle"] != "disabled":
                return str(old["lifecycle"])
            if old["in_service_at"] is not None:
                return "in_service"
            heard = conn.execute(
                select(device_state.c.last_seen).where(device_state.c.device_id == device_id)
            ).scalar_one_or_none()
            return "online" if heard is not None else "registered"

        return self._transition(device_id, target, "enabled", actor)

    def retire(self, device_id: str, *, actor: str = "registry") -> Change:
        """`retired`, for good: the id stays (with its history) and is never reused."""
        return self._transition(device_id, lambda old, conn: "retired", "retired", actor, retired_ok=True)

    def confirm(self, device_id: str, *, actor: str = "registry") -> Change:
        """An installer's confirmation that the device works where it is: `in_service` (from registered or
        online). A disabled or retired device cannot be confirmed (DeviceConflictError)."""

        def target(old: RowMapping, conn: Connection) -> str:
            if old["lifecycle"] == "disabled":
                raise DeviceConflictError(f"device {device_id!r} is disabled: enable it before confirming it")
            return "in_service"

        return self._transition(device_id, target, "confirmed", actor)

    def _transition(
        self,
        device_id: str,
        target: Callable[[RowMapping, Connection], str],
        action: str,
        actor: str,
        *,
        retired_ok: bool = False,
    ) -> Change:
        with write_transaction(self._engine) as conn:
            version = _lock_version(conn)
            old = self._fetch(conn, device_id)
            if old["lifecycle"] == "retired":
                if retired_ok:
                    return Change(_device_from_row(old), False)
                raise DeviceRetiredError(f"device {device_id!r} is retired: nothing can be done with it")
            lifecycle = target(old, conn)
            if lifecycle == old["lifecycle"]:
                return Change(_device_from_row(old), False)
            version += 1
            now = self._clock()
            values: dict[str, Any] = {"lifecycle": lifecycle, "updated_at": now, "version": version}
            if lifecycle == "in_service" and old["in_service_at"] is None:
                values["in_service_at"] = now
            conn.execute(update(devices).where(devices.c.device_id == device_id).values(**values))
            detail = {"from": old["lifecycle"], "to": lifecycle}
            return self._changed(conn, device_id, action, detail, actor, version, now)

    def _changed(
        self,
        conn: Connection,
        device_id: str,
        action: str,
        detail: Mapping[str, Any],
        actor: str,
        version: int,
        now: dt.datetime,
    ) -> Change:
        """After a device's row is written: its history entry, the new registry version, the device now."""
        self._log(conn, [(device_id, action, detail)], actor=actor, version=version, at=now)
        _store_version(conn, version)
        return Change(_device_from_row(self._fetch(conn, device_id)), True)

    @staticmethod
    def _fetch(conn: Connection, device_id: str) -> RowMapping:
        row = conn.execute(select(*_FULL_COLUMNS).where(devices.c.device_id == device_id)).first()
        if row is None:
            raise DeviceNotFoundError(f"device {device_id!r} is not registered")
        return row._mapping

    def note(
        self, device_id: str, action: str, detail: Mapping[str, Any] | None = None, *, actor: str
    ) -> None:
        """Add an entry to a device's history for something done outside the registry (credentials
        issued or rotated); the version does not change."""
        with self._engine.begin() as conn:
            self._log(
                conn, [(device_id, action, dict(detail or {}))], actor=actor, version=None, at=self._clock()
            )

    @staticmethod
    def _log(
        conn: Connection,
        events: Sequence[tuple[str, str, Mapping[str, Any]]],
        *,
        actor: str,
        version: int | None,
        at: dt.datetime,
    ) -> None:
        if events:
            conn.execute(
                insert(device_events),
                [
                    {
                        "device_id": d,
                        "at": at,
                        "action": a,
                        "actor": actor,
                        "version": version,
                        "detail": dict(x),
                    }
                    for d, a, x in events
                ],
            )

    def history(self, device_id: str, *, limit: int = 100) -> builtins.list[DeviceEvent]:
        """The device's history, newest first."""
        stmt = (
            select(device_events)
            .where(device_events.c.device_id == device_id)
            .order_by(device_events.c.id.desc())
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [
                DeviceEvent(**{**row._mapping, "detail": MappingProxyType(row.detail or {})})
                for row in conn.execute(stmt)
            ]

    # -- reading --------------------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceInfo | None:
        stmt = select(*_INFO_COLUMNS).where(devices.c.device_id == device_id)
        return _first(self._engine, stmt, _info_from_row)

    def describe(self, device_id: str) -> RegisteredDevice | None:
        """The full registry row of one device."""
        stmt = select(*_FULL_COLUMNS).where(devices.c.device_id == device_id)
        return _first(self._engine, stmt, _device_from_row)

    def list(
        self,
        *,
        device_type: str | None = None,
        community: str | None = None,
        grid_code: str | None = None,
        lifecycle: str | None = None,
        batch: str | None = None,
        communities: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> builtins.list[RegisteredDevice]:
        """Devices matching all the given filters, by device id. `communities` limits to those (a scope)."""
        stmt = select(*_FULL_COLUMNS).order_by(devices.c.device_id).offset(offset).limit(limit)
        stmt = stmt.where(*_filters(device_type, community, grid_code, lifecycle, batch, communities))
        return _all(self._engine, stmt, _device_from_row)

    def count(
        self,
        *,
        device_type: str | None = None,
        community: str | None = None,
        grid_code: str | None = None,
        lifecycle: str | None = None,
        batch: str | None = None,
        communities: Sequence[str] | None = None,
    ) -> int:
        """How many devices `list` would give without limit."""
        stmt = select(func.count()).select_from(devices)
        stmt = stmt.where(*_filters(device_type, community, grid_code, lifecycle, batch, communities))
        with self._engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def iter_devices(
        self, *, page_size: int = 2000, communities: Sequence[str] | None = None
    ) -> Iterator[RegisteredDevice]:
        """Every device by id, read page by page (a short read per page, so an export does not hold a
        connection or the whole registry in memory)."""
        after: str | None = None
        while True:
            stmt = select(*_FULL_COLUMNS).order_by(devices.c.device_id).limit(page_size)
            stmt = stmt.where(*_filters(None, None, None, None, None, communities))
            if after is not None:
                stmt = stmt.where(devices.c.device_id > after)
            page = _all(self._engine, stmt, _device_from_row)
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].device_id

    def attribute_names(self, *, communities: Sequence[str] | None = None) -> builtins.list[str]:
        """Every attribute name any device has, sorted (the `attr.` columns of an export)."""
        names: set[str] = set()
        stmt = select(devices.c.attributes).where(*_filters(None, None, None, None, None, communities))
        with self._engine.connect() as conn:
            for (attributes,) in conn.execute(stmt.execution_options(yield_per=5000)):
                names.update(attributes or {})
        return sorted(names)

    def export_csv(self, out: IO[str], *, communities: Sequence[str] | None = None) -> int:
        """Write every device in the import format (module docstring); returns how many.

        Importing the file again reports every row unchanged.
        """
        attrs = self.attribute_names(communities=communities)
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*EXPORT_COLUMNS, *(ATTRIBUTE_PREFIX + a for a in attrs)])
        n = 0
        for device in self.iter_devices(communities=communities):
            writer.writerow(export_row(device, attrs))
            n += 1
        return n

    def commissioning(
        self,
        *,
        community: str | None = None,
        batch: str | None = None,
        grid_code: str | None = None,
        device_type: str | None = None,
        communities: Sequence[str] | None = None,
        limit: int = 1000,
    ) -> Commissioning:
        """Counts per lifecycle for the selection, and each device's progress (those not yet in service
        first, never heard from before heard from, then by id; at most `limit`)."""
        where = _filters(device_type, community, grid_code, None, batch, communities)
        d, s = devices, device_state
        joined = d.outerjoin(s, s.c.device_id == d.c.device_id)
        counts_stmt = select(d.c.lifecycle, func.count()).where(*where).group_by(d.c.lifecycle)
        silent_stmt = select(func.count()).select_from(joined).where(*where, s.c.last_seen.is_(None))
        rank = (d.c.lifecycle == "in_service") | (d.c.lifecycle == "retired")
        stmt = (
            select(
                d.c.device_id,
                d.c.device_type,
                d.c.lifecycle,
                d.c.community,
                d.c.grid_code,
                d.c.building,
                d.c.batch,
                s.c.online,
                s.c.last_seen,
                s.c.fw,
                s.c.last_topic,
                s.c.last_payload,
                s.c.seen_fields,
            )
            .select_from(joined)
            .where(*where)
            .order_by(rank, s.c.last_seen.is_not(None), d.c.device_id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            counts = dict.fromkeys(LIFECYCLES, 0)
            counts.update({lc: int(n) for lc, n in conn.execute(counts_stmt)})
            silent = int(conn.execute(silent_stmt).scalar_one())
            rows = conn.execute(stmt).all()
        progress = []
        for r in rows:
            seen = tuple(sorted(r.seen_fields or ()))
            model = THING_MODELS.get(r.device_type)
            required = model.commissioning_fields if model is not None else ()
            progress.append(
                DeviceProgress(
                    device_id=r.device_id,
                    device_type=r.device_type,
                    lifecycle=r.lifecycle,
                    community=r.community,
                    grid_code=r.grid_code,
                    building=r.building,
                    batch=r.batch,
                    online=r.online,
                    last_seen=r.last_seen,
                    fw=r.fw,
                    last_topic=r.last_topic,
                    last_payload=r.last_payload,
                    seen_fields=seen,
                    missing_fields=tuple(f for f in required if f not in seen),
                )
            )
        return Commissioning(
            total=sum(counts.values()), counts=counts, not_heard_from=silent, devices=tuple(progress)
        )

    # -- lifecycle, by the gateway ----------------------------------------------------------------------

    def set_lifecycle(self, device_id: str, lifecycle: Lifecycle, *, actor: str = "registry") -> bool:
        """Move a device to `lifecycle`. Returns False if it was already there (no version bump).

        Raises DeviceNotFoundError, or ValueError for an unknown lifecycle.
        """
        if lifecycle not in LIFECYCLES:
            raise ValueError(f"unknown lifecycle {lifecycle!r}, expected one of {', '.join(LIFECYCLES)}")
        with write_transaction(self._engine) as conn:
            version = _lock_version(conn) + 1
            current = conn.execute(
                select(devices.c.lifecycle).where(devices.c.device_id == device_id)
            ).scalar_one_or_none()
            if current is None:
                raise DeviceNotFoundError(f"device {device_id!r} is not registered")
            if current == lifecycle:
                return False
            now = self._clock()
            conn.execute(
                update(devices)
                .where(devices.c.device_id == device_id)
                .values(lifecycle=lifecycle, updated_at=now, version=version)
            )
            detail = {"from": current, "to": lifecycle}
            self._log(conn, [(device_id, "lifecycle", detail)], actor=actor, version=version, at=now)
            _store_version(conn, version)
            return True

    def mark_online(self, device_ids: Iterable[str]) -> builtins.list[str]:
        """Move the given devices that are still `registered` to `online` (first valid message).

        Returns the ids actually moved. Cheap when there is nothing to do: one read, no lock.
        """
        ids = sorted(set(device_ids))
        if not ids:
            return []
        pending = select(devices.c.device_id).where(
            devices.c.device_id.in_(ids), devices.c.lifecycle == "registered"
        )
        with self._engine.connect() as conn:
            if conn.execute(pending.limit(1)).first() is None:
                return []
        with write_transaction(self._engine) as conn:
            version = _lock_version(conn) + 1
            moved = sorted(conn.execute(pending).scalars())
            if not moved:
                return []
            now = self._clock()
            conn.execute(
                update(devices)
                .where(devices.c.device_id.in_(moved), devices.c.lifecycle == "registered")
                .values(lifecycle="online", updated_at=now, version=version)
            )
            events = [(d, "online", {"from": "registered", "to": "online"}) for d in moved]
            self._log(conn, events, actor="gateway", version=version, at=now)
            _store_version(conn, version)
            return moved

    def mark_in_service(self, device_ids: Iterable[str], *, by: str = "gateway") -> builtins.list[str]:
        """Move devices that are `registered` or `online` to `in_service` (commissioned).

        The gateway calls it once a device has reported its type's commissioning fields; an installer
        calls it to confirm a device by hand. Returns the ids actually moved.
        """
        ids = sorted(set(device_ids))
        if not ids:
            return []
        with write_transaction(self._engine) as conn:
            version = _lock_version(conn) + 1
            pending = select(devices.c.device_id, devices.c.lifecycle).where(
                devices.c.device_id.in_(ids), devices.c.lifecycle.in_(("registered", "online"))
            )
            before = {r.device_id: r.lifecycle for r in conn.execute(pending)}
            moved = sorted(before)
            if not moved:
                return []
            now = self._clock()
            conn.execute(
                update(devices)
                .where(devices.c.device_id.in_(moved), devices.c.lifecycle.in_(("registered", "online")))
                .values(lifecycle="in_service", in_service_at=now, updated_at=now, version=version)
            )
            action = "in_service" if by == "gateway" else "confirmed"
            events = [(d, action, {"from": before[d], "to": "in_service"}) for d in moved]
            self._log(conn, events, actor=by, version=version, at=now)
            _store_version(conn, version)
            return moved

    # -- the gateway's cache ----------------------------------------------------------------------------

    def current_version(self) -> int:
        with self._engine.connect() as conn:
            return int(
                conn.execute(
                    select(registry_version.c.version).where(registry_version.c.id == 1)
                ).scalar_one()
            )

    def changed_since(self, version: int) -> builtins.list[DeviceInfo]:
        """Devices changed after `version` (any lifecycle, so a cache learns of disabled ones too)."""
        stmt = select(*_INFO_COLUMNS).where(devices.c.version > version).order_by(devices.c.version)
        return _all(self._engine, stmt, _info_from_row)

    def load_all(self) -> dict[str, DeviceInfo]:
        with self._engine.connect() as conn:
            return {
                row.device_id: _info_from_row(row._mapping) for row in conn.execute(select(*_INFO_COLUMNS))
            }


def _filters(
    device_type: str | None,
    community: str | None,
    grid_code: str | None,
    lifecycle: str | None,
    batch: str | None,
    communities: Sequence[str] | None,
) -> builtins.list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    for column, value in (
        (devices.c.device_type, device_type),
        (devices.c.community, community),
        (devices.c.grid_code, grid_code),
        (devices.c.lifecycle, lifecycle),
        (devices.c.batch, batch),
    ):
        if value is not None:
            out.append(column == value)
    if communities is not None:
        out.append(devices.c.community.in_(list(communities)))
    return out


EXPORT_COLUMNS: Final = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)


def export_row(device: RegisteredDevice, attribute_names: Sequence[str]) -> builtins.list[str]:
    """A device as a CSV row of EXPORT_COLUMNS then `attr.<name>` columns (empty cell = not set)."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dt.date):
            return value.isoformat()
        return str(value)

    return [cell(getattr(device, c)) for c in EXPORT_COLUMNS] + [
        cell(device.attributes.get(a)) for a in attribute_names
    ]


class RegistryCache:
    """All devices in memory for O(1) lookups on the message path, kept fresh by polling.

    `get` is a plain dict lookup and safe to call from the event loop while `refresh` runs in a
    worker thread: changed entries are assigned one by one (atomic under the GIL), a full reload
    swaps the whole dict. Disabled and retired devices stay in the cache with their lifecycle so
    the gateway can reject their messages with a specific reason.
    """

    def __init__(self, registry: Registry | Engine) -> None:
        self._registry = registry if isinstance(registry, Registry) else Registry(registry)
        self._devices: dict[str, DeviceInfo] = {}
        self._version: int | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> int | None:
        """The registry version the cache reflects (None before the first load)."""
        return self._version

    def get(self, device_id: str) -> DeviceInfo | None:
        return self._devices.get(device_id)

    def __len__(self) -> int:
        return len(self._devices)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def snapshot(self) -> Mapping[str, DeviceInfo]:
        """A read-only view of the cached devices."""
        return MappingProxyType(self._devices)

    def load(self) -> int:
        """Load every device; returns how many."""
        with self._lock:
            return self._load()

    def _load(self) -> int:
        # Read the version before the rows: a change committed in between is then fetched again
        # by the next refresh, never missed.
        version = self._registry.current_version()
        self._devices = self._registry.load_all()
        self._version = version
        return len(self._devices)

    def refresh(self) -> int:
        """Apply the registry changes made since the last load or refresh; returns how many devices
        changed. When nothing changed this costs one single-row query.
        """
        with self._lock:
            if self._version is None:
                return self._load()
            version = self._registry.current_version()
            if version == self._version:
                return 0
            if version < self._version:
                # The database was replaced (restored, recreated): start over.
                return self._load()
            changed = self._registry.changed_since(self._version)
            for info in changed:
                self._devices[info.device_id] = info
            self._version = version
            return len(changed)


# ---------------------------------------------------------------------------------------------
# Places and responsible units

PlaceLevel: TypeAlias = Literal["district", "street", "community", "grid"]
assert get_args(PlaceLevel) == PLACE_LEVELS

#: A place's level by the length of its code (module docstring).
PLACE_CODE_LENGTHS: Final[Mapping[int, str]] = MappingProxyType(
    {6: "district", 9: "street", 12: "community", 14: "grid", 15: "grid"}
)
_PARENT_CODE_LENGTH: Final = {"street": 6, "community": 9, "grid": 12}
_UNIT_ID_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class PlaceExistsError(RegistryError):
    """A place with that code is already registered."""


class PlaceNotFoundError(RegistryError):
    """No place has that code."""


class PlaceParentError(RegistryError):
    """The place's parent (the prefix of its code) is not registered."""


class UnitExistsError(RegistryError):
    """A responsible unit with that id or name is already registered."""


class UnitNotFoundError(RegistryError):
    """No responsible unit has that id."""


def place_level(code: str) -> str:
    """district, street, community or grid by the code's length; ValueError if it is none of them."""
    if not _DIGITS_RE.fullmatch(code) or len(code) not in PLACE_CODE_LENGTHS:
        raise ValueError("must be 6 (district), 9 (street), 12 (community), 15 or 14 (grid) digits")
    return PLACE_CODE_LENGTHS[len(code)]


def parent_place_code(code: str) -> str | None:
    """The code of the place's parent: its code's first 6, 9 or 12 digits (None for a district)."""
    length = _PARENT_CODE_LENGTH.get(place_level(code))
    return None if length is None else code[:length]


class PlaceRecord(BaseModel):
    """A place as an installer or the city enters it. `level` and `parent_code` follow from the code:
    when given they must agree with it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    code: str
    name: str = Field(min_length=1, max_length=128)
    level: PlaceLevel | None = None
    parent_code: str | None = None

    @field_validator("code", mode="before")
    @classmethod
    def _code_as_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("code")
    @classmethod
    def _check_code(cls, value: str) -> str:
        place_level(value)
        return value

    @model_validator(mode="after")
    def _derive(self) -> PlaceRecord:
        level = place_level(self.code)
        if self.level is not None and self.level != level:
            raise ValueError(
                f"code {self.code} is a {level} code ({len(self.code)} digits), not a {self.level}"
            )
        parent = parent_place_code(self.code)
        if self.parent_code is not None and self.parent_code != parent:
            expected = (
                "none (a district has no parent)"
                if parent is None
                else f"{parent}, the code's first {len(parent)} digits"
            )
            raise ValueError(
                f"parent_code {self.parent_code} does not fit code {self.code}: expected {expected}"
            )
        self.level = level  # type: ignore[assignment]
        self.parent_code = parent
        return self


@dataclass(frozen=True, slots=True)
class Place:
    code: str
    level: str
    name: str
    parent_code: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return _slots_as_dict(self, ("created_at", "updated_at"))


def _place_from_row(m: RowMapping) -> Place:
    return Place(**m)


class Places:
    """The place hierarchy (district → street → community → grid) in SQL."""

    def __init__(self, engine: Engine, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def add(self, record: PlaceRecord) -> Place:
        """Register a place; its parent must be registered first (PlaceParentError), its code free
        (PlaceExistsError)."""
        now = self._clock()
        with write_transaction(self._engine) as conn:
            if conn.execute(select(places.c.code).where(places.c.code == record.code)).first() is not None:
                raise PlaceExistsError(f"place {record.code} is already registered")
            if record.parent_code is not None:
                parent = conn.execute(
                    select(places.c.level).where(places.c.code == record.parent_code)
                ).scalar_one_or_none()
                if parent is None:
                    wanted = PLACE_LEVELS[PLACE_LEVELS.index(str(record.level)) - 1]
                    raise PlaceParentError(
                        f"the parent {wanted} {record.parent_code} of {record.level} {record.code} "
                        f"is not registered: add it first"
                    )
            conn.execute(
                insert(places),
                [
                    {
                        "code": record.code,
                        "level": record.level,
                        "name": record.name,
                        "parent_code": record.parent_code,
                        "created_at": now,
                        "updated_at": now,
                    }
                ],
            )
        place = self.get(record.code)
        assert place is not None
        return place

    def get(self, code: str) -> Place | None:
        return _first(self._engine, select(places).where(places.c.code == code), _place_from_row)

    def list(
        self,
        *,
        level: str | None = None,
        parent_code: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> builtins.list[Place]:
        """Places by code (so a parent comes before its children)."""
        stmt = select(places).order_by(places.c.code).offset(offset).limit(limit)
        if level is not None:
            stmt = stmt.where(places.c.level == level)
        if parent_code is not None:
            stmt = stmt.where(places.c.parent_code == parent_code)
        return _all(self._engine, stmt, _place_from_row)


class ResponsibleUnitRecord(BaseModel):
    """A unit that acts on devices (权属/养护单位): a water company, the street, a property manager."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    unit_id: str
    name: str = Field(min_length=1, max_length=128)
    kind: str | None = Field(default=None, max_length=32)
    contact: str | None = Field(default=None, max_length=256)

    @field_validator("unit_id")
    @classmethod
    def _check_unit_id(cls, value: str) -> str:
        if not _UNIT_ID_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("kind", "contact", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


@dataclass(frozen=True, slots=True)
class ResponsibleUnit:
    unit_id: str
    name: str
    kind: str | None
    contact: str | None
    created_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return _slots_as_dict(self, ("created_at",))


def _unit_from_row(m: RowMapping) -> ResponsibleUnit:
    return ResponsibleUnit(**m)


class ResponsibleUnits:
    """Responsible units in SQL. Devices name theirs in `responsible_unit` (the unit's name)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def add(self, record: ResponsibleUnitRecord) -> ResponsibleUnit:
        """Register a unit; its id and its name must both be free (UnitExistsError)."""
        with write_transaction(self._engine) as conn:
            clash = conn.execute(
                select(responsible_units.c.unit_id, responsible_units.c.name).where(
                    (responsible_units.c.unit_id == record.unit_id)
                    | (responsible_units.c.name == record.name)
                )
            ).first()
            if clash is not None:
                what = (
                    f"id {record.unit_id!r}" if clash.unit_id == record.unit_id else f"name {record.name!r}"
                )
                raise UnitExistsError(f"a responsible unit with {what} is already registered")
            conn.execute(insert(responsible_units), [{**record.model_dump(), "created_at": self._clock()}])
        unit = self.get(record.unit_id)
        assert unit is not None
        return unit

    def get(self, unit_id: str) -> ResponsibleUnit | None:
        stmt = select(responsible_units).where(responsible_units.c.unit_id == unit_id)
        return _first(self._engine, stmt, _unit_from_row)

    def list(self, *, kind: str | None = None) -> builtins.list[ResponsibleUnit]:
        stmt = select(responsible_units).order_by(responsible_units.c.unit_id)
        if kind is not None:
            stmt = stmt.where(responsible_units.c.kind == kind)
        return _all(self._engine, stmt, _unit_from_row)
