"""The pending sweep tells the client of a job it ends: a job left PENDING by a process that stopped (or died) in
its submit window had its client hook watched in that process alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from relay.api.mj import render as mj_render
from relay.clock import SystemClock
from relay.core import tracker
from relay.services import Relay
from relay.store.jobs import Admission, JobStore, NewJob
from tests.helpers import Receiver, relay_config, serve

pytestmark = pytest.mark.anyio


async def test_a_job_the_pending_sweep_ends_is_told_to_its_clients_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process admitted a job with a `notifyHook` and died before submitting it. This process's sweep ends it
    as interrupted, releases its hold, and the client's hook gets the task's FAILURE, signed as every delivery
    is. A job of the same kind without a hook ends alike, unheard."""
    receiver = Receiver()
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"attempts": 2, "backoff_s": 0.05}}
    relay = Relay(relay_config(tmp_path, **sections), SystemClock(), {})
    relay.notifier.render = lambda row, base, now: mj_render.task(row, relay.images, base, now)  # as the app does
    await relay.open()
    try:
        with serve(receiver.app()) as hooks:
            key, _ = await relay.keys.create("k", 100, 0)
            # The dead process's admissions: long ago, their leases long run out.
            gone = JobStore(relay.db.engine, owner="a-process-that-died", lease_s=30)
            then = time.time() - 3600
            told, untold = (
                NewJob(
                    job_id,
                    job_id,
                    "mj-fast",
                    "fast",
                    "MID_JOURNEY",
                    "imagine",
                    "a kite",
                    2,
                    then + 600,
                    None,
                    None,
                    None,
                    hook,
                )
                for job_id, hook in (("told", hooks + "/ok"), ("untold", None))
            )
            assert await gone.open_many([Admission(key.id, (told, untold))], then) == [True]

            monkeypatch.setattr(tracker, "PENDING_GRACE_S", 60.0)
            await relay.tracker.sweep_pending()

            for job_id in ("told", "untold"):
                row = await relay.store.get(job_id)
                assert row is not None
                assert (row.state.value, row.hold_state, row.error_code) == ("FAILED", "released", "interrupted")
            async with asyncio.timeout(10):
                while not receiver.tasks("told"):
                    await asyncio.sleep(0.01)
            (task,) = receiver.tasks("told")
            assert task["status"] == "FAILURE"
            assert receiver.deliveries[0][0]["x-mj-relay-signature"].startswith("sha256=")
            current = await relay.keys.get(key.id)
            assert current is not None and (current.balance, current.held) == (100, 0)
    finally:
        with contextlib.suppress(Exception):
            await relay.close()
