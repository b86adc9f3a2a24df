"""subscriptions: their owners (subscription_owner) and the notification queue
(subscription_delivery)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 15:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subscription_owner",
        sa.Column("sub_id", sa.String(length=64), nullable=False),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sub_id", name=op.f("pk_subscription_owner")),
    )
    op.create_table(
        "subscription_delivery",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
            nullable=False,
        ),
        sa.Column("sub_id", sa.String(length=64), nullable=False),
        sa.Column("event_no", sa.BigInteger(), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_try", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription_delivery")),
        sqlite_autoincrement=True,
    )  # fmt: skip
    op.create_index(
        op.f("ix_subscription_delivery_status_due"),
        "subscription_delivery",
        ["status", "due"],
        unique=False,
    )
    op.create_index(
        op.f("ix_subscription_delivery_sub_id_id"),
        "subscription_delivery",
        ["sub_id", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_subscription_delivery_sub_id_id"), table_name="subscription_delivery")
    op.drop_index(op.f("ix_subscription_delivery_status_due"), table_name="subscription_delivery")
    op.drop_table("subscription_delivery")
    op.drop_table("subscription_owner")
