"""bulk export: the job queue (bulk_job)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 07:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulk_job",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("client_key", sa.String(length=200), nullable=False),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("request_url", sa.Text(), nullable=False),
        sa.Column("transaction_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("snapshot_pid", sa.BigInteger(), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=True),
        sa.Column("exported", sa.BigInteger(), nullable=False),
        sa.Column("estimate", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_job")),
    )
    with op.batch_alter_table("bulk_job", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_bulk_job_status_lease_until"), ["status", "lease_until"]
        )
        batch_op.create_index(batch_op.f("ix_bulk_job_client_key_status"), ["client_key", "status"])


def downgrade() -> None:
    with op.batch_alter_table("bulk_job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bulk_job_client_key_status"))
        batch_op.drop_index(batch_op.f("ix_bulk_job_status_lease_until"))
    op.drop_table("bulk_job")
