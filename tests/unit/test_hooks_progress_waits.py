"""Endings go first: an upstream hook that reports a task still running, taken while finished jobs are being
delivered, waits until those deliveries are done (at most `PROGRESS_WAIT_MAX_S`); a call that ends a job never
waits."""

from __future__ import annotations

import asyncio
import json

import pytest

from relay.core import upstream_hooks
from relay.core.upstream_hooks import UpstreamHooks, reports_running
from tests.unit.test_hooks_across_processes import Forwarded, body_of, hooks_of
from tests.unit.test_tracker import World, world

pytestmark = pytest.mark.anyio
__all__ = ["world"]  # the fixture


async def turns(count: int = 20) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def upstream_id_of(world: World, job_id: str) -> str:
    row = await world.store.get(job_id)
    assert row is not None and row.upstream_id is not None
    return row.upstream_id


async def progress_of(world: World, job_id: str) -> tuple[str, int]:
    row = await world.store.get(job_id)
    assert row is not None
    return row.state.value, row.progress


def held_downloads(world: World) -> asyncio.Event:
    """Image downloads wait for the returned event: jobs that finish stay being delivered until it is set."""
    gate = asyncio.Event()
    upstream = world.pool.upstreams["sim"]
    real = upstream.download

    async def held(url: str) -> bytes:
        await gate.wait()
        return await real(url)

    upstream.download = held  # type: ignore[method-assign]
    return gate


async def deliveries_done(world: World) -> None:
    """Wait until no job is being delivered, without moving the clock (`World.settle` moves it a second each time
    it looks, so on a slow machine a waiting progress call's limit ran out before the deliveries were done)."""
    for _ in range(500):
        if not world.tracker.lifecycle.delivering():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("deliveries did not finish")


async def setup(world: World) -> tuple[UpstreamHooks, str, str, bytes, bytes]:
    """Hooks, a job still running and one finished upstream, the first one's progress call and the second's end."""
    hooks = hooks_of(world, Forwarded())
    running, finished = await world.submit("a fox"), await world.submit("a hare")
    world.clock.advance(5)  # 10 s jobs: both half-way
    progress = body_of(world, await upstream_id_of(world, running))
    world.clock.advance(6)
    ended = body_of(world, await upstream_id_of(world, finished))
    assert json.loads(progress)["status"] == "IN_PROGRESS" and json.loads(ended)["status"] == "SUCCESS"
    return hooks, running, finished, progress, ended


async def waiting_behind_a_delivery(world: World, hooks: UpstreamHooks, ended: bytes, progress: bytes) -> asyncio.Event:
    """An end call taken (its job's delivery held: set the returned event to let it go on), then a progress call."""
    gate = held_downloads(world)
    hooks.take("sim", ended)
    await turns()
    assert world.tracker.lifecycle.delivering()
    hooks.take("sim", progress)
    await turns()
    return gate


async def test_progress_taken_while_jobs_are_delivered_is_applied_once_they_are_done(world: World) -> None:
    hooks, running, finished, progress, ended = await setup(world)
    gate = await waiting_behind_a_delivery(world, hooks, ended, progress)
    assert await progress_of(world, running) == ("SUBMITTED", 0)  # it waits for the delivery
    gate.set()
    await world.settle()
    assert await world.state(finished) == ("SUCCEEDED", None, "captured")
    for _ in range(50):  # each check of the deliveries is a clock sleep
        if await progress_of(world, running) != ("SUBMITTED", 0):
            break
        world.clock.advance(upstream_hooks.PROGRESS_WAIT_CHECK_S)
        await turns()
    assert await progress_of(world, running) == ("IN_PROGRESS", int(json.loads(progress)["progress"].rstrip("%")))
    await hooks.close()


async def test_progress_waits_no_longer_than_its_limit(world: World) -> None:
    hooks, running, finished, progress, ended = await setup(world)
    gate = await waiting_behind_a_delivery(world, hooks, ended, progress)
    world.clock.advance(upstream_hooks.PROGRESS_WAIT_MAX_S - 0.01)
    await turns()
    assert await progress_of(world, running) == ("SUBMITTED", 0)
    world.clock.advance(0.01)
    for _ in range(50):
        if await progress_of(world, running) != ("SUBMITTED", 0):
            break
        await turns()
    assert (await progress_of(world, running))[0] == "IN_PROGRESS"
    assert world.tracker.lifecycle.delivering()  # applied while the delivery still goes on
    gate.set()
    await world.settle()
    await hooks.close()


async def test_an_end_is_never_held_back_and_progress_of_a_job_that_ended_meanwhile_is_late(world: World) -> None:
    hooks, running, finished, progress, ended = await setup(world)
    gate = held_downloads(world)
    lifecycle = world.tracker.lifecycle
    hooks.take("sim", ended)
    await turns()
    hooks.take("sim", progress)  # waits
    running_end = body_of(world, await upstream_id_of(world, running))  # the clock is past its end too
    hooks.take("sim", running_end)
    await turns()
    assert lifecycle.delivering() and lifecycle.find("sim", await upstream_id_of(world, running)) is not None
    assert (await progress_of(world, running))[1] == 0
    late = world.pool.metrics.upstream_hooks.labels("sim", "late")
    gate.set()
    await deliveries_done(world)  # the clock kept still: the progress call's wait does not run out meanwhile
    world.clock.advance(upstream_hooks.PROGRESS_WAIT_CHECK_S)  # its next look finds nothing delivered
    await hooks.close()
    assert await world.state(running) == ("SUCCEEDED", None, "captured")
    assert await progress_of(world, running) == ("SUCCEEDED", 100)
    assert late._value.get() == 1  # the progress call came to a job ended here: nothing applied


async def test_progress_taken_while_nothing_is_delivered_is_applied_at_once(world: World) -> None:
    hooks, running, _, progress, _ = await setup(world)
    hooks.take("sim", progress)
    for _ in range(50):
        if await progress_of(world, running) != ("SUBMITTED", 0):
            break
        await turns()
    assert (await progress_of(world, running))[0] == "IN_PROGRESS"
    await hooks.close()


@pytest.mark.parametrize(
    ("body", "running"),
    [
        (b'{"id":"1","status":"IN_PROGRESS","progress":"15%"}', True),
        (b'{"id": "1", "status": "IN_PROGRESS", "progress": "15%"}', True),
        (b'{"id":"1","status":"SUCCESS","progress":"100%"}', False),
        (b'{"id":"1","status":"SUBMITTED"}', False),
        (b'{"id":"1","status":"IN_PROGRESS","status":"success"}', False),  # the last of two keys counts
        (b'{"id":"1","status":"IN_PROGRESS","prompt":"a failure of a cat"}', False),  # applied at once: harmless
        (b'{"id":"1","status":"IN_PROGRESS","properties":{"status":"MODAL"}}', False),
        (b'{"id":"1","status":"in_progress"}', False),
    ],
)
def test_what_counts_as_a_report_of_a_running_task(body: bytes, running: bool) -> None:
    assert reports_running(body) is running
