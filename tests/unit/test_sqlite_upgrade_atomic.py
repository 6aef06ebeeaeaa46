"""An upgrade of a SQLite database that fails (here: a job whose key is gone, as an operator's `sqlite3` shell,
which enforces no foreign keys, leaves after deleting a key) changes nothing: once the row is mended, the next start
upgrades it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relay.store.db import Database
from tests.helpers import database_at

pytestmark = pytest.mark.anyio


def columns(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


async def test_a_failed_sqlite_upgrade_leaves_the_database_as_it_was_and_can_be_run_again(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    url = f"sqlite+aiosqlite:///{path}"
    await database_at(url, "0001")
    with sqlite3.connect(path) as conn:  # the sqlite3 shell: foreign keys not enforced
        conn.execute(
            "INSERT INTO jobs (id, request_id, key_id, model, mode, bot, action, prompt, state, progress, price, "
            "hold_state, created_at, updated_at, deadline_at) VALUES ('job_gone_aaaaaaa', 'r', 'key_gone', "
            "'mj-fast', 'fast', 'MID_JOURNEY', 'imagine', 'p', 'SUCCEEDED', 100, 2, 'captured', 1, 2, 3)"
        )
    before = {table: columns(path, table) for table in ("keys", "jobs")}
    db = Database(url)
    try:
        with pytest.raises(RuntimeError, match="key is gone"):
            await db.migrate()
        async with db.engine.connect() as conn:  # the pooled connection enforces foreign keys again
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await db.dispose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    assert {table: columns(path, table) for table in ("keys", "jobs")} == before  # nothing half done
    with sqlite3.connect(path) as conn:  # the operator mends the row
        conn.execute(
            "INSERT INTO keys (id, name, key_hash, prefix, balance, held, created_at) "
            "VALUES ('key_gone', 'restored', 'h', 'sk-mjr-x', 0, 0, 1)"
        )
    db = Database(url)
    try:
        await db.migrate()
    finally:
        await db.dispose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0013",)]
        assert conn.execute("SELECT id, key_id FROM jobs").fetchall() == [("job_gone_aaaaaaa", "key_gone")]
