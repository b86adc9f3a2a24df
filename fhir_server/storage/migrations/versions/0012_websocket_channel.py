"""websocket Subscriptions: the delivery row's channel, websocket binding tokens
(subscription_binding), and on PostgreSQL a NOTIFY on every change-feed insert

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 17:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# One NOTIFY per inserting statement, delivered when its transaction commits (PostgreSQL folds
# identical notifications of one transaction into one): Subscription workers in every process
# LISTEN on it (fhir_server.storage.wakeups) instead of polling the feed.
_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION mso_change_feed_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('mso_change_feed', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
_NOTIFY_TRIGGER = """
CREATE TRIGGER change_feed_notify AFTER INSERT ON change_feed
FOR EACH STATEMENT EXECUTE FUNCTION mso_change_feed_notify()
"""


def upgrade() -> None:
    op.add_column(
        "subscription_delivery",
        sa.Column("channel", sa.String(length=16), server_default="rest-hook", nullable=False),
    )
    op.create_table(
        "subscription_binding",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("subs", sa.Text(), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_subscription_binding")),
    )
    op.create_index(
        op.f("ix_subscription_binding_expires"), "subscription_binding", ["expires"], unique=False
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NOTIFY_FUNCTION)
        op.execute(_NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS change_feed_notify ON change_feed")
        op.execute("DROP FUNCTION IF EXISTS mso_change_feed_notify()")
    op.drop_index(op.f("ix_subscription_binding_expires"), table_name="subscription_binding")
    op.drop_table("subscription_binding")
    op.drop_column("subscription_delivery", "channel")
