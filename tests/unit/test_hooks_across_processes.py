"""An upstream hook that reaches a process which does not follow its job: forwarded to the live process that
holds the job's lease, or, once that process is gone, the job is claimed here and the hook applied at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from adapters import TaskStatus, TaskView
from relay.core import upstream_hooks
from relay.core.coordination import Coordinator
from relay.core.lifecycle import Tracked
from relay.core.upstream_hooks import UpstreamHooks
from relay.store.attempts import AttemptStore
from relay.store.jobs import JobRow, JobState, JobStore, NewJob
from relay.store.leases import Leases
from tests.unit.test_tracker import World, world

pytestmark = pytest.mark.anyio
__all__ = ["world"]  # the fixture


class Forwarded(list[tuple[str, str, str, bytes]]):
    async def __call__(self, owner: str, provider: str, upstream_id: str, body: bytes) -> None:
        self.append((owner, provider, upstream_id, body))


def hooks_of(
    world: World,
    forwarded: Forwarded,
    follow: Callable[[list[JobRow]], Awaitable[object]] | None = None,
    watch: Callable[[list[JobRow]], Awaitable[None]] | None = None,
) -> UpstreamHooks:
    lifecycle = world.tracker.lifecycle
    hooks = UpstreamHooks(
        config=world.pool.config,
        secrets=["a-signing-secret"],
        pool=world.pool,
        lifecycle=lifecycle,
        store=world.store,
        clock=world.clock,
        metrics=world.pool.metrics,
        submitting=lambda job_id: False,
        leases=Leases(world.store.engine, world.store.owner, 30),
        follow=follow or world.tracker.adopt,
        watch=watch,
    )
    hooks.forward = forwarded
    return hooks


def coordinator_of(world: World, on_adopted: Callable[[list[JobRow]], Awaitable[None]]) -> Coordinator:
    """This process's coordinator among others on one database, carrying adopted jobs' hooks on with `on_adopted`."""
    return Coordinator(
        leases=Leases(world.store.engine, world.store.owner, 30),
        attempts=AttemptStore(world.store.engine),
        tracker=world.tracker,
        lifecycle=world.tracker.lifecycle,
        clock=world.clock,
        alone=False,
        on_adopted=on_adopted,
    )


async def elsewhere(world: World, job_id: str, *, submitted: bool = True) -> tuple[str, bytes]:
    """A job another process admitted (and submitted): its task upstream, and the hook body that task makes."""
    other = JobStore(world.store.engine, owner="another-process", lease_s=4)
    reply = world.engine.submit_imagine({"prompt": "a cat", "state": job_id}, "fast")
    upstream_id = str(reply.body["result"])
    now = world.clock.now()
    new = NewJob(job_id, "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "a cat", 2, now + 600)
    assert await other.open(world.key_id, [new], now)
    if submitted:
        await other.mark_submitted(job_id, "sim", upstream_id, now)
    return upstream_id, body_of(world, upstream_id)


def body_of(world: World, upstream_id: str) -> bytes:
    task = world.engine.task(upstream_id, "sim://sim")  # the in-process simulator's own image links
    assert task is not None
    return json.dumps(task).encode()


async def test_a_live_process_s_job_is_forwarded_and_a_dead_one_s_claimed(world: World) -> None:
    forwarded = Forwarded()
    hooks = hooks_of(world, forwarded)
    upstream_id, body = await elsewhere(world, "job_elsewhere1")
    world.clock.advance(2)  # running upstream (10 s jobs); the other process's lease (4 s) is live
    body = body_of(world, upstream_id)

    assert await hooks.apply("sim", body) == "forwarded"
    assert forwarded == [("another-process", "sim", upstream_id, body)]
    assert not world.tracker.lifecycle.following("job_elsewhere1")

    world.clock.advance(3)  # the other process died: its lease ran out
    body = body_of(world, upstream_id)
    assert await hooks.apply("sim", body) == "adopted"
    assert len(forwarded) == 1 and world.tracker.lifecycle.following("job_elsewhere1")
    assert world.tracker.lifecycle._by_job["job_elsewhere1"].state is JobState.IN_PROGRESS
    row = await world.store.get("job_elsewhere1")
    assert row is not None and row.owner == world.store.owner

    # from now on it is followed here: the next call is simply applied
    world.clock.advance(6)
    finished = body_of(world, upstream_id)
    view = world.pool.upstreams["sim"].parse_hook(finished)
    assert view is not None and view.status is TaskStatus.SUCCESS
    assert await hooks.apply("sim", finished) == "applied"
    await world.settle()
    assert await world.state("job_elsewhere1") == ("SUCCEEDED", None, "captured")
    assert await hooks.apply("sim", finished) == "late"  # ended here: a late duplicate changes nothing


async def test_calls_about_jobs_followed_elsewhere_are_looked_up_at_once(world: World) -> None:
    """Calls taken together about jobs this process does not follow each read the store: not in turn, so one slow
    read holds none of the others back."""
    forwarded = Forwarded()
    hooks = hooks_of(world, forwarded)
    bodies = [(await elsewhere(world, f"job_elsewhere{i}"))[1] for i in range(3)]
    world.clock.advance(2)  # their process's lease is live
    reading = 0
    all_reading = asyncio.Event()
    get = world.store.get

    async def slow_get(job_id: str) -> JobRow | None:
        nonlocal reading
        reading += 1
        if reading == len(bodies):
            all_reading.set()
        await all_reading.wait()  # returns only once every call is reading
        return await get(job_id)

    world.store.get = slow_get  # type: ignore[method-assign]
    outcomes = await asyncio.wait_for(hooks.apply_many([("sim", body) for body in bodies]), 5)
    assert outcomes == ["forwarded"] * 3 and len(forwarded) == 3


async def test_a_pending_job_of_a_live_process_is_left_to_it(world: World) -> None:
    """The upstream took the task and called back before the submitting process wrote it down: that process is
    alive and will; the call goes to it, and the job is not taken away from it."""
    forwarded = Forwarded()
    watched: list[list[str]] = []

    async def watch(rows: list[JobRow]) -> None:
        watched.append([row.id for row in rows])

    hooks = hooks_of(world, forwarded, watch=watch)
    rounds: list[None] = []
    hooks.held_elsewhere = lambda: rounds.append(None)
    upstream_id, _ = await elsewhere(world, "job_pending01", submitted=False)
    world.clock.advance(2)
    assert await hooks.apply("sim", body_of(world, upstream_id)) == "forwarded"
    assert await world.state("job_pending01") == ("PENDING", None, "held")
    # Its task is written down, and an adoption round asked for: were that process gone, the round would claim the
    # job as a running one now (`Leases.claim_expired`), not when its lease runs out.
    noted = await world.store.get("job_pending01")
    assert noted is not None and (noted.provider, noted.upstream_id) == ("sim", upstream_id) and rounds == [None]
    world.clock.advance(3)  # that process died in its submit window: the job is adopted here, by this call or by
    # the look at the first one that its lease's end brought (then this call is applied to the job followed here)
    assert await hooks.apply("sim", body_of(world, upstream_id)) in ("adopted", "applied")
    row = await world.store.get("job_pending01")
    assert row is not None and row.state is not JobState.PENDING and row.owner == world.store.owner
    assert watched == [["job_pending01"]]  # its client hook goes on here, as an adopted job's does


async def test_a_pending_job_whose_process_died_is_adopted_when_its_lease_runs_out(world: World) -> None:
    """That process died in its submit window, and the calls about the task all came while its lease lived (a short
    task, or a provider that calls only at the start and the end): each was forwarded to it, and none comes again.
    Once its lease runs out the job is adopted here with the task the calls named and followed to its end, rather
    than left PENDING for the sweep to end as interrupted while the upstream ran it."""
    forwarded = Forwarded()
    hooks = hooks_of(world, forwarded)
    upstream_id, _ = await elsewhere(world, "job_pending03", submitted=False)
    world.clock.advance(2)  # its process's lease (4 s) is live
    assert await hooks.apply("sim", body_of(world, upstream_id)) == "forwarded"
    assert len(forwarded) == 1
    for _ in range(100):  # the lease runs out, and no call comes again
        if world.tracker.lifecycle.following("job_pending03"):
            break
        await asyncio.sleep(0.01)
        world.clock.advance(0.25)
    row = await world.store.get("job_pending03")
    assert row is not None and row.state is JobState.IN_PROGRESS and row.upstream_id == upstream_id
    assert row.owner == world.store.owner and world.tracker.lifecycle.following("job_pending03")
    world.clock.advance(10)
    await world.tracker.poll("sim")
    await world.settle()
    assert await world.state("job_pending03") == ("SUCCEEDED", None, "captured")


async def test_a_pending_job_whose_process_lives_on_is_left_to_it_after_its_lease_time(world: World) -> None:
    """The process that holds the job lives (it renews its lease) and writes the job down: it is never adopted."""
    hooks = hooks_of(world, Forwarded())
    upstream_id, _ = await elsewhere(world, "job_pending04", submitted=False)
    owner = JobStore(world.store.engine, owner="another-process", lease_s=4)
    renewing = Leases(world.store.engine, "another-process", 4)
    world.clock.advance(2)
    assert await hooks.apply("sim", body_of(world, upstream_id)) == "forwarded"
    for step in range(40):  # 10 s, past the lease it had then: the look at the call finds it renewed
        if step == 20:
            await owner.mark_submitted("job_pending04", "sim", upstream_id, world.clock.now())
        await renewing.renew(world.clock.now())
        await asyncio.sleep(0.01)
        world.clock.advance(0.25)
    row = await world.store.get("job_pending04")
    assert row is not None and row.owner == "another-process" and row.state is JobState.SUBMITTED
    assert not world.tracker.lifecycle.following("job_pending04") and not hooks._after_lease


async def test_a_forwarded_call_is_applied_by_the_process_that_follows_the_job(world: World) -> None:
    hooks = hooks_of(world, Forwarded())
    job_id = await world.submit("a dog")
    row = await world.store.get(job_id)
    assert row is not None and row.upstream_id is not None
    world.clock.advance(11)
    await hooks.forwarded("sim", body_of(world, row.upstream_id), row.upstream_id)
    await world.settle()
    assert await world.state(job_id) == ("SUCCEEDED", None, "captured")


async def test_a_forwarded_call_too_large_to_carry_makes_the_job_due_at_once(world: World) -> None:
    hooks = hooks_of(world, Forwarded())
    job_id = await world.submit("a bird")
    tracked = world.tracker.lifecycle._by_job[job_id]
    tracked.due_at = world.clock.now() + 100
    row = await world.store.get(job_id)
    assert row is not None and row.upstream_id is not None
    await hooks.forwarded("sim", None, row.upstream_id)
    assert tracked.due_at == world.clock.now()


async def test_calls_are_applied_after_they_are_answered_together_and_counted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`take` returns before the call is applied (the provider's notify thread waits for nothing else); the calls
    taken in one turn of the loop are applied together, as one read of their jobs (a job spoken of twice: once);
    `close` waits for what is being applied."""
    hooks = hooks_of(world, Forwarded())
    job_ids = [await world.submit("a fox"), await world.submit("a hare")]
    bodies = []
    for job_id in job_ids:
        row = await world.store.get(job_id)
        assert row is not None and row.upstream_id is not None
        bodies.append(body_of(world, row.upstream_id))
    world.clock.advance(11)
    ended = [body_of(world, json.loads(body)["id"]) for body in bodies]
    lifecycle = world.tracker.lifecycle
    gate = asyncio.Event()
    together: list[list[str]] = []
    hooks_of_lifecycle = lifecycle.hooks

    async def held_back(provider: str, calls: list[tuple[Tracked, TaskView]]) -> None:
        together.append([tracked.job_id for tracked, _ in calls])
        await gate.wait()
        await hooks_of_lifecycle(provider, calls)

    monkeypatch.setattr(lifecycle, "hooks", held_back)
    read_as: list[list[str]] = []
    apply = lifecycle.apply

    async def one_read(provider: str, jobs: list[Tracked], views: list[TaskView] | None) -> None:
        read_as.append([tracked.job_id for tracked in jobs])
        await apply(provider, jobs, views)

    monkeypatch.setattr(lifecycle, "apply", one_read)
    applied = world.pool.metrics.upstream_hooks.labels("sim", "applied")
    for body in [bodies[0], *ended, ended[0]]:  # a progress view, both ends, and an end again
        assert hooks.room(len(body))
        hooks.take("sim", body)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert together == [[job_ids[0], *job_ids, job_ids[0]]]
    assert applied._value.get() == 0 and await world.state(job_ids[0]) != ("SUCCEEDED", None, "captured")
    gate.set()
    await hooks.close()
    await world.settle()
    assert applied._value.get() == 4
    for job_id in job_ids:
        assert await world.state(job_id) == ("SUCCEEDED", None, "captured")
    assert read_as == [job_ids]  # one read of both jobs, each with its most advanced view


async def test_taken_calls_are_bounded_in_number_and_bytes(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `MAX_APPLYING` calls or `MAX_APPLYING_BYTES` taken and not yet applied, there is no room: the caller
    applies a call before answering it."""
    hooks = hooks_of(world, Forwarded())
    gate = asyncio.Event()

    async def held_back(calls: list[tuple[str, bytes]]) -> list[upstream_hooks.Outcome]:
        await gate.wait()
        return ["unreadable"] * len(calls)

    monkeypatch.setattr(hooks, "apply_many", held_back)
    monkeypatch.setattr(upstream_hooks, "MAX_APPLYING_BYTES", 100)
    assert hooks.room(100) and not hooks.room(101)
    hooks.take("sim", b"x" * 60)
    await asyncio.sleep(0)
    assert hooks.room(40) and not hooks.room(41)  # the bytes are held until the call is applied
    monkeypatch.setattr(upstream_hooks, "MAX_APPLYING", 2)
    hooks.take("sim", b"{}")
    assert not hooks.room(0)
    gate.set()
    await hooks.close()
    assert hooks.room(100)


async def test_calls_whose_task_is_cancelled_before_it_starts_free_their_room(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task that applies a turn's calls may be cancelled before it ever runs (a shutdown): the calls stop
    counting against the room, and the next call taken gets a task of its own."""
    hooks = hooks_of(world, Forwarded())
    applied: list[list[tuple[str, bytes]]] = []

    async def record(calls: list[tuple[str, bytes]]) -> list[upstream_hooks.Outcome]:
        applied.append(list(calls))
        return ["unreadable"] * len(calls)

    monkeypatch.setattr(hooks, "apply_many", record)
    monkeypatch.setattr(upstream_hooks, "MAX_APPLYING", 2)
    hooks.take("sim", b"one")
    hooks.take("sim", b"two")
    assert not hooks.room(0)
    (task,) = hooks._applying
    task.cancel()  # before its first step
    await asyncio.gather(task, return_exceptions=True)
    assert hooks.room(0) and not hooks._applying
    hooks.take("sim", b"three")
    await hooks.close()
    assert applied == [[("sim", b"three")]]
    assert hooks.room(0)


async def test_one_call_that_fails_fails_alone(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose reading raises is counted failed; a group whose applying raises is applied again call by call,
    so only the call at fault fails."""
    hooks = hooks_of(world, Forwarded())
    job_ids = [await world.submit("a fox"), await world.submit("a hare")]
    world.clock.advance(11)
    bodies = []
    for job_id in job_ids:
        row = await world.store.get(job_id)
        assert row is not None and row.upstream_id is not None
        bodies.append(body_of(world, row.upstream_id))
    upstream = world.pool.upstreams["sim"]
    parse = upstream.parse_hook

    def fussy(body: bytes) -> TaskView | None:
        if body == b"boom":
            raise RuntimeError("a bug in reading one call")
        return parse(body)

    monkeypatch.setattr(upstream, "parse_hook", fussy)
    lifecycle = world.tracker.lifecycle
    hooks_of_lifecycle = lifecycle.hooks

    async def not_in_company(provider: str, calls: list[tuple[Tracked, TaskView]]) -> None:
        if len(calls) > 1 or calls[0][0].job_id == job_ids[1]:
            raise RuntimeError("a bug in applying one job's call")
        await hooks_of_lifecycle(provider, calls)

    monkeypatch.setattr(lifecycle, "hooks", not_in_company)
    assert await hooks.apply_many([("sim", bodies[0]), ("sim", b"boom"), ("sim", bodies[1])]) == [
        "applied",
        "failed",
        "failed",
    ]
    await world.settle()
    assert await world.state(job_ids[0]) == ("SUCCEEDED", None, "captured")
    assert await hooks.apply("sim", b"not json") == "unreadable"


async def test_a_job_a_hook_claims_carries_on_as_an_adopted_one_its_client_hooks_included(world: World) -> None:
    """Claimed for an upstream hook ahead of the adoption round (which then never sees it), the job goes through
    what adoption does after a claim: its client hooks are watched here from now on."""
    adopted: list[list[str]] = []

    async def on_adopted(rows: list[JobRow]) -> None:
        # watched before it is followed: a job that ends at once (its provider gone) still has its end sent
        assert not any(world.tracker.lifecycle.following(row.id) for row in rows)
        adopted.append([row.id for row in rows])

    coordinator = coordinator_of(world, on_adopted)
    hooks = hooks_of(world, Forwarded(), follow=coordinator.follow_claimed)
    upstream_id, _ = await elsewhere(world, "job_claimed01")
    world.clock.advance(5)  # the other process died: its lease (4 s) ran out
    assert await hooks.apply("sim", body_of(world, upstream_id)) == "adopted"
    assert adopted == [["job_claimed01"]] and world.tracker.lifecycle.following("job_claimed01")


async def test_a_job_adopted_here_is_followed_even_when_its_client_hook_cannot_be_carried_on(world: World) -> None:
    """Carrying on an adopted job's client hook reads its key, which may fail (the database briefly unreachable):
    the job, written as this process's, is followed all the same, by an upstream hook's adoption or a claim."""

    async def broken(rows: list[JobRow]) -> None:
        raise OSError("the database went away")

    hooks = hooks_of(world, Forwarded(), watch=broken)
    upstream_id, _ = await elsewhere(world, "job_pending02", submitted=False)
    world.clock.advance(5)  # its process died in its submit window
    assert await hooks.apply("sim", body_of(world, upstream_id)) == "adopted"
    assert world.tracker.lifecycle.following("job_pending02")

    coordinator = coordinator_of(world, broken)
    await elsewhere(world, "job_claimed02")
    world.clock.advance(5)  # that process died too
    assert await coordinator.adopt() == 1 and world.tracker.lifecycle.following("job_claimed02")


async def test_a_call_of_another_provider_than_the_one_a_job_is_submitted_to_is_not_written_down(
    world: World,
) -> None:
    """A job is being submitted here to provider `other`, and `sim` (which refused it before, so knows its id, or
    names it at will) calls about a task of its own with the job's state: that task is not the job's. Written down
    on the job, a process that claims the job after this one died would follow it at `sim` (ending it by the task
    `sim` says, charged for another's image or refunded while `other` ran it); and the task `other` names next would
    no longer be written down (the first one named stays)."""
    hooks = hooks_of(world, Forwarded())
    hooks._submitting = lambda job_id: job_id == "job_submit01"
    hooks._submitting_to = lambda job_id: "other" if job_id == "job_submit01" else None
    now = world.clock.now()
    new = NewJob("job_submit01", "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "a cat", 2, now + 600)
    assert await world.store.open(world.key_id, [new], now)
    reply = world.engine.submit_imagine({"prompt": "a cat", "state": "job_submit01"}, "fast")
    assert await hooks.apply("sim", body_of(world, str(reply.body["result"]))) == "unknown"
    row = await world.store.get("job_submit01")
    assert row is not None and row.state is JobState.PENDING
    assert row.provider is None and row.upstream_id is None
    # the provider the submit waits on names its task: that one is written down
    hooks._submitting_to = lambda job_id: "sim"
    assert await hooks.apply("sim", body_of(world, str(reply.body["result"]))) == "unknown"
    row = await world.store.get("job_submit01")
    assert row is not None and (row.provider, row.upstream_id) == ("sim", reply.body["result"])
