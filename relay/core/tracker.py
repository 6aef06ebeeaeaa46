"""Following every submitted job to its end.

One loop per provider reads the status of that provider's running jobs in batches (`list-by-condition`, or per-id
fetch where a provider has none). Each job is read one poll interval after it was submitted and every interval after
that, on its own cadence: a burst's jobs are read in the order they were submitted, so the time a burst took to
come in does not add a whole interval to its later jobs. Jobs due close together share one upstream call: a round
waits for the jobs due within ROUND_GAP_S (a quarter interval for shorter intervals) of the first one due, and rounds
are at least that far apart. So no job is read before its time, nor more than that gap after it.
Each change is written as a guarded transition and published to whoever waits. A finished job's grid is downloaded
once and kept before the job counts as succeeded; a job the upstream no longer knows for `lost_after_s`, or one
past its deadline, ends FAILED with its hold released.

`observe()` is the pure decision: what one task view means for one job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from adapters import TaskStatus, TaskView, UpstreamUnavailable
from relay.clock import Clock
from relay.config import Config
from relay.core.events import JobEvent, JobEvents
from relay.core.finish import Finisher
from relay.core.images import ImageError, ImageStore
from relay.core.providers import ProviderPool
from relay.logs import event
from relay.store.jobs import JobRow, JobState, JobStore, ProgressChange

log = logging.getLogger("relay.tracker")

# A job still PENDING this long after it was made was never confirmed by an upstream (a submit, even tried on
# several providers, times out well before): the relay stopped while submitting it. It is ended, its hold released.
PENDING_GRACE_S = 600.0
SWEEP_EVERY_S = 60.0
# A round's finished jobs are delivered in chunks of this many; each chunk's grids are written by one of SAVE_THREADS
# threads of the tracker's own, which take the next chunk without waiting for the event loop.
DELIVERY_CHUNK = 25
SAVE_THREADS = 4
# A round waits up to min(ROUND_GAP_S, interval / 4) after the first job due for others due meanwhile, and rounds of
# one provider start at least that far apart: a job is read at most that late.
ROUND_GAP_S = 0.25


@dataclass(slots=True)
class Tracked:
    job_id: str
    model: str
    provider: str
    upstream_id: str
    deadline_at: float
    state: JobState = JobState.SUBMITTED
    progress: int = 0
    missing_since: float | None = None
    delivering: bool = False
    due_at: float = 0.0  # when the job is next read; 0 until it is first tracked


@dataclass(frozen=True, slots=True)
class Step:
    kind: Literal["none", "progress", "success", "failure"]
    state: JobState | None = None
    progress: int = 0
    error_code: str | None = None
    reason: str | None = None


def observe(state: JobState, progress: int, view: TaskView) -> Step:
    """What an upstream task view means for a job that is in `state` at `progress`."""
    if view.status is TaskStatus.SUCCESS:
        if view.image_url:
            return Step("success", JobState.IN_PROGRESS, 100)
        return Step("failure", error_code="failed", reason="the upstream reported success without an image")
    if view.status in (TaskStatus.FAILURE, TaskStatus.CANCEL):
        reason = view.fail_reason or ("cancelled upstream" if view.status is TaskStatus.CANCEL else None)
        return Step("failure", error_code="banned" if view.banned else "failed", reason=reason)
    new_state = {
        TaskStatus.IN_PROGRESS: JobState.IN_PROGRESS,
        TaskStatus.MODAL: JobState.MODAL,
    }.get(view.status, JobState.SUBMITTED)
    if state is JobState.IN_PROGRESS and new_state is JobState.SUBMITTED:
        new_state = state  # never step back
    new_progress = max(progress, min(99, view.progress))
    if new_state is state and new_progress == progress:
        return Step("none")
    return Step("progress", new_state, new_progress)


def _buttons_json(view: TaskView) -> str:
    return json.dumps(
        [
            {"customId": b.custom_id, "label": b.label, "emoji": b.emoji, "type": b.type, "style": b.style}
            for b in view.buttons
        ]
    )


class Tracker:
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
        self._wake = {name: asyncio.Event() for name in pool.names}
        self._loops: list[asyncio.Task[None]] = []
        self._deliveries: set[asyncio.Task[None]] = set()
        self._download_slots = asyncio.Semaphore(64)
        self._writers: ThreadPoolExecutor | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.resume()
        self._loops = [asyncio.create_task(self._loop(name), name=f"tracker:{name}") for name in self.pool.names]
        self._loops.append(asyncio.create_task(self._sweep_loop(), name="tracker:sweep"))

    async def stop(self) -> None:
        tasks = [*self._loops, *self._deliveries]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops = []
        if self._writers is not None:
            self._writers.shutdown(wait=True, cancel_futures=True)
            self._writers = None
        await self.finisher.close()

    @property
    def running(self) -> bool:
        return bool(self._loops) and not any(task.done() for task in self._loops)

    async def resume(self) -> None:
        """Pick up the jobs a previous run left unfinished; end those it never got to submit."""
        await self.sweep_pending()
        for row in await self.store.active():
            if row.provider is None or row.upstream_id is None or self.tracking(row.id):
                continue  # a young PENDING job may still be being submitted: the sweep ends it if it stays so
            if row.provider not in self._jobs:
                await self.finisher.end(
                    row.id, succeeded=False, error_code="lost", fail_reason="its provider is no longer configured"
                )
                continue
            self.pool.acquire(row.provider)
            tracked = self.tracked_from(row)
            tracked.due_at = self.clock.now()  # it may have ended while the relay was down: read it at once
            self.track(tracked)

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
        )

    def track(self, tracked: Tracked) -> None:
        if not tracked.due_at:
            tracked.due_at = self.clock.now() + self.pool.poll_interval(tracked.provider)
        self._jobs[tracked.provider][tracked.job_id] = tracked
        self._by_job[tracked.job_id] = tracked
        self._wake[tracked.provider].set()

    def tracking(self, job_id: str) -> bool:
        return job_id in self._by_job

    def count(self) -> int:
        return len(self._by_job)

    async def expire(self, job_id: str) -> bool:
        """End a job that passed its deadline now, without waiting for the next poll. False while the upstream has
        finished it and its grid is being delivered: it ends on its own shortly, as succeeded."""
        tracked = self._by_job.get(job_id)
        if tracked is None:
            return True
        if tracked.delivering:
            return False
        return await self._end(tracked, succeeded=False, error_code="timeout", reason="the job passed its deadline")

    async def sweep_pending(self) -> None:
        """End jobs stuck in PENDING past the grace (see PENDING_GRACE_S)."""
        now = self.clock.now()
        for row in await self.store.stale_pending(now - PENDING_GRACE_S):
            if self.tracking(row.id):
                continue  # submitted, though the write saying so failed: it ends when the upstream says so
            await self.finisher.end(
                row.id, succeeded=False, error_code="interrupted", fail_reason="never confirmed upstream"
            )

    async def _sweep_loop(self) -> None:
        while True:
            await self.clock.sleep(SWEEP_EVERY_S)
            try:
                await self.sweep_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pending sweep failed")

    # -- polling -------------------------------------------------------------------------------------------------

    async def _loop(self, provider: str) -> None:
        interval = self.pool.poll_interval(provider)
        wake = self._wake[provider]
        gap = min(ROUND_GAP_S, interval / 4)
        last_round = -float("inf")
        while True:
            due = self._round_time(provider, gap)
            if due is None:
                wake.clear()
                await wake.wait()
                continue
            delay = max(due, last_round + gap) - self.clock.now()
            if delay > 0:
                # Then look again: jobs may have come meanwhile, and a timer may fire a little before the wall
                # clock reaches its time. A job read even a moment early finds its task unfinished and waits a
                # whole interval more.
                await self.clock.sleep(delay)
                continue
            round_start = self.clock.now()
            try:
                if await self.poll(provider):
                    last_round = round_start
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll failed", extra={"fields": {"provider": provider}})

    def _round_time(self, provider: str, gap: float) -> float | None:
        """When the next round should read: when the last of the jobs due within `gap` of the first one due is due
        (so a group due just after a few others is read with them, on time); None when no job waits to be read."""
        dues = [t.due_at for t in self._jobs[provider].values() if not t.delivering]
        if not dues:
            return None
        horizon = min(dues) + gap
        return max(due for due in dues if due <= horizon)

    async def poll(self, provider: str) -> int:
        """One round over a provider's running jobs that are due to be read; returns how many were read."""
        started = self.clock.now()
        jobs = [t for t in self._jobs[provider].values() if not t.delivering and t.due_at <= started]
        if not jobs:
            return 0
        interval = self.pool.poll_interval(provider)
        for tracked in jobs:  # next read: one interval on; one interval from now for a job read over an interval late
            following = tracked.due_at + interval
            tracked.due_at = following if following > started else started + interval
        by_upstream: dict[str, list[Tracked]] = {}
        for tracked in jobs:
            by_upstream.setdefault(tracked.upstream_id, []).append(tracked)
        try:
            views: list[TaskView] | None = await self.pool.fetch_many(provider, list(by_upstream))
        except UpstreamUnavailable as exc:
            event(log, "status read failed", provider=provider, reason=str(exc))
            views = None
        now = self.clock.now()
        changes: list[tuple[Tracked, Step]] = []
        successes: list[tuple[Tracked, TaskView]] = []
        failures: dict[str, tuple[Tracked, str, str | None]] = {}
        if views is not None:
            seen: set[str] = set()
            for view in views:
                seen.add(view.upstream_id)
                for tracked in by_upstream.get(view.upstream_id, ()):
                    tracked.missing_since = None
                    step = observe(tracked.state, tracked.progress, view)
                    if step.kind == "progress":
                        changes.append((tracked, step))
                    elif step.kind == "success":
                        successes.append((tracked, view))
                    elif step.kind == "failure":
                        failures[tracked.job_id] = (tracked, step.error_code or "failed", step.reason)
            for tracked in jobs:
                if tracked.upstream_id in seen:
                    continue
                tracked.missing_since = tracked.missing_since or now
                if now - tracked.missing_since >= self.config.jobs.lost_after_s:
                    failures[tracked.job_id] = (tracked, "lost", "the upstream no longer knows the job")
        finished = {tracked.job_id for tracked, _ in successes}
        for tracked in jobs:
            if now >= tracked.deadline_at and tracked.job_id not in failures and tracked.job_id not in finished:
                failures[tracked.job_id] = (tracked, "timeout", "the job passed its deadline")

        records = [ProgressChange(t.job_id, step.state or t.state, step.progress) for t, step in changes]
        for tracked, _ in successes:
            tracked.state, tracked.progress, tracked.delivering = JobState.IN_PROGRESS, 100, True
            self.events.publish(JobEvent(tracked.job_id, tracked.state, tracked.progress))
        if successes:  # the upstream's image URL and buttons are written with the job's end
            task = asyncio.create_task(self._deliver(successes), name=f"deliver:{provider}")
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        await self.store.record_progress(records, now)
        for tracked, step in changes:
            tracked.state, tracked.progress = step.state or tracked.state, step.progress
            self.events.publish(JobEvent(tracked.job_id, tracked.state, tracked.progress))
        await asyncio.gather(
            *(self._end(t, succeeded=False, error_code=code, reason=reason) for t, code, reason in failures.values())
        )
        return len(jobs)

    # -- ends ----------------------------------------------------------------------------------------------------

    async def _deliver(self, finished: list[tuple[Tracked, TaskView]]) -> None:
        """Download the grids of jobs the upstream finished (once each), keep them, then end the jobs as succeeded.
        A round's jobs go in chunks, all at once: the first chunks end (and are answered) while later ones are still
        being written to disk."""
        chunks = [finished[i : i + DELIVERY_CHUNK] for i in range(0, len(finished), DELIVERY_CHUNK)]
        await asyncio.gather(*(self._deliver_chunk(chunk) for chunk in chunks))

    async def _deliver_chunk(self, finished: list[tuple[Tracked, TaskView]]) -> None:
        """Downloads run concurrently, the grids are written by one thread, and the endings are group-committed.
        What fails is tried again, up to `images.download_attempts` times."""
        pending = finished
        try:
            for attempt in range(self.config.images.download_attempts):
                if attempt:
                    await self.clock.sleep(min(2.0**attempt, 10.0))
                downloads = await asyncio.gather(*(self._download(t, v) for t, v in pending))
                reasons = {t.job_id: d for (t, _), d in zip(pending, downloads, strict=True) if isinstance(d, str)}
                got = [(t, v, d) for (t, v), d in zip(pending, downloads, strict=True) if isinstance(d, bytes)]
                reasons.update(await asyncio.get_running_loop().run_in_executor(self._writer_pool(), self._save, got))
                await asyncio.gather(
                    *(self._end(t, succeeded=True, view=v) for t, v, _ in got if t.job_id not in reasons)
                )
                pending = [(t, v) for t, v in pending if t.job_id in reasons]
                if not pending:
                    return
            await asyncio.gather(
                *(
                    self._end(t, succeeded=False, error_code="download", reason=reasons[t.job_id], view=v)
                    for t, v in pending
                )
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery failed")
            reason = "the relay failed to store it"
            await asyncio.gather(
                *(self._end(t, succeeded=False, error_code="internal", reason=reason) for t, _ in pending)
            )

    async def _download(self, tracked: Tracked, view: TaskView) -> bytes | str:
        """The grid's bytes, or why they could not be had."""
        assert view.image_url is not None
        async with self._download_slots:
            try:
                return await self.pool.download(tracked.provider, view.image_url)
            except UpstreamUnavailable as exc:
                return str(exc)

    def _save(self, grids: list[tuple[Tracked, TaskView, bytes]]) -> dict[str, str]:
        """Keep downloaded grids; returns why each one that could not be kept failed. Blocking: run it in a thread."""
        failed = {}
        for tracked, _, data in grids:
            try:
                self.images.save_grid(tracked.job_id, data)
            except ImageError as exc:
                failed[tracked.job_id] = str(exc)
        return failed

    def _writer_pool(self) -> ThreadPoolExecutor:
        if self._writers is None:
            self._writers = ThreadPoolExecutor(max_workers=SAVE_THREADS, thread_name_prefix="grid-writer")
        return self._writers

    async def _end(
        self,
        tracked: Tracked,
        *,
        succeeded: bool,
        error_code: str | None = None,
        reason: str | None = None,
        view: TaskView | None = None,
    ) -> bool:
        """Whether the job has ended (False: the write failed and the job is followed again). `view` is the
        upstream's view of a job it finished: its image URL and buttons are kept with the job."""
        if self._by_job.pop(tracked.job_id, None) is None:
            return True
        self._jobs[tracked.provider].pop(tracked.job_id, None)
        try:
            await self.finisher.end(
                tracked.job_id,
                succeeded=succeeded,
                error_code=error_code,
                fail_reason=reason,
                image_url=view.image_url if view else None,
                buttons=_buttons_json(view) if view else None,
            )
        except Exception:
            # Nothing was written: keep following the job, and the next round ends it (endings are guarded, so
            # trying again can never settle twice).
            log.exception("ending a job failed; it is tried again", extra={"fields": {"job": tracked.job_id}})
            tracked.delivering = False
            tracked.due_at = self.clock.now()
            self.track(tracked)
            return False
        self.pool.release(tracked.provider)
        return True
