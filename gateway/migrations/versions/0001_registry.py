"""Registry, registry version, device state and dead letters.

Revision ID: 0001_registry
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_registry"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types are spelled out here, not imported from gateway.db, so this script keeps describing the
# schema as it was when later migrations change the application's tables.
_TS = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("device_type", sa.String(32), nullable=False),
        sa.Column("district", sa.String(128)),
        sa.Column("street", sa.String(128)),
        sa.Column("community", sa.String(128)),
        sa.Column("grid_code", sa.String(15)),
        sa.Column("building", sa.String(128)),
        sa.Column("address", sa.String(256)),
        sa.Column("lat", sa.Float()),
        sa.Column("lon", sa.Float()),
        sa.Column("responsible_unit", sa.String(128)),
        sa.Column("component_code", sa.String(16)),
        sa.Column("attributes", _JSON, nullable=False),
        sa.Column("lifecycle", sa.String(16), nullable=False, server_default="registered"),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "lifecycle IN ('registered', 'online', 'in_service', 'disabled', 'retired')",
            name=op.f("ck_devices_lifecycle"),
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
    )
    for column in ("device_type", "community", "grid_code", "version"):
        op.create_index(op.f(f"ix_devices_{column}"), "devices", [column])

    op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"),
        sa.CheckConstraint("id = 1", name=op.f("ck_registry_version_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_version")),
    )
    op.execute("INSERT INTO registry_version (id, version) VALUES (1, 0)")

    op.create_table(
        "device_state",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("online", sa.Boolean()),
        sa.Column("last_seen", _TS),
        sa.Column("last_status_at", _TS),
        sa.Column("fw", sa.String(64)),
        sa.Column("last_seq", sa.BigInteger()),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_state")),
    )

    op.create_table(
        "dead_letters",
        sa.Column("id", _AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("topic", sa.String(512), nullable=False),
        sa.Column("device_id", sa.String(128)),
        sa.Column("device_type", sa.String(32)),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_size", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    for column in ("received_at", "device_id", "reason"):
        op.create_index(op.f(f"ix_dead_letters_{column}"), "dead_letters", [column])


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("device_state")
    op.drop_table("registry_version")
    op.drop_table("devices")
