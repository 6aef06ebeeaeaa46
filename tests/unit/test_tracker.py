"""Tracking jobs to their end, with the clock moved by hand: a real SQLite store, the in-process simulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters import PartialRead, TaskStatus, TaskView, UpstreamUnavailable
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.core import lifecycle as lifecycle_module
from relay.core.coordination import ADOPT_SOON_GAP_S, Coordinator
from relay.core.events import JobEvents
from relay.core.finish import Finisher
from relay.core.lifecycle import PROGRESS_EVERY_S, Lifecycle, Step, Tracked, ahead, observe, read_after_hook
from relay.core.providers import ProviderPool
from relay.core.tracker import Tracker
from relay.domain import FailureCode, ResultShape
from relay.images import ImageStore, StorageError
from relay.metrics import Metrics
from relay.store.attempts import AttemptStore
from relay.store.db import Database
from relay.store.jobs import Ending, JobRow, JobState, JobStore, NewJob, ProgressChange
from relay.store.keys import KeyStore
from relay.store.leases import Leases
from relay.store.tables import jobs
from tests.helpers import FakeClock, relay_config

pytestmark = pytest.mark.anyio


def view(status: TaskStatus, progress: int = 0, **extra: object) -> TaskView:
    return TaskView("u1", status, progress, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "progress", "seen", "step"),
    [
        (JobState.SUBMITTED, 0, view(TaskStatus.SUBMITTED), Step("none")),
        (JobState.SUBMITTED, 0, view(TaskStatus.IN_PROGRESS, 15), Step("progress", JobState.IN_PROGRESS, 15)),
        (JobState.IN_PROGRESS, 46, view(TaskStatus.IN_PROGRESS, 31), Step("none")),
        (JobState.IN_PROGRESS, 46, view(TaskStatus.SUBMITTED, 0), Step("none")),
        (JobState.SUBMITTED, 0, view(TaskStatus.MODAL), Step("progress", JobState.MODAL, 0)),
        (JobState.SUBMITTED, 0, view(TaskStatus.NOT_START), Step("none")),
        (
            JobState.IN_PROGRESS,
            93,
            view(TaskStatus.SUCCESS, 100, image_url="u"),
            Step("success", JobState.IN_PROGRESS, 100),
        ),
        (
            JobState.IN_PROGRESS,
            93,
            view(TaskStatus.SUCCESS, 100),
            Step("failure", error_code="failed", reason="the upstream reported success without an image"),
        ),
        (
            JobState.IN_PROGRESS,
            5,
            view(TaskStatus.FAILURE, fail_reason="x"),
            Step("failure", error_code="failed", reason="x"),
        ),
        (
            JobState.IN_PROGRESS,
            5,
            view(TaskStatus.FAILURE, fail_reason="banned", banned=True),
            Step("failure", error_code="banned", reason="banned"),
        ),
        (
            JobState.IN_PROGRESS,
            5,
            view(TaskStatus.CANCEL),
            Step("failure", error_code="failed", reason="cancelled upstream"),
        ),
        (JobState.IN_PROGRESS, 5, view(TaskStatus.IN_PROGRESS, 100), Step("progress", JobState.IN_PROGRESS, 99)),
    ],
)
def test_observe(state: JobState, progress: int, seen: TaskView, step: Step) -> None:
    assert observe(state, progress, seen) == step


def test_a_text_task_the_upstream_says_succeeded_without_its_text_is_not_charged() -> None:
    """A describe or a shorten gives text, and nothing else: one the upstream reports finished with no text (an
    image URL of the described picture is no result) fails, its hold released, as a grid reported without an
    image does."""
    text = ResultShape.TEXT
    assert observe(JobState.IN_PROGRESS, 50, view(TaskStatus.SUCCESS, 100, final_prompt="a fox"), text) == Step(
        "success", JobState.IN_PROGRESS, 100
    )
    for seen in (view(TaskStatus.SUCCESS, 100), view(TaskStatus.SUCCESS, 100, image_url="u")):
        assert observe(JobState.IN_PROGRESS, 50, seen, text) == Step(
            "failure", error_code="failed", reason="the upstream reported success without its text"
        )


def test_a_modal_view_of_a_job_no_confirmation_can_start_parks_nothing() -> None:
    """Only a follow-up waits in MODAL for `submit/modal`: an upstream saying MODAL of an imagine (a bug, or a
    hostile upstream) would hold it without a slot while it runs, to a window nobody can end."""
    assert observe(JobState.SUBMITTED, 0, view(TaskStatus.MODAL), may_wait=False) == Step("none")
    assert observe(JobState.SUBMITTED, 0, view(TaskStatus.MODAL, 10), may_wait=False) == Step(
        "progress", JobState.SUBMITTED, 10
    )


def coordinator_of(world: World, leases: Leases, *, alone: bool) -> Coordinator:
    """The coordination of the world's relay process, with these leases."""
    return Coordinator(
        leases=leases,
        attempts=AttemptStore(world.store.engine),
        tracker=world.tracker,
        lifecycle=world.tracker.lifecycle,
        clock=world.clock,
        alone=alone,
    )


async def test_an_imagine_the_upstream_says_is_waiting_in_modal_keeps_running_with_its_slot(world: World) -> None:
    job = await world.submit("a heron")
    lifecycle = world.tracker.lifecycle
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    assert tracked.state is JobState.SUBMITTED and tracked.slot and world.pool.in_flight["sim"] == 1
    row = await world.store.get(job)
    assert row is not None and row.state is JobState.SUBMITTED


@dataclass
class World:
    clock: FakeClock
    engine: SimEngine
    store: JobStore
    keys: KeyStore
    tracker: Tracker
    pool: ProviderPool
    events: JobEvents
    key_id: str

    async def submit(self, prompt: str, price: int = 2, deadline_s: float = 600, *, may_wait: bool = False) -> str:
        """A job submitted and followed: an imagine, or (`may_wait`) a follow-up the upstream may park in MODAL
        (the simulator runs an imagine for it: the tests speak for the upstream with the views they apply)."""
        reply = self.engine.submit_imagine({"prompt": prompt}, "fast")
        upstream_id = str(reply.body["result"])
        job_id = f"job_{upstream_id}"
        now = self.clock.now()
        kind = "variation" if may_wait else "imagine"
        new = NewJob(job_id, "r", "mj-fast", "fast", "MID_JOURNEY", kind, prompt, price, now + deadline_s)
        assert await self.store.open(self.key_id, [new], now)
        await self.store.mark_submitted(job_id, "sim", upstream_id, now)
        self.pool.acquire("sim")
        self.tracker.track(
            Tracked(job_id, "mj-fast", "sim", upstream_id, now + deadline_s, may_wait=may_wait, mode="fast")
        )
        return job_id

    def upstream_keeps_parked(self) -> None:
        """Every read from now on finds each task waiting in MODAL, whatever the simulator runs."""

        async def parked(ids: Sequence[str]) -> list[TaskView]:
            return [TaskView(i, TaskStatus.MODAL, 0) for i in ids]

        self.pool.upstreams["sim"].fetch_many = parked  # type: ignore[method-assign]

    def images_gone(self) -> None:
        """Every image download fails from now on, as from an upstream that lost its images."""

        async def no_image(url: str) -> bytes:
            raise UpstreamUnavailable("gone")

        self.pool.upstreams["sim"].download = no_image  # type: ignore[method-assign]

    def downloads(self) -> list[str]:
        """The URLs of the image downloads made from now on, each as it is made."""
        made: list[str] = []
        upstream = self.pool.upstreams["sim"]
        real = upstream.download

        async def counted(url: str) -> bytes:
            made.append(url)
            return await real(url)

        upstream.download = counted  # type: ignore[method-assign]
        return made

    async def settle(self) -> None:
        """Let delivery tasks finish, moving the clock for their retry pauses."""
        for _ in range(200):
            if not self.tracker.lifecycle._deliveries:
                return
            await asyncio.sleep(0.01)
            self.clock.advance(1)
        raise AssertionError("deliveries did not finish")

    async def state(self, job_id: str) -> tuple[str, str | None, str]:
        row = await self.store.get(job_id)
        assert row is not None
        return row.state.value, row.error_code, row.hold_state

    async def balance(self) -> tuple[int, int]:
        key = await self.keys.get(self.key_id)
        assert key is not None
        return key.balance, key.held


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = FakeClock()
    config = relay_config(tmp_path, jobs={"poll_interval_s": 1, "lost_after_s": 30, "modal_timeout_s": 20})
    engine = SimEngine(SimSettings(fast_s=10, tile_px=16), now=clock.now)
    db = Database(config.database_url())
    await db.migrate()
    store, keys, events, metrics = JobStore(db.engine), KeyStore(db.engine), JobEvents(), Metrics()
    record, _ = await keys.create("k", 1000, clock.now())
    pool = ProviderPool(config, metrics, clock, {"sim": SimulatorUpstream("sim", engine)})
    images = ImageStore(tmp_path / "images", ["s"], 600)
    await images.open()
    finisher = Finisher(store, events, metrics, clock)
    lifecycle = Lifecycle(
        config=config, store=store, pool=pool, images=images, finisher=finisher, events=events, clock=clock
    )
    tracker = Tracker(config=config, store=store, pool=pool, lifecycle=lifecycle, finisher=finisher, clock=clock)
    yield World(clock, engine, store, keys, tracker, pool, events, record.id)
    await tracker.stop()
    await db.dispose()


async def test_many_jobs_are_followed_in_one_batch_to_success(world: World) -> None:
    jobs = [await world.submit(f"cat {i}") for i in range(30)]
    subscription = world.events.subscribe(jobs)
    world.clock.advance(5)
    await world.tracker.poll("sim")
    rows = [await world.store.get(j) for j in jobs]
    assert {(r.state, r.progress) for r in rows if r} == {(JobState.IN_PROGRESS, 31)}
    world.clock.advance(5)
    await world.tracker.poll("sim")
    await world.settle()
    assert {await world.state(j) for j in jobs} == {("SUCCEEDED", None, "captured")}
    assert await world.balance() == (1000 - 60, 0)
    assert world.pool.in_flight["sim"] == 0 and world.tracker.count() == 0
    events = []
    while (event := await subscription.next(0.01)) is not None:
        events.append(event)
    assert {e.state for e in events} == {JobState.IN_PROGRESS, JobState.SUCCEEDED}


async def test_failed_banned_lost_and_overdue_jobs_end_failed_and_release(world: World) -> None:
    failing = await world.submit("bridge sim:fail")
    lost = await world.submit("ghost sim:lose")
    overdue = await world.submit("sloth sim:never", deadline_s=60)
    world.clock.advance(6)
    await world.tracker.poll("sim")
    assert await world.state(failing) == ("FAILED", "failed", "released")
    assert (await world.state(lost))[0] == "SUBMITTED"  # not yet lost: the upstream may come back
    world.clock.advance(31)
    await world.tracker.poll("sim")
    assert await world.state(lost) == ("FAILED", "lost", "released")
    world.clock.advance(30)
    await world.tracker.poll("sim")
    assert await world.state(overdue) == ("FAILED", "timeout", "released")
    assert await world.balance() == (1000, 0)
    assert world.pool.in_flight["sim"] == 0


async def test_an_unreadable_upstream_changes_nothing_but_deadlines_still_hold(world: World) -> None:
    job = await world.submit("cat", deadline_s=20)

    async def broken(ids: Sequence[str]) -> list[TaskView]:
        raise UpstreamUnavailable("down")

    world.pool.upstreams["sim"].fetch_many = broken  # type: ignore[method-assign]
    world.clock.advance(12)
    await world.tracker.poll("sim")
    assert (await world.state(job))[0] == "SUBMITTED"
    world.clock.advance(10)
    await world.tracker.poll("sim")
    assert await world.state(job) == ("FAILED", "timeout", "released")


async def test_a_download_that_breaks_unexpectedly_fails_its_job_only(world: World) -> None:
    """An error no adapter foresaw (a bug, an odd URL) on one job's download fails that job; the others delivered
    in the same round succeed."""
    broken, fine = await world.submit("cat"), await world.submit("dog")
    broken_row = await world.store.get(broken)
    assert broken_row is not None and broken_row.upstream_id is not None
    real_download = world.pool.upstreams["sim"].download

    async def odd(url: str) -> bytes:
        if broken_row.upstream_id in url:
            raise UnicodeError("label empty or too long")
        return await real_download(url)

    world.pool.upstreams["sim"].download = odd  # type: ignore[method-assign]
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(broken) == ("FAILED", "download", "released")
    assert await world.state(fine) == ("SUCCEEDED", None, "captured")


async def test_a_slow_download_holds_up_no_other_jobs_ending(world: World) -> None:
    """Jobs that finish in the same read are each delivered on their own: one whose grid is slow to come does not
    keep the others from ending (and their clients from being answered)."""
    slow, quick = await world.submit("cat"), await world.submit("dog")
    slow_row = await world.store.get(slow)
    assert slow_row is not None and slow_row.upstream_id is not None
    real_download = world.pool.upstreams["sim"].download
    started, release = asyncio.Event(), asyncio.Event()

    async def held_back(url: str) -> bytes:
        if slow_row.upstream_id in url:
            started.set()
            await release.wait()
        return await real_download(url)

    world.pool.upstreams["sim"].download = held_back  # type: ignore[method-assign]
    subscription = world.events.subscribe([quick])
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await started.wait()
    async with asyncio.timeout(5):
        while (event := await subscription.next(1)) is None or not event.state.terminal:
            pass
    assert await world.state(quick) == ("SUCCEEDED", None, "captured")
    assert (await world.state(slow))[0] not in ("SUCCEEDED", "FAILED")  # still downloading
    release.set()
    await world.settle()
    assert await world.state(slow) == ("SUCCEEDED", None, "captured")


async def test_a_grid_that_cannot_be_downloaded_fails_the_job(world: World) -> None:
    job = await world.submit("cat")
    world.images_gone()
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(job) == ("FAILED", "download", "released")
    row = await world.store.get(job)
    assert row is not None and row.upstream_image_url


async def test_unfinished_jobs_are_picked_up_after_a_restart(world: World) -> None:
    running = await world.submit("cat")
    now = world.clock.now()
    never_sent = NewJob("job_pending0", "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "p", 2, now + 600)
    await world.store.open(world.key_id, [never_sent], now)
    world.tracker.lifecycle._by_job.clear()
    world.tracker.lifecycle._jobs["sim"].clear()
    world.pool.release("sim")

    leases = Leases(world.store.engine, "restarted-process", 30)
    coordinator = coordinator_of(world, leases, alone=True)
    await world.tracker.resume()  # a young PENDING job may still be submitting elsewhere: left alone
    assert await coordinator.adopt(first=True) == 1  # alone on SQLite: every running job is this process's now
    assert world.tracker.tracking(running) and await world.state("job_pending0") == ("PENDING", None, "held")
    world.clock.advance(601)
    await world.tracker.resume()
    assert await world.state("job_pending0") == ("FAILED", "interrupted", "released")
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(running) == ("SUCCEEDED", None, "captured")


async def test_a_retired_provider_s_job_whose_ending_fails_holds_up_none_of_the_jobs_claimed_with_it(
    world: World,
) -> None:
    """At a restart, a job of a provider no longer configured (past its deadline) is claimed with the others and
    ended; its ending fails (the database briefly away). The relay still starts, the jobs claimed with it are
    followed, and the retired job is claimed again once its lease runs out, and ended then."""
    now = world.clock.now()
    retired = NewJob("job_retired0", "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "p", 2, now + 10)
    assert await world.store.open(world.key_id, [retired], now)
    await world.store.mark_submitted("job_retired0", "retired", "u-retired", now)
    running = [await world.submit(f"cat {i}") for i in range(3)]
    world.tracker.lifecycle._by_job.clear()
    world.tracker.lifecycle._jobs["sim"].clear()
    for _ in running:
        world.pool.release("sim")
    store = world.tracker.finisher.store
    real_finish = store.finish_many

    async def failing_for_retired(endings: Sequence[Ending], now: float) -> list[JobRow | None]:
        if any(ending.job_id == "job_retired0" for ending in endings):
            raise OSError("the database went away")
        return await real_finish(endings, now)

    store.finish_many = failing_for_retired  # type: ignore[method-assign]
    coordinator = coordinator_of(world, Leases(world.store.engine, "restarted-process", 30), alone=True)
    world.clock.advance(11)
    assert await coordinator.adopt(first=True) == 4
    assert all(world.tracker.tracking(job) for job in running) and world.pool.in_flight["sim"] == 3
    assert await world.state("job_retired0") == ("SUBMITTED", None, "held")
    store.finish_many = real_finish  # type: ignore[method-assign]
    world.clock.advance(31)  # its lease (not renewed: it is not followed) ran out
    await coordinator.adopt()
    assert await world.state("job_retired0") == ("FAILED", "lost", "released")


async def test_the_loops_poll_on_their_interval_and_sweep_stale_pending_jobs(world: World) -> None:
    job = await world.submit("cat")
    now = world.clock.now()
    stuck = NewJob("job_stuck000", "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "p", 2, now + 6000)
    await world.store.open(world.key_id, [stuck], now)
    await world.tracker.start()
    assert world.tracker.running
    for _ in range(12):  # twelve poll intervals: the job is done
        await asyncio.sleep(0.01)
        world.clock.advance(1)
    await world.settle()
    assert await world.state(job) == ("SUCCEEDED", None, "captured")
    assert (await world.state("job_stuck000"))[0] == "PENDING"
    for _ in range(12):  # ten minutes later the sweep has ended the job that never got submitted
        world.clock.advance(60)
        await asyncio.sleep(0.01)
    assert await world.state("job_stuck000") == ("FAILED", "interrupted", "released")
    await world.tracker.stop()
    assert not world.tracker.running


async def test_an_ending_that_fails_to_write_is_tried_again(world: World) -> None:
    job = await world.submit("bridge sim:fail")
    store = world.tracker.finisher.store
    real_finish = store.finish_many
    calls = []

    async def flaky_finish(endings: list[Ending], now: float) -> list[JobRow | None]:
        calls.append([ending.job_id for ending in endings])
        if len(calls) == 1:
            raise RuntimeError("database unavailable")
        return await real_finish(endings, now)

    store.finish_many = flaky_finish  # type: ignore[method-assign]
    world.clock.advance(6)
    await world.tracker.poll("sim")
    assert world.tracker.tracking(job) and (await world.state(job))[0] == "SUBMITTED"
    calls.clear()
    assert await world.tracker.expire(job) is False  # the write failed again: not ended, still followed
    assert world.tracker.tracking(job)
    assert world.pool.in_flight["sim"] == 1  # the slot is still taken
    await world.tracker.poll("sim")
    assert await world.state(job) == ("FAILED", "failed", "released")
    assert world.pool.in_flight["sim"] == 0 and await world.balance() == (1000, 0)


async def test_a_hook_about_a_job_that_ended_meanwhile_changes_nothing(world: World) -> None:
    """A call read while its job was followed, applied after the job ended (its deadline, a read): no delivery, no
    second release of its provider slot."""
    job = await world.submit("a late heron")
    lifecycle = world.tracker.lifecycle
    tracked = lifecycle._by_job[job]
    downloads: list[str] = []

    async def download(name: str, url: str) -> bytes:
        downloads.append(url)
        return b""

    world.pool.download = download  # type: ignore[method-assign]
    world.clock.advance(601)  # past its deadline
    assert await lifecycle.end(tracked, succeeded=False, error_code=FailureCode.TIMEOUT, reason="late")
    assert world.pool.in_flight["sim"] == 0 and not tracked.slot
    await lifecycle.hooks("sim", [(tracked, view(TaskStatus.MODAL))])  # would release a slot again
    await lifecycle.hooks("sim", [(tracked, TaskView(tracked.upstream_id, TaskStatus.SUCCESS, 100, image_url="u"))])
    await world.settle()
    assert world.pool.in_flight["sim"] == 0 and not lifecycle._deliveries and downloads == []
    assert await world.state(job) == ("FAILED", "timeout", "released")


async def test_two_jobs_on_one_upstream_task_are_both_followed(world: World) -> None:
    first = await world.submit("cat")
    now = world.clock.now()
    twin = NewJob("job_twin0000", "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "cat", 2, now + 600)
    await world.store.open(world.key_id, [twin], now)
    upstream_id = first.removeprefix("job_")
    await world.store.mark_submitted("job_twin0000", "sim", upstream_id, now)
    world.pool.acquire("sim")
    world.tracker.track(Tracked("job_twin0000", "mj-fast", "sim", upstream_id, now + 600, mode="fast"))
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(first) == await world.state("job_twin0000") == ("SUCCEEDED", None, "captured")
    assert world.pool.in_flight["sim"] == 0


async def test_a_task_listed_twice_is_delivered_once_by_its_first_end(world: World) -> None:
    """A status read that lists one task twice (a provider's duplicate rows), finished and then failed, is read as
    that task's first end: its grid is downloaded once and the job succeeds."""
    job = await world.submit("cat")
    real_fetch = world.pool.upstreams["sim"].fetch_many
    downloads = world.downloads()

    async def listed_twice(ids: Sequence[str]) -> list[TaskView]:
        views = await real_fetch(ids)
        return views + views + [TaskView(v.upstream_id, TaskStatus.FAILURE, 0, fail_reason="x") for v in views]

    world.pool.upstreams["sim"].fetch_many = listed_twice  # type: ignore[method-assign]
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(job) == ("SUCCEEDED", None, "captured")
    assert len(downloads) == 1


async def test_a_follow_up_a_read_finds_parked_waits_the_modal_window_whatever_its_mode(world: World) -> None:
    """A follow-up the upstream took and then parked in MODAL (new-api passes a remix variation on as accepted)
    waits `jobs.modal_timeout_s` (20 s here) from then for `submit/modal`, as one parked at its submit does: not a
    short mode's running deadline (10 s), nor a long one's (1800 s)."""
    short = await world.submit("cat", deadline_s=10, may_wait=True)
    long = await world.submit("dog", deadline_s=1800, may_wait=True)
    world.upstream_keeps_parked()
    world.clock.advance(1)
    await world.tracker.poll("sim")
    assert {(await world.state(j))[0] for j in (short, long)} == {"MODAL"}
    world.clock.advance(15)
    await world.tracker.poll("sim")
    assert {(await world.state(j))[0] for j in (short, long)} == {"MODAL"}
    world.clock.advance(6)
    await world.tracker.poll("sim")
    assert await world.state(short) == await world.state(long) == ("FAILED", "timeout", "released")
    assert await world.balance() == (1000, 0)


async def test_a_job_being_delivered_is_not_expired(world: World) -> None:
    job = await world.submit("cat")
    gate = asyncio.Event()
    real_download = world.pool.upstreams["sim"].download

    async def slow_download(url: str) -> bytes:
        await gate.wait()
        return await real_download(url)

    world.pool.upstreams["sim"].download = slow_download  # type: ignore[method-assign]
    world.clock.advance(11)
    await world.tracker.poll("sim")
    assert await world.tracker.expire(job) is False  # the upstream finished it: it is being delivered
    gate.set()
    await world.settle()
    assert await world.state(job) == ("SUCCEEDED", None, "captured")
    assert await world.tracker.expire(job) is True


async def test_rounds_start_one_interval_apart_however_long_a_round_takes(world: World) -> None:
    await world.submit("sloth sim:never")
    starts: list[float] = []
    real_fetch = world.pool.upstreams["sim"].fetch_many

    async def slow_fetch(ids: Sequence[str]) -> list[TaskView]:
        starts.append(world.clock.now())
        world.clock.advance(0.375)  # a round takes 0.375 s of the 1 s interval
        return await real_fetch(ids)

    world.pool.upstreams["sim"].fetch_many = slow_fetch  # type: ignore[method-assign]
    first = world.clock.now()
    await world.tracker.start()
    for _ in range(40):  # steps of 1/8 s keep the clock's sums exact
        await asyncio.sleep(0.005)
        world.clock.advance(0.125)
    await world.tracker.stop()
    assert [start - first for start in starts][:5] == [1.0, 2.0, 3.0, 4.0, 5.0]


def record_rounds(world: World) -> list[tuple[float, set[str]]]:
    """Each status read of the simulator from now on: when it happened and which task ids it asked for."""
    rounds: list[tuple[float, set[str]]] = []
    real_fetch = world.pool.upstreams["sim"].fetch_many

    async def recording_fetch(ids: Sequence[str]) -> list[TaskView]:
        rounds.append((world.clock.now(), set(ids)))
        return await real_fetch(ids)

    world.pool.upstreams["sim"].fetch_many = recording_fetch  # type: ignore[method-assign]
    return rounds


async def test_each_job_is_read_on_its_own_cadence_and_close_ones_share_a_round(world: World) -> None:
    rounds = record_rounds(world)
    # The test clock moves 1/8 s every 5 ms of real time: a round waiting for the progress window (real time) would
    # see it move on meanwhile. Each write is made as soon as it is asked for here, as it was without the window.
    world.tracker.lifecycle._progress.every_s = None
    first = world.clock.now()
    await world.tracker.start()
    # c is due 1/8 s after b, within the quarter-interval gap: b's round waits for it. d is due 3/8 s after b: it
    # starts a round of its own, which waits the 1/8 s until a is due again.
    submitted_at = {0.0: "a", 0.5: "b", 0.625: "c", 0.875: "d"}
    ids = {}
    for _ in range(26):  # steps of 1/8 s keep the clock's sums exact
        at = world.clock.now() - first
        if at in submitted_at:
            job = await world.submit(f"sloth sim:never {submitted_at[at]}")
            ids[job.removeprefix("job_")] = submitted_at[at]
        await asyncio.sleep(0.005)
        world.clock.advance(0.125)
    await world.tracker.stop()
    seen = [(at - first, {ids[i] for i in read}) for at, read in rounds]
    assert seen[:5] == [(1.0, {"a"}), (1.625, {"b", "c"}), (2.0, {"a", "d"}), (2.625, {"b", "c"}), (3.0, {"a", "d"})]


async def test_a_round_reads_only_due_jobs(world: World) -> None:
    await world.submit("sloth sim:never")
    world.clock.advance(0.5)
    assert await world.tracker.poll("sim") == 0  # submitted half an interval ago: not due yet
    world.clock.advance(0.499)
    assert await world.tracker.poll("sim") == 0  # a millisecond early is still early
    world.clock.advance(0.001)
    assert await world.tracker.poll("sim") == 1
    assert await world.tracker.poll("sim") == 0  # next due one interval later


async def test_a_timer_firing_a_little_early_never_makes_a_round_read_early(world: World) -> None:
    """A task read even a moment before it is due may not have finished yet, and would wait a whole interval more."""
    clock = world.clock
    real_sleep = clock.sleep

    async def early_sleep(seconds: float) -> None:  # every timer fires 1/256 s before its time
        await real_sleep(max(0.0, seconds - 1 / 256))

    clock.sleep = early_sleep  # type: ignore[method-assign]
    rounds = record_rounds(world)
    first = clock.now()
    await world.submit("sloth sim:never")
    await world.tracker.start()
    for _ in range(1024 + 64):  # steps of 1/1024 s keep the clock's sums exact
        for _ in range(5):
            await asyncio.sleep(0)
        clock.advance(1 / 1024)
    await world.tracker.stop()
    assert rounds, "the job was never read"
    assert 1.0 <= rounds[0][0] - first < 1.0 + 8 / 1024  # when it is due, not before (nor a round gap later)


class CheckedLeases(Leases):
    """The lifecycle's leases in a test: every lease check (`hold`) is counted and sets `checking`, waits for
    `gate` when one is given, and the calls numbered in `failing` (from 1) raise, as when the database is briefly
    unreachable."""

    def __init__(self, world: World, failing: tuple[int, ...] = (), gate: asyncio.Event | None = None) -> None:
        super().__init__(world.store.engine, world.store.owner, 30)
        self.calls = 0
        self.failing = failing
        self.gate = gate
        self.checking = asyncio.Event()
        world.tracker.lifecycle.leases = self

    async def hold(self, job_ids: Sequence[str], now: float) -> set[str]:
        self.calls += 1
        self.checking.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.calls in self.failing:
            raise OSError("the database went away")
        return await super().hold(job_ids, now)


async def test_a_finished_job_whose_lease_check_fails_is_read_again_and_delivered(world: World) -> None:
    """The lease check before a download is a write; one that fails (the database briefly unreachable) leaves the
    job followed and due at once, so the next round reads it and delivers it, rather than it waiting forever."""
    lifecycle = world.tracker.lifecycle
    leases = CheckedLeases(world, failing=(1,))
    job = await world.submit("cat")
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert (await world.state(job))[0] not in ("SUCCEEDED", "FAILED") and leases.calls == 1
    assert lifecycle.following(job)
    await world.tracker.poll("sim")  # due at once: read again, and delivered
    await world.settle()
    assert await world.state(job) == ("SUCCEEDED", None, "captured")


async def test_a_process_whose_lease_was_taken_delivers_nothing(world: World) -> None:
    """A process that stalled past its lease finds, when the job finishes, that another process took it: it leaves
    the job (no download, no ending), so the grid is fetched and the hold settled once, by the other."""
    lifecycle = world.tracker.lifecycle
    lifecycle.leases = Leases(world.store.engine, world.store.owner, 30)
    job = await world.submit("cat")
    downloads = world.downloads()
    world.clock.advance(11)  # the job is done upstream; meanwhile this process stalled and its lease ran out
    other = Leases(world.store.engine, "another-process", 30)
    assert [row.id for row in await other.claim_expired(world.clock.now() + 31, ["sim"])] == [job]
    await world.tracker.poll("sim")
    await world.settle()
    assert downloads == [] and not lifecycle.following(job)
    assert (await world.state(job))[1:] == (None, "held")  # not ended here
    assert world.pool.in_flight["sim"] == 0
    # while it holds the lease, the same finish is delivered
    lifecycle.leases = None
    second = await world.submit("dog")
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert len(downloads) == 1 and await world.state(second) == ("SUCCEEDED", None, "captured")


class LateLeases(Leases):
    """The lifecycle's leases in a test: a lease check (`hold`) is answered only once the lease it writes, stamped
    when it was asked, has run out (it waited on a stalled connection or a full pool, or the process was paused
    meanwhile), and another process's adoption round claims the job right after it landed."""

    def __init__(self, world: World) -> None:
        super().__init__(world.store.engine, world.store.owner, 30)
        self.world = world
        self.other = Leases(world.store.engine, "another-process", 30)
        self.claimed: list[str] = []
        world.tracker.lifecycle.leases = self

    async def hold(self, job_ids: Sequence[str], now: float) -> set[str]:
        self.world.clock.advance(31)
        held = await super().hold(job_ids, now)
        self.claimed += [row.id for row in await self.other.claim_expired(self.world.clock.now(), ["sim"])]
        return held


async def test_a_lease_check_answered_after_the_lease_it_wrote_ran_out_delivers_nothing(world: World) -> None:
    """The lease check before a download is answered only after the lease it wrote ran out, and another process
    claims the job at once, as it may: this process must take the job for lost, not download the grid the other
    downloads too (and end it in its place)."""
    lifecycle = world.tracker.lifecycle
    leases = LateLeases(world)
    job = await world.submit("cat")
    downloads = world.downloads()
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert leases.claimed == [job]
    assert downloads == [] and not lifecycle.following(job)
    assert (await world.state(job))[1:] == (None, "held")  # not ended here: the other process ends it
    assert world.pool.in_flight["sim"] == 0


async def test_a_process_whose_lease_was_taken_does_not_end_the_job_at_the_deadline_it_knew(world: World) -> None:
    """Another process took the job over (it wrote a confirmation with a later deadline, or adopted the job while
    this one stalled): the deadline this process knew passes, and it leaves the job to the other, unended."""
    lifecycle = world.tracker.lifecycle
    lifecycle.leases = Leases(world.store.engine, world.store.owner, 30)
    job = await world.submit("sloth sim:never", deadline_s=20)
    other = Leases(world.store.engine, "another-process", 30)
    world.clock.advance(21)
    assert [row.id for row in await other.claim_expired(world.clock.now() + 31, ["sim"])] == [job]
    await world.tracker.poll("sim")
    assert (await world.state(job))[1:] == (None, "held")  # not ended
    assert not lifecycle.following(job) and world.pool.in_flight["sim"] == 0
    assert not await lifecycle.expire(job)  # a waiter here leaves it to the other process too


async def test_a_job_whose_lease_check_fails_before_it_times_out_is_read_again_and_ended(world: World) -> None:
    """The lease check before a failure is written fails (the database briefly unreachable): nothing is ended, the
    job stays followed and is due at once, and the next round ends it."""
    lifecycle = world.tracker.lifecycle
    leases = CheckedLeases(world, failing=(1,))
    job = await world.submit("sloth sim:never", deadline_s=20)
    world.clock.advance(21)
    await world.tracker.poll("sim")
    assert (await world.state(job))[1:] == (None, "held") and leases.calls == 1
    assert lifecycle.following(job) and world.tracker.lifecycle.jobs_of("sim")[job].due_at <= world.clock.now()
    await world.tracker.poll("sim")
    assert await world.state(job) == ("FAILED", "timeout", "released")
    assert await world.balance() == (1000, 0) and world.pool.in_flight["sim"] == 0


@pytest.mark.parametrize(
    ("running_since", "progress", "due"),
    [
        (None, 0, 110.0),  # not seen running: a whole interval of silence
        (100.0, 0, 110.0),  # running, no progress yet: nothing to go by
        (90.0, 50, 110.0),  # half done in 10 s: ends at 110, later than a whole interval of silence
        (98.0, 80, 103.0),  # 80% in 2 s: ends at 100.5, read a quarter of an interval after
        (99.0, 99, 102.5),  # about to end: a quarter of an interval from now, never sooner
        (100.0, 50, 110.0),  # started just now (no time to go by)
    ],
)
def test_a_job_hooks_speak_of_is_read_after_silence_or_soon_after_its_expected_end(
    running_since: float | None, progress: int, due: float
) -> None:
    assert read_after_hook(100.0, 10.0, running_since, progress) == pytest.approx(due, abs=0.02)


@pytest.mark.parametrize(
    ("first", "then", "further"),
    [
        (view(TaskStatus.SUBMITTED), view(TaskStatus.IN_PROGRESS, 0), True),
        (view(TaskStatus.IN_PROGRESS, 31), view(TaskStatus.IN_PROGRESS, 46), True),
        (view(TaskStatus.IN_PROGRESS, 46), view(TaskStatus.IN_PROGRESS, 31), False),  # reordered: the older one
        (view(TaskStatus.IN_PROGRESS, 46), view(TaskStatus.IN_PROGRESS, 46), False),  # a duplicate
        (view(TaskStatus.MODAL), view(TaskStatus.IN_PROGRESS, 0), True),  # confirmed, then running
        (view(TaskStatus.IN_PROGRESS, 93), view(TaskStatus.SUCCESS, 100), True),
        (view(TaskStatus.IN_PROGRESS, 93), view(TaskStatus.FAILURE), True),
        (view(TaskStatus.SUCCESS, 100), view(TaskStatus.IN_PROGRESS, 93), False),
        (view(TaskStatus.SUCCESS, 100), view(TaskStatus.FAILURE), False),  # of two ends, the first heard stands
        (view(TaskStatus.NOT_START), view(TaskStatus.CANCEL), True),
    ],
)
def test_of_several_calls_about_one_task_the_furthest_on_is_kept(
    first: TaskView, then: TaskView, further: bool
) -> None:
    assert ahead(then, first) is further


def test_a_job_first_seen_part_done_is_judged_by_the_progress_made_since() -> None:
    # adopted at 60%, at 90% 3 s later: 10 s per 100%, ends at 101; counted from 0% it would seem to end at once
    assert read_after_hook(100.0, 10.0, 97.0, 90, progress_then=60) == pytest.approx(103.5)
    assert read_after_hook(100.0, 10.0, 97.0, 60, progress_then=60) == 110.0  # no progress made yet


async def test_a_job_whose_end_call_is_lost_is_read_soon_after_its_progress_says_it_ends(world: World) -> None:
    """Calls report the job running and its progress, then the end call is lost: the job is read a quarter of an
    interval after the end its progress pointed at, not a whole interval after the last call."""
    lifecycle = world.tracker.lifecycle
    job_id = await world.submit("a hare")
    tracked = lifecycle._by_job[job_id]
    interval = world.pool.poll_interval("sim")
    duration = world.engine.settings.duration("fast")
    said = None
    for _ in range(400):  # the upstream calls when its task changes, until it is about to end
        world.clock.advance(duration / 400)
        seen = world.engine.task(tracked.upstream_id, "sim://sim")
        assert seen is not None
        if seen["status"] == "SUCCESS":
            break  # the end call is lost
        if (seen["status"], seen["progress"]) == said:
            continue
        said = (seen["status"], seen["progress"])
        view = world.pool.upstreams["sim"].parse_hook(json.dumps(seen).encode())
        assert view is not None
        await lifecycle.hook(tracked, view)
        last_call = world.clock.now()
    assert tracked.running_since is not None and tracked.progress >= 90
    assert tracked.due_at < last_call + interval  # sooner than a whole interval of silence
    end = tracked.running_since + (last_call - tracked.running_since) * 100 / tracked.progress
    assert tracked.due_at == pytest.approx(end + interval / 4, abs=0.01)
    assert end == pytest.approx(tracked.running_since + duration * 0.9, abs=duration / 100)  # the task's own end


async def test_progress_hooks_over_several_turns_share_one_write(world: World) -> None:
    """Hooks report progress all through their jobs, a few jobs at each turn of the loop: after a write, what comes
    within the progress window is written together, not a transaction for each turn's few."""
    jobs = [await world.submit(f"cat {i}") for i in range(3)]
    lifecycle = world.tracker.lifecycle
    tracked: list[Tracked] = []
    for job_id in jobs:
        found = lifecycle.find("sim", job_id.removeprefix("job_"))
        assert found is not None
        tracked.append(found)
    writes: list[int] = []
    record = world.store.record_progress

    async def counted(changes: Sequence[ProgressChange], now: float) -> None:
        writes.append(len(changes))
        await record(changes, now)

    world.store.record_progress = counted  # type: ignore[method-assign]
    assert lifecycle._progress.every_s == PROGRESS_EVERY_S
    lifecycle._progress.every_s = 0.3  # a window that no few turns below outlast, however loaded the machine
    first, second, third = ((t, TaskView(t.upstream_id, TaskStatus.IN_PROGRESS, 15)) for t in tracked)
    await lifecycle.hook(*first)  # after a quiet spell: written at the next turn, alone
    later = [asyncio.ensure_future(lifecycle.hook(*second))]
    for _ in range(5):  # turns that, without the window, would each have written what they brought
        await asyncio.sleep(0)
    later.append(asyncio.ensure_future(lifecycle.hook(*third)))
    await asyncio.gather(*later)
    assert writes == [1, 2]
    rows = [await world.store.get(job_id) for job_id in jobs]
    assert {(row.state, row.progress) for row in rows if row} == {(JobState.IN_PROGRESS, 15)}


async def test_a_job_confirmed_while_its_modal_view_is_written_keeps_the_slot_it_took(world: World) -> None:
    """A view saying MODAL waits in the progress window when the client confirms the job, which takes a provider
    slot for it, and the confirmation is written: once written, the view neither parks the job again (in memory or
    in the store) nor gives that slot back."""
    job = await world.submit("a parked heron", may_wait=True)
    lifecycle = world.tracker.lifecycle
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))  # parked: its slot is freed
    assert tracked.state is JobState.MODAL and not tracked.slot and world.pool.in_flight["sim"] == 0
    lifecycle._progress.every_s = 0.3  # the next write waits for the window
    late = asyncio.ensure_future(lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 40)))
    for _ in range(3):  # its write is queued, waiting
        await asyncio.sleep(0)
    assert not late.done()
    assert lifecycle.confirming(job, world.clock.now() + 600) is not None  # the client confirms: a slot is taken
    row = await world.store.confirm_modal(job, tracked.upstream_id, world.clock.now() + 600, world.clock.now())
    assert row is not None and not lifecycle.confirmed(row)  # followed here already
    await late
    assert tracked.slot and world.pool.in_flight["sim"] == 1
    row = await world.store.get(job)  # the row, written after the confirmation, does not wait in MODAL again
    assert row is not None and (row.state, tracked.state) == (JobState.SUBMITTED, JobState.SUBMITTED)


async def test_a_job_confirmed_here_while_another_process_followed_it_is_followed_here_as_confirmed(
    world: World,
) -> None:
    """submit/modal reached this process while another followed the waiting job. Once the confirmation is written,
    this process follows the job (holding a provider slot, to its new deadline, read at once), and a view of it in
    MODAL read before the confirmation (an upstream hook forwarded late) parks it again neither in memory nor in the
    store."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("a parked heron", may_wait=True)
    parked = lifecycle._by_job[job]
    await lifecycle.hook(parked, TaskView(parked.upstream_id, TaskStatus.MODAL, 0))
    lifecycle.forget(job)  # followed by another process
    now = world.clock.now()
    row = await world.store.confirm_modal(job, parked.upstream_id, now + 600, now)
    assert row is not None and lifecycle.confirmed(row)  # taken over
    taken = lifecycle._by_job[job]
    assert taken.confirmed and taken.slot and world.pool.in_flight["sim"] == 1
    assert (taken.state, taken.deadline_at, taken.due_at) == (JobState.SUBMITTED, now + 600, now)
    await lifecycle.hook(taken, TaskView(taken.upstream_id, TaskStatus.MODAL, 0))
    stored = await world.store.get(job)
    assert stored is not None and (stored.state, taken.state) == (JobState.SUBMITTED, JobState.SUBMITTED)
    assert taken.slot and world.pool.in_flight["sim"] == 1


async def test_a_job_adopted_while_its_confirmation_was_under_way_runs_to_the_new_deadline(world: World) -> None:
    """This process adopted the waiting job while a confirmation it sent was under way (so the job was not marked
    as being confirmed): once the confirmation is written, the job runs to its new deadline with a slot, and is
    never parked again."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("a parked heron", may_wait=True)
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    assert not tracked.confirmed and world.pool.in_flight["sim"] == 0
    now = world.clock.now()
    row = await world.store.confirm_modal(job, tracked.upstream_id, now + 600, now)
    assert row is not None and not lifecycle.confirmed(row)  # followed here: nothing taken over
    assert tracked.confirmed and tracked.slot and world.pool.in_flight["sim"] == 1
    assert (tracked.state, tracked.deadline_at) == (JobState.SUBMITTED, now + 600)
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    assert tracked.state is JobState.SUBMITTED


async def test_a_failed_delivery_whose_lease_check_fails_is_read_again_and_ended(world: World) -> None:
    """A delivery fails (the image cannot be had) and the lease check before its failure is written fails too:
    the job is not left as being delivered (which no round reads), but read again, and ended then."""
    lifecycle = world.tracker.lifecycle
    leases = CheckedLeases(world, failing=(2,))  # the first is the check before the download
    job = await world.submit("cat")
    world.images_gone()
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    assert leases.calls == 2 and (await world.state(job))[1:] == (None, "held")
    tracked = lifecycle._by_job[job]
    assert not tracked.delivering and tracked.due_at <= world.clock.now()
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(job) == ("FAILED", "download", "released")
    assert world.pool.in_flight["sim"] == 0


async def test_a_job_confirmed_while_its_lease_is_checked_for_a_timeout_is_not_ended(world: World) -> None:
    """A job waiting in MODAL passes its deadline; while the lease check before its timeout is written is under
    way, the client confirms it here (a later deadline): it is not ended."""
    lifecycle = world.tracker.lifecycle
    go_on = asyncio.Event()
    leases = CheckedLeases(world, gate=go_on)
    job = await world.submit("sloth sim:never", deadline_s=20)
    tracked = lifecycle._by_job[job]
    world.clock.advance(21)
    poll = asyncio.ensure_future(world.tracker.poll("sim"))
    await leases.checking.wait()
    assert lifecycle.confirming(job, world.clock.now() + 600) is not None
    go_on.set()
    await poll
    assert (await world.state(job))[1:] == (None, "held") and lifecycle.following(job)
    assert tracked.deadline_at == world.clock.now() + 600


async def test_a_timeout_the_store_refused_follows_the_job_to_its_new_deadline(world: World) -> None:
    """A job waiting in MODAL passes the deadline this process knows, but a confirmation its follower has not heard
    of moved the stored one on: the timeout is not written, and the job is followed on, to the stored deadline,
    with nothing settled."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("a parked heron sim:never", deadline_s=20, may_wait=True)
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    world.upstream_keeps_parked()  # the upstream has not started it yet
    assert await world.store.confirm_modal(job, tracked.upstream_id, world.clock.now() + 600, world.clock.now())
    world.clock.advance(21)
    await world.tracker.poll("sim")
    assert (await world.state(job))[1:] == (None, "held")
    assert lifecycle._by_job.get(job) is tracked and tracked.deadline_at == world.clock.now() - 21 + 600
    assert not lifecycle.ended_here("sim", tracked.upstream_id)


async def test_an_end_decided_for_a_copy_of_a_job_followed_anew_leaves_it_alone(world: World) -> None:
    """A round decided to end a job from its copy of it; meanwhile the job was handed over and taken back (a
    confirmation written here): the new copy is followed on, with its slot, and the job is not ended."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("a parked heron", deadline_s=20, may_wait=True)
    old = lifecycle._by_job[job]
    await lifecycle.hook(old, TaskView(old.upstream_id, TaskStatus.MODAL, 0))
    lifecycle.forget(job)
    now = world.clock.now()
    row = await world.store.confirm_modal(job, old.upstream_id, now + 600, now)
    assert row is not None and lifecycle.confirmed(row)
    new = lifecycle._by_job[job]
    world.clock.advance(21)  # past the old copy's deadline
    await lifecycle.end(old, succeeded=False, error_code=FailureCode.TIMEOUT, reason="late")
    assert lifecycle._by_job.get(job) is new and world.pool.in_flight["sim"] == 1
    assert (await world.state(job))[1:] == (None, "held")


async def test_a_job_whose_confirmation_was_refused_times_out_soon_after_the_store_says_so(world: World) -> None:
    """A job waiting in MODAL passed its deadline while a confirmation (here or elsewhere) was under way, so its
    timeout was not written; the confirmation is then refused and the old deadline put back. The job is not
    followed on to the longer deadline: it is looked at again within a poll interval, and ended then."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("a parked heron", deadline_s=20, may_wait=True)
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    window, longer = tracked.deadline_at, world.clock.now() + 600
    assert await world.store.extend_modal(job, longer, world.clock.now(), world.clock.now() + 40)

    async def unreadable(ids: Sequence[str]) -> list[TaskView]:
        raise UpstreamUnavailable("down")

    world.pool.upstreams["sim"].fetch_many = unreadable  # type: ignore[method-assign]
    world.clock.advance(21)
    await world.tracker.poll("sim")
    assert lifecycle.following(job) and tracked.deadline_at <= world.clock.now() + 1
    await world.store.restore_modal(job, longer, window)  # the upstream refused it
    world.clock.advance(2)
    await world.tracker.poll("sim")
    assert await world.state(job) == ("FAILED", "timeout", "released")


async def test_a_timeout_refused_for_a_job_another_process_took_meanwhile_is_left_to_it(world: World) -> None:
    """The lease check before a timeout passed, then another process wrote its confirmation (taking the job and
    moving its deadline on) before the timeout's write: nothing is ended here, the job is left to the other
    process, and a later upstream hook about it is not taken for one about a job that ended here."""
    lifecycle = world.tracker.lifecycle
    CheckedLeases(world)
    job = await world.submit("a parked heron sim:never", deadline_s=20, may_wait=True)
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    world.upstream_keeps_parked()  # the upstream has not started it yet
    other = JobStore(world.store.engine, owner="another-process", lease_s=30)
    now = world.clock.now()
    assert await other.extend_modal(job, now + 600, now, now + 40)
    write = lifecycle.finisher.end_many

    async def confirmed_first(endings: list[Ending]) -> list[JobRow | None | Exception]:
        assert await other.confirm_modal(job, tracked.upstream_id, now + 600, world.clock.now())
        return await write(endings)

    lifecycle.finisher.end_many = confirmed_first  # type: ignore[method-assign]
    world.clock.advance(21)
    await world.tracker.poll("sim")
    assert (await world.state(job))[1:] == (None, "held") and not lifecycle.following(job)
    assert not lifecycle.ended_here("sim", tracked.upstream_id) and world.pool.in_flight["sim"] == 0


async def test_a_confirmed_job_adopted_later_is_never_parked_again(world: World) -> None:
    """Another process confirmed the job and then died; this one adopts it. A view of the job in MODAL read
    before the confirmation (an upstream hook sent late) parks it again neither in memory nor in the store."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("a parked heron", may_wait=True)
    parked = lifecycle._by_job[job]
    await lifecycle.hook(parked, TaskView(parked.upstream_id, TaskStatus.MODAL, 0))
    lifecycle.forget(job)  # followed by another process, which confirms it
    now = world.clock.now()
    other = JobStore(world.store.engine, owner="another-process", lease_s=30)
    assert await other.confirm_modal(job, parked.upstream_id, now + 600, now)
    world.clock.advance(31)  # that process died: its lease ran out
    await world.tracker.adopt(await Leases(world.store.engine, world.store.owner, 30).claim([job], world.clock.now()))
    adopted = lifecycle._by_job[job]
    assert adopted.confirmed and adopted.slot
    await lifecycle.hook(adopted, TaskView(adopted.upstream_id, TaskStatus.MODAL, 0))
    stored = await world.store.get(job)
    assert stored is not None and (stored.state, adopted.state) == (JobState.SUBMITTED, JobState.SUBMITTED)
    assert adopted.slot and world.pool.in_flight["sim"] == 1


@pytest.mark.parametrize("written", [True, False], ids=["written", "not-written"])
async def test_a_waiter_that_goes_away_while_its_job_s_timeout_is_written_leaves_the_job_followed(
    world: World, written: bool
) -> None:
    """A waiter past its deadline ends its job and goes away (its client disconnected) while the ending is being
    written. The write goes on; whatever it meets, the job is not left out of the followed set, unread until its
    lease runs out, with its provider slot taken for good: it is read again at once, and ended (or found ended)
    then, its slot given back."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("sloth sim:never", deadline_s=20)
    store = lifecycle.finisher.store
    real_finish = store.finish_many
    writing, go_on = asyncio.Event(), asyncio.Event()

    async def slow_finish(endings: Sequence[Ending], now: float) -> list[JobRow | None]:
        writing.set()
        await go_on.wait()
        if not written:
            raise OSError("the database went away")
        return await real_finish(endings, now)

    store.finish_many = slow_finish  # type: ignore[method-assign]
    world.clock.advance(21)
    waiter = asyncio.ensure_future(lifecycle.expire(job))
    await writing.wait()
    waiter.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    store.finish_many = real_finish  # type: ignore[method-assign]
    assert lifecycle.following(job)
    await world.tracker.poll("sim")
    assert await world.state(job) == ("FAILED", "timeout", "released")
    assert not lifecycle.following(job) and world.pool.in_flight["sim"] == 0
    assert await world.balance() == (1000, 0)


async def test_an_ending_whose_slot_release_fails_after_the_write_is_followed_until_it_is_given_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step after a job's ending was written fails (here giving its provider slot back): the job is not left
    unfollowed with the slot taken, nor is the round's failure anyone else's: it is read again at once, found
    ended, and its slot given back then. It was settled once."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("bridge sim:fail")
    real_release, calls = world.pool.release, []

    def release_once_broken(name: str) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("a metric could not be moved")
        real_release(name)

    monkeypatch.setattr(world.pool, "release", release_once_broken)
    world.clock.advance(6)
    await world.tracker.poll("sim")
    assert await world.state(job) == ("FAILED", "failed", "released")
    assert lifecycle.following(job) and world.pool.in_flight["sim"] == 1
    await world.tracker.poll("sim")
    assert not lifecycle.following(job) and world.pool.in_flight["sim"] == 0
    assert await world.balance() == (1000, 0)


async def test_a_refused_timeout_whose_stored_deadline_cannot_be_looked_at_is_followed_on(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's timeout was refused by the store (a confirmation moved its deadline on) and looking up the deadline
    it now has fails: the job is not left followed by nobody until its lease runs out; it is read again at once,
    and followed on to the stored deadline then."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("a parked heron sim:never", deadline_s=20, may_wait=True)
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    world.upstream_keeps_parked()  # the upstream has not started it yet
    assert await world.store.confirm_modal(job, tracked.upstream_id, world.clock.now() + 600, world.clock.now())
    real_later, calls = lifecycle._later_deadlines, []

    async def later_once_broken(job_ids: list[str]) -> dict[str, float | None]:
        calls.append(job_ids)
        if len(calls) == 1:
            raise RuntimeError("an unforeseen row")
        return await real_later(job_ids)

    monkeypatch.setattr(lifecycle, "_later_deadlines", later_once_broken)
    world.clock.advance(21)
    await world.tracker.poll("sim")
    assert len(calls) == 1 and lifecycle._by_job.get(job) is tracked
    assert not lifecycle.ended_here("sim", tracked.upstream_id)
    await world.tracker.poll("sim")
    assert len(calls) == 2 and lifecycle._by_job.get(job) is tracked
    assert tracked.deadline_at == world.clock.now() - 21 + 600 and (await world.state(job))[1:] == (None, "held")


async def ended_unanswered(world: World) -> None:
    """The jobs followed finish upstream and are read: their endings land, but each write is taken for failed (the
    connection was cut before the commit was answered)."""
    store = world.tracker.finisher.store
    real_finish = store.finish_many

    async def landed_unanswered(endings: Sequence[Ending], now: float) -> list[JobRow | None]:
        await real_finish(endings, now)
        raise OSError("the connection was cut before the commit was answered")

    store.finish_many = landed_unanswered  # type: ignore[method-assign]
    world.clock.advance(11)
    await world.tracker.poll("sim")
    await world.settle()
    store.finish_many = real_finish  # type: ignore[method-assign]


async def test_a_finished_job_whose_ending_landed_unanswered_is_not_downloaded_again(world: World) -> None:
    """A delivered job's ending is committed, but its answer is lost (the connection cut just then: a failover, a
    pooler): taken for failed, the job is followed again and read at once, and the upstream still says it
    finished. It is not delivered again (its grid downloaded twice, its image kept twice): the lease check before
    the download finds it ended, and the job is let go, its slot given back and its end told to whoever waits."""
    lifecycle = world.tracker.lifecycle
    lifecycle.leases = Leases(world.store.engine, world.store.owner, 30)
    job = await world.submit("cat")
    subscription = world.events.subscribe([job])
    downloads = world.downloads()
    await ended_unanswered(world)
    assert await world.state(job) == ("SUCCEEDED", None, "captured") and lifecycle.following(job)
    await world.tracker.poll("sim")  # due at once: read again, finished upstream
    await world.settle()
    assert len(downloads) == 1
    assert not lifecycle.following(job) and world.pool.in_flight["sim"] == 0
    assert await world.balance() == (998, 0)
    heard = []
    while (change := await subscription.next(0.01)) is not None:
        heard.append(change.state)
    assert JobState.SUCCEEDED in heard


async def test_a_job_whose_ending_landed_unanswered_and_that_a_renewal_lets_go_has_its_end_told(world: World) -> None:
    """As above, but the lease renewal comes before the job is read again: it finds the job ended (no lease of an
    ended job is renewed) and stops following it. Its end is told to whoever waits all the same (a waiter here, a
    client hook watched here: nothing else would ever tell them, as nobody heard of the end when it was
    written)."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("cat")
    subscription = world.events.subscribe([job])
    await ended_unanswered(world)
    assert await world.state(job) == ("SUCCEEDED", None, "captured") and lifecycle.following(job)
    coordinator = coordinator_of(world, Leases(world.store.engine, world.store.owner, 30), alone=True)
    await coordinator.renew()  # before the next read
    assert not lifecycle.following(job) and world.pool.in_flight["sim"] == 0
    heard = []
    while (change := await subscription.next(0.01)) is not None:
        heard.append(change.state)
    assert JobState.SUCCEEDED in heard


async def test_results_held_for_a_failing_image_store_are_bounded_and_the_others_fail_as_before(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result the image store will not keep is held in memory and kept again until its job's deadline, but only
    so many at once (each may be a large grid): one past that is tried `images.download_attempts` times and its job
    fails, released, as before; the one held is kept once the store is back, and charged."""
    monkeypatch.setattr(lifecycle_module, "KEEP_WAITING_MAX", 1)
    images = world.tracker.lifecycle.images
    keep = images.save
    store_down = True

    async def save(job_id: str, name: str, data: bytes) -> None:
        if store_down:
            raise StorageError("the image store failed (down)")
        await keep(job_id, name, data)

    monkeypatch.setattr(images, "save", save)
    held, past = await world.submit("cat"), await world.submit("dog")
    world.clock.advance(11)
    await world.tracker.poll("sim")
    for _ in range(200):  # the pauses of the one past the bound run out; the one held waits on
        states = {await world.state(held), await world.state(past)}
        if ("FAILED", "internal", "released") in states:
            break
        await asyncio.sleep(0.01)
        world.clock.advance(1)
    assert states == {("SUBMITTED", None, "held"), ("FAILED", "internal", "released")}
    for _ in range(30):  # and it still waits, well past those pauses
        await asyncio.sleep(0.01)
        world.clock.advance(1)
    assert {await world.state(held), await world.state(past)} == states
    assert world.tracker.lifecycle._keep_waiting == 1
    store_down = False
    await world.settle()
    states = {await world.state(held), await world.state(past)}
    assert states == {("SUCCEEDED", None, "captured"), ("FAILED", "internal", "released")}
    assert world.tracker.lifecycle._keep_waiting == 0 and await world.balance() == (998, 0)


async def test_a_job_its_upstream_could_not_answer_for_is_not_lost_and_its_neighbours_are_read(world: World) -> None:
    read = await world.submit("cat")
    unread = await world.submit("dog")
    real = world.pool.upstreams["sim"].fetch_many
    upstream_of = {job: (await world.store.get(job)).upstream_id for job in (read, unread)}  # type: ignore[union-attr]

    async def partly(ids: Sequence[str]) -> list[TaskView]:
        views = [v for v in await real(ids) if v.upstream_id != upstream_of[unread]]
        raise PartialRead("one task's fetch answered HTTP 500", views, frozenset({upstream_of[unread]}))

    world.pool.upstreams["sim"].fetch_many = partly  # type: ignore[method-assign]
    world.clock.advance(5)
    await world.tracker.poll("sim")
    assert (await world.store.get(read)).progress == 31  # type: ignore[union-attr]
    world.clock.advance(40)  # past lost_after_s: a job whose read failed is not one the upstream forgot
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(read) == ("SUCCEEDED", None, "captured")
    assert (await world.state(unread))[0] == "SUBMITTED"


async def test_a_waiter_ending_a_job_a_round_is_ending_meanwhile_is_not_told_it_ended_before_it_has(
    world: World,
) -> None:
    """A round ends a job past its deadline; while its lease check is under way, a waiter past its own deadline
    ends the job too. The round takes the job first and writes its timeout, which fails: the job is followed
    again, and may yet finish. The waiter is not told the job ended (it would tell its client the job timed out,
    and the job could still succeed and be charged): it hears of the end when one is written."""
    lifecycle = world.tracker.lifecycle
    go_on, written = asyncio.Event(), asyncio.Event()
    leases = CheckedLeases(world, gate=go_on)
    job = await world.submit("sloth sim:never", deadline_s=20)
    store = lifecycle.finisher.store
    real_finish = store.finish_many
    writing = asyncio.Event()

    async def slow_failing_finish(endings: Sequence[Ending], now: float) -> list[JobRow | None]:
        writing.set()
        await written.wait()
        raise OSError("the database went away")

    store.finish_many = slow_failing_finish  # type: ignore[method-assign]
    world.clock.advance(21)
    poll = asyncio.ensure_future(world.tracker.poll("sim"))
    await leases.checking.wait()  # the round's lease check is under way
    waiter = asyncio.ensure_future(lifecycle.expire(job))
    for _ in range(5):
        await asyncio.sleep(0)
    go_on.set()
    await writing.wait()  # the round took the job and writes its timeout
    for _ in range(20):
        await asyncio.sleep(0)
    written.set()
    await poll
    store.finish_many = real_finish  # type: ignore[method-assign]
    assert lifecycle.following(job) and (await world.state(job))[1:] == (None, "held")
    assert await waiter is False


async def test_a_job_whose_ending_a_hook_brought_could_not_be_written_is_read_again_at_once(world: World) -> None:
    """An upstream hook says a task failed, and the job's ending cannot be written (the database briefly away): the
    job is followed again, to be read at once, and ended then. The hook's own next-read time (an interval on, as
    hooks keep a job current) must not put that read off."""
    job = await world.submit("cat")
    lifecycle = world.tracker.lifecycle
    tracked = lifecycle._by_job[job]
    store = lifecycle.finisher.store
    real_finish = store.finish_many

    async def unreachable(endings: Sequence[Ending], now: float) -> list[JobRow | None]:
        raise OSError("the database went away")

    store.finish_many = unreachable  # type: ignore[method-assign]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.FAILURE, 0, fail_reason="banned"))
    store.finish_many = real_finish  # type: ignore[method-assign]
    assert lifecycle.following(job)
    assert lifecycle._by_job[job].due_at <= world.clock.now()


def held_progress_writes(world: World) -> tuple[asyncio.Event, asyncio.Event]:
    """Progress writes held until the second event is set; the first is set once one is under way."""
    writes, written = asyncio.Event(), asyncio.Event()
    record = world.store.record_progress

    async def held(changes: Sequence[ProgressChange], now: float) -> None:
        writes.set()
        await written.wait()
        await record(changes, now)

    world.store.record_progress = held  # type: ignore[method-assign]
    return writes, written


def held_downloads(world: World) -> tuple[asyncio.Event, asyncio.Event]:
    """Downloads held until the second event is set; the first is set once one is under way."""
    downloads, fetched = asyncio.Event(), asyncio.Event()
    real_download = world.pool.upstreams["sim"].download

    async def slow_download(url: str) -> bytes:
        downloads.set()
        await fetched.wait()
        return await real_download(url)

    world.pool.upstreams["sim"].download = slow_download  # type: ignore[method-assign]
    return downloads, fetched


async def hook_the_end(world: World, tracked: Tracked) -> None:
    """The upstream's hook saying the job's task finished (it has)."""
    seen = world.engine.task(tracked.upstream_id, "sim://sim")
    assert seen is not None and seen["status"] == "SUCCESS"
    done = world.pool.upstreams["sim"].parse_hook(json.dumps(seen).encode())
    assert done is not None
    await world.tracker.lifecycle.hook(tracked, done)


async def test_a_job_the_upstream_finishes_while_a_round_writes_its_timeout_is_delivered_not_timed_out(
    world: World,
) -> None:
    """A round reads a job running just past its deadline, and its progress is written with the timeout to
    follow; meanwhile the upstream's hook says the task finished, and its grid is being delivered. The round does
    not end the job as timed out under the delivery (its image kept, its client told it failed, its hold released
    for a task the upstream ran): the job ends as the delivery says, succeeded and charged."""
    job = await world.submit("cat", deadline_s=8)  # the task takes 10 s
    lifecycle = world.tracker.lifecycle
    tracked = lifecycle._by_job[job]
    writes, written = held_progress_writes(world)
    downloads, fetched = held_downloads(world)
    world.clock.advance(9)
    round_ = asyncio.ensure_future(world.tracker.poll("sim"))  # reads it running, past its deadline
    await writes.wait()
    world.clock.advance(2)  # the upstream finishes the task, and says so
    await hook_the_end(world, tracked)
    await downloads.wait()  # its grid is being downloaded
    written.set()
    await round_
    fetched.set()
    await world.settle()
    assert await world.state(job) == ("SUCCEEDED", None, "captured")
    assert await world.balance() == (998, 0)


async def test_a_job_the_upstream_finishes_while_a_round_writes_its_loss_is_delivered_not_lost(
    world: World,
) -> None:
    """The same with a job the provider's reads have left out for `lost_after_s`: the round that finds it lost
    writes its neighbour's progress first; meanwhile the upstream's hook says the task finished. The job ends as
    its delivery says, succeeded and charged, not lost."""
    job = await world.submit("a hare")
    other = await world.submit("a tortoise sim:slow")
    lifecycle = world.tracker.lifecycle
    tracked = lifecycle._by_job[job]
    real = world.pool.upstreams["sim"].fetch_many

    async def leaving_it_out(ids: Sequence[str]) -> list[TaskView]:
        return [v for v in await real(ids) if v.upstream_id != tracked.upstream_id]

    world.pool.upstreams["sim"].fetch_many = leaving_it_out  # type: ignore[method-assign]
    world.clock.advance(1)
    await world.tracker.poll("sim")  # missing from now on
    assert tracked.missing_since is not None
    writes, written = held_progress_writes(world)
    downloads, fetched = held_downloads(world)
    world.clock.advance(31)  # past lost_after_s; the neighbour's progress moved on
    round_ = asyncio.ensure_future(world.tracker.poll("sim"))  # finds the job lost
    await writes.wait()
    await hook_the_end(world, tracked)
    await downloads.wait()
    written.set()
    await round_
    fetched.set()
    await world.settle()
    assert await world.state(job) == ("SUCCEEDED", None, "captured")
    assert (await world.state(other))[0] == "IN_PROGRESS"


async def test_a_job_the_upstream_finishes_while_its_timeout_s_lease_check_fails_is_downloaded_once(
    world: World,
) -> None:
    """A round ends a job past its deadline, and checks its lease first; meanwhile the upstream's hook says the task
    finished, and its delivery starts. The round's lease check fails (the database briefly away): that leaves the
    delivery under way alone, rather than making the job due to be read again, which would deliver it twice."""
    lifecycle = world.tracker.lifecycle
    gate = asyncio.Event()
    leases = CheckedLeases(world, failing=(1,), gate=gate)
    job = await world.submit("cat", deadline_s=8)  # the task takes 10 s
    tracked = lifecycle._by_job[job]
    downloads = world.downloads()
    world.clock.advance(9)
    round_ = asyncio.ensure_future(world.tracker.poll("sim"))  # past its deadline: its lease is checked
    await leases.checking.wait()
    world.clock.advance(2)
    seen = world.engine.task(tracked.upstream_id, "sim://sim")
    assert seen is not None and seen["status"] == "SUCCESS"
    done = world.pool.upstreams["sim"].parse_hook(json.dumps(seen).encode())
    assert done is not None
    await lifecycle.hook(tracked, done)  # its delivery starts, and checks the lease too
    gate.set()
    await round_
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state(job) == ("SUCCEEDED", None, "captured")
    assert len(downloads) == 1


async def test_a_job_due_at_once_between_rounds_is_read_at_once(world: World) -> None:
    """A job taken up while the provider's loop waits for its next round (adopted from a process that died, or a
    confirmation that reached this process) is read at once, as its wake-up asks: not when the loop next looks, up
    to a quarter interval later (a second here; 15 s for a provider read every minute)."""
    world.pool.poll_interval = lambda name: 4.0  # type: ignore[method-assign]
    world.tracker.lifecycle._progress.every_s = None
    rounds = record_rounds(world)
    await world.submit("sloth sim:never")  # first read 4 s on: the loop waits a quarter interval at a time
    taken_up = await world.submit("a hare sim:never")
    row = await world.store.get(taken_up)
    assert row is not None
    world.tracker.lifecycle.forget(taken_up)  # followed elsewhere, for now
    await world.tracker.start()
    for _ in range(128):  # an eighth of a second on, well before the loop next looks
        for _ in range(5):
            await asyncio.sleep(0)
        world.clock.advance(1 / 1024)
    assert rounds == []
    taken = world.clock.now()
    world.tracker.lifecycle.take_up(row)
    for _ in range(512):
        for _ in range(5):
            await asyncio.sleep(0)
        world.clock.advance(1 / 1024)
    await world.tracker.stop()
    assert rounds, "the job was not read"
    assert rounds[0][1] == {row.upstream_id} and rounds[0][0] - taken <= 0.25


async def test_a_follow_up_the_upstream_runs_out_of_modal_unconfirmed_runs_to_its_mode_s_deadline_with_a_slot(
    world: World,
) -> None:
    """A follow-up the upstream parked in MODAL, then ran without a `submit/modal` (confirmed upstream some other
    way): from then on it is a running job like any other, holding one of its provider's slots and running to its
    mode's deadline from the moment it was seen running, not the modal window's."""
    job = await world.submit("a heron run upstream", may_wait=True)
    lifecycle = world.tracker.lifecycle
    tracked = lifecycle._by_job[job]
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.MODAL, 0))
    assert tracked.state is JobState.MODAL and not tracked.slot and world.pool.in_flight["sim"] == 0
    world.clock.advance(15)  # five seconds of the modal window left
    await lifecycle.hook(tracked, TaskView(tracked.upstream_id, TaskStatus.IN_PROGRESS, 10))
    runs_until = world.clock.now() + lifecycle.config.jobs.deadline_s.fast
    assert tracked.state is JobState.IN_PROGRESS and tracked.slot and world.pool.in_flight["sim"] == 1
    assert tracked.deadline_at == runs_until
    row = await world.store.get(job)
    assert row is not None and (row.state, row.deadline_at) == (JobState.IN_PROGRESS, runs_until)
    world.clock.advance(10)  # past the modal window: the job runs on
    await world.tracker.poll("sim")
    row = await world.store.get(job)
    assert row is not None and row.state is not JobState.FAILED


async def test_a_retry_for_another_process_s_job_claims_it_ahead_of_the_next_adoption_round(world: World) -> None:
    """`adopt_soon` (a client's retry came here for a job another process holds): the jobs that process left are
    claimed and followed now, with the clock standing still, not at the next round; once the process stops
    adopting, nothing is claimed."""
    lifecycle = world.tracker.lifecycle
    job = await world.submit("cat")
    lifecycle.forget(job)  # another process's job, which this one does not follow
    world.pool.release("sim")
    coordinator = coordinator_of(world, Leases(world.store.engine, world.store.owner, 30), alone=False)
    async with world.store.engine.begin() as conn:
        await conn.execute(jobs.update().values(owner="dead-process", lease_until=world.clock.now() + 30))
    await coordinator.start()
    try:
        assert not lifecycle.following(job)  # its lease lives
        async with world.store.engine.begin() as conn:  # the process is gone (its lease ran out, or its presence)
            await conn.execute(jobs.update().values(lease_until=world.clock.now() - 1))
        coordinator.adopt_soon()
        coordinator.adopt_soon()  # one round at a time
        early = coordinator._early
        assert early is not None
        await early
        row = await world.store.get(job)
        assert lifecycle.following(job) and row is not None and row.owner == world.store.owner
        coordinator.adopt_soon()  # retries that keep coming: a round every ADOPT_SOON_GAP_S at most
        assert coordinator._early is early
        world.clock.advance(ADOPT_SOON_GAP_S)
        coordinator.adopt_soon()
        again = coordinator._early
        assert again is not early and again is not None
        await again
        await coordinator.stop_adopting()
        world.clock.advance(ADOPT_SOON_GAP_S)
        coordinator.adopt_soon()
        assert coordinator._early is again
    finally:
        await coordinator.stop()
