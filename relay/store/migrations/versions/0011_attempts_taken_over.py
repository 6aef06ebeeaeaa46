"""The attempts a retry took the body over from, so that one of them held only later sends nothing while an attempt
that a new request of the same body merely came after runs as it would have.

Revision ID: 0011
Revises: 0010
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
        "attempts_taken_over",
        sa.Column("request_id", sa.String(40), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_attempts_taken_over_created", "attempts_taken_over", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_attempts_taken_over_created", "attempts_taken_over")
    op.drop_table("attempts_taken_over")
