"""An upstream hook forwarded to a relay process while it shuts down (SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.core.jobs import Attempt
from relay.services import Relay
from tests.helpers import pg_database, relay_config

pytestmark = pytest.mark.anyio


class GatedDownloads(SimulatorUpstream):
    def __init__(self) -> None:
        super().__init__("sim", SimEngine(SimSettings(fast_s=1.0, tile_px=16)))
        self.gate = asyncio.Event()
        self.downloads = 0

    async def download(self, url: str) -> bytes:
        self.downloads += 1
        await self.gate.wait()
        return await super().download(url)


@pytest.mark.postgres
async def test_a_hook_forwarded_to_a_stopping_process_does_not_take_its_handed_over_job_back(tmp_path: Path) -> None:
    """Relay B forwards an upstream hook (the task finished) to relay A, which follows the job, while A is shutting
    down; it is heard after A handed its leases over. A must leave it to the process that adopts the job: applying
    it starts a delivery that renews A's lease (for `jobs.lease_s`, 30 s) just before A exits, so B cannot adopt
    the job, and its waiters wait, until that lease runs out."""
    upstream = GatedDownloads()
    jobs = {"poll_interval_s": 30}  # A does not read the job itself: the hook says it finished
    async with contextlib.AsyncExitStack() as stack:
        database = {"url": await stack.enter_async_context(pg_database())}
        a = Relay(relay_config(tmp_path / "a", database=database, jobs=jobs), SystemClock(), {"sim": upstream})
        b = Relay(relay_config(tmp_path / "b", database=database), SystemClock(), {"sim": upstream})
        await a.open()
        await b.open()
        stack.push_async_callback(b.close)
        key, _ = await a.keys.create("k", 100, 0)
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        generation = await a.jobs.start(key, spec, Attempt("body", retry=False))
        (job_id,) = generation.job_ids
        generation.close()
        row = await a.store.get(job_id)
        assert row is not None and row.upstream_id is not None and row.owner == a.process_id
        await asyncio.sleep(1.2)  # the task finished upstream
        task = upstream.engine.task(row.upstream_id, "sim://sim")
        assert task is not None and task["status"] == "SUCCESS"

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

        async def ended() -> None:
            while True:
                now = await b.store.get(job_id)
                assert now is not None
                if now.state.terminal:
                    return
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(ended(), 5)
        except TimeoutError:
            left = await b.store.get(job_id)
            assert left is not None
            pytest.fail(
                f"5 s after A's hand-over the job is still {left.state.value}, owned by "
                f"{'A' if left.owner == a.process_id else left.owner}, its lease "
                f"{(left.lease_until or 0) - time.time():.1f} s from running out (downloads: {upstream.downloads})"
            )
