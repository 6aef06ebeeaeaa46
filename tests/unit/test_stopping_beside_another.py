"""A relay process stopping (as at SIGTERM) beside another on one PostgreSQL database (two service stacks, as two
processes would be): what it leaves to the other, and what it finishes itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.core import submit
from relay.core.jobs import Attempt
from relay.core.modes import ModeHints
from relay.core.tasks import TaskOrder
from relay.domain import TaskKind
from relay.services import Relay
from relay.store.keys import KeyRecord
from tests.helpers import FakeClock, ended_row, pg_database, relay_config
from tests.unit.test_pending_sweep_submitting import GatedAnswers

pytestmark = pytest.mark.anyio


class GatedDownloads(SimulatorUpstream):
    """The simulator, with image downloads that wait at a gate; each download is counted."""

    def __init__(self, fast_s: float) -> None:
        super().__init__("sim", SimEngine(SimSettings(fast_s=fast_s, tile_px=16)))
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.downloads = 0

    async def download(self, url: str) -> bytes:
        self.downloads += 1
        self.waiting.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await super().download(url)


@contextlib.asynccontextmanager
async def two_relays(
    tmp_path: Path, upstream: GatedDownloads, jobs_of_a: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Relay, Relay, KeyRecord, str]]:
    """Relays A and B on one fresh database, and one job A started (its id); B is closed at the end, A by the test."""
    async with contextlib.AsyncExitStack() as stack:
        database = {"url": await stack.enter_async_context(pg_database())}
        a = Relay(
            relay_config(tmp_path / "a", database=database, jobs=jobs_of_a or {}), SystemClock(), {"sim": upstream}
        )
        b = Relay(relay_config(tmp_path / "b", database=database), SystemClock(), {"sim": upstream})
        await a.open()
        await b.open()
        stack.push_async_callback(b.close)
        key, _ = await a.keys.create("k", 100, 0)
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        generation = await a.jobs.start(key, spec, Attempt("body", retry=False))
        (job_id,) = generation.job_ids
        generation.close()
        yield a, b, key, job_id


async def ended(relay: Relay, job_id: str) -> str:
    return (await ended_row(relay, job_id)).state.value


@pytest.mark.postgres
async def test_sigterm_while_a_grid_is_downloaded_does_not_download_it_again_elsewhere(tmp_path: Path) -> None:
    """Relay A is stopped (as at SIGTERM) while it downloads a finished job's grid. The job must end once, with one
    download: A's hand-over must not throw its download away for relay B to adopt the job and download it again."""
    upstream = GatedDownloads(fast_s=0.2)
    async with two_relays(tmp_path, upstream) as (a, b, _, job_id):
        await asyncio.wait_for(upstream.waiting.wait(), 10)  # A downloads the grid

        closing = asyncio.create_task(a.close())  # SIGTERM: A shuts down
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(upstream.cancelled.wait(), 1)
        upstream.gate.set()  # the download would have finished now
        await asyncio.wait_for(closing, 20)

        assert await asyncio.wait_for(ended(b, job_id), 10) == "SUCCEEDED"
        await asyncio.sleep(0.5)  # B's adoption round (every second) has had its chance
        assert upstream.downloads == 1, f"the grid was downloaded {upstream.downloads} times"


@pytest.mark.postgres
async def test_a_hook_forwarded_to_a_stopping_process_does_not_take_its_handed_over_job_back(tmp_path: Path) -> None:
    """Relay B forwards an upstream hook (the task finished) to relay A, which follows the job, while A is shutting
    down; it is heard after A handed its leases over. A must leave it to the process that adopts the job: applying
    it starts a delivery that renews A's lease (for `jobs.lease_s`, 30 s) just before A exits, so B cannot adopt
    the job, and its waiters wait, until that lease runs out."""
    upstream = GatedDownloads(fast_s=1.0)
    # A does not read the job itself: the hook says it finished
    async with two_relays(tmp_path, upstream, {"poll_interval_s": 30}) as (a, b, _, job_id):
        row = await a.store.get(job_id)
        assert row is not None and row.upstream_id is not None and row.owner == a.process_id
        while (task := upstream.engine.task(row.upstream_id, "sim://sim")) is None or task["status"] != "SUCCESS":
            await asyncio.sleep(0.05)  # until the task finished upstream

        assert a.broadcast is not None
        stop = a.coordinator.stop

        async def handed_over_then_a_forwarded_hook_is_heard() -> None:
            await stop()  # the leases are handed over
            payload = f"{a.process_id}|sim|{row.upstream_id}|{json.dumps(task)}"
            a.broadcast._heard_hook(None, 0, "mj_relay_hooks", payload)  # B sent it while A's lease was live

        a.coordinator.stop = handed_over_then_a_forwarded_hook_is_heard  # type: ignore[method-assign]
        await a.close()
        for delivery in list(a.lifecycle._deliveries):  # A's process exits: what it left running dies with it
            delivery.cancel()
        await asyncio.gather(*a.lifecycle._deliveries, return_exceptions=True)
        upstream.gate.set()

        try:
            await asyncio.wait_for(ended(b, job_id), 5)
        except TimeoutError:
            left = await b.store.get(job_id)
            assert left is not None
            pytest.fail(
                f"5 s after A's hand-over the job is still {left.state.value}, owned by "
                f"{'A' if left.owner == a.process_id else left.owner}, its lease "
                f"{(left.lease_until or 0) - time.time():.1f} s from running out (downloads: {upstream.downloads})"
            )


async def submitting_beside_another(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    clock: FakeClock,
    upstream: GatedAnswers,
    providers: list[dict[str, Any]] | None = None,
) -> tuple[Relay, Relay, KeyRecord, TaskOrder, asyncio.Future[Any]]:
    """Relays A and B on one PostgreSQL database (B closed by `stack`; A is for the test to stop), a key, an imagine
    order, and A's submit of it, which the upstream has taken and not yet answered."""
    database = {"url": await stack.enter_async_context(pg_database())}
    more = {"providers": providers} if providers is not None else {}
    a = Relay(relay_config(tmp_path / "a", database=database, **more), clock, {"sim": upstream})
    b = Relay(relay_config(tmp_path / "b", database=database, **more), clock, {"sim": upstream})
    await a.open()
    await b.open()
    stack.push_async_callback(b.close)
    key, _ = await a.keys.create("k", 100, 0)
    order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite")
    submitting = asyncio.ensure_future(a.tasks.submit(key, order, "http://127.0.0.1:1"))
    await asyncio.wait_for(upstream.taken.wait(), 10)
    return a, b, key, order, submitting


@pytest.mark.postgres
async def test_a_submit_answered_after_the_hand_over_is_handed_over_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relay A is stopped (as at SIGTERM) while an upstream is slow to answer a submit: A waits for it a while, then
    hands its leases over, and only then does the upstream take the task. The job is written down as A's, with a
    lease, though A follows nothing any more: it must be handed over as it is written, so that relay B adopts it at
    once, not once that lease has run out."""
    monkeypatch.setattr(submit, "STOP_WAIT_S", 0.05)  # A stops waiting for the submit before it is answered
    upstream = GatedAnswers()
    clock = FakeClock()  # both relays' time stands still: no lease runs out of itself
    async with contextlib.AsyncExitStack() as stack:
        a, b, key, order, submitting = await submitting_beside_another(stack, tmp_path, clock, upstream)

        release = a.leases.release

        async def release_then_answer() -> int:
            released = await release()
            upstream.gate.set()  # the upstream answers as A goes on stopping
            await submitting  # and A writes the job down
            return released

        monkeypatch.setattr(a.leases, "release", release_then_answer)
        await a.close()
        job_id = submitting.result().job_id
        row = await b.store.get(job_id)
        assert row is not None and (row.state.value, row.owner) == ("SUBMITTED", a.process_id)

        assert await b.coordinator.adopt() == 1
        assert b.lifecycle.following(job_id)


class CountedGatedAnswers(GatedAnswers):
    """`GatedAnswers`, telling when a second task reached the upstream."""

    def __init__(self) -> None:
        super().__init__()
        self.second = asyncio.Event()

    async def submit(self, request: Any) -> Any:
        if self.engine.submits >= 1:
            self.second.set()
        return await super().submit(request)


@pytest.mark.postgres
async def test_a_slot_reserved_by_a_submit_still_under_way_at_the_hand_over_is_not_given_to_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider has `max_in_flight: 1`. Relay A is stopped (as at SIGTERM) while the provider is slow to answer
    the submit of a job that reserved its one slot: A waits for it a while, then hands its leases over, and the
    upstream takes the task only after that. The reservation is live all the while (the task is on its way to the
    provider): relay B must not be given the slot meanwhile, or the provider runs two jobs at once."""
    monkeypatch.setattr(submit, "STOP_WAIT_S", 0.05)  # A stops waiting for the submit before it is answered
    upstream = CountedGatedAnswers()
    clock = FakeClock()  # both relays' time stands still: no lease runs out of itself
    providers = [{"name": "sim", "dialect": "simulator", "max_in_flight": 1}]
    async with contextlib.AsyncExitStack() as stack:
        a, b, key, order, submitting = await submitting_beside_another(stack, tmp_path, clock, upstream, providers)

        release = a.leases.release
        reached: list[bool] = []

        async def release_then_another_submits() -> int:
            released = await release()
            other = asyncio.ensure_future(b.tasks.submit(key, order, "http://127.0.0.1:1"))
            second = asyncio.ensure_future(upstream.second.wait())
            await asyncio.wait({other, second}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            reached.append(upstream.second.is_set())
            second.cancel()
            upstream.gate.set()  # the upstream answers as A goes on stopping
            await submitting  # and A writes the job down
            with contextlib.suppress(Exception):
                await other
            return released

        monkeypatch.setattr(a.leases, "release", release_then_another_submits)
        await a.close()
        assert reached == [False], "B sent a second job to a provider whose one slot A's submit still held"
        # A's job, written down once the upstream took it, is handed over then: B adopts it at once
        assert await b.coordinator.adopt() == 1
        assert b.lifecycle.following(submitting.result().job_id)


@pytest.mark.postgres
async def test_a_stopping_process_adopts_no_job_it_would_not_follow(tmp_path: Path) -> None:
    """Relays A and C are stopped together (as in a rolling deploy). A is letting a delivery finish (its tracker no
    longer reads anything) when C hands its running job over. A must not claim it: it would hold the job, with a
    fresh lease, while nothing reads it, until its own hand-over, keeping a live process (B) from adopting it."""
    clock = FakeClock()  # adoption rounds come when the test moves the clock
    upstream = GatedAnswers()
    upstream.gate.set()
    async with contextlib.AsyncExitStack() as stack:
        database = {"url": await stack.enter_async_context(pg_database())}
        a = Relay(relay_config(tmp_path / "a", database=database), clock, {"sim": upstream})
        c = Relay(relay_config(tmp_path / "c", database=database), clock, {"sim": upstream})
        await a.open()
        await c.open()
        key, _ = await c.keys.create("k", 100, 0)
        order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite")
        job_id = (await c.tasks.submit(key, order, "http://127.0.0.1:1")).job_id

        gate, delivering = asyncio.Event(), asyncio.Event()
        close_lifecycle = a.lifecycle.close

        async def a_delivery_is_let_finish() -> None:
            delivering.set()
            await gate.wait()
            await close_lifecycle()

        a.lifecycle.close = a_delivery_is_let_finish  # type: ignore[method-assign]
        adopting = next(task for task in a.coordinator._loops if task.get_name() == "leases:adopt")
        stopping = asyncio.ensure_future(a.close())
        try:
            await asyncio.wait_for(delivering.wait(), 10)
            await c.close()  # C hands its job over
            row = await a.store.get(job_id)
            assert row is not None and row.owner == c.process_id and row.lease_until == 0.0

            clock.advance(1.0)  # an adoption round is due
            while not adopting.done() and (row := await a.store.get(job_id)) is not None and row.owner != a.process_id:
                await asyncio.sleep(0.01)
            row = await a.store.get(job_id)
            assert row is not None and row.owner != a.process_id, "A, stopping, claimed a job it follows no more"
        finally:
            gate.set()
            await stopping
