"""The ledger of every credit movement, and key policies (allowed models, a requests-per-minute limit, expiry).

Keys and jobs made before this version get the ledger rows that explain them: each job its hold and, when it
ended, its capture or release; each key an opening top-up of its balance plus what it has been charged, so
`mj-relay ledger check` balances on an upgraded database.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OUTCOME = sa.text("kind IN ('capture', 'release')")


def upgrade() -> None:
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("models", sa.Text, nullable=True))
        batch.add_column(sa.Column("rpm", sa.Integer, nullable=True))
        batch.add_column(sa.Column("expires_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("rate_window", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("rate_count", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("keys.id"), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("action", sa.String(32), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_ledger_key_created", "ledger", ["key_id", "created_at"])
    op.create_index("ix_ledger_job", "ledger", ["job_id"])
    op.create_index("ix_ledger_created", "ledger", ["created_at"])
    op.create_index(
        "ux_ledger_outcome", "ledger", ["job_id"], unique=True, sqlite_where=OUTCOME, postgresql_where=OUTCOME
    )
    columns = "kind, key_id, job_id, amount, model, action, note, created_at"
    op.execute(
        f"INSERT INTO ledger ({columns}) "
        "SELECT 'topup', k.id, NULL, k.balance + COALESCE((SELECT SUM(j.price) FROM jobs j "
        "WHERE j.key_id = k.id AND j.hold_state = 'captured'), 0), NULL, NULL, "
        "'opening balance (migration 0005)', k.created_at FROM keys k"
    )
    op.execute(
        f"INSERT INTO ledger ({columns}) SELECT 'hold', key_id, id, price, model, action, NULL, created_at FROM jobs"
    )
    op.execute(
        f"INSERT INTO ledger ({columns}) "
        "SELECT CASE WHEN hold_state = 'captured' THEN 'capture' ELSE 'release' END, key_id, id, price, model, "
        "action, NULL, COALESCE(finished_at, updated_at) FROM jobs WHERE hold_state IN ('captured', 'released')"
    )


def downgrade() -> None:
    op.drop_index("ux_ledger_outcome", "ledger")
    op.drop_index("ix_ledger_created", "ledger")
    op.drop_index("ix_ledger_job", "ledger")
    op.drop_index("ix_ledger_key_created", "ledger")
    op.drop_table("ledger")
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("rate_count")
        batch.drop_column("rate_window")
        batch.drop_column("expires_at")
        batch.drop_column("rpm")
        batch.drop_column("models")
