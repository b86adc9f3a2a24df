"""DICOMweb bridge: the series metadata cache (dicomweb_metadata_cache)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicomweb_metadata_cache",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("base_key", sa.String(length=64), nullable=False),
        sa.Column("source_version", sa.String(length=128), nullable=False),
        sa.Column("etag", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("filled", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "study_uid", "series_uid", "base_key", name=op.f("pk_dicomweb_metadata_cache")
        ),
    )


def downgrade() -> None:
    op.drop_table("dicomweb_metadata_cache")
