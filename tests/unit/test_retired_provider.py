"""Jobs running on a provider the configuration no longer has (removed, renamed at a restart): nobody can follow them
to their end, so they are ended, their holds settled and their clients told, rather than left running for ever."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.api.mj import render
from relay.clock import SystemClock
from relay.core.modes import ModeHints
from relay.core.tasks import TaskOrder
from relay.domain import JobState, TaskKind
from relay.services import Relay
from tests.helpers import Receiver, relay_config, serve, sql

pytestmark = pytest.mark.anyio

SIM = {"fast_s": 30, "relax_s": 30, "turbo_s": 30, "tile_px": 16}


def started(relay: Relay) -> Relay:
    relay.notifier.render = lambda row, base, now: render.task(row, relay.images, base, now)  # as the app does
    return relay


async def test_a_relay_started_without_a_running_job_s_provider_ends_it_and_tells_its_hook(tmp_path: Path) -> None:
    """Alone on SQLite, restarted with the provider renamed: the job was claimed only by a process that has its
    provider, which none ever will. It stayed SUBMITTED past its deadline, its credits held and its hook silent. Now
    it is left running until its deadline (the provider may be put back), and ended once that has passed."""
    receiver = Receiver()
    engine = SimEngine(SimSettings(**SIM))
    sections = {"api": {"references": {"allow_private": True}}, "jobs": {"poll_interval_s": 0.05}}
    async with contextlib.AsyncExitStack() as stack:
        hook = stack.enter_context(serve(receiver.app())) + "/ok"
        before = started(
            Relay(relay_config(tmp_path, **sections), SystemClock(), {"sim": SimulatorUpstream("sim", engine)})
        )
        await before.open()
        key, _ = await before.keys.create("k", 100, 0)
        order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite", notify_hook=hook)
        task = await before.tasks.submit(key, order, "http://127.0.0.1:1")
        await before.close()

        providers = [{"name": "renamed", "dialect": "simulator", "simulator": SIM}]
        config = relay_config(tmp_path, providers=providers, **sections)
        after = started(Relay(config, SystemClock(), {"renamed": SimulatorUpstream("renamed", engine)}))
        await after.open()
        stack.push_async_callback(after.close)
        row = await after.store.get(task.job_id)
        assert row is not None and row.state is JobState.SUBMITTED and row.hold_state == "held", row
        sql(config, "UPDATE jobs SET deadline_at = ? WHERE id = ?", time.time() - 1, task.job_id)
        await after.coordinator.adopt()
        row = await after.store.get(task.job_id)
        assert row is not None and row.state is JobState.FAILED and row.hold_state == "released", row
        assert "no longer configured" in (row.fail_reason or "")
        record = await after.keys.get(key.id)
        assert record is not None and (record.balance, record.held) == (100, 0)
        for _ in range(100):
            if any(t["status"] == "FAILURE" for t in receiver.tasks(task.job_id)):
                break
            await asyncio.sleep(0.05)
        assert [t["status"] for t in receiver.tasks(task.job_id)][-1] == "FAILURE", receiver.deliveries
        assert json.loads(receiver.deliveries[-1][1])["failReason"]


async def test_an_adopted_job_s_hook_links_bracket_an_ipv6_listening_address(tmp_path: Path) -> None:
    """A job's hook carried on after a restart links its images at the listening address when no `public_url` is
    set. A relay listening on an IPv6 address (`::1`) named it bare, `http://::1:8080`, which no client can parse:
    the task's `imageUrl` at its end was no link at all."""
    engine = SimEngine(SimSettings(fast_s=30, tile_px=16))
    sections = {"api": {"references": {"allow_private": True}}, "server": {"host": "::1", "port": 8080}}
    relay = started(Relay(relay_config(tmp_path, **sections), SystemClock(), {"sim": SimulatorUpstream("sim", engine)}))
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 100, 0)
        order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite", notify_hook="http://[::1]:9/h")
        task = await relay.tasks.submit(key, order, "http://[::1]:8080")
        row = await relay.store.get(task.job_id)
        assert row is not None
        relay.notifier._unwatch(task.job_id)  # as after a restart: the job is adopted, its hook carried on
        await relay._watch_hooks([row])
        base = relay.notifier._watches[task.job_id].base_url
        assert base == "http://[::1]:8080"
        assert httpx.URL(base + "/files/x/grid.png").host == "::1"
    finally:
        await relay.close()
