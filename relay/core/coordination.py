"""Coordination between relay processes that share one database: each running job is followed by exactly one live
process, and nothing a process dies with is lost.

    leases     a process holds a lease on every job it admits, submits, parks or adopts (`store.leases`), renews
               them all every `jobs.lease_s / 3`, and stops following a job whose lease another process took
    adoption   every second (at most `jobs.lease_s / 2`; and at start) a process claims the running jobs whose lease
               ran out, or whose process is gone (`store.presence`: SIGKILLed, its connection to PostgreSQL lost):
               a dead process's jobs are followed again within a second of its death, within `lease_s` + 1 s when
               the server did not see its connection go (a machine cut off); the jobs a gone process held and never
               sent are ended (interrupted, nothing charged), so that their clients' retries start afresh; a process
               alone on SQLite claims every running job of its providers at start (a restart), and ends the jobs
               its earlier runs never sent; a job of a provider a process has
               not is claimed by it only once the job's deadline has passed, to end it
    capacity   with other processes about, every second each learns how many jobs the others run on each provider,
               so that routing passes over a provider that is full (the limit itself is kept by `store.slots`)
    hand-over  at shutdown (SIGTERM) a process releases its leases, so the others claim its jobs at once; a job it
               writes down as its own after that (a submit answered late) is handed over as it is written; it claims
               none from the start of its shutdown (it would hold them while it reads nothing)
    retries    attempts older than the retry window are forgotten here, and gone processes with no jobs left

Waking waiters and forwarding upstream hooks across processes is `core.broadcast` (PostgreSQL LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from relay.clock import Clock
from relay.core.background import cancel_all, every
from relay.core.jobs import RETRY_WINDOW_S
from relay.core.lifecycle import Lifecycle
from relay.core.tracker import Tracker
from relay.logs import event
from relay.store.attempts import AttemptStore
from relay.store.jobs import JobRow
from relay.store.leases import CLAIM_BATCH, Leases

log = logging.getLogger("relay.coordination")

ADOPT_EVERY_S = 1.0
ADOPT_SOON_GAP_S = 0.2
FORGET_EVERY_S = 60.0
UNSENT_REASON = "its relay process went away before submitting it"


class Coordinator:
    def __init__(
        self,
        *,
        leases: Leases,
        attempts: AttemptStore,
        tracker: Tracker,
        lifecycle: Lifecycle,
        clock: Clock,
        alone: bool,
        on_adopted: Callable[[list[JobRow]], Awaitable[None]] | None = None,
        retry_window_s: float = RETRY_WINDOW_S,
    ) -> None:
        self.leases = leases
        self.attempts = attempts
        self.tracker = tracker
        self.lifecycle = lifecycle
        self.clock = clock
        # on SQLite: the only process there is, so every running job of its providers is its own at start
        self.alone = alone
        self._on_adopted = on_adopted  # e.g. the adopted jobs' client hooks go on here
        self.retry_window_s = retry_window_s  # attempts older than this are forgotten (see `jobs.retry_window_s`)
        self._loops: list[asyncio.Task[None]] = []
        self._adopting: asyncio.Task[None] | None = None  # the adoption round's loop (one of `_loops`)
        self._early: asyncio.Task[object] | None = None  # a round ahead of the loop's (`adopt_soon`)
        self._early_at = -ADOPT_SOON_GAP_S  # when it started

    async def start(self) -> None:
        await self.adopt(first=True)
        lease_s = self.leases.lease_s
        self._adopting = asyncio.create_task(
            self._every(min(ADOPT_EVERY_S, lease_s / 2), self.adopt), name="leases:adopt"
        )
        self._loops = [
            asyncio.create_task(self._every(lease_s / 3, self.renew), name="leases:renew"),
            self._adopting,
            asyncio.create_task(self._every(FORGET_EVERY_S, self._forget), name="attempts:forget"),
        ]
        if not self.alone and any(p.max_in_flight for p in self.tracker.pool.settings.values()):
            await self.count_elsewhere()
            self._loops.append(
                asyncio.create_task(self._every(ADOPT_EVERY_S, self.count_elsewhere), name="leases:count")
            )

    async def stop_adopting(self) -> None:
        """A process that is stopping claims no more jobs (first, before its tracker stops reading): one claimed
        then would be held, with a fresh lease, by a process that reads nothing any more, until its hand-over,
        while a live process could have adopted it at once. Its leases are still renewed until `stop`."""
        if self._adopting is not None:
            adopting, self._adopting = self._adopting, None
            await cancel_all([adopting, *self._early_round()])
            self._loops.remove(adopting)

    async def stop(self) -> None:
        await cancel_all([*self._loops, *self._early_round()])
        self._loops, self._adopting, self._early = [], None, None
        # First: a job written as this process's from here on (a submit answered only now) is handed over as well.
        self.tracker.store.handing_over = True
        released = await self.leases.release()
        if released:
            event(log, "leases handed over", jobs=released)
        try:  # before the listening connection closes: the jobs left are left to their leases, not claimed at once
            await self.leases.withdraw()
        except Exception:
            log.exception("this process's presence could not be withdrawn")

    @property
    def running(self) -> bool:
        return bool(self._loops) and not any(task.done() for task in self._loops)

    async def adopt(self, *, first: bool = False) -> int:
        """Follow the running jobs whose lease ran out (at the first start alone: every running job of its
        providers), claimed in batches until none is left: a process that died with more than one claim takes is
        adopted whole. A job of a provider this process has not is claimed only past its deadline
        (`Leases.claim_expired`).

        A claim that fails (rolled back: on PostgreSQL, two processes claiming the same jobs at once may deadlock)
        is logged and made again, and the round goes on: the jobs of the claims after it are not left for the next
        round. Two failing in a row end the round (the database is not serving claims now), raising the second
        failure once the jobs claimed so far are followed."""
        providers = self.tracker.pool.names
        followed = 0
        failed: Exception | None = None
        while True:
            try:
                rows = await self.leases.claim_expired(self.clock.now(), providers, any_lease=first and self.alone)
            except Exception as exc:
                again, failed = failed is None, exc  # the later of two is the one raised: the earlier one is logged
                if not again:
                    break
                log.exception("claiming jobs to adopt failed; claimed again")
                continue
            failed = None
            followed += await self.follow_claimed(rows)
            if len(rows) < CLAIM_BATCH:
                break
        if followed and not first:
            event(log, "jobs adopted", jobs=followed)
        if failed is not None:
            raise failed
        alone = first and self.alone
        await self.end_unsent(alone=alone)
        if alone:
            await self.leases.forget_earlier()
        return followed

    async def end_unsent(self, *, alone: bool = False) -> int:
        """End the jobs gone processes (`alone`: the earlier runs) held and never sent (`Leases.claim_unsent`), in
        batches until none is left; how many. Their holds are released, and their clients' retries, waiting on
        them, are answered at once (503, and the next retry starts the request afresh) instead of when the pending
        sweep would end them."""
        ended = 0
        while True:
            rows = await self.leases.claim_unsent(self.clock.now(), alone=alone)
            await self.tracker.end_unsubmitted(rows, UNSENT_REASON)
            ended += len(rows)
            if len(rows) < CLAIM_BATCH:
                break
        if ended:
            event(log, "jobs a gone process never sent ended", jobs=ended)
        return ended

    def adopt_soon(self) -> None:
        """Claim what can be claimed now, ahead of the next round (once: a round under way, or one that started
        less than ADOPT_SOON_GAP_S ago, will do): a client's retry came here for a job another process holds, and
        that process may have just died. Its jobs are followed at once, not up to a round later. Nothing when this
        process claims no more (stopping). Retries that keep coming for a live process's jobs make a round every
        ADOPT_SOON_GAP_S at most."""
        if self._adopting is None or (self._early is not None and not self._early.done()):
            return
        now = self.clock.now()
        if now - self._early_at < ADOPT_SOON_GAP_S:
            return
        self._early_at = now
        self._early = asyncio.create_task(self._adopt_early(), name="leases:adopt-soon")

    def _early_round(self) -> list[asyncio.Task[object]]:
        return [self._early] if self._early is not None else []

    async def _adopt_early(self) -> None:
        try:
            await self.adopt()
        except Exception:
            log.exception("coordination failed", extra={"fields": {"work": "adopt_soon"}})

    async def follow_claimed(self, rows: list[JobRow]) -> int:
        """Follow jobs this process has just claimed (by adoption, or for an upstream hook that named one), and
        carry on what goes with them (their client hooks); how many were not followed here already."""
        rows = [row for row in rows if not self.lifecycle.following(row.id)]
        if rows:
            if self._on_adopted is not None:  # first: a job may end at once, and its end goes to its hook
                try:
                    await self._on_adopted(rows)
                except Exception:  # the jobs are this process's now: followed all the same
                    log.exception("carrying on adopted jobs' hooks failed", extra={"fields": {"jobs": len(rows)}})
            await self.tracker.adopt(rows)
        return len(rows)

    async def renew(self) -> None:
        """Renew the leases of the jobs followed here (and of those being submitted); stop following the jobs another
        process took meanwhile (this one stalled), or that ended (an ending of this process's that landed though its
        write was taken for failed, the job followed again): the end of such a job is told to whoever waits here,
        its client hook included, as nothing else tells it."""
        followed = set(self.lifecycle.followed())
        held = await self.leases.renew(self.clock.now(), followed)
        lost = sorted(followed - held)
        if lost:
            await self.lifecycle.let_go(lost)

    async def count_elsewhere(self) -> None:
        """Learn how many jobs the other live processes run on each provider."""
        pool = self.tracker.pool
        counts = await self.leases.running_elsewhere(self.clock.now())
        pool.elsewhere = {name: counts.get(name, 0) for name in pool.settings}
        for name, running in pool.elsewhere.items():
            pool.metrics.in_flight_elsewhere.labels(name).set(running)

    async def _forget(self) -> None:
        await self.attempts.forget_before(self.clock.now() - self.retry_window_s)
        await self.leases.forget_gone()

    async def _every(self, seconds: float, work: Callable[[], Awaitable[object]]) -> None:
        name = getattr(work, "__name__", "")
        await every(self.clock.sleep, seconds, work, log, "coordination failed", {"work": name})
