"""A relay process stopped while it delivers a grid, beside another on one PostgreSQL database (two service stacks,
as two processes would be)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.core.jobs import Attempt
from relay.services import Relay
from tests.helpers import pg_database, relay_config

pytestmark = pytest.mark.anyio


class GatedDownloads(SimulatorUpstream):
    """The simulator, with image downloads that wait at a gate; each download is counted."""

    def __init__(self) -> None:
        super().__init__("sim", SimEngine(SimSettings(fast_s=0.2, tile_px=16)))
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


@pytest.mark.postgres
async def test_sigterm_while_a_grid_is_downloaded_does_not_download_it_again_elsewhere(tmp_path: Path) -> None:
    """Relay A is stopped (as at SIGTERM) while it downloads a finished job's grid. The job must end once, with one
    download: A's hand-over must not throw its download away for relay B to adopt the job and download it again."""
    upstream = GatedDownloads()
    async with contextlib.AsyncExitStack() as stack:
        database = {"url": await stack.enter_async_context(pg_database())}
        a = Relay(relay_config(tmp_path / "a", database=database), SystemClock(), {"sim": upstream})
        b = Relay(relay_config(tmp_path / "b", database=database), SystemClock(), {"sim": upstream})
        await a.open()
        await b.open()
        stack.push_async_callback(b.close)
        key, _ = await a.keys.create("k", 100, 0)
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        generation = await a.jobs.start(key, spec, Attempt("body", retry=False))
        (job_id,) = generation.job_ids
        generation.close()
        await asyncio.wait_for(upstream.waiting.wait(), 10)  # A downloads the grid

        closing = asyncio.create_task(a.close())  # SIGTERM: A shuts down
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(upstream.cancelled.wait(), 1)
        upstream.gate.set()  # the download would have finished now
        await asyncio.wait_for(closing, 20)

        async def ended() -> str:
            while True:
                row = await b.store.get(job_id)
                assert row is not None
                if row.state.terminal:
                    return row.state.value
                await asyncio.sleep(0.05)

        assert await asyncio.wait_for(ended(), 10) == "SUCCEEDED"
        await asyncio.sleep(0.5)  # B's adoption round (every second) has had its chance
        assert upstream.downloads == 1, f"the grid was downloaded {upstream.downloads} times"
