"""The images a key uploaded in its current upload window (`api.uploads`), counted in its row like its requests
per minute, so the bound holds across relay processes.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("upload_window", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("upload_count", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("upload_count")
        batch.drop_column("upload_window")
