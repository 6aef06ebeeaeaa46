"""The one owner of a running job's life: what an upstream view means for it, and the write that follows.

Whoever learns something about a job (a poll round, and next an upstream hook or a recovery) hands the view to
`apply`; nothing else decides a job's state. `observe()` is the pure decision. A change of state or progress is
one guarded write (group-committed across jobs) and an event to whoever waits. A task the upstream finished is
delivered before the job counts as succeeded: a grid or an image is downloaded once and kept (its result shape
decides which), a text result is kept as it came. A job the upstream no longer knows for `lost_after_s`, or one
past its deadline (for a job parked in MODAL: the time a confirmation may take), ends FAILED with its hold
released. Ending a job also frees its provider slot.

The jobs being followed are registered here (`follow`); the tracker decides when each is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal, cast

from adapters import TaskStatus, TaskView, UpstreamUnavailable
from adapters.http import DOWNLOAD_LANES
from relay.clock import Clock
from relay.config import Config
from relay.core.background import cancel_all, let_finish
from relay.core.batch import Batcher
from relay.core.events import JobEvent, JobEvents
from relay.core.finish import Finisher
from relay.core.providers import ProviderPool
from relay.domain import FailureCode, JobState, Mode, ResultShape
from relay.images import GRID, IMAGE, ImageError, ImageStore, StorageError
from relay.store.jobs import Ending, JobRow, JobStore, ProgressChange
from relay.store.leases import Leases

log = logging.getLogger("relay.lifecycle")

# How many ended jobs' upstream tasks are remembered (`Lifecycle.ended_here`).
ENDED_REMEMBERED = 10_000
# At most one progress write starts this often. A job's hooks report its progress a few times a second, spread over
# the job, so a thousand running jobs brought progress of a few jobs at each turn of the loop, each few a transaction
# of its own; this makes them one transaction per window. What applies a read or a hook waits for its write as
# before (a hook call was answered already), at most this much longer.
PROGRESS_EVERY_S = 0.02
# How long a stopping process lets the deliveries under way finish (a download takes well under a second).
STOP_WAIT_S = 5.0
# The longest pause between two tries to keep a downloaded result in an image store that failed.
KEEP_PAUSE_MAX_S = 10.0
# Results held in memory at once while they wait for an image store that failed (each is a grid of up to
# `images.max_download_bytes`): past that, a result is tried `images.download_attempts` times, as a download is.
KEEP_WAITING_MAX = 32
_FILE_OF = {ResultShape.GRID: GRID, ResultShape.IMAGE: IMAGE}


@dataclass(slots=True)
class Tracked:
    job_id: str
    model: str
    provider: str
    upstream_id: str
    deadline_at: float
    state: JobState = JobState.SUBMITTED
    progress: int = 0
    shape: ResultShape = ResultShape.GRID
    missing_since: float | None = None
    delivering: bool = False
    confirmed: bool = False  # a MODAL job the client confirmed: it never goes back to MODAL
    slot: bool = True  # holds one of its provider's running-job slots (a job waiting in MODAL does not)
    due_at: float = 0.0  # when the job is next read; 0 until it is first followed
    running_since: float | None = None  # when this process first saw it IN_PROGRESS
    running_from: int = 0  # its progress then (more than 0 for a job adopted while it ran)
    may_wait: bool = False  # a follow-up the upstream may park in MODAL (a job submitted on its own never waits)
    # Taken from the store (claimed from a process that died or stalled): its result may be kept already
    taken_up: bool = False
    mode: str = field(kw_only=True)  # fast, relax or turbo: how long it may run (`jobs.deadline_s`)


@dataclass(frozen=True, slots=True)
class _End:
    """How a followed job ends (`Lifecycle.end`)."""

    tracked: Tracked
    succeeded: bool
    error_code: FailureCode | None = None
    reason: str | None = None
    view: TaskView | None = None  # the upstream's view of a job it finished: its image URL, buttons and text

    @property
    def superseded(self) -> bool:
        """A read's verdict that the job timed out or was lost, for a job the upstream has since been heard to
        finish (a hook heard while the end was being written, or its lease checked): its result is being delivered,
        and the delivery ends it, as succeeded, charged for the task the upstream ran; as `expire` leaves it."""
        return self.tracked.delivering and self.error_code in (FailureCode.TIMEOUT, FailureCode.LOST)

    def ending(self) -> Ending:
        view = self.view
        return Finisher.ending(
            self.tracked.job_id,
            self.succeeded,
            self.error_code,
            self.reason,
            image_url=view.image_url if view else None,
            buttons=buttons_json(view) if view else None,
            text=view.final_prompt if view else None,
        )


@dataclass(frozen=True, slots=True)
class Step:
    kind: Literal["none", "progress", "success", "failure"]
    state: JobState | None = None
    progress: int = 0
    error_code: FailureCode | None = None
    reason: str | None = None


_STATE_OF = {TaskStatus.IN_PROGRESS: JobState.IN_PROGRESS, TaskStatus.MODAL: JobState.MODAL}


def observe(
    state: JobState,
    progress: int,
    view: TaskView,
    shape: ResultShape = ResultShape.GRID,
    confirmed: bool = False,
    may_wait: bool = True,
) -> Step:
    """What an upstream task view means for a job that is in `state` at `progress` (`may_wait`: a follow-up,
    which the upstream may park in MODAL; a MODAL view of any other job is read as one of a job submitted)."""
    if view.status is TaskStatus.SUCCESS:
        if shape is ResultShape.TEXT:  # its text is its whole result (an image URL is the picture it described)
            if view.final_prompt:
                return Step("success", JobState.IN_PROGRESS, 100)
            return Step(
                "failure", error_code=FailureCode.FAILED, reason="the upstream reported success without its text"
            )
        if view.image_url:
            return Step("success", JobState.IN_PROGRESS, 100)
        return Step("failure", error_code=FailureCode.FAILED, reason="the upstream reported success without an image")
    if view.status in (TaskStatus.FAILURE, TaskStatus.CANCEL):
        reason = view.fail_reason or ("cancelled upstream" if view.status is TaskStatus.CANCEL else None)
        return Step("failure", error_code=FailureCode.BANNED if view.banned else FailureCode.FAILED, reason=reason)
    new_state = _STATE_OF.get(view.status, JobState.SUBMITTED)
    if state is JobState.IN_PROGRESS and new_state is not JobState.IN_PROGRESS:
        new_state = state  # never step back
    if new_state is JobState.MODAL and (confirmed or not may_wait):
        new_state = state  # a view read before the confirmation, or of a job no confirmation can start
    if state is JobState.MODAL and new_state is JobState.SUBMITTED and not confirmed:
        new_state = state  # only a confirmation (or the task running) takes a job out of MODAL
    new_progress = max(progress, min(99, view.progress))
    if new_state is state and new_progress == progress:
        return Step("none")
    return Step("progress", new_state, new_progress)


# How far on a task is, by its status (any other status: 0).
_RANK = {TaskStatus.MODAL: 1, TaskStatus.IN_PROGRESS: 2} | dict.fromkeys(
    (status for status in TaskStatus if status.terminal), 3
)


def ahead(view: TaskView, other: TaskView) -> bool:
    """Whether `view` of a task is further on than `other`: by status (submitted, waiting in MODAL, running,
    ended), then by progress; of two ends, the first one heard stands."""
    if other.status.terminal:
        return False
    rank, other_rank = _RANK.get(view.status, 0), _RANK.get(other.status, 0)
    return rank > other_rank or (rank == other_rank and view.progress > other.progress)


def read_after_hook(
    now: float, interval: float, running_since: float | None, progress: int, progress_then: int = 0
) -> float:
    """When a job an upstream hook just spoke of is next read: once hooks have been silent for a whole poll
    interval; or, when the progress it made since this process first saw it running (at `progress_then`) says it
    ends sooner, a quarter of an interval after that end, so that a lost end call costs about that rather than up
    to an interval and more (Midjourney reports progress in about even steps of time: 0, 15, 31, ... 93%, each
    when it is reached). Never sooner than a quarter of an interval from now."""
    quiet = now + interval
    made = progress - progress_then
    if running_since is None or not 0 < progress < 100 or made <= 0 or now <= running_since:
        return quiet
    expected_end = now + (now - running_since) * (100 - progress) / made
    return min(quiet, expected_end + interval / 4)


def buttons_json(view: TaskView) -> str:
    return json.dumps(
        [
            {"customId": b.custom_id, "label": b.label, "emoji": b.emoji, "type": b.type, "style": b.style}
            for b in view.buttons
        ]
    )


class Lifecycle:
    def __init__(
        self,
        *,
        config: Config,
        store: JobStore,
        pool: ProviderPool,
        images: ImageStore,
        finisher: Finisher,
        events: JobEvents,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.images = images
        self.finisher = finisher
        self.events = events
        self.clock = clock
        self._jobs: dict[str, dict[str, Tracked]] = {name: {} for name in pool.names}
        self._by_job: dict[str, Tracked] = {}
        self._by_upstream: dict[tuple[str, str], Tracked] = {}
        # The upstream tasks of the jobs that ended here lately (oldest first): a hook about one, arriving after a
        # read saw the end, is known late without a database read.
        self._ended: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Progress of many jobs written together: a round's changes, and the upstream hooks arriving meanwhile, at
        # most one write every PROGRESS_EVERY_S (hooks report progress all through a job, not together).
        self._progress: Batcher[ProgressChange, None] = Batcher(
            self._write_progress, "progress", every_s=PROGRESS_EVERY_S
        )
        # The lease checks of deliveries starting together, renewed together: each is a write, and a thousand
        # grids finishing at once must not queue a thousand transactions ahead of their downloads.
        self._holds: Batcher[str, bool] = Batcher(self._hold_leases, "leases")
        self._deliveries: set[asyncio.Task[None]] = set()
        # Results downloaded at once over all providers (each is held in memory until kept): a provider's lanes.
        self._download_slots = asyncio.Semaphore(DOWNLOAD_LANES)
        self._keep_waiting = 0  # results held in memory until an image store that failed takes them (`_keep`)
        # The tracker's wake-up: a job of the provider is due at the time given.
        self.on_follow: Callable[[str, float], None] = lambda provider, due_at: None
        self.leases: Leases | None = None  # with them, a finished job is delivered only while its lease is held

    # -- the jobs being followed ---------------------------------------------------------------------------------

    def follow(self, tracked: Tracked) -> None:
        """Follow a submitted job to its end; it is first read one poll interval on (unless `due_at` says)."""
        if not tracked.due_at:
            tracked.due_at = self.clock.now() + self.pool.poll_interval(tracked.provider)
        self._jobs[tracked.provider][tracked.job_id] = tracked
        self._by_job[tracked.job_id] = tracked
        self._by_upstream[(tracked.provider, tracked.upstream_id)] = tracked
        self.on_follow(tracked.provider, tracked.due_at)

    def started(self, tracked: Tracked) -> None:
        """A job the upstream just took (or parked in MODAL): follow it, and tell whoever waits."""
        self.follow(tracked)
        self.events.publish(JobEvent(tracked.job_id, tracked.state, tracked.progress))

    def followed(self) -> list[str]:
        return list(self._by_job)

    def delivering(self) -> bool:
        """Whether finished jobs are being delivered here now (downloaded, kept, ended)."""
        return bool(self._deliveries)

    def forget(self, job_id: str) -> None:
        """Stop following a job without ending it: another process follows it now."""
        tracked = self._unfollow(job_id)
        if tracked is not None:
            self._free_slot(tracked)

    def _free_slot(self, tracked: Tracked) -> None:
        """Give the job's provider slot back, if it holds one."""
        if tracked.slot:
            self.pool.release(tracked.provider)
            tracked.slot = False

    def _unfollow(self, job_id: str) -> Tracked | None:
        """The job no longer followed here (None if it was not): its slot is the caller's to release."""
        tracked = self._by_job.pop(job_id, None)
        if tracked is None:
            return None
        self._jobs[tracked.provider].pop(job_id, None)
        if self._by_upstream.get((tracked.provider, tracked.upstream_id)) is tracked:
            del self._by_upstream[(tracked.provider, tracked.upstream_id)]
        return tracked

    def find(self, provider: str, upstream_id: str) -> Tracked | None:
        """The followed job that is this provider's task `upstream_id`."""
        return self._by_upstream.get((provider, upstream_id))

    def ended_here(self, provider: str, upstream_id: str) -> bool:
        """Whether this provider's task `upstream_id` belongs to a job that ended here lately."""
        return (provider, upstream_id) in self._ended

    def following(self, job_id: str) -> bool:
        return job_id in self._by_job

    def jobs_of(self, provider: str) -> dict[str, Tracked]:
        return self._jobs[provider]

    def count(self) -> int:
        return len(self._by_job)

    @staticmethod
    def tracked_from(row: JobRow) -> Tracked:
        assert row.provider is not None and row.upstream_id is not None
        return Tracked(
            job_id=row.id,
            model=row.model,
            provider=row.provider,
            upstream_id=row.upstream_id,
            deadline_at=row.deadline_at,
            state=row.state,
            progress=row.progress,
            shape=row.spec.shape,
            confirmed=row.confirmed_at is not None,  # a view read before its confirmation never parks it again
            slot=row.state is not JobState.MODAL,
            may_wait=row.spec.follow_up,
            mode=row.mode,
        )

    def take_up(self, row: JobRow) -> Tracked:
        """Follow a job this process just took from the store (claimed, or confirmed while another followed it):
        holding a provider slot unless it waits in MODAL, read at once, as it may have moved on meanwhile."""
        tracked = self.tracked_from(row)
        tracked.taken_up = True
        if tracked.slot:
            self.pool.acquire(tracked.provider)
        tracked.due_at = self.clock.now()
        self.follow(tracked)
        return tracked

    # -- confirming a job that waits in MODAL --------------------------------------------------------------------
    #
    # The upstream may start the task the moment it takes the confirmation, before the relay has written it down:
    # so the job is marked confirmed (no read takes it back to MODAL, and the deadline it runs to applies) before
    # the confirmation is sent, and unmarked if the upstream refuses it.

    def confirming(self, job_id: str, deadline_at: float) -> float | None:
        """Mark a MODAL job as being confirmed: it takes a provider slot and runs to `deadline_at`. Returns the
        deadline it had (for `unconfirmed`), or None when the job is not followed here."""
        tracked = self._by_job.get(job_id)
        if tracked is None:
            return None
        waited_until = tracked.deadline_at
        tracked.confirmed, tracked.deadline_at = True, deadline_at
        if not tracked.slot:
            self.pool.acquire(tracked.provider)
            tracked.slot = True
        return waited_until

    def unconfirmed(self, job_id: str, waited_until: float) -> None:
        """The upstream refused the confirmation: the job waits in MODAL again, to its old deadline."""
        tracked = self._by_job.get(job_id)
        if tracked is None:
            return
        tracked.confirmed, tracked.deadline_at = False, waited_until
        if tracked.state is JobState.MODAL:
            self._free_slot(tracked)

    def confirmed(self, row: JobRow) -> bool:
        """The confirmation is written (`row`, as written, with this process holding its lease): the job runs under
        the upstream id it now has, to the deadline it now has, holding a provider slot, and no view read before
        the confirmation parks it again. A job not followed here (another process followed the waiting job, or
        took it from this one meanwhile) is followed from now on, read at once: True then. Either way the change is
        told (to the job's client hook, and to the other processes: the one that followed it lets it go)."""
        assert row.upstream_id is not None
        tracked = self._by_job.get(row.id)
        if tracked is None:
            self.take_up(row)  # confirmed, as the row says
            self.events.publish(JobEvent(row.id, row.state, row.progress))
            return True
        self.confirming(row.id, row.deadline_at)  # already marked, unless this process adopted the job meanwhile
        if tracked.upstream_id != row.upstream_id:
            self._by_upstream.pop((tracked.provider, tracked.upstream_id), None)
            tracked.upstream_id = row.upstream_id
            self._by_upstream[(tracked.provider, row.upstream_id)] = tracked
        if tracked.state is JobState.MODAL:
            tracked.state, tracked.progress = JobState.SUBMITTED, 0
            tracked.due_at = self.clock.now() + self.pool.poll_interval(tracked.provider)
            self.events.publish(JobEvent(row.id, JobState.SUBMITTED, 0))
            self.on_follow(tracked.provider, tracked.due_at)
        return False

    # -- applying what the upstream says -------------------------------------------------------------------------

    async def apply(
        self, provider: str, jobs: list[Tracked], views: list[TaskView] | None, unread: Collection[str] = ()
    ) -> None:
        """Apply one read of `jobs` (all of `provider`): the views the upstream gave, or None when it could not
        answer. A job missing from the views counts towards being lost, unless its task is among `unread` (the
        upstream could not answer for it: that says nothing of the task); every job is checked against its
        deadline."""
        jobs = [tracked for tracked in jobs if not tracked.delivering]  # already finished: being delivered
        by_upstream: dict[str, list[Tracked]] = {}
        for tracked in jobs:
            by_upstream.setdefault(tracked.upstream_id, []).append(tracked)
        now = self.clock.now()
        changes: list[tuple[Tracked, Step]] = []
        successes: list[tuple[Tracked, TaskView]] = []
        failures: dict[str, tuple[Tracked, FailureCode, str | None]] = {}
        if views is not None:
            # A task listed more than once (a provider's duplicate rows) is read as its most advanced view, as
            # hooks speaking of it twice are: one view decides, so a finished job is delivered once.
            latest: dict[str, TaskView] = {}
            for view in views:
                kept = latest.get(view.upstream_id)
                if kept is None or ahead(view, kept):
                    latest[view.upstream_id] = view
            for view in latest.values():
                for tracked in by_upstream.get(view.upstream_id, ()):
                    tracked.missing_since = None
                    step = observe(
                        tracked.state, tracked.progress, view, tracked.shape, tracked.confirmed, tracked.may_wait
                    )
                    if step.kind == "progress":
                        changes.append((tracked, step))
                    elif step.kind == "success":
                        successes.append((tracked, view))
                    elif step.kind == "failure":
                        failures[tracked.job_id] = (tracked, step.error_code or FailureCode.FAILED, step.reason)
            for tracked in jobs:
                if tracked.upstream_id in latest or tracked.upstream_id in unread:
                    continue
                tracked.missing_since = tracked.missing_since or now
                if now - tracked.missing_since >= self.config.jobs.lost_after_s:
                    failures[tracked.job_id] = (tracked, FailureCode.LOST, "the upstream no longer knows the job")
        records = [
            ProgressChange(t.job_id, step.state or t.state, step.progress, t.state, self._new_deadline(t, step, now))
            for t, step in changes
        ]
        moved = {record.job_id: record.deadline_at for record in records if record.deadline_at is not None}
        finished = {tracked.job_id for tracked, _ in successes}
        for tracked in jobs:
            deadline_at = moved.get(tracked.job_id, tracked.deadline_at)
            if now >= deadline_at and tracked.job_id not in failures and tracked.job_id not in finished:
                failures[tracked.job_id] = (tracked, FailureCode.TIMEOUT, _deadline_reason(tracked))

        for tracked, _ in successes:
            tracked.state, tracked.progress, tracked.delivering = JobState.IN_PROGRESS, 100, True
            self.events.publish(JobEvent(tracked.job_id, tracked.state, tracked.progress))
        # The upstream's image URL, buttons and text are written with the job's end. Each job is delivered by a
        # task of its own, all at once: the first are ended (and answered) while others are still downloading.
        for tracked, view in successes:
            task = asyncio.create_task(self._deliver(tracked, view), name=f"deliver:{provider}")
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        if records:
            await self._progress.many(records)
        for tracked, step in changes:
            new_state = step.state or tracked.state
            if tracked.delivering or (new_state is tracked.state and step.progress < tracked.progress):
                continue  # another view of the job, applied meanwhile, took it further: this one is stale
            if new_state is JobState.MODAL and tracked.confirmed:
                continue  # confirmed while this view was written: the job takes a slot and runs, it waits no more
            moved_to = self._new_deadline(tracked, step, now)
            if moved_to is not None:
                tracked.deadline_at = moved_to
            if not tracked.slot and _runs_unconfirmed(tracked, new_state):  # it runs: it holds a slot, as confirmed
                self.pool.acquire(tracked.provider)
                tracked.slot = True
            tracked.state, tracked.progress = new_state, step.progress
            if tracked.state is JobState.IN_PROGRESS and tracked.running_since is None:
                tracked.running_since, tracked.running_from = now, tracked.progress
            if tracked.state is JobState.MODAL:  # parked by the upstream: it runs nothing now
                self._free_slot(tracked)
            self.events.publish(JobEvent(tracked.job_id, tracked.state, tracked.progress))
        if failures:
            await self.end_all([_End(t, False, code, reason) for t, code, reason in failures.values()])

    def _new_deadline(self, tracked: Tracked, step: Step, now: float) -> float | None:
        """The deadline a progress step gives the job, if it moves it on. A job the upstream parks in MODAL (a
        follow-up it took, then asked to confirm) waits for `submit/modal` for the modal window from now, as one
        parked at its submit does, not to a running job's deadline; one it runs out of MODAL unconfirmed (confirmed
        upstream some other way) runs to its mode's deadline from now, as a confirmed one does."""
        new_state = step.state or tracked.state
        if new_state is tracked.state:  # progress alone (nearly every step): the deadline stays
            return None
        if new_state is JobState.MODAL:
            return now + self.config.jobs.modal_timeout_s
        if _runs_unconfirmed(tracked, new_state):
            return now + self.config.jobs.deadline_s.of(cast(Mode, tracked.mode))
        return None

    async def hook(self, tracked: Tracked, view: TaskView) -> None:
        """Apply what an upstream hook said of a job (`hooks`)."""
        await self.hooks(tracked.provider, [(tracked, view)])

    async def hooks(self, provider: str, calls: list[tuple[Tracked, TaskView]]) -> None:
        """Apply what upstream hooks said of jobs of `provider`, as one read of them would (of a job spoken of more
        than once, its most advanced view); then each job is next read as `read_after_hook` says (hooks keep it
        current: polling is the safety net for a lost call), but one that applying them made due at once (an ending
        that could not be written, tried again at the next read) is read at once."""
        latest: dict[str, tuple[Tracked, TaskView]] = {}
        for tracked, view in calls:
            if self._by_job.get(tracked.job_id) is not tracked:
                continue  # ended (or handed over) since the call was read: nothing to apply
            kept = latest.get(tracked.job_id)
            if kept is None or ahead(view, kept[1]):
                latest[tracked.job_id] = (tracked, view)
        due = {job_id: tracked.due_at for job_id, (tracked, _) in latest.items()}
        await self.apply(provider, [tracked for tracked, _ in latest.values()], [view for _, view in latest.values()])
        now = self.clock.now()
        interval = self.pool.poll_interval(provider)
        for job_id, (tracked, _) in latest.items():
            if tracked.due_at != due[job_id] and tracked.due_at <= now:
                continue
            tracked.due_at = read_after_hook(
                now, interval, tracked.running_since, tracked.progress, tracked.running_from
            )

    async def _write_progress(self, changes: list[ProgressChange]) -> list[None]:
        await self.store.record_progress(changes, self.clock.now())
        return [None] * len(changes)

    async def expire(self, job_id: str) -> bool:
        """End a job that passed its deadline now, without waiting for the next read. False while the upstream has
        finished it and its result is being delivered: it ends on its own shortly, as succeeded. A job this process
        does not follow is left to the one that does (or adopts it): True only when it has ended."""
        tracked = self._by_job.get(job_id)
        if tracked is None:
            row = await self.store.get(job_id)
            return row is None or row.state.terminal
        if tracked.delivering:
            return False
        return await self.end(
            tracked, succeeded=False, error_code=FailureCode.TIMEOUT, reason=_deadline_reason(tracked)
        )

    # -- ends ----------------------------------------------------------------------------------------------------

    async def _deliver(self, tracked: Tracked, view: TaskView) -> None:
        """Download a finished job's result, keep it, and end the job (group-committed with the others ending
        meanwhile). Each job goes on its own, so none waits for a slower neighbour's download. A text result
        needs no download. A download that fails, or is not an image, is tried again, up to
        `images.download_attempts` times, then the job ends as a download failure. A downloaded image the store
        will not keep is kept again, from the bytes in hand, until the job's deadline (`_keep`); one still not kept
        then ends the job as an internal failure. A lease check that could not be written leaves the job to be read
        again at once."""
        try:
            if not await self._still_mine(tracked):
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "checking a finished job's lease failed; it is read again", extra={"fields": {"job": tracked.job_id}}
            )
            tracked.delivering = False
            tracked.due_at = self.clock.now()
            self.on_follow(tracked.provider, tracked.due_at)
            return
        try:
            if await self._kept_already(tracked):
                await self.end(tracked, succeeded=True, view=view)
                return
            code, reason = FailureCode.DOWNLOAD, "the image could not be fetched"
            for attempt in range(self.config.images.download_attempts):
                if attempt:
                    await self.clock.sleep(min(2.0**attempt, 10.0))
                result = await self._download(tracked, view)
                if isinstance(result, str):
                    code, reason = FailureCode.DOWNLOAD, result
                    continue
                if result is not None:
                    failed = await self._keep(tracked, result)
                    if isinstance(failed, ImageError):
                        code, reason = FailureCode.DOWNLOAD, str(failed)
                        continue
                    if failed is not None:
                        await self.end(
                            tracked, succeeded=False, error_code=FailureCode.INTERNAL, reason=str(failed), view=view
                        )
                        return
                await self.end(tracked, succeeded=True, view=view)
                return
            await self.end(tracked, succeeded=False, error_code=code, reason=reason, view=view)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery failed", extra={"fields": {"job": tracked.job_id}})
            await self.end(
                tracked, succeeded=False, error_code=FailureCode.INTERNAL, reason="the relay failed to store it"
            )

    async def _kept_already(self, tracked: Tracked) -> bool:
        """Whether a job taken from the store has its whole result kept already: the process that held it died (or
        stalled) after keeping it, before its ending was written. Its grid is not downloaded a second time. One the
        kill left half-written (a file is written in place), or a store that cannot say, is downloaded again."""
        if not tracked.taken_up or tracked.shape is ResultShape.TEXT:
            return False
        try:
            return await self.images.kept_whole(tracked.job_id, _FILE_OF[tracked.shape])
        except StorageError:
            return False

    async def _keep(self, tracked: Tracked, data: bytes) -> ImageError | StorageError | None:
        """Keep a finished job's downloaded image: None once kept, or why not. An image store that fails (a bucket
        down or unreachable for a while, a full disk) is tried again with the same bytes, after 2 s, 4 s, 8 s, then
        every `KEEP_PAUSE_MAX_S`, until the job's deadline, the last try at it (and at least
        `images.download_attempts` times, for a job that finished at its deadline): the upstream made the image, so
        a store that comes back in time costs the job only the wait. Meanwhile the job stays running, its hold
        open; its deadline does not end it while it is being delivered (`expire`). At most `KEEP_WAITING_MAX`
        results wait so at once (each held in memory): one past that is tried `images.download_attempts` times."""
        tries = 0
        waiting = False  # counted among the results held for the store
        try:
            while True:
                try:
                    await self.images.save(tracked.job_id, _FILE_OF[tracked.shape], data)
                    return None
                except ImageError as exc:
                    return exc
                except StorageError as exc:
                    tries += 1
                    if not waiting and self._keep_waiting < KEEP_WAITING_MAX:
                        waiting = True
                        self._keep_waiting += 1
                    left = tracked.deadline_at - self.clock.now() if waiting else 0.0
                    if tries >= self.config.images.download_attempts and left <= 0:
                        return exc
                    pause = min(2.0**tries, KEEP_PAUSE_MAX_S)
                    if tries >= self.config.images.download_attempts:
                        pause = min(pause, left)
                    log.warning(
                        "a finished job's image could not be kept; it is kept again shortly",
                        extra={"fields": {"job": tracked.job_id, "why": str(exc), "tries": tries, "pause_s": pause}},
                    )
                    await self.clock.sleep(pause)
        finally:
            if waiting:
                self._keep_waiting -= 1

    async def _still_mine(self, tracked: Tracked) -> bool:
        """Whether this process still holds a finished job (renewed now, with the others checked meanwhile), so
        that no grid is downloaded twice: one whose lease another process took while this one stalled is left
        to it."""
        if self.leases is None:
            return True
        if await self._holds(tracked.job_id):
            return True
        await self.let_go([tracked.job_id])
        return False

    async def let_go(self, job_ids: list[str]) -> None:
        """Stop following jobs this process no longer holds: another process took them, or they ended (an ending of
        this process's that landed though its write was taken for failed: the job was followed again, and it is not
        delivered or ended a second time). The end of one that ended is told to whoever waits, as a write that found
        it ended tells it (`Finisher.tell_ended`): nobody heard of it when it was written."""
        for job_id in job_ids:
            self.forget(job_id)
        await self.finisher.tell_ended(job_ids)

    async def _hold_leases(self, job_ids: list[str]) -> list[bool]:
        """Whether this process still holds each job. A check answered late (it waited on a stalled connection or a
        full pool, or the process was paused meanwhile) wrote a lease stamped when it was asked, which may have run
        out by the time it landed, or be about to: another process may claim those jobs at any moment, and they are
        taken for lost (adopted again once the lease runs out), not downloaded or ended here beside that process."""
        assert self.leases is not None
        asked = self.clock.now()
        held = await self.leases.hold(job_ids, asked)
        if self.clock.now() - asked > self.leases.lease_s / 2:
            return [False] * len(job_ids)
        return [job_id in held for job_id in job_ids]

    async def _download(self, tracked: Tracked, view: TaskView) -> bytes | str | None:
        """The result's bytes, why they could not be had, or None for a result that is text."""
        if tracked.shape is ResultShape.TEXT:
            return None
        assert view.image_url is not None
        async with self._download_slots:
            try:
                return await self.pool.download(tracked.provider, view.image_url)
            except UpstreamUnavailable as exc:
                return str(exc)
            except Exception:  # a bug on one job's path: that job's download failed, not its neighbours'
                log.exception("download failed", extra={"fields": {"job": tracked.job_id}})
                return "the image could not be fetched"

    async def end(
        self,
        tracked: Tracked,
        *,
        succeeded: bool,
        error_code: FailureCode | None = None,
        reason: str | None = None,
        view: TaskView | None = None,
    ) -> bool:
        """Whether the job has ended (False: it was not ended here: the write failed and the job is followed
        again, another process holds it now, or another call here took it first). `view` is the upstream's view of
        a job it finished: its image URL, buttons and text are kept with the job."""
        return (await self.end_all([_End(tracked, succeeded, error_code, reason, view)]))[0]

    async def end_all(self, ends: list[_End]) -> list[bool]:
        """End jobs in one group commit (see `end`); whether each has ended."""
        ended = [True] * len(ends)
        elsewhere = await self._not_held([end for end in ends if not end.succeeded])
        mine: list[int] = []
        now = self.clock.now()
        for index, end in enumerate(ends):
            tracked = end.tracked
            if tracked.job_id in elsewhere or (
                end.error_code is FailureCode.TIMEOUT and tracked.confirmed and now < tracked.deadline_at
            ):
                ended[index] = False  # taken by another process, or confirmed (a later deadline) while it was checked
                continue
            if end.superseded:  # finished since this end was decided: its delivery ends it
                ended[index] = False
                continue
            if self._by_job.get(tracked.job_id) is not tracked:
                # Ended already, or being ended by another call (its write under way, and it may fail), or followed
                # anew since this end was decided (taken over, adopted): not ended here; a waiter hears of the end
                # when it is written.
                ended[index] = False
                continue
            self._unfollow(tracked.job_id)
            key = (tracked.provider, tracked.upstream_id)
            # From now on an upstream hook about the job is known to be late here, without a database read: the
            # upstream's own call often comes after a read saw the end.
            self._ended[key] = None
            if len(self._ended) > ENDED_REMEMBERED:
                self._ended.popitem(last=False)
            mine.append(index)
        if not mine:
            return ended
        settled: set[int] = set()
        try:
            await self._settle(ends, mine, ended, settled)
        except BaseException as exc:
            # A step between taking the jobs out of the followed set and settling them failed, or the caller went
            # away (a waiter whose client disconnected: the write itself goes on). A job left out of the set would
            # be read by nobody until its lease ran out, its provider slot taken for good: each not yet settled is
            # followed again and read at once, and ended (or found ended) then; endings are guarded, so trying
            # again can never settle twice.
            for index in mine:
                if index not in settled:
                    self._follow_again(ends[index].tracked)
                    ended[index] = False
            if not isinstance(exc, Exception):
                raise
            log.exception(
                "ending jobs failed; they are tried again",
                extra={"fields": {"jobs": [ends[index].tracked.job_id for index in mine if index not in settled]}},
            )
        return ended

    async def _settle(self, ends: list[_End], mine: list[int], ended: list[bool], settled: set[int]) -> None:
        """Write the endings of `mine` (taken out of the followed set by `end_all`), then give each job's slot back
        or follow it again; each index handled is added to `settled`."""
        outcomes = await self.finisher.end_many([ends[index].ending() for index in mine])
        overdue = [
            ends[index].tracked.job_id
            for index, outcome in zip(mine, outcomes, strict=True)
            if outcome is None and ends[index].error_code is FailureCode.TIMEOUT
        ]
        later = await self._later_deadlines(overdue) if overdue else {}
        for index, outcome in zip(mine, outcomes, strict=True):
            tracked = ends[index].tracked
            if isinstance(outcome, Exception):
                # Nothing was written: keep following the job, and the next round ends it (endings are guarded, so
                # trying again can never settle twice).
                log.error(
                    "ending a job failed; it is tried again",
                    exc_info=outcome,
                    extra={"fields": {"job": tracked.job_id}},
                )
                self._follow_again(tracked)
                ended[index] = False
            elif tracked.job_id in later:  # the store kept it running: a confirmation moved its deadline on
                deadline = later[tracked.job_id]
                ended[index] = False
                if deadline is None:  # and another process holds it now: that one ends it
                    self._ended.pop((tracked.provider, tracked.upstream_id), None)
                    self._free_slot(tracked)
                else:
                    tracked.deadline_at = deadline
                    self._follow_again(tracked)
            else:
                self._free_slot(tracked)
            settled.add(index)

    def _follow_again(self, tracked: Tracked) -> None:
        """A job this process meant to end and did not: followed again, read at once; unless it is followed anew
        meanwhile (a confirmation here took it over), when this copy gives its slot back."""
        self._ended.pop((tracked.provider, tracked.upstream_id), None)
        tracked.delivering = False
        tracked.due_at = self.clock.now()
        if self._by_job.get(tracked.job_id) is None:
            self.follow(tracked)
        else:
            self._free_slot(tracked)

    async def _later_deadlines(self, job_ids: list[str]) -> dict[str, float | None]:
        """Of jobs whose timeout the store did not write, those still running: with the deadline to follow each to
        here, or None when another process holds it now. A job still waiting in MODAL (a confirmation of it is
        under way, and may be refused) is looked at again within a poll interval; one whose row cannot be read
        now, at the next round."""
        later: dict[str, float | None] = {}
        for job_id in job_ids:
            try:
                row = await self.store.get(job_id)
            except Exception:
                log.exception("reading a job whose timeout was not written failed", extra={"fields": {"job": job_id}})
                later[job_id] = self.clock.now()
                continue
            if row is None or row.state.terminal:
                continue
            if self.leases is not None and row.owner != self.store.owner:
                later[job_id] = None
            elif row.state is JobState.MODAL and row.provider is not None:
                later[job_id] = min(row.deadline_at, self.clock.now() + self.pool.poll_interval(row.provider))
            else:
                later[job_id] = row.deadline_at
        return later

    async def _not_held(self, failing: list[_End]) -> set[str]:
        """Of followed jobs about to fail here, those this process must not end now. A job another process took
        over (it wrote a confirmation this one did not see, or adopted the job while this one stalled) runs to
        that process's deadline, not to the one known here: it is forgotten here. A success needs no check (its
        delivery checked before the download). When the check cannot be written, no job is ended: each is read
        again at once; but one the upstream was heard to finish meanwhile (`_End.superseded`), which its delivery
        under way ends: read again, it would be delivered twice."""
        if self.leases is None:
            return set()
        followed = [end for end in failing if self._by_job.get(end.tracked.job_id) is end.tracked]
        if not followed:
            return set()
        try:
            held = await self._holds.many([end.tracked.job_id for end in followed])
        except Exception:
            log.exception("checking leases before ending jobs failed; they are read again")
            for end in followed:
                if end.superseded:
                    continue
                tracked = end.tracked
                tracked.delivering = False  # a delivery that failed: read again, and delivered or ended then
                tracked.due_at = self.clock.now()
                self.on_follow(tracked.provider, tracked.due_at)
            return {end.tracked.job_id for end in followed}
        lost = [end.tracked.job_id for end, mine in zip(followed, held, strict=True) if not mine]
        if lost:
            await self.let_go(lost)
        return set(lost)

    async def close(self) -> None:
        # Deliveries under way are let finish and end their jobs here, for a while: one cancelled leaves its job
        # running, for the process that adopts it to download the grid again. Not longer: this process's other jobs
        # are handed over only after this, and nothing follows them meanwhile.
        await let_finish(self._deliveries, STOP_WAIT_S)
        await self._progress.close()
        await self._holds.close()
        await cancel_all(list(self._deliveries))


def _runs_unconfirmed(tracked: Tracked, new_state: JobState) -> bool:
    """Whether a job waiting in MODAL, unconfirmed, is seen running: the upstream ran it without `submit/modal`."""
    return tracked.state is JobState.MODAL and new_state is JobState.IN_PROGRESS and not tracked.confirmed


def _deadline_reason(tracked: Tracked) -> str:
    if tracked.state is JobState.MODAL:
        return "nobody confirmed the task (submit/modal) in time"
    return "the job passed its deadline"
