"""When a retry that started afresh last claimed a body (`claimed_at`), kept when a newer request's row takes the
body from it: a first attempt whose own row lands after both sends nothing, as it would had the retry's row stayed
(the retry may be its own). Rows written before this carry no claim time: a late row is written over them as before.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("claimed_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("claimed_at")
