"""Forgetting attempts older than the retry window (every minute, in every process) on a large table."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from relay.core.jobs import RETRY_WINDOW_S
from relay.store.attempts import AttemptStore
from relay.store.db import Database
from relay.store.tables import attempts

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0
# An hour of a relay taking about 55 requests a second: the rows a relay that was stopped for more than an hour
# forgets at its first round, a minute after it starts again.
ROWS = 200_000


async def fill(database: Database, count: int, created_at: float) -> None:
    spec = json.dumps(
        {"model": "mj-fast", "mode": "fast", "bot": "MID_JOURNEY", "prompt": "a lighthouse " * 20, "n": 1}
    )
    rows = [
        {
            "fingerprint": f"{i:064x}",
            "request_id": f"{i:024x}",
            "state": "started",
            "job_ids": json.dumps([str(10**17 + i)]),
            "spec": spec,
            "deadline_at": created_at + 600,
            "created_at": created_at + i * 0.001,
            "updated_at": created_at,
        }
        for i in range(count)
    ]
    async with database.engine.begin() as conn:
        for start in range(0, count, 20_000):
            await conn.execute(insert(attempts), rows[start : start + 20_000])


async def test_forgetting_an_hour_of_attempts_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    try:
        await database.migrate()
        await fill(database, ROWS, NOW - 2 * RETRY_WINDOW_S)
        await fill_fresh(database)
        gaps: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:  # what every other request, hook and poll of the relay waits behind
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beating = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        forgotten = await AttemptStore(database.engine).forget_before(NOW - RETRY_WINDOW_S)
        took = time.perf_counter() - started
        stop.set()
        await beating
        assert forgotten == ROWS
        async with database.engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(attempts))).scalar_one() == 10
        longest = max(gaps)
        assert longest < 0.1, f"the event loop was held {longest * 1000:.0f} ms in one go (the prune took {took:.2f} s)"
    finally:
        await database.dispose()


async def fill_fresh(database: Database) -> None:
    rows = [
        {
            "fingerprint": f"f{i:063x}",
            "request_id": f"f{i:023x}",
            "state": "started",
            "job_ids": "[]",
            "spec": "{}",
            "deadline_at": NOW,
            "created_at": NOW - 10,
            "updated_at": NOW,
        }
        for i in range(10)
    ]
    async with database.engine.begin() as conn:
        await conn.execute(insert(attempts), rows)
