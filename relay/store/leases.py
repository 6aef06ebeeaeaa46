"""Who follows each running job: a lease on the job's row (`owner`, `lease_until`).

A relay process follows (reads, applies, delivers, ends) only the jobs it holds: those it admitted, submitted,
parked or adopted, while it renews them. A job whose lease ran out (its process died, or handed it over at
shutdown) is claimed by another process in one guarded UPDATE, so two processes never both claim it. Every
statement here is set-based: a process renews all its leases in one statement.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import and_, case, func, not_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.domain import ACTIVE_STATES, RUNNING_STATES, JobState
from relay.store import presence
from relay.store.db import changed, connected, transaction
from relay.store.jobs import JobRow, handed_over, rows_of
from relay.store.tables import jobs

# The most jobs one claim takes (a process that died with more is claimed in several, one after the other).
CLAIM_BATCH = 500
_ACTIVE = [s.value for s in ACTIVE_STATES]
_RUNNING = [s.value for s in RUNNING_STATES]


# A PENDING job whose task a provider's hook named while its submit waited for the answer (`JobStore.note_task`):
# running there, claimed as a running job once its process's lease ran out (it died before the answer came), and
# written SUBMITTED as it is claimed.
_NOTED = and_(jobs.c.state == JobState.PENDING.value, jobs.c.upstream_id.is_not(None), jobs.c.provider.is_not(None))
_CLAIMABLE = or_(jobs.c.state.in_(_RUNNING), _NOTED)
# A PENDING job never sent anywhere: its process marks a job before each submit leaves (the provider on its row,
# `JobStore.mark_sending_many`), so one without a provider nor a noted task was never sent.
_UNSENT = and_(jobs.c.state == JobState.PENDING.value, jobs.c.provider.is_(None), jobs.c.upstream_id.is_(None))
# A PENDING job marked as being sent to the provider on its row, its task not known: its submit may have made one.
_MARKED = and_(jobs.c.state == JobState.PENDING.value, jobs.c.provider.is_not(None), jobs.c.upstream_id.is_(None))


def _lapsed(now: float) -> Any:
    return or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now)


class Leases:
    def __init__(self, engine: AsyncEngine, owner: str, lease_s: float, *, presence: bool = False) -> None:
        self.engine = engine
        self.owner = owner
        self.lease_s = lease_s
        # On PostgreSQL: a job whose process is gone (`store.presence`) is claimable at once, its lease or not.
        self.presence = presence

    def _lapsed(self, now: float) -> Any:
        """Claimable: a job whose lease ran out, or (on PostgreSQL) another process's whose process is gone. Not one
        of this process's own for that: while its listening connection is made again it looks gone to itself too,
        and a claim would leave its jobs as claimable as before (a round would claim the same ones without end)."""
        if self.presence:
            return or_(_lapsed(now), self._gone_others())
        return _lapsed(now)

    def _gone_others(self) -> Any:
        """Another process's job whose process is gone (`store.presence`)."""
        return and_(jobs.c.owner != self.owner, jobs.c.owner.in_(presence.gone()))

    async def renew(self, now: float, following: Collection[str] | None = None) -> set[str]:
        """Renew the leases this process holds: every one, or (`following`) those of the jobs it follows and of its
        jobs not yet submitted; the ids of the jobs renewed. A running job the process holds but does not follow
        (a claim whose commit landed though the connection was cut before it was answered, so the process never
        learnt it took the job) is not kept: its lease runs out and the job is adopted again, not left unfollowed
        for as long as the process lives, never ended, its hold never settled."""
        held = (jobs.c.owner == self.owner, jobs.c.state.in_(_ACTIVE))
        statement = update(jobs).values(lease_until=now + self.lease_s).returning(jobs.c.id)
        if following is None:
            return await self._ids(statement.where(*held))
        ids = list(following)
        pending = jobs.c.state == JobState.PENDING.value

        async def work(conn: AsyncConnection) -> set[str]:
            renewed = {row.id for row in await conn.execute(statement.where(*held, pending))}
            for start in range(0, len(ids), CLAIM_BATCH):  # bounded lists: a process may follow thousands
                chunk = statement.where(*held, jobs.c.id.in_(ids[start : start + CLAIM_BATCH]))
                renewed.update(row.id for row in await conn.execute(chunk))
            return renewed

        return await transaction(self.engine, work)

    async def hold(self, job_ids: Sequence[str], now: float) -> set[str]:
        """Renew the leases of these jobs; those it still holds: not a job another process took meanwhile, nor one
        that has ended (its ending written, though the write was taken for failed: it is nobody's to deliver or end)."""
        if not job_ids:
            return set()
        return await self._ids(
            update(jobs)
            .where(jobs.c.id.in_(list(job_ids)), jobs.c.owner == self.owner, jobs.c.state.in_(_ACTIVE))
            .values(lease_until=now + self.lease_s)
            .returning(jobs.c.id)
        )

    async def _ids(self, statement: Any) -> set[str]:
        async def work(conn: AsyncConnection) -> set[str]:
            return {row.id for row in await conn.execute(statement)}

        return await transaction(self.engine, work)

    async def claim_expired(
        self, now: float, providers: Collection[str], limit: int = CLAIM_BATCH, *, any_lease: bool = False
    ) -> list[JobRow]:
        """Claim running jobs of these providers whose lease ran out or whose process is gone (or, with `any_lease`,
        every one not already this process's: a process that knows it is alone, on SQLite); the jobs claimed. A job
        of a provider this process does not have is left to the processes that have it (another release, mid-deploy;
        or this one once the provider is configured again, as after a rename undone), until its deadline has passed
        (no process that has its provider followed it to its end): claimed then, it is ended by the tracker, its hold
        settled and its hook told, where it would otherwise stay running, and held, for ever."""
        mine = or_(jobs.c.owner.is_(None), jobs.c.owner != self.owner)
        claimable = mine if any_lease else self._lapsed(now)
        known = jobs.c.provider.in_(list(providers))
        unfollowed = and_(jobs.c.provider.is_not(None), jobs.c.deadline_at < now)
        some = select(jobs.c.id).where(_CLAIMABLE, or_(known, unfollowed), claimable).limit(limit)
        return await self._claim(jobs.c.id.in_(some.scalar_subquery()), claimable, now)

    async def claim(self, job_ids: Sequence[str], now: float) -> list[JobRow]:
        """Claim these running jobs if their lease ran out or their process is gone (an upstream hook named one this
        process can follow now, ahead of the next adoption round); the jobs claimed."""
        if not job_ids:
            return []
        return await self._claim(jobs.c.id.in_(list(job_ids)), self._lapsed(now), now)

    async def _claim(self, which: Any, claimable: Any, now: float) -> list[JobRow]:
        """One guarded UPDATE: of two processes claiming a job at once, one gets it."""
        submitted = case((jobs.c.state == JobState.PENDING.value, JobState.SUBMITTED.value), else_=jobs.c.state)
        statement = (
            update(jobs)
            .where(which, _CLAIMABLE, claimable)
            .values(
                owner=self.owner,
                lease_until=now + self.lease_s,
                state=submitted,
                submitted_at=func.coalesce(jobs.c.submitted_at, now),
            )
            .returning(*jobs.c)
        )
        return await self._rows(statement)

    async def _rows(self, statement: Any) -> list[JobRow]:
        async def work(conn: AsyncConnection) -> list[JobRow]:
            return rows_of((await conn.execute(statement)).all())

        return await transaction(self.engine, work)

    async def claim_unsent(self, now: float, limit: int = CLAIM_BATCH, *, alone: bool = False) -> list[JobRow]:
        """Claim the jobs that gone processes (`store.presence`) held and never sent, to end them: nothing runs them
        upstream, and their clients' retries wait on them. Only a gone process's: it writes a row, so it is of a
        release that marks its submits, and it sends nothing any more; one that looks gone while its listening
        connection is made again finds its mark refused, and sends nothing either. With `alone` (a process alone
        on SQLite, at its start), those of the earlier runs that wrote a row. One guarded UPDATE; none otherwise."""
        gone: Any
        if alone:
            gone = jobs.c.owner.in_(presence.earlier(self.owner))
        elif self.presence:
            gone = self._gone_others()
        else:
            return []
        some = select(jobs.c.id).where(_UNSENT, gone).limit(limit)
        statement = (
            update(jobs)
            .where(jobs.c.id.in_(some.scalar_subquery()), _UNSENT, gone)
            .values(owner=self.owner, lease_until=now + self.lease_s)
            .returning(*jobs.c)
        )
        return await self._rows(statement)

    async def claim_maybe_sent(
        self,
        now: float,
        marked_before: Mapping[str, float],
        passed_over: Collection[str] = (),
        limit: int = CLAIM_BATCH,
    ) -> list[JobRow]:
        """Claim the jobs left marked as sent and never answered (PENDING, a provider on the row, no task), each
        marked (`updated_at`) before `marked_before[provider]`, so that its submit is surely over: those of a gone
        process (on SQLite: of an earlier run), those whose lease ran out, and this process's own (a job it claimed
        so before and could not settle yet; the caller passes over those it is still submitting). For their tasks
        to be looked up by their state (`core.maybe_sent`); not those `passed_over` (this process's, looked up
        already to no avail). One guarded UPDATE."""
        if not marked_before:
            return []
        early = or_(*(and_(jobs.c.provider == p, jobs.c.updated_at < t) for p, t in sorted(marked_before.items())))
        others = self._gone_others() if self.presence else jobs.c.owner.in_(presence.earlier(self.owner))
        own = and_(jobs.c.owner == self.owner, jobs.c.id.not_in(list(passed_over)))
        whose = or_(_lapsed(now), others, own)
        some = select(jobs.c.id).where(_MARKED, early, whose).limit(limit)
        statement = (
            update(jobs)
            .where(jobs.c.id.in_(some.scalar_subquery()), _MARKED, early, whose)
            .values(owner=self.owner, lease_until=now + self.lease_s)
            .returning(*jobs.c)
        )
        return await self._rows(statement)

    async def register(self, now: float) -> None:
        """On SQLite, at the start: this run's row (`store.presence`); on PostgreSQL the listening connection
        writes it."""
        if not self.presence:
            await presence.register(self.engine, self.owner, now)

    async def forget_earlier(self) -> int:
        """On SQLite: forget the earlier runs that hold no job any more; how many."""
        return 0 if self.presence else await presence.forget_earlier(self.engine, self.owner)

    async def withdraw(self) -> None:
        """This process stops on purpose: it is known by its leases from now on, not by its presence."""
        if self.presence:
            await presence.withdraw(self.engine, self.owner)

    async def forget_gone(self) -> int:
        """Forget the gone processes that hold no job any more (`store.presence`); how many."""
        return await presence.forget_gone(self.engine) if self.presence else 0

    async def running_elsewhere(self, now: float) -> dict[str, int]:
        """How many jobs hold a slot of each provider (submitted or in progress) in the other live processes."""
        slot_states = [JobState.SUBMITTED.value, JobState.IN_PROGRESS.value]
        async with connected(self.engine) as conn:
            result = await conn.execute(
                select(jobs.c.provider, func.count())
                .where(
                    jobs.c.state.in_(slot_states),
                    jobs.c.owner != self.owner,
                    jobs.c.lease_until >= now,
                    jobs.c.provider.is_not(None),
                )
                .group_by(jobs.c.provider)
            )
            return {str(row[0]): int(row[1]) for row in result}

    async def release(self) -> int:
        """Hand every lease of this process over (its jobs are claimed by another at once); how many. Not that of a
        job still PENDING with a provider slot reserved (`store.slots`): its submit is still under way (a stopping
        process lets it go on), so the task may be on its way to the provider, and the slot is held as long as the
        lease is. A handed-over lease would give the slot to another process's job at once, and the provider would
        run one job more than `max_in_flight`. The job is handed over as its submit is written down
        (`JobStore.handing_over`), or its slot is given back if no provider took it; if the process exits first,
        the lease runs out as a dead process's does."""
        reserving = and_(jobs.c.state == JobState.PENDING.value, jobs.c.provider.is_not(None))
        return await changed(self.engine, handed_over(self.owner).where(not_(reserving)))
