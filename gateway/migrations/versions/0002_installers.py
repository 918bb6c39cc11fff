"""Installers: device install date, firmware, batch and in-service time; commissioning state;
places, responsible units and API keys.

Revision ID: 0002_installers
Revises: 0001_registry
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_installers"
down_revision: str | Sequence[str] | None = "0001_registry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("install_date", sa.Date()))
        b.add_column(sa.Column("firmware", sa.String(64)))
        b.add_column(sa.Column("batch", sa.String(64)))
        b.add_column(sa.Column("in_service_at", _TS))
    op.create_index(op.f("ix_devices_batch"), "devices", ["batch"])
    with op.batch_alter_table("device_state") as b:
        b.add_column(sa.Column("last_topic", sa.String(512)))
        b.add_column(sa.Column("last_payload", sa.LargeBinary()))
        b.add_column(sa.Column("seen_fields", _JSON))
    op.create_table(
        "places",
        sa.Column("code", sa.String(15), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("parent_code", sa.String(15)),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.CheckConstraint(
            "level IN ('district', 'street', 'community', 'grid')", name=op.f("ck_places_level")
        ),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_places")),
    )
    op.create_index(op.f("ix_places_parent_code"), "places", ["parent_code"])
    op.create_index(op.f("ix_places_level"), "places", ["level"])
    op.create_table(
        "responsible_units",
        sa.Column("unit_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32)),
        sa.Column("contact", sa.String(256)),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("unit_id", name=op.f("pk_responsible_units")),
        sa.UniqueConstraint("name", name=op.f("uq_responsible_units_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("scope", _JSON, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("last_used_at", _TS),
        sa.Column("revoked_at", _TS),
        sa.CheckConstraint(
            "role IN ('admin', 'installer', 'manager', 'viewer', 'incident_system')",
            name=op.f("ck_api_keys_role"),
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_keys")),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("responsible_units")
    op.drop_index(op.f("ix_places_level"), table_name="places")
    op.drop_index(op.f("ix_places_parent_code"), table_name="places")
    op.drop_table("places")
    with op.batch_alter_table("device_state") as b:
        b.drop_column("seen_fields")
        b.drop_column("last_payload")
        b.drop_column("last_topic")
    op.drop_index(op.f("ix_devices_batch"), table_name="devices")
    with op.batch_alter_table("devices") as b:
        b.drop_column("in_service_at")
        b.drop_column("batch")
        b.drop_column("firmware")
        b.drop_column("install_date")
