"""search index tables (idx_*), owned by the search work

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from fhir_server.storage.index_schema import INDEX_TABLES

    bind = op.get_bind()
    for table in INDEX_TABLES:
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    from fhir_server.storage.index_schema import INDEX_TABLES

    bind = op.get_bind()
    for table in reversed(INDEX_TABLES):
        table.drop(bind, checkfirst=True)
