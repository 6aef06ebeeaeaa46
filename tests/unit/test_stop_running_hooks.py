"""A stopping process waits for client hook deliveries only of jobs that ended (no one else sends their end), not
for a running job's progress to a receiver that never answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.services import Relay
from tests.helpers import relay_config

pytestmark = pytest.mark.anyio


async def test_stopping_does_not_wait_out_a_progress_delivery_to_a_receiver_that_never_answers(tmp_path: Path) -> None:
    from relay.api.mj import render as mj_render
    from relay.core.modes import ModeHints
    from relay.core.tasks import TaskOrder
    from relay.domain import TaskKind

    calls: list[bytes] = []
    held: list[asyncio.StreamWriter] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        calls.append(await reader.read(65536))  # a receiver that takes the request and never answers
        await asyncio.Event().wait()

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = SimulatorUpstream("sim", SimEngine(SimSettings(fast_s=60, tile_px=16)))
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"timeout_s": 2.0, "backoff_s": 1.0}}
    relay = Relay(relay_config(tmp_path, **sections), SystemClock(), {"sim": upstream})
    relay.notifier.render = lambda row, base, now: mj_render.task(row, relay.images, base, now)
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 100, 0)
        order = TaskOrder(
            TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite", notify_hook=f"http://127.0.0.1:{port}/h"
        )
        submitted = await relay.tasks.submit(key, order, "http://127.0.0.1:1")
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.05)
        assert calls, "the receiver was never called"
        row = await relay.jobs.store.get(submitted.job_id) if hasattr(relay.jobs, "store") else None
        started = time.monotonic()
        await relay.close()
        took = time.monotonic() - started
        assert took < 3.0, (
            f"stopping took {took:.1f} s, waiting out the tries of a delivery of a job still running upstream "
            f"({row.state.value if row else 'running'}): its later states come from the process that follows it next"
        )
    finally:
        with contextlib.suppress(Exception):
            await relay.close()
        for writer in held:
            writer.transport.abort()
        server.close()
