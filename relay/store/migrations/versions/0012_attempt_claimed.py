"""Whether an attempt's row was written by a retry that started afresh (`claim_many`): a first attempt whose own
row lands after such a retry's does not take its body back, and sends nothing. Rows written before count as
written by attempts that were not retries, as they were treated.

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
        batch.add_column(sa.Column("claimed", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("claimed")
