"""Governance incidents: incidents, their append-only history, daily id counters and the delivery outbox.

Revision ID: 0005_incidents
Revises: 0004_alarms
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_incidents"
down_revision: str | Sequence[str] | None = "0004_alarms"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("incident_id", sa.String(32), nullable=False),
        sa.Column("dedup_key", sa.String(289), nullable=False),
        sa.Column("rule_id", sa.String(96), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("urgency", sa.String(2), nullable=False),
        sa.Column("commissioning", sa.Boolean(), nullable=False),
        sa.Column("data", _JSON, nullable=False),
        sa.Column("opened_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("resolved_at", _TS),
        sa.CheckConstraint("status IN ('open', 'resolved')", name=op.f("ck_incidents_status")),
        sa.PrimaryKeyConstraint("incident_id", name=op.f("pk_incidents")),
    )
    op.create_index(
        "uq_incidents_open_dedup_key",
        "incidents",
        ["dedup_key"],
        unique=True,
        sqlite_where=sa.text("status = 'open'"),
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_index(op.f("ix_incidents_dedup_key"), "incidents", ["dedup_key"])
    op.create_index(op.f("ix_incidents_status_urgency"), "incidents", ["status", "urgency"])
    op.create_index(op.f("ix_incidents_opened_at"), "incidents", ["opened_at"])

    op.create_table(
        "incident_history",
        sa.Column("id", _AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("incident_id", sa.String(32), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("change", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incident_history")),
    )
    op.create_index(op.f("ix_incident_history_incident_id"), "incident_history", ["incident_id"])

    op.create_table(
        "incident_counters",
        sa.Column("local_date", sa.Date(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("local_date", name=op.f("pk_incident_counters")),
    )

    op.create_table(
        "outbox",
        sa.Column("id", _AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("incident_id", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.String(512), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("last_status", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("delivered_at", _TS),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed', 'disabled', 'held')", name=op.f("ck_outbox_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
        sa.UniqueConstraint(
            "incident_id", "endpoint", "seq", name=op.f("uq_outbox_incident_id_endpoint_seq")
        ),
    )
    op.create_index(
        op.f("ix_outbox_endpoint_state_next_attempt_at"), "outbox", ["endpoint", "state", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_outbox_endpoint_state_next_attempt_at"), table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("incident_counters")
    op.drop_index(op.f("ix_incident_history_incident_id"), table_name="incident_history")
    op.drop_table("incident_history")
    op.drop_index(op.f("ix_incidents_opened_at"), table_name="incidents")
    op.drop_index(op.f("ix_incidents_status_urgency"), table_name="incidents")
    op.drop_index(op.f("ix_incidents_dedup_key"), table_name="incidents")
    op.drop_index("uq_incidents_open_dedup_key", table_name="incidents")
    op.drop_table("incidents")
