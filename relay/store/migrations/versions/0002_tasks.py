"""Jobs that know their task: the button acted on, the client's state and hook, a text result, when the upstream
started; and a per-key secret that signs hook deliveries.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("custom_id", sa.Text, nullable=True))
        batch.add_column(sa.Column("client_state", sa.Text, nullable=True))
        batch.add_column(sa.Column("notify_hook", sa.Text, nullable=True))
        batch.add_column(sa.Column("result_text", sa.Text, nullable=True))
        batch.add_column(sa.Column("started_at", sa.Float, nullable=True))
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("hook_secret", sa.String(64), nullable=True))
    keys = sa.table("keys", sa.column("id", sa.String), sa.column("hook_secret", sa.String))
    connection = op.get_bind()
    for (key_id,) in connection.execute(sa.select(keys.c.id)).all():
        connection.execute(
            keys.update().where(keys.c.id == key_id).values(hook_secret="whsec_" + secrets.token_urlsafe(32))
        )
    with op.batch_alter_table("keys") as batch:
        batch.alter_column("hook_secret", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_jobs_parent", "jobs", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_parent", "jobs")
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("hook_secret")
    with op.batch_alter_table("jobs") as batch:
        for column in ("started_at", "result_text", "notify_hook", "client_state", "custom_id"):
            batch.drop_column(column)
