"""Read models over the jobs table: what operators and clients are shown, never written.

search_jobs     the jobs filtered by key, state and creation time, newest first, a page at a time (keyset
                pagination on creation time and id, so a page is as cheap deep in the table as at its top)
quota           a key's balance plus every credit its jobs ever captured, read as one
usage_by_day    credits a key's jobs captured, by the UTC day they finished and model
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.db import connected
from relay.store.jobs import JobRow, rows_of
from relay.store.ledger import whole_seconds
from relay.store.tables import jobs, keys

DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: int  # unix seconds of the UTC day's start
    model: str
    credits: int


async def search_jobs(
    engine: AsyncEngine,
    *,
    key_id: str | None,
    states: Sequence[str] | None,
    since: float | None,
    until: float | None,
    after: tuple[float, str] | None,
    limit: int,
) -> tuple[list[JobRow], bool]:
    """Jobs newest first (by creation), `limit` of them after the cursor; and whether more follow."""
    conditions: list[Any] = []
    if key_id is not None:
        conditions.append(jobs.c.key_id == key_id)
    if states:
        conditions.append(jobs.c.state.in_(list(states)))
    if since is not None:
        conditions.append(jobs.c.created_at >= since)
    if until is not None:
        conditions.append(jobs.c.created_at < until)
    if after is not None:
        created_at, job_id = after
        conditions.append(
            or_(jobs.c.created_at < created_at, and_(jobs.c.created_at == created_at, jobs.c.id < job_id))
        )
    statement = select(jobs).where(*conditions).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
    async with connected(engine) as conn:
        found = (await conn.execute(statement)).all()
    return rows_of(found[:limit]), len(found) > limit


@dataclass(frozen=True, slots=True)
class Quota:
    name: str
    expires_at: float | None
    credits: int  # the balance plus every credit the key's jobs ever captured


async def quota(engine: AsyncEngine, key_id: str) -> Quota | None:
    """The key's quota (None: no such key): its balance and what its jobs captured, read in one statement, so one
    snapshot of both: a charge that lands meanwhile (balance down, captured up) is seen whole or not at all."""
    captured = (
        select(func.coalesce(func.sum(jobs.c.price), 0))
        .where(jobs.c.key_id == key_id, jobs.c.hold_state == "captured")
        .scalar_subquery()
    )
    query = select(keys.c.name, keys.c.expires_at, keys.c.balance, captured.label("captured")).where(
        keys.c.id == key_id
    )
    async with connected(engine) as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        return None
    expires_at = None if row.expires_at is None else float(row.expires_at)
    return Quota(str(row.name), expires_at, int(row.balance) + int(row.captured))


async def usage_by_day(engine: AsyncEngine, key_id: str, start: int, end: int) -> list[DayUsage]:
    """Credits captured by the key's jobs that finished in [start, end), by UTC day and model. A job's time is its
    `finished_at` in whole seconds, the same expression for the range and the day, so each job lands in one day."""
    second = whole_seconds(jobs.c.finished_at)
    day = (second // DAY_S).label("day")
    query = (
        select(day, jobs.c.model, func.sum(jobs.c.price).label("credits"))
        .where(
            jobs.c.key_id == key_id,
            jobs.c.created_at < end,  # a job finished in the range began before its end (keeps to the key's index)
            jobs.c.hold_state == "captured",
            second >= start,
            second < end,
        )
        .group_by(day, jobs.c.model)
        .order_by(day, jobs.c.model)
    )
    async with connected(engine) as conn:
        rows = (await conn.execute(query)).all()
    return [DayUsage(int(row.day) * DAY_S, str(row.model), int(row.credits)) for row in rows]
