"""A native submit (`/mj/submit/...`) the server stops waiting for (its graceful shutdown over: uvicorn cancels the
request) while its job is being held: a job that is then submitted may run upstream and is followed after the stop,
so its client is told its id (22, queued) to read it by, not to submit it again; one never sent keeps the stop's
retryable answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from relay.clock import SystemClock
from relay.core import submit
from relay.core.modes import ModeHints
from relay.core.tasks import Submission, TaskOrder
from relay.domain import JobState, TaskKind
from relay.services import Relay
from relay.store.jobs import Admission
from tests.helpers import relay_config
from tests.unit.test_stop_admitted import SlowAnswers, _exit, _rows

pytestmark = pytest.mark.anyio


async def _stop_while_holding(tmp_path: Path, hold_s: float) -> tuple[Submission | None, list[tuple[str, str]]]:
    """The answer to a native imagine cancelled while its hold takes `hold_s` to be written once the relay starts
    stopping (None: the cancellation went on, for the server's 503), and the job's state and hold at the exit."""
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
        order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite")
        request = asyncio.create_task(relay.tasks.submit(key, order, "http://127.0.0.1:1"))
        await asyncio.wait_for(holding.wait(), 5)
        request.cancel()  # the graceful shutdown's time ran out: uvicorn cancels the request

        closing = asyncio.create_task(relay.close())  # then the lifespan stops the relay
        await asyncio.sleep(hold_s)
        gate.set()  # the hold is written
        answer: Submission | None = None
        with contextlib.suppress(asyncio.CancelledError):
            answer = await asyncio.wait_for(request, 20)
        await asyncio.wait_for(closing, 20)
        closed = True
        await _exit(before)
        return answer, _rows(relay)
    finally:
        if not closed:
            with contextlib.suppress(Exception):
                await relay.close()


async def test_a_native_submit_whose_job_is_sent_as_the_relay_stops_is_answered_its_id(tmp_path: Path) -> None:
    """The job is held and sent while the relay stops: the client was answered 503 `Retry-After: 1`, and its retry
    (midjourney-proxy clients keep no idempotency key) started and paid for a second job beside this one."""
    answer, rows = await _stop_while_holding(tmp_path, hold_s=0.05)
    assert rows == [("SUBMITTED", "held")]
    assert answer is not None
    assert (answer.state, answer.queued) == (JobState.SUBMITTED, True)
    assert answer.job_id.isdigit()


async def test_a_native_submit_whose_job_is_never_sent_keeps_the_retryable_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold lands after the stop stopped waiting: the job is ended unsent, its hold released, and the request
    stays cancelled (the server answers it 503 `Retry-After: 1`): a retry starts the only job."""
    monkeypatch.setattr(submit, "STOP_WAIT_S", 0.1)
    answer, rows = await _stop_while_holding(tmp_path, hold_s=0.3)
    assert rows == [("FAILED", "released")]
    assert answer is None
