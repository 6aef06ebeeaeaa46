"""A relay stopping (as at SIGTERM, once the requests under way had their time) while a request's jobs are being
held: a job whose hold is written must be submitted and handed over, or ended with its hold released; never left
PENDING, holding credits, while the upstream may run it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from adapters import SubmitOutcome, SubmitRequest
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.core import submit
from relay.core.jobs import Attempt
from relay.services import Relay
from relay.store.jobs import Admission
from tests.helpers import relay_config

pytestmark = pytest.mark.anyio


class SlowAnswers(SimulatorUpstream):
    """The simulator, taking each task at once and answering `answer_s` later."""

    def __init__(self, answer_s: float) -> None:
        super().__init__("sim", SimEngine(SimSettings(fast_s=30, tile_px=16)))
        self.answer_s = answer_s

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        outcome = await super().submit(request)
        await asyncio.sleep(self.answer_s)
        return outcome


async def _exit(before: set[asyncio.Task[object]]) -> None:
    """What the process's exit does to the tasks the stop left running (those not running `before`): cancels them."""
    others = [task for task in asyncio.all_tasks() if task not in before]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def _rows(relay: Relay) -> list[tuple[str, str]]:
    with sqlite3.connect(relay.config.database_url().split(":///", 1)[1]) as conn:
        return list(conn.execute("SELECT state, hold_state FROM jobs").fetchall())


async def _stop_while_holding(tmp_path: Path, hold_s: float) -> tuple[str, str, int]:
    """A request's job whose hold takes `hold_s` to be written once the relay starts stopping (its request outlived
    the graceful shutdown and was cancelled; the work it started goes on); the upstream takes the task and answers
    a moment later. The job's state and hold once the process exited, and how many submits the upstream took."""
    before = asyncio.all_tasks()
    upstream = SlowAnswers(answer_s=0.5)
    relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": upstream})
    await relay.open()
    closed = False
    try:
        key, _ = await relay.keys.create("k", 100, 0)
        gate, holding = asyncio.Event(), asyncio.Event()
        open_many = relay.store.open_many

        async def slow_hold(batch: Sequence[Admission], now: float) -> list[bool]:
            holding.set()
            await gate.wait()
            return await open_many(batch, now)

        relay.store.open_many = slow_hold  # type: ignore[method-assign,assignment]
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        request = asyncio.create_task(relay.jobs.start(key, spec, Attempt("body", retry=False)))
        await asyncio.wait_for(holding.wait(), 5)
        request.cancel()  # the graceful shutdown's time ran out: uvicorn cancels the request

        closing = asyncio.create_task(relay.close())  # then the lifespan stops the relay
        await asyncio.sleep(hold_s)
        gate.set()  # the hold is written
        await asyncio.wait_for(closing, 20)
        closed = True
        await _exit(before)

        rows = _rows(relay)
        assert len(rows) == 1
        return rows[0][0], rows[0][1], upstream.engine.submits
    finally:
        if not closed:
            with contextlib.suppress(Exception):
                await relay.close()


async def test_a_job_held_as_the_relay_stops_is_submitted_before_the_process_exits(tmp_path: Path) -> None:
    """The hold is written while the stopping process waits for the work under way: the job must be submitted and
    written down before the process exits (its lease handed over with the others), not left PENDING, holding
    credits, while the upstream runs it, for the pending sweep to release ten minutes later."""
    state, hold_state, submits = await _stop_while_holding(tmp_path, hold_s=0.05)
    assert (state, hold_state, submits) == ("SUBMITTED", "held", 1)


async def test_a_job_held_after_the_stop_stopped_waiting_is_ended_and_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold is written only after the stopping process stopped waiting for the work under way: the job must be
    ended with its hold released, and never sent, rather than sent as the process goes away."""
    monkeypatch.setattr(submit, "STOP_WAIT_S", 0.1)
    state, hold_state, submits = await _stop_while_holding(tmp_path, hold_s=0.3)
    assert (state, hold_state, submits) == ("FAILED", "released", 0)
