"""Which relay processes on one PostgreSQL database are alive, told at once rather than by a lease running out.

A process takes an advisory lock of its own (a random key) on its listening connection (`core.broadcast`), and
then writes a row naming itself and that key (`processes`). The lock lives exactly as long as the connection: a
process that is SIGKILLed, or whose machine drops it, loses the connection at once, the server lets the lock go,
and its row names a key no session holds. Such a process is *gone*: its jobs are claimed by the others in their
next adoption round, without waiting for its leases to run out (`store.leases`). A process that stops on purpose
deletes its row as it hands its leases over (`Coordinator.stop`), through its pool, so that a listening connection
that is down then cannot keep the row; from then on it is known by its leases, as a process of a release that
writes no row always is: a job it still writes down as it drains its submits is handed over as it is written, and
one still PENDING with a provider slot reserved keeps its lease, as at any stop.

A live process whose listening connection was dropped (the network, a server restart) looks gone until the
connection is made again: its jobs may be claimed meanwhile, and it stops following them at its next renewal, as
it does for a job another process took after a stall. No job is run or ended twice for it: every ending is guarded
by the job's state; a grid may be downloaded by both.

On SQLite there is one process at a time and no lock: each run writes its row at start all the same (`register`,
lock key 0), so that the next run knows the jobs a run left were marked as they were sent (`JobStore.
mark_sending_many`), and ends those it never sent at once (`Leases.claim_unsent`); a run of a release before that
wrote no row, and its jobs are left to the pending sweep. Rows of earlier runs that hold no job are deleted then.
"""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
from sqlalchemy import and_, delete, exists, insert, not_, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.domain import ACTIVE_STATES
from relay.store.db import changed
from relay.store.tables import jobs, processes

_ACTIVE = [s.value for s in ACTIVE_STATES]
# The process of the row holds a job still (one not ended).
_HOLDS_JOBS = exists().where(and_(jobs.c.owner == processes.c.owner, jobs.c.state.in_(_ACTIVE)))

# Whether no session holds the advisory lock of the process's key (`pg_advisory_lock(bigint)` shows as the key's
# two halves, `objsubid` 1), in this database.
_UNHELD = text(
    "NOT EXISTS (SELECT 1 FROM pg_locks AS l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid = (processes.lock_key >> 32)::oid AND l.objid = (processes.lock_key & 4294967295)::oid)"
)


def new_key() -> int:
    """A process's lock key: random, below 2**62 (both halves read as unsigned, no sign to mind)."""
    return secrets.randbits(62) or 1


def gone() -> Any:
    """The owners that wrote a row and whose lock no session holds (a selectable of `processes.owner`)."""
    return select(processes.c.owner).where(_UNHELD)


async def announce(conn: asyncpg.Connection, owner: str, key: int, now: float) -> bool:
    """Take this process's lock on `conn` and write its row (again, after a reconnection); whether the lock is
    held. Not when another session still holds it (the server has not yet noticed that the connection before this
    one is gone): taken at a later try, and the row is left until then, so the process is known by its leases."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        return False
    await conn.execute(
        "INSERT INTO processes (owner, lock_key, started_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (owner) DO UPDATE SET lock_key = EXCLUDED.lock_key",
        owner,
        key,
        now,
    )
    return True


def earlier(owner: str) -> Any:
    """On SQLite: the owners of earlier runs that wrote a row (a selectable of `processes.owner`)."""
    return select(processes.c.owner).where(processes.c.owner != owner)


async def register(engine: AsyncEngine, owner: str, now: float) -> None:
    """On SQLite: this run's row, written at its start (see above)."""
    await changed(engine, insert(processes).values(owner=owner, lock_key=0, started_at=now))


async def forget_earlier(engine: AsyncEngine, owner: str) -> int:
    """On SQLite: delete the rows of earlier runs that hold no job any more; how many."""
    return await changed(engine, delete(processes).where(processes.c.owner != owner, not_(_HOLDS_JOBS)))


async def withdraw(engine: AsyncEngine, owner: str) -> None:
    """A process that stops on purpose: its row goes (before its lock), so its jobs are left to their leases."""
    await changed(engine, delete(processes).where(processes.c.owner == owner))


async def forget_gone(engine: AsyncEngine) -> int:
    """Delete the rows of gone processes that hold no job any more; how many."""
    return await changed(engine, delete(processes).where(_UNHELD, not_(_HOLDS_JOBS)))
