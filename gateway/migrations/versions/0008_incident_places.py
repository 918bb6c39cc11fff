"""Incidents get the columns managers and viewers filter and count on, beside `community` (0006):
district, street, grid code, building (the device's place), device id and device type, each indexed
with the status, and when it was first acknowledged, filled in from the incidents' JSON. A street or
district viewer's scope and the board's grid/building/type filters become index lookups instead of
reading every incident's JSON; counts by status need no JSON either. Also: incidents by (status,
resolved_at) for "resolved since", devices by street and by district.

Revision ID: 0008_incident_places
Revises: 0007_users
Create Date: 2026-11-21
"""

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008_incident_places"
down_revision: str | Sequence[str] | None = "0007_users"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (column, its type, where it is in the incident's JSON)
_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any], tuple[str, str]], ...] = (
    ("district", sa.String(128), ("location", "district")),
    ("street", sa.String(128), ("location", "street")),
    ("grid_code", sa.String(15), ("location", "grid_code")),
    ("building", sa.String(128), ("location", "building")),
    ("device_id", sa.String(64), ("device", "id")),
    ("device_type", sa.String(32), ("device", "type")),
)
_PLACE_INDEXES = ("community", "district", "street", "building", "device_id")
_BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        for name, type_, _ in _COLUMNS:
            batch.add_column(sa.Column(name, type_))
        batch.add_column(sa.Column("acknowledged_at", sa.DateTime(timezone=True)))
    # A place (or device) with the status and the urgency: SQLite without statistics then prefers it to
    # (status, urgency) for a scope's listing in urgency order (measured: bench/manager_api_bench.py).
    op.drop_index(op.f("ix_incidents_community_status"), table_name="incidents")
    for name in _PLACE_INDEXES:
        op.create_index(op.f(f"ix_incidents_{name}_status_urgency"), "incidents", [name, "status", "urgency"])
    op.create_index(
        op.f("ix_incidents_grid_code_device_type_status"), "incidents", ["grid_code", "device_type", "status"]
    )
    op.create_index(op.f("ix_incidents_device_type_status"), "incidents", ["device_type", "status"])
    # counts of incidents resolved since a time; devices by street or district (viewers' scopes)
    op.create_index(op.f("ix_incidents_status_resolved_at"), "incidents", ["status", "resolved_at"])
    op.create_index(op.f("ix_devices_street"), "devices", ["street"])
    op.create_index(op.f("ix_devices_district"), "devices", ["district"])
    # Fill the columns from each incident's JSON, in Python so that SQLite and PostgreSQL read it alike.
    bind = op.get_bind()
    table = sa.table(
        "incidents",
        sa.column("incident_id", sa.String(32)),
        sa.column("data", sa.JSON()),
        *(sa.column(name, type_) for name, type_, _ in _COLUMNS),
        sa.column("acknowledged_at", sa.DateTime(timezone=True)),
    )
    last = ""
    while True:
        rows = bind.execute(
            sa.select(table.c.incident_id, table.c.data)
            .where(table.c.incident_id > last)
            .order_by(table.c.incident_id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        for incident_id, data in rows:
            doc = data if isinstance(data, dict) else {}
            values: dict[str, object] = {}
            for name, _, (part, key) in _COLUMNS:
                section = doc.get(part)
                value = section.get(key) if isinstance(section, dict) else None
                values[name] = None if value is None else str(value)
            acked = doc.get("acknowledged_at")
            when = _utc(acked) if isinstance(acked, str) else None
            # stored as gateway.db.UTCDateTime stores it: naive UTC on SQLite
            sqlite = bind.dialect.name == "sqlite"
            values["acknowledged_at"] = when.replace(tzinfo=None) if when and sqlite else when
            bind.execute(sa.update(table).where(table.c.incident_id == incident_id).values(**values))
        last = rows[-1][0]


def _utc(text: str) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def downgrade() -> None:
    op.drop_index(op.f("ix_devices_district"), table_name="devices")
    op.drop_index(op.f("ix_devices_street"), table_name="devices")
    op.drop_index(op.f("ix_incidents_status_resolved_at"), table_name="incidents")
    op.drop_index(op.f("ix_incidents_device_type_status"), table_name="incidents")
    op.drop_index(op.f("ix_incidents_grid_code_device_type_status"), table_name="incidents")
    for name in reversed(_PLACE_INDEXES):
        op.drop_index(op.f(f"ix_incidents_{name}_status_urgency"), table_name="incidents")
    op.create_index(op.f("ix_incidents_community_status"), "incidents", ["community", "status"])
    with op.batch_alter_table("incidents") as batch:
        batch.drop_column("acknowledged_at")
        for name, _, _ in reversed(_COLUMNS):
            batch.drop_column(name)
