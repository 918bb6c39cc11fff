"""SQL schema of the registry, device state and dead letters; engines and migrations."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Date,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import DateTime, TypeDecorator

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

LIFECYCLES: Final = ("registered", "online", "in_service", "disabled", "retired")

DEVICE_ID_LEN: Final = 64
DEVICE_TYPE_LEN: Final = 32
GRID_CODE_LEN: Final = 15
COMPONENT_CODE_LEN: Final = 16
TOPIC_LEN: Final = 512
REASON_LEN: Final = 40
# Dead letters keep whatever device id the topic carried, valid or not, so the column is wider
# than a valid id: the reason for the dead letter may be that very id.
DEAD_LETTER_DEVICE_ID_LEN: Final = 128

DEFAULT_SQLITE_BUSY_TIMEOUT_MS: Final = 10_000

# Execution option that makes the next transaction on a SQLite connection take the write lock at
# BEGIN (BEGIN IMMEDIATE), so a read-then-write transaction cannot fail half-way on a lock upgrade.
_SQLITE_BEGIN_OPTION: Final = "sc_sqlite_begin"

# Key of pg_advisory_xact_lock taken while migrating, so two processes starting together do not
# both try to create the schema. Any constant works; this one spells "scgw".
_PG_MIGRATION_LOCK_KEY: Final = 0x73636777


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the database stores.

    SQLite has no timestamp type: values are stored as fixed-width UTC text, which keeps them
    ordered and comparable in SQL (MAX, >, CASE). Naive datetimes are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


# JSONB on PostgreSQL so attribute values compare and index by value, plain JSON text elsewhere.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
AutoIncrementId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(DEVICE_ID_LEN), primary_key=True),
    Column("device_type", String(DEVICE_TYPE_LEN), nullable=False),
    Column("district", String(128)),
    Column("street", String(128)),
    Column("community", String(128)),
    Column("grid_code", String(GRID_CODE_LEN)),
    Column("building", String(128)),
    Column("address", String(256)),
    Column("lat", Float),
    Column("lon", Float),
    Column("responsible_unit", String(128)),
    Column("component_code", String(COMPONENT_CODE_LEN)),
    Column("attributes", JSONDocument, nullable=False, default=dict),
    Column("lifecycle", String(16), nullable=False, default="registered", server_default="registered"),
    Column("install_date", Date),
    Column("firmware", String(64)),
    Column("batch", String(64)),
    Column("in_service_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The registry_version value of the transaction that last changed this row.
    Column("version", BigInteger, nullable=False),
    CheckConstraint("lifecycle IN ({})".format(", ".join(f"'{x}'" for x in LIFECYCLES)), name="lifecycle"),
    Index(None, "device_type"),
    Index(None, "community"),
    Index(None, "grid_code"),
    # street and district scopes (viewers), migration 0008
    Index(None, "street"),
    Index(None, "district"),
    Index(None, "version"),
    Index(None, "batch"),
)

# One row, bumped in the same transaction as any change to `devices`: readers poll it to learn
# cheaply whether anything changed, then fetch only rows with a larger `devices.version`.
registry_version = Table(
    "registry_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("id = 1", name="single_row"),
)

# No foreign key to devices on purpose: recording state must never fail because of a registry
# change racing the gateway's batch.
device_state = Table(
    "device_state",
    metadata,
    Column("device_id", String(DEVICE_ID_LEN), primary_key=True),
    Column("online", Boolean),
    Column("last_seen", UTCDateTime),
    Column("last_status_at", UTCDateTime),
    Column("fw", String(64)),
    Column("last_seq", BigInteger),
    Column("last_topic", String(TOPIC_LEN)),
    Column("last_payload", LargeBinary),
    Column("seen_fields", JSONDocument),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", AutoIncrementId, primary_key=True, autoincrement=True),
    Column("received_at", UTCDateTime, nullable=False),
    Column("topic", String(TOPIC_LEN), nullable=False),
    Column("device_id", String(DEAD_LETTER_DEVICE_ID_LEN)),
    Column("device_type", String(DEVICE_TYPE_LEN)),
    Column("reason", String(REASON_LEN), nullable=False),
    Column("detail", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("payload_size", Integer, nullable=False),
    Index(None, "received_at"),
    Index(None, "device_id"),
    Index(None, "reason"),
)


class SchemaNotCurrentError(RuntimeError):
    """The database schema is not at the latest migration."""


def make_engine(
    url: str,
    *,
    echo: bool = False,
    sqlite_busy_timeout_ms: int = DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
    pool_size: int = 5,
    max_overflow: int = 10,
) -> Engine:
    """Create an engine configured for this project's access pattern.

    SQLite: WAL (readers never block the writer), a busy timeout, foreign keys on, and
    SQLAlchemy-controlled BEGIN so SELECTs are inside the transaction and DDL is transactional.
    The parent directory of a SQLite file is created. `sqlite://` (memory) shares one connection
    across threads so a worker thread sees the same database.

    PostgreSQL: a bounded pool with pre-ping and recycling, so a restarted server costs one failed
    checkout, not a stuck gateway.
    """
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        return _make_sqlite_engine(url, echo=echo, busy_timeout_ms=sqlite_busy_timeout_ms)
    kwargs: dict[str, Any] = {}
    if sa_url.get_backend_name() == "postgresql":
        kwargs = {
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_pre_ping": True,
            "pool_recycle": 1800,
            "pool_timeout": 30,
        }
        connect_args: dict[str, Any] = {}
        if sa_url.get_driver_name() in ("psycopg", "psycopg2") and "application_name" not in sa_url.query:
            connect_args["application_name"] = "sc-gateway"
        if sa_url.get_driver_name() == "psycopg":
            # psycopg 3 prepares a statement after 5 runs, and PostgreSQL may then keep a generic
            # plan made while a table was small: a bulk import into a fresh table then scans the
            # whole table per batch (measured: 100k rows 40 s instead of 10 s). Unprepared
            # statements also keep working behind PgBouncer in transaction mode.
            connect_args["prepare_threshold"] = None
        kwargs["connect_args"] = connect_args
    return create_engine(url, echo=echo, **kwargs)


def _make_sqlite_engine(url: str, *, echo: bool, busy_timeout_ms: int) -> Engine:
    sa_url = make_url(url)
    database = sa_url.database or ""
    in_memory = database in ("", ":memory:") or sa_url.query.get("mode") == "memory"
    kwargs: dict[str, Any] = {}
    if in_memory:
        kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    elif not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                # In WAL mode NORMAL is still corruption-safe; a power cut may lose the last commits.
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that intends to write, committed on success and rolled back on error.

    On SQLite it begins with BEGIN IMMEDIATE so it holds the write lock from its first statement
    (waiting up to busy_timeout for it); on other databases it is an ordinary transaction.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        with conn.begin():
            yield conn


def migrate(url: str, *, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision` (default: the latest). Running it again is a no-op.

    The whole upgrade is one transaction on both SQLite and PostgreSQL, and concurrent callers are
    serialised (BEGIN IMMEDIATE / an advisory lock).
    """
    engine = make_engine(url)
    try:
        migrate_engine(engine, revision=revision)
    finally:
        engine.dispose()


def migrate_engine(engine: Engine, *, revision: str = "head") -> None:
    """`migrate` with an existing engine (needed for `sqlite://` in-memory databases)."""
    cfg = _alembic_config()
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def make_revision(url: str, message: str, *, autogenerate: bool = True, rev_id: str | None = None) -> str:
    """Write a new migration script into gateway/migrations/versions; returns its path.

    With `autogenerate`, the script holds the difference between `metadata` and the database at
    `url`, which must be at the latest revision. Always read and edit the generated script.
    """
    engine = make_engine(url)
    try:
        cfg = _alembic_config()
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            script = command.revision(cfg, message=message, autogenerate=autogenerate, rev_id=rev_id)
    finally:
        engine.dispose()
    if script is None or isinstance(script, list):
        raise RuntimeError("alembic did not write exactly one revision")
    return str(script.path)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The latest revision shipped with this package."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def require_current_schema(engine: Engine) -> None:
    """Raise SchemaNotCurrentError unless the database is at the latest migration (a start-up check)."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        state = "has never been migrated" if current is None else f"is at revision {current}"
        raise SchemaNotCurrentError(
            f"database {where} {state}, this version needs {head}: run `sc-gateway db migrate`"
        )


def _alembic_config() -> Config:
    # No alembic.ini: the script location is this package's folder, so it works installed and
    # from any working directory.
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


PLACE_LEVELS: Final = ("district", "street", "community", "grid")

# The place hierarchy (district → street → community → grid), each level by its code:
# district 6 digits (GB/T 2260), street 9, community 12, grid 15 (or a 14-digit legacy code).
places = Table(
    "places",
    metadata,
    Column("code", String(GRID_CODE_LEN), primary_key=True),
    Column("level", String(16), nullable=False),
    Column("name", String(128), nullable=False),
    Column("parent_code", String(GRID_CODE_LEN)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("level IN ({})".format(", ".join(f"'{x}'" for x in PLACE_LEVELS)), name="level"),
    Index(None, "parent_code"),
    Index(None, "level"),
)

# Units that act on devices (权属/养护单位): referenced by devices.responsible_unit (name) for now.
responsible_units = Table(
    "responsible_units",
    metadata,
    Column("unit_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("kind", String(32)),
    Column("contact", String(256)),
    Column("created_at", UTCDateTime, nullable=False),
)

API_ROLES: Final = ("admin", "installer", "manager", "viewer", "incident_system")

# Machine and person credentials for the API. The secret is kept only as a SHA-256 hash; key_id is
# the public prefix of the key, so a key can be listed and revoked without knowing its secret.
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("role", String(32), nullable=False),
    Column("scope", JSONDocument, nullable=False, default=dict),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
    CheckConstraint("role IN ({})".format(", ".join(f"'{x}'" for x in API_ROLES)), name="role"),
)

# A device's history (全程留痕): every registry change and credential operation, by whom, at which
# registry version. No foreign key: the history of a device outlives nothing but is never in the way.
device_events = Table(
    "device_events",
    metadata,
    Column("id", AutoIncrementId, primary_key=True, autoincrement=True),
    Column("device_id", String(DEVICE_ID_LEN), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("action", String(32), nullable=False),
    Column("actor", String(128)),
    Column("version", BigInteger),
    Column("detail", JSONDocument, nullable=False, default=dict),
    Index(None, "device_id"),
)

ALARM_STATES: Final = ("open", "cleared")
RULE_ID_LEN: Final = 96
ALARM_KEY_LEN: Final = 192

# Alarms of the rules stage (gateway/evaluate.py), for the incidents stage and people. One row per alarm
# occurrence from open to clear; at most one open row per (rule, key), enforced by a partial unique index.
# `alarm_key` is the device id, or a group key for group rules (device_id then NULL).
alarms = Table(
    "alarms",
    metadata,
    Column("id", AutoIncrementId, primary_key=True, autoincrement=True),
    Column("rule_id", String(RULE_ID_LEN), nullable=False),
    Column("alarm_key", String(ALARM_KEY_LEN), nullable=False),
    Column("device_id", String(DEVICE_ID_LEN)),
    Column("device_type", String(DEVICE_TYPE_LEN), nullable=False),
    Column("community", String(128)),
    Column("grid_code", String(GRID_CODE_LEN)),
    Column("state", String(8), nullable=False),
    Column("urgency", String(2), nullable=False),
    Column("change", String(16), nullable=False),
    Column("occurrences", Integer, nullable=False),
    Column("flapping", Boolean, nullable=False),
    Column("opened_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("cleared_at", UTCDateTime),
    Column("evidence", JSONDocument, nullable=False),
    Column("message_zh", Text, nullable=False),
    Column("message_en", Text, nullable=False),
    Column("members", JSONDocument, nullable=False),
    # the device was not in service (still being commissioned) when the alarm opened
    Column("commissioning_noise", Boolean, nullable=False),
    CheckConstraint("state IN ({})".format(", ".join(f"'{x}'" for x in ALARM_STATES)), name="state"),
    Index(
        "uq_alarms_open_rule_key",
        "rule_id",
        "alarm_key",
        unique=True,
        sqlite_where=text("state = 'open'"),
        postgresql_where=text("state = 'open'"),
    ),
    Index(None, "state", "community"),
    Index(None, "device_id"),
    Index(None, "opened_at"),
)

INCIDENT_STATUSES: Final = ("open", "resolved")
INCIDENT_ID_LEN: Final = 32
DEDUP_KEY_LEN: Final = ALARM_KEY_LEN + 1 + RULE_ID_LEN
OUTBOX_STATES: Final = ("pending", "delivered", "failed", "disabled", "held")
ENDPOINT_LEN: Final = 512

# Governance incidents (incidents/, incident-delivery v1): the latest state of each incident, its JSON
# (`data`, as the case system receives it) beside the columns people filter on. At most one open
# incident per dedup key, enforced by a partial unique index.
incidents = Table(
    "incidents",
    metadata,
    Column("incident_id", String(INCIDENT_ID_LEN), primary_key=True),
    Column("dedup_key", String(DEDUP_KEY_LEN), nullable=False),
    Column("rule_id", String(RULE_ID_LEN), nullable=False),
    Column("status", String(16), nullable=False),
    Column("urgency", String(2), nullable=False),
    # raised while the device was not in service: kept, never delivered
    Column("commissioning", Boolean, nullable=False),
    # the device's community (data.location.community), for a manager's scope (migration 0006)
    Column("community", String(128)),
    # the rest of its place and its device, for scopes, filters and counts (migration 0008): copies of
    # data.location.* and data.device.* (device_id is null for an incident on a group of devices)
    Column("district", String(128)),
    Column("street", String(128)),
    Column("grid_code", String(GRID_CODE_LEN)),
    Column("building", String(128)),
    Column("device_id", String(DEVICE_ID_LEN)),
    Column("device_type", String(DEVICE_TYPE_LEN)),
    # when it was first acknowledged (data.acknowledged_at), for counts by status (migration 0008)
    Column("acknowledged_at", UTCDateTime),
    Column("data", JSONDocument, nullable=False),
    Column("opened_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime),
    CheckConstraint("status IN ({})".format(", ".join(f"'{x}'" for x in INCIDENT_STATUSES)), name="status"),
    Index(
        "uq_incidents_open_dedup_key",
        "dedup_key",
        unique=True,
        sqlite_where=text("status = 'open'"),
        postgresql_where=text("status = 'open'"),
    ),
    Index(None, "dedup_key"),
    Index(None, "status", "urgency"),
    Index(None, "opened_at"),
    # a place (or device) with the status and urgency, so that SQLite without statistics prefers it to
    # (status, urgency) for a scope's listing in urgency order (bench/manager_api_bench.py); migration 0008
    Index(None, "community", "status", "urgency"),
    Index(None, "district", "status", "urgency"),
    Index(None, "street", "status", "urgency"),
    Index(None, "building", "status", "urgency"),
    Index(None, "device_id", "status", "urgency"),
    Index(None, "grid_code", "device_type", "status"),
    Index(None, "device_type", "status"),
    Index(None, "status", "resolved_at"),
)

# Append-only history of every incident change and who made it: `rule:<id>`, `device:<id>`, `user:<...>`
# or `incident_system`. `change` holds the whole incident for `opened`, else {field: [old, new]}.
incident_history = Table(
    "incident_history",
    metadata,
    Column("id", AutoIncrementId, primary_key=True, autoincrement=True),
    Column("incident_id", String(INCIDENT_ID_LEN), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("actor", String(160), nullable=False),
    Column("change", JSONDocument, nullable=False),
    Index(None, "incident_id"),
)

# The last sequence number given out per local (UTC+8) date: INC-YYYYMMDD-NNNNNN.
incident_counters = Table(
    "incident_counters",
    metadata,
    Column("local_date", Date, primary_key=True),
    Column("last_seq", Integer, nullable=False),
)

# The transactional outbox: one row per (incident change, endpoint), written in the transaction of the
# change. `event_id` is the CloudEvents id and webhook-id (the same on every retry); `body` is the exact JSON
# sent; `seq` orders the events of one incident (delivered in that order per endpoint).
outbox = Table(
    "outbox",
    metadata,
    Column("id", AutoIncrementId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("incident_id", String(INCIDENT_ID_LEN), nullable=False),
    Column("endpoint", String(ENDPOINT_LEN), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime),
    # when a re-send or a re-enabled endpoint started its retry window anew (migration 0006); the window
    # (SC_DELIVERY_RETRY_HOURS) runs from this, else from created_at
    Column("retry_from", UTCDateTime),
    CheckConstraint("state IN ({})".format(", ".join(f"'{x}'" for x in OUTBOX_STATES)), name="state"),
    UniqueConstraint("incident_id", "endpoint", "seq"),
    Index(None, "endpoint", "state", "next_attempt_at"),
)

# Incident-system endpoints that answered 410 Gone: no delivery goes there until an operator re-enables it
# (`sc-gateway deliveries enable NAME`); their new outbox rows are written `disabled`, to be re-sent then.
ENDPOINT_NAME_LEN: Final = 64
delivery_endpoints = Table(
    "delivery_endpoints",
    metadata,
    Column("name", String(ENDPOINT_NAME_LEN), primary_key=True),
    Column("disabled_at", UTCDateTime),
    Column("disabled_reason", Text),
    Column("updated_at", UTCDateTime, nullable=False),
)

# What the incident system reported of a case (back-channel): dispatched, in_progress, closed, false_alarm.
# `report_id`, when the reporter gives one, makes a repeated report a no-op.
REPORT_STATUSES: Final = ("dispatched", "in_progress", "closed", "false_alarm")
incident_reports = Table(
    "incident_reports",
    metadata,
    Column("id", AutoIncrementId, primary_key=True, autoincrement=True),
    Column("incident_id", String(INCIDENT_ID_LEN), nullable=False),
    Column("report_id", String(128), unique=True),
    Column("status", String(16), nullable=False),
    Column("case_id", String(128)),
    Column("note", Text),
    Column("actor", String(160), nullable=False),
    Column("reported_at", UTCDateTime, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    CheckConstraint("status IN ({})".format(", ".join(f"'{x}'" for x in REPORT_STATUSES)), name="status"),
    Index(None, "incident_id"),
)

# False alarms reported by the incident system, counted per rule and device ('' for a group incident),
# for whoever tunes the rules.
false_alarms = Table(
    "false_alarms",
    metadata,
    Column("rule_id", String(RULE_ID_LEN), primary_key=True),
    Column("device_id", String(DEVICE_ID_LEN), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("last_at", UTCDateTime, nullable=False),
    Column("last_incident_id", String(INCIDENT_ID_LEN), nullable=False),
)

# Alarms closed from outside the rules process (a case closed by the incident system): the rules process
# resolves them in its engine (rules.engine.Engine.resolve) and sets done_at.
alarm_resolutions = Table(
    "alarm_resolutions",
    metadata,
    Column("id", AutoIncrementId, primary_key=True, autoincrement=True),
    Column("rule_id", String(RULE_ID_LEN), nullable=False),
    Column("alarm_key", String(ALARM_KEY_LEN), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("requested_at", UTCDateTime, nullable=False),
    Column("done_at", UTCDateTime),
    Index(None, "done_at"),
)

USERNAME_LEN: Final = 64

# People who log in to the API (property managers, grid members, the command centre, installers, admins).
# Machines keep using api_keys. `scope` is the same JSON as an API key's; `password_hash` is
# `scrypt$<n>$<r>$<p>$<salt>$<hash>` (api/auth.py), never the password.
users = Table(
    "users",
    metadata,
    Column("username", String(USERNAME_LEN), primary_key=True),
    Column("display_name", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("scope", JSONDocument, nullable=False, default=dict),
    Column("password_hash", String(256), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("last_login_at", UTCDateTime),
    CheckConstraint("role IN ({})".format(", ".join(f"'{x}'" for x in API_ROLES)), name="role"),
)

# A person's login sessions: the bearer token is 256 random bits, kept only as its SHA-256 (like an API
# key's secret), with a fixed expiry; logging out, a new password or disabling the user revokes them.
user_tokens = Table(
    "user_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("username", String(USERNAME_LEN), ForeignKey("users.username"), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
    Index(None, "username"),
    Index(None, "expires_at"),
)
