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
    responsible_unit, component_code                        optional (empty cell = not set)
    attr.<name>                                             one column per attribute, e.g. attr.bay_kind

Attribute values are kept as the text in the cell (an empty cell means the device does not have
that attribute); whoever reads an attribute converts it with its own schema. Unknown columns are a
file error (a typo in the header must not silently drop a column). Row numbers in the report are
spreadsheet rows: the header is row 1, the first device row 2. A row's values replace the device's
place data and attributes entirely; the lifecycle is never changed by an import.
"""

from __future__ import annotations

import builtins
import csv
import datetime as dt
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, Final, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from sqlalchemy import Connection, Engine, RowMapping, bindparam, func, insert, select, update

from devices import THING_MODELS
from gateway.db import LIFECYCLES, devices, registry_version, write_transaction

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
)
ATTRIBUTE_PREFIX: Final = "attr."

_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GRID_CODE_RE: Final = re.compile(r"[0-9]{14,15}")
_COMPONENT_CODE_RE: Final = re.compile(r"[0-9]{16}")
_ATTRIBUTE_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class RegistryError(Exception):
    """Base class of registry errors a caller is expected to handle."""


class DeviceExistsError(RegistryError):
    """The device id is already registered."""


class DeviceNotFoundError(RegistryError):
    """The device id is not registered."""


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
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)

    @field_validator(*OPTIONAL_COLUMNS, mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
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

    @field_validator("component_code")
    @classmethod
    def _check_component_code(cls, value: str | None) -> str | None:
        if value is not None and not _COMPONENT_CODE_RE.fullmatch(value):
            raise ValueError("must be 16 digits")
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
        """JSON-ready: timestamps as RFC 3339 text."""
        out = {name: getattr(self, name) for name in self.__slots__}
        out["attributes"] = dict(self.attributes)
        out["created_at"] = self.created_at.isoformat()
        out["updated_at"] = self.updated_at.isoformat()
        return out


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


def parse_csv(source: CsvSource, *, encoding: str = "utf-8-sig") -> ParsedCsv:
    """Read and validate a device CSV without touching the database (see the module docstring).

    Raises CsvFormatError when the file as a whole is unusable: no header, unknown or duplicate
    columns, a required column missing, not text in `encoding`.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, encoding=encoding, newline="") as f:
            return _parse_csv_stream(f, encoding)
    return _parse_csv_stream(source, encoding)


def _parse_csv_stream(stream: IO[str], encoding: str) -> ParsedCsv:
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
                records.append((row_number, DeviceRecord.model_validate(data)))
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


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _lock_version(conn: Connection) -> int:
    """Read the registry version holding its row lock until the transaction ends."""
    stmt = select(registry_version.c.version).where(registry_version.c.id == 1).with_for_update()
    return int(conn.execute(stmt).scalar_one())


def _store_version(conn: Connection, version: int) -> None:
    conn.execute(update(registry_version).where(registry_version.c.id == 1).values(version=version))


class Registry:
    """The device registry in SQL. Methods are blocking: call them from a worker thread in asyncio."""

    def __init__(self, engine: Engine, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    @property
    def engine(self) -> Engine:
        return self._engine

    def add(self, record: DeviceRecord) -> None:
        """Register one new device (lifecycle `registered`). Raises DeviceExistsError."""
        now = self._clock()
        with write_transaction(self._engine) as conn:
            version = _lock_version(conn) + 1
            exists = conn.execute(
                select(devices.c.device_id).where(devices.c.device_id == record.device_id)
            ).first()
            if exists is not None:
                raise DeviceExistsError(f"device {record.device_id!r} is already registered")
            conn.execute(
                insert(devices),
                [{**record.model_dump(), "created_at": now, "updated_at": now, "version": version}],
            )
            _store_version(conn, version)

    def upsert_many(
        self,
        records: Iterable[DeviceRecord],
        *,
        batch_size: int = 1000,
        progress: ProgressCallback | None = None,
        dry_run: bool = False,
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
        return self._import(unique, errors, batch_size=batch_size, progress=progress, dry_run=dry_run)

    def import_csv(
        self,
        source: CsvSource,
        *,
        dry_run: bool = False,
        batch_size: int = 1000,
        progress: ProgressCallback | None = None,
        encoding: str = "utf-8-sig",
    ) -> ImportReport:
        """Import a device CSV (format in the module docstring). Valid rows are imported even when
        other rows fail; re-importing the same file changes nothing. With `dry_run` the outcomes are
        computed against the database but nothing is written. Raises CsvFormatError for a bad header.
        """
        parsed = parse_csv(source, encoding=encoding)
        return self._import(
            list(parsed.records),
            list(parsed.errors),
            batch_size=batch_size,
            progress=progress,
            dry_run=dry_run,
        )

    def _import(
        self,
        items: Sequence[tuple[int, DeviceRecord]],
        errors: builtins.list[RowResult],
        *,
        batch_size: int,
        progress: ProgressCallback | None,
        dry_run: bool,
    ) -> ImportReport:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        results = list(errors)
        total = len(items)
        version: int | None = None
        for start in range(0, total, batch_size):
            batch = items[start : start + batch_size]
            if dry_run:
                with self._engine.connect() as conn:
                    results.extend(self._classify(conn, batch)[0])
            else:
                with write_transaction(self._engine) as conn:
                    version, written = self._write_batch(conn, batch)
                results.extend(written)
            if progress is not None:
                progress(min(start + batch_size, total), total)
        if not dry_run and version is None:
            version = self.current_version()
        results.sort(key=lambda r: r.row)
        return ImportReport(rows=tuple(results), dry_run=dry_run, version=None if dry_run else version)

    def _classify(
        self, conn: Connection, batch: Sequence[tuple[int, DeviceRecord]]
    ) -> tuple[builtins.list[RowResult], builtins.list[dict[str, Any]], builtins.list[dict[str, Any]]]:
        ids = [record.device_id for _, record in batch]
        stored = {
            row.device_id: row._mapping
            for row in conn.execute(
                select(*(devices.c[name] for name in _RECORD_FIELDS)).where(devices.c.device_id.in_(ids))
            )
        }
        results: list[RowResult] = []
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for row, record in batch:
            values = record.model_dump()
            old = stored.get(record.device_id)
            if old is None:
                inserts.append(values)
                results.append(RowResult(row, record.device_id, "created"))
            elif all(old[name] == values[name] for name in _RECORD_FIELDS):
                results.append(RowResult(row, record.device_id, "unchanged"))
            else:
                updates.append(values)
                results.append(RowResult(row, record.device_id, "updated"))
        return results, inserts, updates

    def _write_batch(
        self, conn: Connection, batch: Sequence[tuple[int, DeviceRecord]]
    ) -> tuple[int, builtins.list[RowResult]]:
        version = _lock_version(conn)
        results, inserts, updates = self._classify(conn, batch)
        if not inserts and not updates:
            return version, results
        version += 1
        now = self._clock()
        if inserts:
            for values in inserts:
                values.update(created_at=now, updated_at=now, version=version)
            conn.execute(insert(devices), inserts)
        if updates:
            for values in updates:
                values.update(match_device_id=values["device_id"], updated_at=now, version=version)
            conn.execute(_UPDATE_DEVICE, updates)
        _store_version(conn, version)
        return version, results

    def get(self, device_id: str) -> DeviceInfo | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(*_INFO_COLUMNS).where(devices.c.device_id == device_id)).first()
        return None if row is None else _info_from_row(row._mapping)

    def describe(self, device_id: str) -> RegisteredDevice | None:
        """The full registry row of one device."""
        with self._engine.connect() as conn:
            row = conn.execute(select(*_FULL_COLUMNS).where(devices.c.device_id == device_id)).first()
        return None if row is None else _device_from_row(row._mapping)

    def list(
        self,
        *,
        device_type: str | None = None,
        community: str | None = None,
        grid_code: str | None = None,
        lifecycle: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> builtins.list[RegisteredDevice]:
        """Devices matching all the given filters, by device id."""
        stmt = select(*_FULL_COLUMNS).order_by(devices.c.device_id).offset(offset).limit(limit)
        for column, value in (
            (devices.c.device_type, device_type),
            (devices.c.community, community),
            (devices.c.grid_code, grid_code),
            (devices.c.lifecycle, lifecycle),
        ):
            if value is not None:
                stmt = stmt.where(column == value)
        with self._engine.connect() as conn:
            return [_device_from_row(row._mapping) for row in conn.execute(stmt)]

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(devices)).scalar_one())

    def set_lifecycle(self, device_id: str, lifecycle: Lifecycle) -> bool:
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
            conn.execute(
                update(devices)
                .where(devices.c.device_id == device_id)
                .values(lifecycle=lifecycle, updated_at=self._clock(), version=version)
            )
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
            conn.execute(
                update(devices)
                .where(devices.c.device_id.in_(moved), devices.c.lifecycle == "registered")
                .values(lifecycle="online", updated_at=self._clock(), version=version)
            )
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
            pending = select(devices.c.device_id).where(
                devices.c.device_id.in_(ids), devices.c.lifecycle.in_(("registered", "online"))
            )
            moved = sorted(conn.execute(pending).scalars())
            if not moved:
                return []
            version = _lock_version(conn) + 1
            now = self._clock()
            conn.execute(
                update(devices)
                .where(devices.c.device_id.in_(moved), devices.c.lifecycle.in_(("registered", "online")))
                .values(lifecycle="in_service", in_service_at=now, updated_at=now, version=version)
            )
            _store_version(conn, version)
            return moved

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
        with self._engine.connect() as conn:
            return [_info_from_row(row._mapping) for row in conn.execute(stmt)]

    def load_all(self) -> dict[str, DeviceInfo]:
        with self._engine.connect() as conn:
            return {
                row.device_id: _info_from_row(row._mapping) for row in conn.execute(select(*_INFO_COLUMNS))
            }


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
