"""Upstream hooks about a job whose relay process died between the upstream taking its task and writing that down:
the job is adopted with the task the hooks name, however soon the task ends, and not left PENDING for the sweep to
end as interrupted while the upstream ran it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.services import Relay
from relay.store.jobs import JobRow, JobStore, NewJob
from relay.store.slots import Slots
from tests.helpers import ended_row, pg_database, relay_config

pytestmark = pytest.mark.anyio


async def pending_elsewhere(relay: Relay, engine: SimEngine, key_id: str, owner: str, lease_s: float) -> bytes:
    """A job `owner` admitted and was submitting when it died: its task upstream, its row PENDING under a lease that
    lives on for `lease_s`. The task's hook body, as the upstream sends it now."""
    job_id = "job_of_a_dead_submit"
    reply = engine.submit_imagine({"prompt": "a kite", "state": job_id}, "fast")
    dead = JobStore(relay.db.engine, owner=owner, lease_s=lease_s)
    new = NewJob(job_id, "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "a kite", 2, time.time() + 600)
    assert await dead.open(key_id, [new], time.time())
    task = engine.task(str(reply.body["result"]), "sim://sim")
    assert task is not None
    return json.dumps(task).encode()


async def ended(relay: Relay) -> JobRow:
    return await ended_row(relay, "job_of_a_dead_submit")


async def test_a_relay_started_again_adopts_a_job_its_previous_run_was_submitting_at_once(tmp_path: Path) -> None:
    """Alone on SQLite, the relay came straight back after dying mid-submit: the job's lease, its previous run's,
    has not run out. A short task's calls all come while it lives; the first adopts the job."""
    engine = SimEngine(SimSettings(fast_s=0.5, tile_px=16))
    async with contextlib.AsyncExitStack() as stack:
        relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": SimulatorUpstream("sim", engine)})
        await relay.open()
        stack.push_async_callback(relay.close)
        key, _ = await relay.keys.create("k", 100, 0)
        body = await pending_elsewhere(relay, engine, key.id, "the-run-before", lease_s=30)
        assert await relay.upstream_hooks.apply("sim", body) == "adopted"
        row = await asyncio.wait_for(ended(relay), 10)
        assert (row.state.value, row.hold_state) == ("SUCCEEDED", "captured"), (row.error_code, row.fail_reason)


@pytest.mark.postgres
async def test_a_job_another_process_died_submitting_is_adopted_when_its_lease_runs_out(tmp_path: Path) -> None:
    """Next to another on PostgreSQL: every call about the short task came while the dead process's lease lived, and
    was forwarded to it; none comes again. Once the lease runs out, the job is adopted and ends as succeeded."""
    later = [0.0]  # the upstream's time runs ahead of the relay's by this much: a task ends when the test says
    engine = SimEngine(SimSettings(fast_s=5, tile_px=16), now=lambda: time.time() + later[0])
    async with contextlib.AsyncExitStack() as stack:
        database: dict[str, Any] = {"url": await stack.enter_async_context(pg_database())}
        config = relay_config(tmp_path, database=database)
        relay = Relay(config, SystemClock(), {"sim": SimulatorUpstream("sim", engine)})
        await relay.open()
        stack.push_async_callback(relay.close)
        key, _ = await relay.keys.create("k", 100, 0)
        body = await pending_elsewhere(relay, engine, key.id, "a-process-that-died", lease_s=1.5)
        assert await relay.upstream_hooks.apply("sim", body) == "forwarded"
        later[0] = 10  # the task ended
        task = engine.task(json.loads(body)["id"], "sim://sim")
        assert task is not None and task["status"] == "SUCCESS"
        assert await relay.upstream_hooks.apply("sim", json.dumps(task).encode()) == "forwarded"  # the last call
        row = await asyncio.wait_for(ended(relay), 10)
        assert (row.state.value, row.hold_state) == ("SUCCEEDED", "captured"), (row.error_code, row.fail_reason)
        assert row.owner == relay.process_id


@pytest.mark.postgres
async def test_a_call_from_a_provider_the_pending_job_was_not_sent_to_adopts_nothing(tmp_path: Path) -> None:
    """A process died while submitting a job to provider b, whose slot the job holds (its row names b). Provider a,
    which refused the job before (and so knows its id), calls about a task of its own naming the job: the job is
    not a's, and a's image must not end it as succeeded while b runs it. b's own call adopts it."""
    engines = {name: SimEngine(SimSettings(fast_s=0.3, tile_px=16)) for name in ("a", "b")}
    async with contextlib.AsyncExitStack() as stack:
        database: dict[str, Any] = {"url": await stack.enter_async_context(pg_database())}
        providers = [
            {"name": name, "dialect": "simulator", "max_in_flight": 5, "simulator": {"fast_s": 0.3, "tile_px": 16}}
            for name in engines
        ]
        config = relay_config(tmp_path, database=database, providers=providers)
        upstreams = {name: SimulatorUpstream(name, engine) for name, engine in engines.items()}
        relay = Relay(config, SystemClock(), dict(upstreams))
        await relay.open()
        stack.push_async_callback(relay.close)
        key, _ = await relay.keys.create("k", 100, 0)
        job_id = "job_of_a_dead_submit"
        dead = JobStore(relay.db.engine, owner="a-process-that-died", lease_s=1)
        new = NewJob(job_id, "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "a kite", 2, time.time() + 600)
        died = time.time() - 60  # and its lease ran out since
        assert await dead.open(key.id, [new], died)
        assert await Slots(relay.db.engine, 1, dead.owner).take(job_id, "b", 5, died)  # sent to b, b's slot held

        def hook_body(name: str) -> bytes:
            reply = engines[name].submit_imagine({"prompt": "a kite", "state": job_id}, "fast")
            task = engines[name].task(str(reply.body["result"]), "sim://sim")
            assert task is not None
            return json.dumps(task).encode()

        spoof, real = hook_body("a"), hook_body("b")
        assert await relay.upstream_hooks.apply("a", spoof) == "unknown"
        row = await relay.store.get(job_id)
        assert row is not None and (row.state.value, row.provider) == ("PENDING", "b")
        assert await relay.upstream_hooks.apply("b", real) == "adopted"
        row = await asyncio.wait_for(ended(relay), 10)
        assert (row.state.value, row.provider, row.hold_state) == ("SUCCEEDED", "b", "captured")


@pytest.mark.postgres
async def test_calls_about_a_dead_submit_taken_together_all_apply(tmp_path: Path) -> None:
    """A short task's calls about a job a process that died was submitting come in one turn, once its lease ran out:
    the first adopts the job, and the task's end, which came with it, ends it, not left for a read a poll interval
    on."""
    later = [0.0]
    engine = SimEngine(SimSettings(fast_s=5, tile_px=16), now=lambda: time.time() + later[0])
    async with contextlib.AsyncExitStack() as stack:
        database: dict[str, Any] = {"url": await stack.enter_async_context(pg_database())}
        config = relay_config(tmp_path, database=database, jobs={"poll_interval_s": 600})  # only calls end it soon
        relay = Relay(config, SystemClock(), {"sim": SimulatorUpstream("sim", engine)})
        await relay.open()
        stack.push_async_callback(relay.close)
        key, _ = await relay.keys.create("k", 100, 0)
        started = await pending_elsewhere(relay, engine, key.id, "a-process-that-died", lease_s=-60)
        later[0] = 10  # the task ended
        task = engine.task(json.loads(started)["id"], "sim://sim")
        assert task is not None and task["status"] == "SUCCESS"
        outcomes = await relay.upstream_hooks.apply_many([("sim", started), ("sim", json.dumps(task).encode())])
        assert "unknown" not in outcomes, outcomes
        row = await asyncio.wait_for(ended(relay), 10)
        assert (row.state.value, row.hold_state) == ("SUCCEEDED", "captured"), (row.error_code, row.fail_reason)
