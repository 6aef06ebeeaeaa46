"""The relay processes that can be told gone at once (`store.presence`): a row per process, naming the advisory
lock it holds while it lives.

Revision ID: 0013
Revises: 0012
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
        "processes",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("lock_key", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("processes")
