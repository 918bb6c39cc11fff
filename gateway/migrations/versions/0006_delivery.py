"""Incident delivery and back-channel: endpoint state (410), case reports, false-alarm counts, alarm
resolutions for the rules process; incidents get a community column (managers' scope), outbox rows a
retry_from (a re-send starts the retry window anew).

Revision ID: 0006_delivery
Revises: 0005_incidents
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_delivery"
down_revision: str | Sequence[str] | None = "0005_incidents"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("community", sa.String(128)))
    op.create_index(op.f("ix_incidents_community_status"), "incidents", ["community", "status"])
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("retry_from", _TS))
    op.create_table(
        "delivery_endpoints",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("disabled_at", _TS),
        sa.Column("disabled_reason", sa.Text()),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_delivery_endpoints")),
    )
    op.create_table(
        "incident_reports",
        sa.Column("id", _AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("incident_id", sa.String(32), nullable=False),
        sa.Column("report_id", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("case_id", sa.String(128)),
        sa.Column("note", sa.Text()),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("reported_at", _TS, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.CheckConstraint(
            "status IN ('dispatched', 'in_progress', 'closed', 'false_alarm')",
            name=op.f("ck_incident_reports_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incident_reports")),
        sa.UniqueConstraint("report_id", name=op.f("uq_incident_reports_report_id")),
    )
    op.create_index(op.f("ix_incident_reports_incident_id"), "incident_reports", ["incident_id"])
    op.create_table(
        "false_alarms",
        sa.Column("rule_id", sa.String(96), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("last_at", _TS, nullable=False),
        sa.Column("last_incident_id", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("rule_id", "device_id", name=op.f("pk_false_alarms")),
    )
    op.create_table(
        "alarm_resolutions",
        sa.Column("id", _AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("rule_id", sa.String(96), nullable=False),
        sa.Column("alarm_key", sa.String(192), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("requested_at", _TS, nullable=False),
        sa.Column("done_at", _TS),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alarm_resolutions")),
    )
    op.create_index(op.f("ix_alarm_resolutions_done_at"), "alarm_resolutions", ["done_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_alarm_resolutions_done_at"), table_name="alarm_resolutions")
    op.drop_table("alarm_resolutions")
    op.drop_table("false_alarms")
    op.drop_index(op.f("ix_incident_reports_incident_id"), table_name="incident_reports")
    op.drop_table("incident_reports")
    op.drop_table("delivery_endpoints")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("retry_from")
    op.drop_index(op.f("ix_incidents_community_status"), table_name="incidents")
    with op.batch_alter_table("incidents") as batch:
        batch.drop_column("community")
