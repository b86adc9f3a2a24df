"""case chat: per-user read state (chat_read_state)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chat_read_state",
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("case_id", sa.String(length=64), nullable=False),
        sa.Column("read_ms", sa.BigInteger(), nullable=False),
        sa.Column("read_pid", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("username", "case_id", name=op.f("pk_chat_read_state")),
    )


def downgrade() -> None:
    op.drop_table("chat_read_state")
