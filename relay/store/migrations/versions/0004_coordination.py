"""Coordination between relay processes: who follows each job (a lease), and client attempts that retries of a
request find again.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.Float, nullable=True))
    op.create_index("ix_jobs_owner", "jobs", ["owner"])
    op.create_table(
        "attempts",
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("job_ids", sa.Text, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("deadline_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_attempts_created", "attempts", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_attempts_created", "attempts")
    op.drop_table("attempts")
    op.drop_index("ix_jobs_owner", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("owner")
