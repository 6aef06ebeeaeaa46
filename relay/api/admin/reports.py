"""Job search for operators: the jobs table filtered by key, state and creation time, newest first, a page at a
time (keyset pagination on creation time and id, so a page is as cheap deep in the table as at its top). A read
only; every value in it comes from the admin API's checked inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.jobs import JobRow, row_of
from relay.store.tables import jobs

__all__ = ["search_jobs"]


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
    async with engine.connect() as conn:
        found = (await conn.execute(statement)).all()
    return [row_of(row) for row in found[:limit]], len(found) > limit
