"""Client hooks of a job whose submit the upstream answers only after the stop stopped waiting for submits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from adapters.base import ClientError, SubmitOutcome, SubmitRequest
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.api.mj import render as mj_render
from relay.clock import SystemClock
from relay.core import submit as submit_module
from relay.core.modes import ModeHints
from relay.core.tasks import TaskOrder
from relay.domain import TaskKind
from relay.services import Relay
from tests.helpers import Receiver, relay_config, serve

pytestmark = pytest.mark.anyio


class LateRefusal(SimulatorUpstream):
    """An upstream that answers a submit late, and refuses it."""

    def __init__(self, name: str, engine: SimEngine, late_s: float) -> None:
        super().__init__(name, engine)
        self.late_s = late_s
        self.asked = asyncio.Event()

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        self.asked.set()
        await asyncio.sleep(self.late_s)
        return ClientError("the prompt is refused")


async def test_a_submit_refused_after_the_stop_stopped_waiting_still_tells_its_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay stops while a submit is with an upstream that answers it after the stop's wait for submits, within
    its own timeout: the stop waits for that answer (the job may run). The upstream refuses it, so the job ends
    here, FAILED, and nobody else sends that end. Its client hook was stopped before that wait, its HTTP client
    closed: the end's delivery failed on the closed client and was dropped, and the client never heard."""
    monkeypatch.setattr(submit_module, "STOP_WAIT_S", 0.3)
    receiver = Receiver()
    upstream = LateRefusal("sim", SimEngine(SimSettings(fast_s=1, tile_px=16)), late_s=1.0)
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"timeout_s": 2.0, "backoff_s": 0.1}}
    with serve(receiver.app()) as hooks:
        relay = Relay(relay_config(tmp_path, **sections), SystemClock(), {"sim": upstream})
        relay.notifier.render = lambda row, base, now: mj_render.task(row, relay.images, base, now)
        await relay.open()
        try:
            key, _ = await relay.keys.create("k", 100, 0)
            order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite", notify_hook=hooks + "/ok")
            submitting = asyncio.ensure_future(relay.tasks.submit(key, order, "http://127.0.0.1:1"))
            await asyncio.wait_for(upstream.asked.wait(), 5)
        finally:
            await relay.close()  # SIGTERM while the submit is with the upstream
        with pytest.raises(Exception):  # noqa: B017 (the refusal, as its caller is told)
            await submitting
        with receiver.lock:
            statuses = [json.loads(body)["status"] for _, body in receiver.deliveries]
        assert statuses and statuses[-1] == "FAILURE", f"the receiver heard only {statuses}"
