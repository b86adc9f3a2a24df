"""search index: two B-trees fewer per row (token system + identity share one; string :exact
uses the normalized-value index, so idx_string.hash_exact and its index go)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 00:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.drop_index("ix_idx_token_sys")
        batch_op.drop_index("ix_idx_token_identity")
        batch_op.create_index("ix_idx_token_identity", ["hash_identity", "hash_sys", "pid"])
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.drop_index("ix_idx_string_exact")
        batch_op.drop_column("hash_exact")


def downgrade() -> None:
    # hash_exact cannot be computed in SQL: after a downgrade, run `mso reindex`.
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("hash_exact", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.create_index("ix_idx_string_exact", ["hash_exact", "pid"])
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.drop_index("ix_idx_token_identity")
        batch_op.create_index("ix_idx_token_identity", ["hash_identity", "pid"])
        batch_op.create_index("ix_idx_token_sys", ["hash_sys", "pid"])
