"""When each running job is read. What a read means is the lifecycle's (`core.lifecycle`); this module only
decides when to read and hands the views over.

One loop per provider reads the status of that provider's running jobs in batches (`list-by-condition`, or per-id
fetch where a provider has none). Each job is read one poll interval after it was submitted and every interval after
that, on its own cadence: a burst's jobs are read in the order they were submitted, so the time a burst took to
come in does not add a whole interval to its later jobs. Jobs due close together share one upstream call: a round
waits for the jobs due within ROUND_GAP_S (a quarter interval for shorter intervals) of the first one due, and rounds
are at least that far apart. So no job is read before its time, nor more than that gap after it.

At start, jobs a previous run left running are followed again (read at once), and a sweep ends jobs that never got
past PENDING (the relay stopped while submitting them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from adapters import PartialRead, TaskView, UpstreamUnavailable
from relay.clock import Clock
from relay.config import Config
from relay.core.background import cancel_all, every
from relay.core.finish import Finisher
from relay.core.lifecycle import Lifecycle, Tracked
from relay.core.providers import ProviderPool
from relay.domain import FailureCode
from relay.logs import event
from relay.store.jobs import JobRow, JobStore

log = logging.getLogger("relay.tracker")

# A job still PENDING this long after it was made was never confirmed by an upstream (a submit, even tried on
# several providers, times out well before): the relay stopped while submitting it. It is ended, its hold released
# (one its provider's task list can tell of is settled sooner: `core.maybe_sent`).
PENDING_GRACE_S = 600.0
SWEEP_EVERY_S = 60.0
# A round waits up to min(ROUND_GAP_S, interval / 4) after the first job due for others due meanwhile, and rounds of
# one provider start at least that far apart: a job is read at most that late.
ROUND_GAP_S = 0.25


class Tracker:
    def __init__(
        self,
        *,
        config: Config,
        store: JobStore,
        pool: ProviderPool,
        lifecycle: Lifecycle,
        finisher: Finisher,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.lifecycle = lifecycle
        self.finisher = finisher
        self.clock = clock
        self._wake = {name: asyncio.Event() for name in pool.names}
        # When each provider's loop looks at its jobs next, for a job due sooner to wake it (`_wake_provider`).
        self._looks_at: dict[str, float] = {}
        self._loops: list[asyncio.Task[None]] = []
        lifecycle.on_follow = self._wake_provider
        # Whether this process is submitting a job right now (set by the relay: `Submitter.submitting`).
        self.submitting: Callable[[str], bool] = lambda job_id: False
        # Watches the client hooks of jobs the pending sweep ends, those that gave one (set by the relay: its hook
        # watches of adopted jobs).
        self.watch: Callable[[list[JobRow]], Awaitable[None]] = _watch_none

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.resume()
        self._loops = [asyncio.create_task(self._loop(name), name=f"tracker:{name}") for name in self.pool.names]
        sweeping = every(self.clock.sleep, SWEEP_EVERY_S, self.sweep_pending, log, "pending sweep failed")
        self._loops.append(asyncio.create_task(sweeping, name="tracker:sweep"))

    async def stop(self) -> None:
        await cancel_all(self._loops)
        self._loops = []
        await self.lifecycle.close()
        await self.finisher.close()

    @property
    def running(self) -> bool:
        return bool(self._loops) and not any(task.done() for task in self._loops)

    def _wake_provider(self, provider: str, due_at: float) -> None:
        """A job of `provider` is now due at `due_at`: its loop looks again if that is before it would."""
        if due_at < self._looks_at.get(provider, float("inf")):
            self._wake[provider].set()

    def track(self, tracked: Tracked) -> None:
        self.lifecycle.follow(tracked)

    def tracking(self, job_id: str) -> bool:
        return self.lifecycle.following(job_id)

    def count(self) -> int:
        return self.lifecycle.count()

    async def expire(self, job_id: str) -> bool:
        return await self.lifecycle.expire(job_id)

    async def resume(self) -> None:
        """End the jobs a stopped process never got to submit (the running ones are claimed by `core.coordination`)."""
        await self.sweep_pending()

    async def adopt(self, rows: list[JobRow]) -> None:
        """Follow jobs this process just claimed (a previous run's, or a dead process's): read at once, as they may
        have ended meanwhile. A job of a provider no longer configured is ended; one whose ending cannot be written
        now holds up none of the others: followed by nobody, its lease runs out, and it is claimed and ended again.
        So does a job that cannot be followed here (of a task kind a newer release added, mid-deploy): its lease
        runs out, for a process that knows it; past its deadline, when none will follow it any more, it is ended
        as timed out, its hold given back."""
        for row in rows:
            if row.provider is None or row.upstream_id is None or self.tracking(row.id):
                continue
            if row.provider not in self._wake:
                await self._end_adopted(row, FailureCode.LOST, "its provider is no longer configured")
                continue
            try:
                self.lifecycle.take_up(row)
            except Exception:
                if row.deadline_at > self.clock.now():
                    log.exception("following an adopted job failed; it is left", extra={"fields": {"job": row.id}})
                    continue
                log.exception(
                    "an adopted job past its deadline cannot be followed; it is ended",
                    extra={"fields": {"job": row.id}},
                )
                await self._end_adopted(
                    row, FailureCode.TIMEOUT, "its deadline passed, and this relay cannot follow it"
                )

    async def _end_adopted(self, row: JobRow, code: FailureCode, reason: str) -> None:
        """End an adopted job this process will not follow; one whose ending cannot be written is left to the
        process that claims it next."""
        try:
            await self.finisher.end(row.id, succeeded=False, error_code=code, fail_reason=reason)
        except Exception:
            log.exception("ending an adopted job failed; it is tried again", extra={"fields": {"job": row.id}})

    async def sweep_pending(self) -> None:
        """End jobs stuck in PENDING past the grace (see PENDING_GRACE_S); one whose ending cannot be written is
        logged and left to the next sweep, the others ended all the same."""
        now = self.clock.now()
        stale = [
            row
            for row in await self.store.stale_pending(now - PENDING_GRACE_S, now)
            # submitted, though the write saying so failed: it ends when the upstream says so; or still waiting for
            # an upstream's answer (a slow one, or several tried): it may run
            if not self.tracking(row.id) and not self.submitting(row.id)
        ]
        await self.end_unsubmitted(stale, "never confirmed upstream")

    async def end_unsubmitted(self, rows: list[JobRow], reason: str) -> None:
        """End PENDING jobs as interrupted, their holds released: ones the pending sweep found, or ones a gone
        process never sent (`Leases.claim_unsent`). One whose ending cannot be written is logged and left PENDING,
        this process's: a pending sweep ends it."""
        if not rows:
            return
        # A job left by a process that stopped (or died) in its submit window has its client hook watched by
        # nobody: watched here, so that its client hears of the end.
        try:
            await self.watch(rows)
        except Exception:
            log.exception("watching the client hooks of jobs never submitted failed; they end unheard")
        # One group commit for all of them (a crash in a burst's submit window leaves hundreds), not one each in turn.
        # A job whose ending cannot be written holds up none of the others.
        endings = [Finisher.ending(row.id, False, FailureCode.INTERRUPTED, reason) for row in rows]
        for row, outcome in zip(rows, await self.finisher.end_many(endings), strict=True):
            if isinstance(outcome, Exception):
                log.error(
                    "ending a job never submitted failed; a later sweep ends it",
                    exc_info=outcome,
                    extra={"fields": {"job": row.id}},
                )

    # -- polling -------------------------------------------------------------------------------------------------

    async def _loop(self, provider: str) -> None:
        interval = self.pool.poll_interval(provider)
        wake = self._wake[provider]
        gap = min(ROUND_GAP_S, interval / 4)
        last_round = -float("inf")
        while True:
            due = self._round_time(provider, gap)
            wake.clear()
            if due is None:
                self._looks_at[provider] = float("inf")
                await wake.wait()
                continue
            delay = max(due, last_round + gap) - self.clock.now()
            if delay > 0:
                # Then look again: jobs may have come meanwhile, and a timer may fire a little before the wall
                # clock reaches its time. A job read even a moment early finds its task unfinished and waits a
                # whole interval more. At least every quarter interval: an upstream hook may have made a job due
                # sooner than it was (`read_after_hook`); and at once for a job due before then (one taken up or
                # to be read again at once), which wakes the loop.
                nap = min(delay, interval / 4)
                self._looks_at[provider] = self.clock.now() + nap
                await self._nap(nap, wake)
                continue
            self._looks_at[provider] = -float("inf")  # looking now: nothing to wake
            round_start = self.clock.now()
            try:
                if await self.poll(provider):
                    last_round = round_start
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll failed", extra={"fields": {"provider": provider}})

    async def _nap(self, seconds: float, wake: asyncio.Event) -> None:
        """Wait `seconds`, or until `wake` is set."""
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait((timer, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            woken.cancel()

    def _round_time(self, provider: str, gap: float) -> float | None:
        """When the next round should read: when the last of the jobs due within `gap` of the first one due is due
        (so a group due just after a few others is read with them, on time); None when no job waits to be read."""
        dues = [t.due_at for t in self.lifecycle.jobs_of(provider).values() if not t.delivering]
        if not dues:
            return None
        horizon = min(dues) + gap
        return max(due for due in dues if due <= horizon)

    async def poll(self, provider: str) -> int:
        """One round over a provider's running jobs that are due to be read; returns how many were read."""
        started = self.clock.now()
        jobs = [t for t in self.lifecycle.jobs_of(provider).values() if not t.delivering and t.due_at <= started]
        if not jobs:
            return 0
        interval = self.pool.poll_interval(provider)
        for tracked in jobs:  # next read: one interval on; one interval from now for a job read over an interval late
            following = tracked.due_at + interval
            tracked.due_at = following if following > started else started + interval
        upstream_ids = list(dict.fromkeys(tracked.upstream_id for tracked in jobs))
        unread: frozenset[str] = frozenset()
        try:
            views: list[TaskView] | None = await self.pool.fetch_many(provider, upstream_ids)
        except PartialRead as exc:  # the jobs read are applied; those not read wait for the next round
            event(log, "status read failed", provider=provider, reason=str(exc))
            views, unread = exc.views, exc.unread
        except UpstreamUnavailable as exc:
            event(log, "status read failed", provider=provider, reason=str(exc))
            views = None
        await self.lifecycle.apply(provider, jobs, views, unread)
        return len(jobs)


async def _watch_none(rows: list[JobRow]) -> None:
    return None
