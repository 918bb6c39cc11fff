"""Alarms of the rules stage: one row per alarm from open to clear, at most one open per (rule, key).

Revision ID: 0004_alarms
Revises: 0003_device_events
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_alarms"
down_revision: str | Sequence[str] | None = "0003_device_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "alarms",
        sa.Column("id", _AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("rule_id", sa.String(96), nullable=False),
        sa.Column("alarm_key", sa.String(192), nullable=False),
        sa.Column("device_id", sa.String(64)),
        sa.Column("device_type", sa.String(32), nullable=False),
        sa.Column("community", sa.String(128)),
        sa.Column("grid_code", sa.String(15)),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("urgency", sa.String(2), nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("occurrences", sa.Integer(), nullable=False),
        sa.Column("flapping", sa.Boolean(), nullable=False),
        sa.Column("opened_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("cleared_at", _TS),
        sa.Column("evidence", _JSON, nullable=False),
        sa.Column("message_zh", sa.Text(), nullable=False),
        sa.Column("message_en", sa.Text(), nullable=False),
        sa.Column("members", _JSON, nullable=False),
        sa.Column("commissioning_noise", sa.Boolean(), nullable=False),
        sa.CheckConstraint("state IN ('open', 'cleared')", name=op.f("ck_alarms_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alarms")),
    )
    op.create_index(
        "uq_alarms_open_rule_key",
        "alarms",
        ["rule_id", "alarm_key"],
        unique=True,
        sqlite_where=sa.text("state = 'open'"),
        postgresql_where=sa.text("state = 'open'"),
    )
    op.create_index(op.f("ix_alarms_state_community"), "alarms", ["state", "community"])
    op.create_index(op.f("ix_alarms_device_id"), "alarms", ["device_id"])
    op.create_index(op.f("ix_alarms_opened_at"), "alarms", ["opened_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_alarms_opened_at"), table_name="alarms")
    op.drop_index(op.f("ix_alarms_device_id"), table_name="alarms")
    op.drop_index(op.f("ix_alarms_state_community"), table_name="alarms")
    op.drop_index("uq_alarms_open_rule_key", table_name="alarms")
    op.drop_table("alarms")
