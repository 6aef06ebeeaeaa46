"""An index on the ledger by key and id: one key's rows in the order they were written, read a page at a time
(`ledger.export_rows`) without sorting all of that key's rows for every page.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ledger_key_id", "ledger", ["key_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_ledger_key_id", "ledger")
