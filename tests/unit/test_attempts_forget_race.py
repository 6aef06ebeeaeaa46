"""Forgetting old attempts on PostgreSQL while another process's new attempt of the same body (the same
fingerprint, an hour later) takes over the old row: the new attempt is kept, or a retry of it starts and charges
its jobs a second time."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from relay.core.jobs import RETRY_WINDOW_S
from relay.store.attempts import AttemptStore
from relay.store.db import Database
from tests.helpers import pg_database

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]
NOW = 1_800_000_000.0


async def test_an_attempt_that_takes_over_an_old_row_while_old_ones_are_forgotten_is_kept() -> None:
    async with pg_database() as url:
        database = Database(url, pool_size=2)
        try:
            await database.migrate()
            store = AttemptStore(database.engine)
            old = NOW - 2 * RETRY_WINDOW_S
            spec = {"model": "mj-fast", "mode": "fast", "bot": "MID_JOURNEY", "prompt": "a kite", "n": 4}
            await store.begin_many([("f" * 64, "r" * 24, ("1",), spec, None, old + 600, old)])
            other = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                # Another process's first attempt of the same body, an hour later: `begin_many`'s upsert, whose
                # transaction (a group commit) is still open when the prune reaches the row.
                tx = other.transaction()
                await tx.start()
                await other.execute(
                    "INSERT INTO attempts (fingerprint, request_id, state, job_ids, spec, deadline_at, created_at,"
                    " updated_at) VALUES ($1, $2, 'starting', $3, $4, $5, $6, $6) ON CONFLICT (fingerprint) DO UPDATE"
                    " SET request_id = excluded.request_id, state = excluded.state, job_ids = excluded.job_ids,"
                    " spec = excluded.spec, deadline_at = excluded.deadline_at, created_at = excluded.created_at,"
                    " updated_at = excluded.updated_at",
                    "f" * 64,
                    "n" * 24,
                    json.dumps(["2"]),
                    json.dumps(spec),
                    NOW + 600,
                    NOW,
                )
                forgetting = asyncio.create_task(store.forget_before(NOW - RETRY_WINDOW_S))
                # Until the prune waits on the row (not a guess at how long it takes to get there): committed
                # before it got there, the new row would be read as it is and the race would not be tested.
                watcher = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
                try:
                    deadline = asyncio.get_running_loop().time() + 10
                    while not await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query ILIKE 'DELETE FROM attempts%'"
                    ):
                        assert not forgetting.done(), "the prune ended without waiting on the row"
                        assert asyncio.get_running_loop().time() < deadline, "the prune never waited on the row"
                        await asyncio.sleep(0.01)
                finally:
                    await watcher.close()
                await tx.commit()
                await forgetting
            finally:
                await other.close()
            row = await store.get("f" * 64, NOW - RETRY_WINDOW_S)
            assert row is not None and row.request_id == "n" * 24, "the new attempt was forgotten as an old one"
        finally:
            await database.dispose()
