"""The pending sweep of one relay process against an upstream hook that adopts the job in another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.services import Relay
from relay.store.jobs import JobRow, JobStore, NewJob
from tests.helpers import ended_row, pg_database, relay_config

pytestmark = pytest.mark.anyio


@pytest.mark.postgres
async def test_the_pending_sweep_does_not_end_a_job_a_hook_adopted_since_it_read_it(tmp_path: Path) -> None:
    """A process died while submitting a job, long ago: the job is PENDING, its lease lapsed, and the upstream (a
    relax queue) only now starts the task. Relay B's pending sweep reads the job as stale; meanwhile the task's
    first hook reaches relay C, which adopts the job (SUBMITTED, followed by C). B's sweep must then leave it
    alone: ending it "interrupted" would fail a job that runs upstream and that C follows."""
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    upstream = SimulatorUpstream("sim", engine)
    async with contextlib.AsyncExitStack() as stack:
        database = {"url": await stack.enter_async_context(pg_database())}
        b = Relay(relay_config(tmp_path / "b", database=database), SystemClock(), {"sim": upstream})
        c = Relay(relay_config(tmp_path / "c", database=database), SystemClock(), {"sim": upstream})
        for relay in (b, c):
            await relay.open()
            stack.push_async_callback(relay.close)
        key, _ = await b.keys.create("k", 100, 0)

        job_id = "job_pending_long_ago"
        reply = engine.submit_imagine({"prompt": "a kite", "state": job_id}, "fast")
        upstream_id = str(reply.body["result"])
        long_ago = time.time() - 700  # older than the sweep's grace (600 s); its process's lease lapsed long ago
        dead = JobStore(b.db.engine, owner="a-process-that-died", lease_s=30)
        new = NewJob(job_id, "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "a kite", 2, time.time() + 600)
        assert await dead.open(key.id, [new], long_ago)

        read = b.store.stale_pending
        outcomes: list[str] = []

        async def read_then_hook_arrives(created_before: float, now: float) -> list[JobRow]:
            rows = await read(created_before, now)
            task = engine.task(upstream_id, "sim://sim")
            assert task is not None
            outcomes.append(await c.upstream_hooks.apply("sim", json.dumps(task).encode()))
            return rows

        b.store.stale_pending = read_then_hook_arrives  # type: ignore[method-assign]
        await b.tracker.sweep_pending()
        assert outcomes == ["adopted"]

        row = await asyncio.wait_for(ended_row(c, job_id), 10)
        assert (row.state.value, row.error_code) == ("SUCCEEDED", None), (row.state, row.error_code, row.fail_reason)
