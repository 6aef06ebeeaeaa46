"""The pending sweep against a submit of its own process that is still waiting for the upstream's answer."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from adapters import SubmitOutcome, SubmitRequest
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.core import tracker
from relay.core.modes import ModeHints
from relay.core.tasks import TaskOrder
from relay.domain import TaskKind
from relay.services import Relay
from tests.helpers import ended_row, relay_config

pytestmark = pytest.mark.anyio


class GatedAnswers(SimulatorUpstream):
    """The simulator, taking each task at once and answering only once `gate` is set."""

    def __init__(self) -> None:
        super().__init__("sim", SimEngine(SimSettings(fast_s=0.2, tile_px=16)))
        self.gate = asyncio.Event()
        self.taken = asyncio.Event()

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        outcome = await super().submit(request)
        self.taken.set()
        await self.gate.wait()
        return outcome


async def test_the_pending_sweep_leaves_alone_a_job_its_process_is_still_submitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's submit is with a slow upstream (a provider's `timeout_s` may be up to 600 s, and a job may be tried
    on several providers) when the job passes the sweep's grace. The sweep must not end it as interrupted and
    release its hold: the upstream takes it and runs it, so it must run to its end and be charged once."""
    upstream = GatedAnswers()
    relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": upstream})
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 100, 0)
        order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite")
        submitting = asyncio.create_task(relay.tasks.submit(key, order, "http://127.0.0.1:1"))
        await asyncio.wait_for(upstream.taken.wait(), 5)

        monkeypatch.setattr(tracker, "PENDING_GRACE_S", 0.0)  # the submit has taken longer than the grace
        await relay.tracker.sweep_pending()
        upstream.gate.set()
        submitted = await asyncio.wait_for(submitting, 5)

        row = await asyncio.wait_for(ended_row(relay, submitted.job_id), 10)
        assert (row.state.value, row.hold_state) == ("SUCCEEDED", "captured")
        assert upstream.engine.submits == 1
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (98, 0)
    finally:
        with contextlib.suppress(Exception):
            await relay.close()
