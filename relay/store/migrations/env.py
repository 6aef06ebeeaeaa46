"""Alembic environment: the relay hands in an open connection (see `relay.store.db.Database.migrate`)."""

from __future__ import annotations

from alembic import context

from relay.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
