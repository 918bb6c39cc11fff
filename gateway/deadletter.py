"""Dead letters (messages set aside, and why) and device state (online, last seen) in SQL.

Both are written by the gateway in batches from a worker thread; every method here is blocking.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    Engine,
    Insert,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from gateway.db import (
    DEAD_LETTER_DEVICE_ID_LEN,
    DEVICE_TYPE_LEN,
    REASON_LEN,
    TOPIC_LEN,
    UTCDateTime,
    dead_letters,
    device_state,
    devices,
)
from gateway.registry import Registry

DEFAULT_MAX_PAYLOAD_BYTES: Final = 4096
DETAIL_MAX_CHARS: Final = 4000
FW_MAX_CHARS: Final = 64
UNREGISTERED_DEVICE: Final = "unregistered_device"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the gateway set aside: where it came from, the machine reason, a human detail."""

    received_at: dt.datetime
    topic: str
    device_id: str | None
    device_type: str | None
    reason: str
    detail: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter as stored: the payload is cut to the store's bound, `payload_size` is the original."""

    id: int
    received_at: dt.datetime
    topic: str
    device_id: str | None
    device_type: str | None
    reason: str
    detail: str
    payload: bytes
    payload_size: int

    @property
    def truncated(self) -> bool:
        return len(self.payload) < self.payload_size

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; the payload as text when it is UTF-8, and always as base64."""
        return {
            "id": self.id,
            "received_at": self.received_at.isoformat(),
            "topic": self.topic,
            "device_id": self.device_id,
            "device_type": self.device_type,
            "reason": self.reason,
            "detail": self.detail,
            "payload": _as_text(self.payload),
            "payload_base64": base64.b64encode(self.payload).decode("ascii"),
            "payload_size": self.payload_size,
            "truncated": self.truncated,
        }


@dataclass(frozen=True, slots=True)
class UnknownDevice:
    """A device id that publishes but is not registered: the installer's to-do list."""

    device_id: str
    device_type: str | None
    topic: str
    count: int
    first_seen: dt.datetime
    last_seen: dt.datetime
    last_payload: bytes
    last_payload_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_type": self.device_type,
            "topic": self.topic,
            "count": self.count,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "last_payload": _as_text(self.last_payload),
            "last_payload_base64": base64.b64encode(self.last_payload).decode("ascii"),
            "last_payload_size": self.last_payload_size,
        }


def _as_text(payload: bytes) -> str | None:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _clean(text: str, max_chars: int) -> str:
    """Text the database will take: no NUL (PostgreSQL refuses it), no lone surrogates, bounded."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:max_chars]


def _clean_opt(text: str | None, max_chars: int) -> str | None:
    return None if text is None else _clean(text, max_chars)


class DeadLetterStore:
    """Dead letters in SQL, payloads cut to `max_payload_bytes`."""

    def __init__(self, engine: Engine, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        if max_payload_bytes < 0:
            raise ValueError("max_payload_bytes must be >= 0")
        self._engine = engine
        self._max_payload = max_payload_bytes

    def add_many(self, letters: Sequence[DeadLetter]) -> int:
        """Store dead letters in one transaction (one executemany); returns how many.

        Text fields are made safe and cut to their columns, so a hostile topic or detail cannot
        make the batch fail. A naive `received_at` raises ValueError (a programming error).
        """
        if not letters:
            return 0
        rows = [
            {
                "received_at": letter.received_at,
                "topic": _clean(letter.topic, TOPIC_LEN),
                "device_id": _clean_opt(letter.device_id, DEAD_LETTER_DEVICE_ID_LEN),
                "device_type": _clean_opt(letter.device_type, DEVICE_TYPE_LEN),
                "reason": _clean(letter.reason, REASON_LEN),
                "detail": _clean(letter.detail, DETAIL_MAX_CHARS),
                "payload": bytes(letter.payload[: self._max_payload]),
                "payload_size": len(letter.payload),
            }
            for letter in letters
        ]
        with self._engine.begin() as conn:
            conn.execute(insert(dead_letters), rows)
        return len(rows)

    def count_by_reason(self, since: dt.datetime | None = None) -> dict[str, int]:
        """Dead letters per reason (received at or after `since`), most frequent first."""
        n = func.count().label("n")
        stmt = select(dead_letters.c.reason, n).group_by(dead_letters.c.reason).order_by(n.desc())
        if since is not None:
            stmt = stmt.where(dead_letters.c.received_at >= since)
        with self._engine.connect() as conn:
            return {reason: int(count) for reason, count in conn.execute(stmt)}

    def recent(
        self,
        limit: int = 50,
        reason: str | None = None,
        device_id: str | None = None,
        since: dt.datetime | None = None,
    ) -> list[StoredDeadLetter]:
        """The newest dead letters, newest first, optionally of one reason and/or device."""
        stmt = select(dead_letters).order_by(dead_letters.c.received_at.desc(), dead_letters.c.id.desc())
        if reason is not None:
            stmt = stmt.where(dead_letters.c.reason == reason)
        if device_id is not None:
            stmt = stmt.where(dead_letters.c.device_id == device_id)
        if since is not None:
            stmt = stmt.where(dead_letters.c.received_at >= since)
        with self._engine.connect() as conn:
            return [StoredDeadLetter(**row._mapping) for row in conn.execute(stmt.limit(limit))]

    def unknown_devices(self, since: dt.datetime | None = None, *, limit: int = 1000) -> list[UnknownDevice]:
        """Device ids rejected as `unregistered_device` (since `since`) that are still not registered,
        with their topic, type and payload of the latest message and how many were set aside.
        Most active first.
        """
        dl = dead_letters
        ranked = (
            select(
                dl.c.device_id,
                dl.c.device_type,
                dl.c.topic,
                dl.c.payload,
                dl.c.payload_size,
                dl.c.received_at,
                func.count().over(partition_by=dl.c.device_id).label("n"),
                func.min(dl.c.received_at).over(partition_by=dl.c.device_id).label("first_seen"),
                func.row_number()
                .over(partition_by=dl.c.device_id, order_by=(dl.c.received_at.desc(), dl.c.id.desc()))
                .label("rn"),
            )
            .where(
                dl.c.reason == UNREGISTERED_DEVICE,
                dl.c.device_id.is_not(None),
                ~exists().where(devices.c.device_id == dl.c.device_id),
            )
            .where(*([dl.c.received_at >= since] if since is not None else []))
            .subquery()
        )
        stmt = (
            select(ranked)
            .where(ranked.c.rn == 1)
            .order_by(ranked.c.n.desc(), ranked.c.device_id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [
                UnknownDevice(
                    device_id=row.device_id,
                    device_type=row.device_type,
                    topic=row.topic,
                    count=int(row.n),
                    first_seen=row.first_seen,
                    last_seen=row.received_at,
                    last_payload=row.payload,
                    last_payload_size=row.payload_size,
                )
                for row in conn.execute(stmt)
            ]

    def prune(self, before: dt.datetime) -> int:
        """Delete dead letters received before `before`; returns how many."""
        with self._engine.begin() as conn:
            return conn.execute(delete(dead_letters).where(dead_letters.c.received_at < before)).rowcount


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """Liveness seen in one or more messages of a device.

    `online` None means "no statement" (the message said nothing about it). A status message's
    `online` wins over older ones; `seen_at` only ever moves last_seen forward.
    """

    device_id: str
    online: bool | None
    seen_at: dt.datetime
    fw: str | None
    is_status_message: bool
    seq: int | None = None
    last_topic: str | None = None
    last_payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class DeviceState:
    device_id: str
    online: bool | None
    last_seen: dt.datetime | None
    last_status_at: dt.datetime | None
    fw: str | None
    last_seq: int | None
    last_topic: str | None = None
    last_payload: bytes | None = None
    seen_fields: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "online": self.online,
            "last_seen": None if self.last_seen is None else self.last_seen.isoformat(),
            "last_status_at": None if self.last_status_at is None else self.last_status_at.isoformat(),
            "fw": self.fw,
            "last_seq": self.last_seq,
            "last_topic": self.last_topic,
            "last_payload": None
            if self.last_payload is None
            else self.last_payload.decode("utf-8", "replace"),
            "seen_fields": self.seen_fields,
        }


@dataclass(frozen=True, slots=True)
class OnlineCounts:
    """Devices of one type (retired ones excluded) by what their last status said."""

    online: int
    offline: int
    unknown: int  # never reported a status


def _merge(updates: Iterable[StatusUpdate]) -> list[dict[str, Any]]:
    """Coalesce a batch to one row per device (a device may appear many times in a flush)."""
    merged: dict[str, dict[str, Any]] = {}
    for u in updates:
        m = merged.get(u.device_id)
        if m is None:
            m = merged[u.device_id] = {
                "device_id": u.device_id,
                "last_seen": u.seen_at,
                "online": None,
                "online_at": None,
                "last_status_at": None,
                "fw": None,
                "fw_at": None,
                "last_seq": None,
                "seq_at": None,
                "last_topic": u.last_topic,
                "last_payload": u.last_payload,
            }
        elif u.seen_at > m["last_seen"]:
            m["last_seen"] = u.seen_at
            if u.last_topic is not None:
                m["last_topic"], m["last_payload"] = u.last_topic, u.last_payload
        if u.online is not None and (m["online_at"] is None or u.seen_at >= m["online_at"]):
            m["online"], m["online_at"] = u.online, u.seen_at
        if u.is_status_message and (m["last_status_at"] is None or u.seen_at > m["last_status_at"]):
            m["last_status_at"] = u.seen_at
        if u.fw is not None and (m["fw_at"] is None or u.seen_at >= m["fw_at"]):
            m["fw"], m["fw_at"] = _clean(u.fw, FW_MAX_CHARS), u.seen_at
        if u.seq is not None and (m["seq_at"] is None or u.seen_at >= m["seq_at"]):
            m["last_seq"], m["seq_at"] = u.seq, u.seen_at
    # One lock order for every writer, so two gateway processes cannot deadlock on PostgreSQL.
    return [merged[k] for k in sorted(merged)]


def _newer(at: ColumnElement[Any], than: ColumnElement[Any]) -> ColumnElement[bool]:
    return or_(than.is_(None), at >= than)


class DeviceStateStore:
    """Per-device liveness: online flag, last seen, last status, firmware, last sequence number."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._upsert = self._build_upsert(engine.dialect.name)

    @staticmethod
    def _build_upsert(dialect_name: str) -> Insert:
        ds = device_state
        stmt: postgresql.Insert | sqlite.Insert
        if dialect_name == "postgresql":
            stmt = postgresql.insert(ds)
        elif dialect_name == "sqlite":
            stmt = sqlite.insert(ds)
        else:
            raise NotImplementedError(f"device state upsert is not written for {dialect_name}")
        new = stmt.excluded
        online_at = bindparam("online_at", type_=UTCDateTime())
        fw_at = bindparam("fw_at", type_=UTCDateTime())
        seq_at = bindparam("seq_at", type_=UTCDateTime())
        last_is_newer = and_(new.last_topic.is_not(None), _newer(new.last_seen, ds.c.last_seen))
        return stmt.on_conflict_do_update(
            index_elements=[ds.c.device_id],
            set_={
                "last_seen": case(
                    (_newer(new.last_seen, ds.c.last_seen), new.last_seen), else_=ds.c.last_seen
                ),
                "online": case(
                    (and_(new.online.is_not(None), _newer(online_at, ds.c.last_status_at)), new.online),
                    else_=ds.c.online,
                ),
                "last_status_at": case(
                    (
                        and_(
                            new.last_status_at.is_not(None), _newer(new.last_status_at, ds.c.last_status_at)
                        ),
                        new.last_status_at,
                    ),
                    else_=ds.c.last_status_at,
                ),
                "fw": case(
                    (and_(new.fw.is_not(None), _newer(fw_at, ds.c.last_status_at)), new.fw), else_=ds.c.fw
                ),
                "last_seq": case(
                    (and_(new.last_seq.is_not(None), _newer(seq_at, ds.c.last_seen)), new.last_seq),
                    else_=ds.c.last_seq,
                ),
                # what the device sent last, for the installer: newest wins (SET sees the old row)
                "last_topic": case((last_is_newer, new.last_topic), else_=ds.c.last_topic),
                "last_payload": case((last_is_newer, new.last_payload), else_=ds.c.last_payload),
            },
        )

    def add_seen_fields(self, fields: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
        """Union newly seen telemetry field names into each device's record; returns the new sets.

        Called only for devices still being commissioned, so it stays off the steady-state path.
        """
        if not fields:
            return {}
        ids = sorted(fields)
        out: dict[str, frozenset[str]] = {}
        with self._engine.begin() as conn:
            query = select(device_state.c.device_id, device_state.c.seen_fields).where(
                device_state.c.device_id.in_(ids)
            )
            stored = {row[0]: row[1] for row in conn.execute(query)}
            for device_id in ids:
                if device_id not in stored:
                    continue  # no liveness row yet: record_many writes it first
                before = frozenset(stored[device_id] or ())
                after = before | frozenset(fields[device_id])
                out[device_id] = after
                if after != before:
                    conn.execute(
                        update(device_state)
                        .where(device_state.c.device_id == device_id)
                        .values(seen_fields=sorted(after))
                    )
        return out

    def record_many(self, updates: Sequence[StatusUpdate]) -> int:
        """Upsert liveness for a batch; returns the number of devices written.

        last_seen only moves forward; online/fw follow the newest statement that is not older
        than the last status message stored (a late, out-of-order message does not flip it back).
        """
        rows = _merge(updates)
        if not rows:
            return 0
        with self._engine.begin() as conn:
            conn.execute(self._upsert, rows)
        return len(rows)

    def get(self, device_id: str) -> DeviceState | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(device_state).where(device_state.c.device_id == device_id)).first()
        return None if row is None else DeviceState(**row._mapping)

    def online_counts(self) -> dict[str, OnlineCounts]:
        """Per device type: registered devices (not retired) online, offline, never reported."""
        ds, d = device_state, devices
        online = func.sum(case((ds.c.online.is_(True), 1), else_=0))
        offline = func.sum(case((ds.c.online.is_(False), 1), else_=0))
        stmt = (
            select(d.c.device_type, online, offline, func.count())
            .select_from(d.outerjoin(ds, ds.c.device_id == d.c.device_id))
            .where(d.c.lifecycle != "retired")
            .group_by(d.c.device_type)
            .order_by(d.c.device_type)
        )
        with self._engine.connect() as conn:
            return {
                device_type: OnlineCounts(
                    int(on or 0), int(off or 0), int(total) - int(on or 0) - int(off or 0)
                )
                for device_type, on, off, total in conn.execute(stmt)
            }

    def mark_online(self, device_ids: Iterable[str]) -> list[str]:
        """Move devices still `registered` to `online` (their first valid message arrived), bumping the
        registry version; returns the ids moved. Cheap when none of them is still `registered`.
        """
        return Registry(self._engine).mark_online(device_ids)
