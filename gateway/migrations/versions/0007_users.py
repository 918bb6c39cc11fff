"""People who log in: users (username, role, scope, scrypt password hash, disabled) and their session
tokens (SHA-256 of the token, expiry, revocation).

Revision ID: 0007_users
Revises: 0006_delivery
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0007_users"
down_revision: str | Sequence[str] | None = "0006_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(JSONB(), "postgresql")
_ROLES = ("admin", "installer", "manager", "viewer", "incident_system")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("scope", _JSON, nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("last_login_at", _TS),
        sa.CheckConstraint(
            "role IN ({})".format(", ".join(f"'{x}'" for x in _ROLES)), name=op.f("ck_users_role")
        ),
        sa.PrimaryKeyConstraint("username", name=op.f("pk_users")),
    )
    op.create_table(
        "user_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("last_used_at", _TS),
        sa.Column("revoked_at", _TS),
        sa.ForeignKeyConstraint(["username"], ["users.username"], name=op.f("fk_user_tokens_username_users")),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_user_tokens")),
    )
    op.create_index(op.f("ix_user_tokens_username"), "user_tokens", ["username"])
    op.create_index(op.f("ix_user_tokens_expires_at"), "user_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_user_tokens_expires_at"), table_name="user_tokens")
    op.drop_index(op.f("ix_user_tokens_username"), table_name="user_tokens")
    op.drop_table("user_tokens")
    op.drop_table("users")
