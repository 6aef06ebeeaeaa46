"""Two requests that draw the same random job id: the second is admitted under fresh ids, not refused with a 500."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from adapters import SubmitOutcome, SubmitRequest
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.core import jobs as jobs_module
from relay.core import tasks as tasks_module
from relay.core.jobs import Attempt
from relay.core.modes import ModeHints
from relay.core.tasks import TaskOrder
from relay.domain import TaskKind
from relay.services import Relay
from tests.helpers import ended_row, relay_config

pytestmark = pytest.mark.anyio

TAKEN, FRESH = "1000000000000001", "1000000000000002"


def drawn(*ids: str) -> Iterator[str]:
    yield from ids
    raise AssertionError("more ids drawn than the test expected")


@contextlib.asynccontextmanager
async def a_relay(tmp_path: Path) -> AsyncIterator[Relay]:
    upstream = SimulatorUpstream("sim", SimEngine(SimSettings(fast_s=0.2, tile_px=16)))
    relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": upstream})
    await relay.open()
    try:
        yield relay
    finally:
        await relay.close()


async def test_a_native_task_that_draws_a_taken_id_is_submitted_under_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = drawn(TAKEN, TAKEN, FRESH)
    monkeypatch.setattr(tasks_module, "new_job_id", lambda: next(ids))
    async with a_relay(tmp_path) as relay:
        key, _ = await relay.keys.create("k", 100, 0)
        order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite")
        first = await relay.tasks.submit(key, order, "http://127.0.0.1:1")
        second = await relay.tasks.submit(key, order, "http://127.0.0.1:1")
        assert (first.job_id, second.job_id) == (TAKEN, FRESH)
        for job_id in (TAKEN, FRESH):
            assert (await asyncio.wait_for(ended_row(relay, job_id), 10)).state.value == "SUCCEEDED"
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (96, 0)


async def test_an_image_request_that_draws_a_taken_id_runs_under_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = drawn(TAKEN, TAKEN, FRESH)
    monkeypatch.setattr(jobs_module, "new_job_id", lambda: next(ids))
    async with a_relay(tmp_path) as relay:
        key, _ = await relay.keys.create("k", 100, 0)
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        results: list[list[str]] = []
        for body in ("first", "second"):
            generation = await relay.jobs.start(key, spec, Attempt(body, retry=False))
            try:
                results.append([row.id for row in await asyncio.wait_for(relay.jobs.wait(generation), 10)])
            finally:
                generation.close()
        assert results == [[TAKEN], [FRESH]]
        for job_id in (TAKEN, FRESH):
            assert (await relay.store.get(job_id)) is not None
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (96, 0)
        # A retry of the second request follows the jobs it ran under its fresh id.
        retried = await relay.jobs.start(key, spec, Attempt("second", retry=True))
        try:
            assert retried.job_ids == (FRESH,)
        finally:
            retried.close()


async def test_a_request_that_draws_a_running_job_s_id_as_the_database_fails_leaves_that_job_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request draws the id of another request's job, still being submitted, and the read that would tell a
    collision from an admission written unanswered fails too: that request fails, holding nothing, and the job
    whose id it drew runs on (it is not ended as the failed admission's own)."""
    ids = drawn(TAKEN, TAKEN)
    monkeypatch.setattr(jobs_module, "new_job_id", lambda: next(ids))
    gate, waiting = asyncio.Event(), asyncio.Event()
    upstream = SimulatorUpstream("sim", SimEngine(SimSettings(fast_s=0.2, tile_px=16)))
    submit = upstream.submit

    async def held_submit(request: SubmitRequest) -> SubmitOutcome:
        waiting.set()
        await gate.wait()
        return await submit(request)

    upstream.submit = held_submit  # type: ignore[method-assign]
    relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": upstream})
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 100, 0)
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        first = asyncio.ensure_future(relay.jobs.start(key, spec))
        await asyncio.wait_for(waiting.wait(), 5)  # its job is held, PENDING, its submit under way

        async def unreadable(*args: object) -> bool:
            raise OSError("the database went away")

        monkeypatch.setattr(relay.store, "ids_taken", unreadable)
        with pytest.raises(Exception):  # noqa: B017 - the admission's own failure, whatever the database said
            await relay.jobs.start(key, spec)
        monkeypatch.undo()
        gate.set()
        generation = await asyncio.wait_for(first, 10)
        try:
            (row,) = await asyncio.wait_for(relay.jobs.wait(generation), 10)
        finally:
            generation.close()
        assert (row.id, row.state.value, row.error_code) == (TAKEN, "SUCCEEDED", None)
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (98, 0)
    finally:
        await relay.close()
