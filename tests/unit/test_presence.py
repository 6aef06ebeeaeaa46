"""Processes on PostgreSQL told gone at once: a process's jobs are claimable the moment its connection (and with it
its presence lock) is gone, not only once its leases run out; a process alive, or one that withdrew on purpose, or
one that never announced itself, is known by its leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy import text

from relay.core.broadcast import RECONNECT_S, Broadcast
from relay.core.events import JobEvents
from relay.store import presence
from relay.store.db import Database
from relay.store.leases import Leases
from tests.helpers import pg_database
from tests.unit.test_coordination_store import LEASE, running_job
from tests.unit.test_store import NOW

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@asynccontextmanager
async def migrated() -> AsyncIterator[tuple[str, Database]]:
    """A fresh PostgreSQL database for one test, its schema made; its URL and the store on it."""
    async with pg_database() as url:
        database = Database(url, pool_size=5)
        try:
            await database.migrate()
            yield url, database
        finally:
            await database.dispose()


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))


async def owners(database: Database) -> list[str]:
    async with database.engine.connect() as conn:
        return sorted(row[0] for row in await conn.execute(text("SELECT owner FROM processes")))


async def test_the_jobs_of_a_process_whose_connection_is_gone_are_claimed_before_their_lease_runs_out() -> None:
    async with migrated() as (url, database):
        await running_job(database, "a")
        survivor = Leases(database.engine, "b", LEASE, presence=True)
        alive = await connect(url)
        assert await presence.announce(alive, "a", presence.new_key(), NOW)
        assert await survivor.claim_expired(NOW + 1, ["up"]) == []  # alive, its lease running
        await alive.close()  # the process dies: the server lets its lock go with the connection
        (row,) = await survivor.claim_expired(NOW + 1, ["up"])
        assert row.owner == "b" and row.lease_until == NOW + 1 + LEASE
        # A claim for an upstream hook takes such a job as well.
        await running_job(database, "c", "job_00000002")
        dying = await connect(url)
        assert await presence.announce(dying, "c", presence.new_key(), NOW)
        assert await survivor.claim(["job_00000002"], NOW + 1) == []
        await dying.close()
        (row,) = await survivor.claim(["job_00000002"], NOW + 1)
        assert row.owner == "b"
        # Without presence (SQLite, or a release before it) only the lease counts.
        await running_job(database, "d", "job_00000003")
        assert await Leases(database.engine, "e", LEASE).claim_expired(NOW + 1, ["up"]) == []


async def test_a_process_that_withdrew_or_never_announced_itself_is_known_by_its_leases() -> None:
    async with migrated() as (url, database):
        await running_job(database, "stopping")
        await running_job(database, "older-release", "job_00000002")
        survivor = Leases(database.engine, "b", LEASE, presence=True)
        conn = await connect(url)
        assert await presence.announce(conn, "stopping", presence.new_key(), NOW)
        # A SIGTERM: its row goes first (through its pool), then its connection.
        await Leases(database.engine, "stopping", LEASE, presence=True).withdraw()
        await conn.close()
        assert await survivor.claim_expired(NOW + 1, ["up"]) == []
        rows = await survivor.claim_expired(NOW + LEASE + 1, ["up"])
        assert sorted(row.id for row in rows) == ["job_00000001", "job_00000002"]


async def test_a_lock_still_held_by_the_connection_before_is_taken_later_and_gone_processes_are_forgotten() -> None:
    async with migrated() as (url, database):
        key = presence.new_key()
        before, after = await connect(url), await connect(url)
        assert await presence.announce(before, "a", key, NOW)
        # Made again while the server still holds the old connection's lock: not taken, tried again later.
        assert not await presence.announce(after, "a", key, NOW)
        await before.close()
        assert await presence.announce(after, "a", key, NOW)
        await running_job(database, "gone-with-a-job")
        for owner in ("gone-with-a-job", "gone-idle"):
            conn = await connect(url)
            assert await presence.announce(conn, owner, presence.new_key(), NOW)
            await conn.close()
        leases = Leases(database.engine, "a", LEASE, presence=True)
        assert await leases.forget_gone() == 1
        assert await owners(database) == ["a", "gone-with-a-job"]  # alive, or holding a job still
        await after.close()


async def gone_owners(database: Database) -> list[str]:
    async with database.engine.connect() as conn:
        return sorted(row[0] for row in await conn.execute(presence.gone()))


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 3 * RECONNECT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.05)


async def test_a_relay_is_present_while_its_listening_connection_lives_and_again_once_it_is_made_again() -> None:
    async with migrated() as (url, database):
        broadcast = Broadcast(url, "p", JobEvents(), on_hook=lambda *_: asyncio.sleep(0))
        admin = await connect(url)
        try:
            # The connection before this one still holds the lock (the server has not seen it go yet).
            await admin.fetchval("SELECT pg_advisory_lock($1)", broadcast._lock_key)
            await broadcast.start()
            assert not broadcast.present and await owners(database) == []
            await admin.fetchval("SELECT pg_advisory_unlock($1)", broadcast._lock_key)

            async def present() -> bool:
                return broadcast.present and await owners(database) == ["p"] and await gone_owners(database) == []

            await until(present)
            # The server drops the listening connection: the process is gone for the others until it is made again.
            first = broadcast._conn
            assert first is not None
            await admin.fetchval("SELECT pg_terminate_backend($1)", first.get_server_pid())
            await until(lambda: asyncio.sleep(0, first.is_closed()))
            await until(lambda: asyncio.sleep(0, broadcast._conn is not first))
            await until(present)
            await broadcast.stop()
            assert await gone_owners(database) == ["p"]  # its connection closed, its row left (a SIGKILL's)
            await broadcast.start()  # nothing in the way: present as it starts
            assert broadcast.present and await owners(database) == ["p"] and await gone_owners(database) == []
        finally:
            await broadcast.stop()
            await admin.close()


async def test_a_process_that_looks_gone_to_itself_does_not_claim_its_own_jobs() -> None:
    """A live process whose listening connection is being made again looks gone, to itself as well: its own
    rounds must not claim its own jobs for that (each claim leaves them as claimable as before, so a round over
    500 of them would claim the same ones again and again until the connection is back). A job of its own whose
    lease ran out is still claimed (one it holds but does not follow)."""
    async with migrated() as (url, database):
        await running_job(database, "a")
        conn = await connect(url)
        assert await presence.announce(conn, "a", presence.new_key(), NOW)
        await conn.close()  # its listening connection dropped: gone, for the others
        itself = Leases(database.engine, "a", LEASE, presence=True)
        assert await itself.claim_expired(NOW + 1, ["up"], limit=1) == []
        assert await itself.claim(["job_00000001"], NOW + 1) == []
        (row,) = await itself.claim_expired(NOW + LEASE + 1, ["up"], limit=1)
        assert row.owner == "a"
        (row,) = await Leases(database.engine, "b", LEASE, presence=True).claim_expired(NOW + 1, ["up"])
        assert row.owner == "b"
