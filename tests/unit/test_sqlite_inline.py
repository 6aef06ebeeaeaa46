"""SQLite on the event loop's own thread (`relay.store.sqlite_inline`): a statement runs where it is asked for,
without handing the loop over, and another process's write lock costs a short wait and a retry, never a hang."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.store import sqlite_inline
from relay.store.db import Database, begun, connected, transaction
from relay.store.tables import keys

pytestmark = pytest.mark.anyio

KEY = {"id": "k1", "name": "n", "key_hash": "h", "prefix": "p", "balance": 1, "held": 0, "created_at": 0.0}
KEY |= {"hook_secret": "s"}


async def database(tmp_path: Path, busy_ms: int = sqlite_inline.BUSY_MS) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}", busy_ms=busy_ms)
    await db.migrate()
    return db


async def test_a_transaction_runs_on_the_loops_thread_without_giving_the_loop_away(tmp_path: Path) -> None:
    db = await database(tmp_path)
    others: list[str] = []
    threads: set[int] = set()

    async def other_task() -> None:
        others.append("ran")

    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert isinstance(raw.driver_connection, sqlite_inline.InlineConnection)

    pending = asyncio.create_task(other_task())
    conn = await db.engine.connect()
    await conn.begin()
    await conn.run_sync(lambda c: threads.add(threading.get_ident()))
    for _ in range(20):
        await conn.execute(select(keys.c.id).limit(1))
    await conn.execute(text("CREATE TEMP TABLE t (x)"))
    await conn.commit()
    assert others == []  # twenty statements and a commit, and no other task ran in between
    await conn.close()
    await pending
    assert others == ["ran"] and threads == {threading.get_ident()}
    await db.dispose()


async def test_a_connection_is_taken_and_given_back_without_a_turn_of_the_loop(tmp_path: Path) -> None:
    # SQLAlchemy's own `async with engine.begin()` gives the connection back in a task of its own: two turns of
    # the loop, which under a burst kept every group commit's next batch waiting.
    db = await database(tmp_path)
    async with begun(db.engine) as conn:  # the pool's connection is made
        await conn.execute(text("SELECT 1"))
    turns: list[str] = []
    asyncio.get_running_loop().call_soon(turns.append, "turned")
    async with begun(db.engine) as conn:
        await conn.execute(insert(keys).values(KEY))
    async with connected(db.engine) as conn:
        assert (await conn.execute(select(keys.c.id))).scalars().all() == ["k1"]
    assert await transaction(db.engine, lambda c: c.scalar(select(keys.c.balance))) == 1
    assert turns == []
    await asyncio.sleep(0)
    assert turns == ["turned"]
    await db.dispose()


async def test_a_transaction_that_fails_is_rolled_back_and_gives_the_connection_back(tmp_path: Path) -> None:
    db = await database(tmp_path)
    with pytest.raises(IntegrityError):
        async with begun(db.engine) as conn:
            await conn.execute(insert(keys).values(KEY))
            await conn.execute(insert(keys).values(KEY))
    async with connected(db.engine) as conn:  # the one connection is back in the pool, and nothing was kept
        assert (await conn.execute(select(keys.c.id))).scalars().all() == []
    await db.dispose()


async def holding_the_connection(db: Database, release: asyncio.Event) -> asyncio.Task[None]:
    """A task in a transaction that wrote a key, holding the pool's one connection across turns of the loop until
    `release` is set."""
    inside = asyncio.Event()

    async def holder() -> None:
        async with begun(db.engine) as conn:
            await conn.execute(insert(keys).values(KEY))
            inside.set()
            await release.wait()

    held = asyncio.create_task(holder())
    await inside.wait()
    return held


async def test_a_caller_cancelled_while_waiting_for_the_connection_leaves_the_pool_whole(tmp_path: Path) -> None:
    db = await database(tmp_path)
    release = asyncio.Event()

    async def waiter() -> None:
        async with connected(db.engine) as conn:
            await conn.execute(text("SELECT 1"))

    held = await holding_the_connection(db, release)
    waiting = asyncio.create_task(waiter())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # it waits for the pool's one connection
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await held
    async with asyncio.timeout(5), connected(db.engine) as conn:
        assert (await conn.execute(select(keys.c.id))).scalars().all() == ["k1"]
    await db.dispose()


async def test_a_caller_cancelled_while_holding_the_connection_gives_it_back(tmp_path: Path) -> None:
    db = await database(tmp_path)
    held = await holding_the_connection(db, asyncio.Event())
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    async with asyncio.timeout(5), connected(db.engine) as conn:  # back in the pool, its transaction rolled back
        assert (await conn.execute(select(keys.c.id))).scalars().all() == []
    await db.dispose()


async def test_a_file_locked_by_another_process_is_waited_for_briefly_then_the_write_is_run_again(
    tmp_path: Path,
) -> None:
    db = await database(tmp_path, busy_ms=50)
    other = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the CLI, in the middle of a write
    loop = asyncio.get_running_loop()
    loop.call_later(0.12, other.execute, "ROLLBACK")  # ... done after a while
    beats: list[float] = []

    async def heartbeat() -> None:
        while True:
            beats.append(loop.time())
            await asyncio.sleep(0.01)

    async def work(conn: AsyncConnection) -> int:
        await conn.execute(insert(keys).values(**KEY))
        return 1

    beating = asyncio.create_task(heartbeat())
    started = loop.time()
    assert await transaction(db.engine, work) == 1  # refused while locked, run again once it was free
    beating.cancel()
    assert loop.time() - started >= 0.1
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    assert gaps and max(gaps) < 0.5  # the loop went on between the attempts
    other.close()
    await db.dispose()


async def test_a_lock_never_released_fails_the_write_rather_than_hanging(tmp_path: Path) -> None:
    db = await database(tmp_path, busy_ms=20)
    other = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def work(conn: AsyncConnection) -> None:
        await conn.execute(text("UPDATE keys SET held = 0"))

    with pytest.raises(OperationalError, match="locked"):
        await transaction(db.engine, work)
    other.execute("ROLLBACK")
    other.close()
    await db.dispose()


async def test_database_errors_are_sqlalchemys_as_before(tmp_path: Path) -> None:
    db = await database(tmp_path)
    async with db.engine.begin() as conn:
        await conn.execute(insert(keys).values(**KEY))
    with pytest.raises(IntegrityError):  # what the group commit splits a batch on
        async with db.engine.begin() as conn:
            await conn.execute(insert(keys).values(**KEY))
    async with db.engine.connect() as conn:
        assert (await conn.execute(select(keys.c.id))).scalars().all() == ["k1"]
    await db.dispose()
