"""`max_in_flight` across relay processes that share a PostgreSQL database: a provider's running-job slots.

A job takes one of its provider's slots by writing the provider on its PENDING row before it is sent there, under
a per-provider advisory lock, and only while fewer than `max_in_flight` jobs hold one. Holding one are the jobs
SUBMITTED or IN_PROGRESS there (they run upstream, whichever process follows them) and the PENDING jobs a live
process reserved there (a dead process's reservations lapse with its lease). So the limit is exact across
processes, and nothing has to be given back when a job ends or its process dies: the count is read from the jobs
themselves. A reservation the provider did not take is given back before the job tries another.

On SQLite there is one process, and its own count (`core.providers.ProviderPool.in_flight`) is exact.
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.domain import JobState
from relay.store.db import changed, transaction
from relay.store.tables import jobs

_RUNNING = [JobState.SUBMITTED.value, JobState.IN_PROGRESS.value]
_PENDING = JobState.PENDING.value


class Slots:
    def __init__(self, engine: AsyncEngine, lease_s: float, owner: str) -> None:
        self.engine = engine
        self.lease_s = lease_s  # a reservation is as live as the lease of the process that made it
        self.owner = owner  # the process reserving: only its own PENDING jobs (`JobStore.mark_sending_many`)

    async def take(self, job_id: str, provider: str, limit: int, now: float) -> bool | None:
        """Reserve one of `provider`'s `limit` slots for the PENDING job: True once reserved, False when they are all
        held, None when the job is no longer this process's to send (another process took it for never sent, and
        ends it). The reservation is the job's mark that it may have been sent (see `JobStore.mark_sending_many`)."""

        async def work(conn: AsyncConnection) -> bool | None:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"mj-relay slots {provider}"}
            )
            held = (
                await conn.execute(
                    select(func.count())
                    .select_from(jobs)
                    .where(
                        jobs.c.provider == provider,
                        jobs.c.id != job_id,
                        or_(
                            jobs.c.state.in_(_RUNNING),
                            and_(jobs.c.state == _PENDING, jobs.c.lease_until >= now),
                        ),
                    )
                )
            ).scalar_one()
            if held >= limit:
                return False
            result = await conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.state == _PENDING,
                    jobs.c.owner == self.owner,
                    jobs.c.upstream_id.is_(None),
                )
                .values(provider=provider, lease_until=now + self.lease_s, updated_at=now)
            )
            return True if result.rowcount else None

        return await transaction(self.engine, work)

    async def give_back(self, job_id: str) -> None:
        """The provider did not take the job: its reservation is freed for others."""
        await changed(
            self.engine, update(jobs).where(jobs.c.id == job_id, jobs.c.state == _PENDING).values(provider=None)
        )
