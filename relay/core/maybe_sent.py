"""Jobs left maybe sent: PENDING, marked as being sent to the provider on their row (`JobStore.mark_sending_many`),
their task not known, because the process sending them died (or stopped) before the submit was answered. The
upstream may be running such a job's task, or may never have received its request.

Every FIND_EVERY_S a process claims such jobs (`Leases.claim_maybe_sent`: a gone process's, one whose lease ran
out, its own left unsettled) once their mark is FIND_AFTER_TIMEOUTS times their provider's `connect_timeout_s` +
`timeout_s` old, so that a submit that left then has been taken upstream by now or never will be, and looks them up
in the provider's list of tasks (`Upstream.list_tasks`) by the `state` their submit carried (the job's id):

    found     the job is adopted, as an upstream hook naming it adopts it: written SUBMITTED with the task's id,
              followed (read at once) and delivered to its client, charged once if it succeeds
    absent    the list surely holds every task taken since the mark, and none is the job's: it was never taken, and
              is ended as interrupted, its hold released; its client's retry (503, `Retry-After`) starts it afresh
    unknown   the list is cut before the mark (trueai lists its newest 100 tasks only: a later list reaches back
              less far still), names the state twice, or has a task of it that cannot be read: the job is left,
              this process's, and not looked up again; the pending sweep ends it, as it ends any job still PENDING

Whether a list holds every task taken since a mark (`look_up_states`): one shorter than LIST_CUT_AT holds every task
the upstream keeps (novicezk lists them all); a longer one may be cut (trueai's newest 100), and then holds every
task the upstream took after its oldest one. It reaches back past the mark when one of its tasks was taken before
the mark: one whose `submitTime` is CLOCK_SKEW_S before it (room for the upstream's clock to run behind the relay's),
or one of the relay's own jobs whose submit was answered before it (its `submitted_at`: no clock but the relay's).

A list that cannot be read (the provider down, an answer over the size limit) leaves the provider's jobs to be
looked up READ_RETRY_S later. A provider whose dialect has no such list (new-api and the `/v1/mj` resellers look
tasks up by their ids only) leaves its jobs to their hook or the pending sweep, and is asked again LIST_RETRY_S
later (a server of the midjourney-proxy dialect may lack the list too).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from adapters import Listed, TaskView, UpstreamUnavailable
from relay.clock import Clock
from relay.core.background import cancel_all, every
from relay.core.providers import ProviderPool
from relay.core.tracker import PENDING_GRACE_S, SWEEP_EVERY_S, Tracker
from relay.logs import event
from relay.metrics import Metrics
from relay.store.jobs import JobRow, JobStore
from relay.store.leases import Leases

log = logging.getLogger("relay.maybe_sent")

FIND_EVERY_S = 5.0
FIND_AFTER_TIMEOUTS = 2.0
READ_RETRY_S = 30.0
LIST_RETRY_S = 600.0
# A job passed over (its lookup told nothing) is remembered this long: by then the pending sweep has ended it.
PASSED_OVER_S = PENDING_GRACE_S + SWEEP_EVERY_S
ABSENT_REASON = "its relay process went away while submitting it, and its provider never took it"
# A task list this long may be cut (trueai lists its newest 100 tasks); a shorter one holds every task kept.
LIST_CUT_AT = 100
# How far behind the relay's an upstream's clock may be: a submit that left at t (by the relay's clock) was taken
# upstream at t or later, which that upstream may write down as up to this much earlier.
CLOCK_SKEW_S = 300.0


@dataclass(frozen=True, slots=True)
class StateLookup:
    """What a task list says of some jobs left maybe sent: the task each job found has, and the jobs the upstream
    surely never took. A job in neither is not known either way."""

    found: Mapping[str, TaskView]
    absent: frozenset[str]


def look_up_states(listed: Listed, marks: Mapping[str, float], answered_before: float | None = None) -> StateLookup:
    """What a task list says of the jobs `marks` names (a job id, the `state` its submit carried -> when it was
    marked, by the relay's clock: its request had not left before then). `answered_before`: when the earliest answered
    submit among the list's tasks that are the relay's own jobs was answered (the upstream took it before then), if
    any. A state one listed task carries is found; one no task carries is absent when the list holds every task taken
    since its mark (see the module's doc); a state two tasks carry, or one of a task that could not be read, is not
    known."""
    carried: dict[str, list[TaskView]] = {}
    for view in listed.views:
        if view.state is not None and view.state in marks:
            carried.setdefault(view.state, []).append(view)
    found = {state: views[0] for state, views in carried.items() if len(views) == 1}
    times = [view.submit_time for view in listed.views if view.submit_time is not None]
    taken_by_upstream_clock = min(times) / 1000 + CLOCK_SKEW_S if times else math.inf
    taken_by_relay_clock = answered_before if answered_before is not None else math.inf
    whole = listed.count < LIST_CUT_AT
    absent = frozenset(
        state
        for state, marked_at in marks.items()
        if state not in carried
        and state not in listed.unreadable
        and (whole or taken_by_upstream_clock <= marked_at or taken_by_relay_clock <= marked_at)
    )
    return StateLookup(found=found, absent=absent)


class MaybeSent:
    def __init__(
        self,
        *,
        leases: Leases,
        store: JobStore,
        pool: ProviderPool,
        tracker: Tracker,
        follow: Callable[[list[JobRow]], Awaitable[int]],
        submitting: Callable[[str], bool],
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.leases = leases
        self.store = store
        self.pool = pool
        self.tracker = tracker
        self._follow = follow  # follow jobs adopted here, as adoption does (`Coordinator.follow_claimed`)
        self._submitting = submitting  # a job this process is submitting now is not looked up
        self.metrics = metrics
        self.clock = clock
        self._asked_again_at: dict[str, float] = {}  # a provider whose list could not be read, or that has none
        self._passed_over: dict[str, float] = {}  # jobs whose lookup told nothing, and when
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.create_task(
            every(self.clock.sleep, FIND_EVERY_S, self.round, log, "looking up jobs left maybe sent failed"),
            name="maybe-sent",
        )

    async def stop(self) -> None:
        """A stopping process claims no more (its jobs would be held by a process that reads nothing)."""
        if self._loop is not None:
            await cancel_all([self._loop])
            self._loop = None

    def marked_before(self, now: float) -> dict[str, float]:
        """For each provider to be asked now, the time before which a job's mark is old enough."""
        before: dict[str, float] = {}
        for name, settings in self.pool.settings.items():
            if now < self._asked_again_at.get(name, -math.inf):
                continue
            before[name] = now - FIND_AFTER_TIMEOUTS * (settings.connect_timeout_s + settings.timeout_s)
        return before

    async def round(self) -> int:
        """Claim the jobs left maybe sent and settle those their provider's list tells of; how many were settled."""
        now = self.clock.now()
        for job_id, at in list(self._passed_over.items()):
            if now - at > PASSED_OVER_S:
                del self._passed_over[job_id]
        claimed = await self.leases.claim_maybe_sent(now, self.marked_before(now), self._passed_over)
        by_provider: dict[str, list[JobRow]] = {}
        for row in claimed:
            if row.provider is not None and not self._submitting(row.id):
                by_provider.setdefault(row.provider, []).append(row)
        settled = 0
        for provider, rows in sorted(by_provider.items()):
            try:  # one provider's failure holds up none of the others
                settled += await self._look_up(provider, rows)
            except Exception:
                log.exception("looking up jobs left maybe sent failed", extra={"fields": {"provider": provider}})
        return settled

    async def _look_up(self, provider: str, rows: list[JobRow]) -> int:
        try:
            listed = await self.pool.list_tasks(provider)
        except UpstreamUnavailable as exc:
            self._asked_again_at[provider] = self.clock.now() + READ_RETRY_S
            event(log, "task list unread", provider=provider, jobs=len(rows), reason=str(exc))
            return 0
        if listed is None:
            self._asked_again_at[provider] = self.clock.now() + LIST_RETRY_S
            event(log, "provider lists no tasks; jobs left maybe sent wait for the pending sweep", provider=provider)
            return 0
        marks = {row.id: row.updated_at for row in rows}
        answered_before: float | None = None
        if listed.count >= LIST_CUT_AT:  # a list that may be cut: does it reach back past the marks?
            states = [view.state for view in listed.views if view.state is not None and view.state not in marks]
            answered_before = await self.store.first_answered(states)
        lookup = look_up_states(listed, marks, answered_before)
        adopted: list[JobRow] = []
        failed: set[str] = set()  # looked up again next round
        for row in rows:
            view = lookup.found.get(row.id)
            if view is None:
                continue
            try:
                taken = await self.store.adopt(row.id, provider, view.upstream_id, self.clock.now())
                if taken is not None:
                    adopted.append(taken)
            except Exception:  # one job's failure holds up none of the others
                failed.add(row.id)
                log.exception("adopting a job left maybe sent failed", extra={"fields": {"job": row.id}})
        if adopted:
            await self._follow(adopted)
            event(log, "jobs left maybe sent found upstream", provider=provider, jobs=len(adopted))
        absent = [row for row in rows if row.id in lookup.absent]
        if absent:
            await self.tracker.end_unsubmitted(absent, ABSENT_REASON)
            event(log, "jobs left maybe sent never taken upstream", provider=provider, jobs=len(absent))
        settled = {row.id for row in adopted} | lookup.absent | failed
        unknown = [row.id for row in rows if row.id not in settled]
        now = self.clock.now()
        self._passed_over.update((job_id, now) for job_id in unknown)
        for outcome, count in (("adopted", len(adopted)), ("ended", len(absent)), ("unknown", len(unknown))):
            if count:
                self.metrics.of(self.metrics.maybe_sent, provider, outcome).inc(count)
        return len(adopted) + len(absent)
