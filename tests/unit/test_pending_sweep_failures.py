"""The pending sweep when the ending of one of the jobs it ends cannot be written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from relay.core.tracker import PENDING_GRACE_S
from relay.services import Relay
from relay.store.jobs import Ending, JobRow, JobState, JobStore, NewJob
from tests.helpers import FakeClock, relay_config

pytestmark = pytest.mark.anyio


async def test_a_job_whose_ending_fails_neither_stops_the_start_nor_the_others_and_is_swept_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A process died while submitting three jobs, long ago. At the next start the sweep ends them; the ending of
    one cannot be written (a row the database refuses for now). The relay starts all the same, the two others are
    ended (their holds released), the failure is logged with its job, and the next sweep ends the third."""
    clock = FakeClock()
    config = relay_config(tmp_path)
    before = Relay(config, clock)
    await before.db.migrate()
    key, _ = await before.keys.create("k", 100, clock.now())
    dead = JobStore(before.db.engine, owner="a-process-that-died", lease_s=30)
    deadline = clock.now() + 3600
    new = [
        NewJob(f"job_never_sent_{i}", "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "p", 2, deadline)
        for i in range(3)
    ]
    assert await dead.open(key.id, new, clock.now() - PENDING_GRACE_S - 1)
    await before.db.dispose()

    relay = Relay(config, clock)
    finish_many = relay.store.finish_many
    refused = "job_never_sent_1"

    async def refusing_one(endings: Sequence[Ending], now: float) -> list[JobRow | None]:
        if any(ending.job_id == refused for ending in endings):
            raise RuntimeError("the database refused this row")
        return await finish_many(endings, now)

    monkeypatch.setattr(relay.store, "finish_many", refusing_one)
    with caplog.at_level(logging.ERROR, "relay.tracker"):
        await relay.open()
    try:
        for job_id in ("job_never_sent_0", "job_never_sent_2"):
            row = await relay.store.get(job_id)
            assert row is not None and (row.state, row.hold_state) == (JobState.FAILED, "released")
        row = await relay.store.get(refused)
        assert row is not None and row.state is JobState.PENDING
        assert any(getattr(r, "fields", {}).get("job") == refused for r in caplog.records), caplog.text

        monkeypatch.undo()
        await relay.tracker.sweep_pending()  # the next one, SWEEP_EVERY_S on
        row = await relay.store.get(refused)
        assert row is not None
        assert (row.state, row.hold_state) == (JobState.FAILED, "released")
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (100, 0)
    finally:
        await relay.close()
