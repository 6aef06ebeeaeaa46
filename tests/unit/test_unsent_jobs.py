"""Jobs a process dies with before sending them: each job is marked (its provider written on its PENDING row) as its
submit leaves, so a dead process's job without a mark was never sent. On PostgreSQL the next adoption round ends it
at once (interrupted, its hold released) instead of the pending sweep ten minutes on, and a job taken so is never
sent by the process that held it, should that process be alive after all; on SQLite the next run ends it as it
starts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import select, update

from relay.clock import SystemClock
from relay.core.coordination import UNSENT_REASON
from relay.core.jobs import Attempt
from relay.core.submit import TAKEN_REASON
from relay.domain import FailureCode, JobState
from relay.errors import JobFailed
from relay.services import Relay
from relay.store import presence
from relay.store.db import Database
from relay.store.jobs import JobStore, NewJob, Sending
from relay.store.keys import KeyRecord, KeyStore
from relay.store.leases import Leases
from relay.store.slots import Slots
from relay.store.tables import jobs, processes
from tests.helpers import relay_config
from tests.unit.test_coordination_store import LEASE
from tests.unit.test_jobs import SwitchableUpstream, relays_on_one_database
from tests.unit.test_presence import connect, migrated
from tests.unit.test_store import NOW, job

pytestmark = pytest.mark.anyio
EITHER_STORE = pytest.mark.parametrize("postgres", [False, pytest.param(True, marks=pytest.mark.postgres)])


def kite(job_id: str, now: float) -> NewJob:
    """A job made `now` (on the relay's own clock, which the sweeps and deadlines read)."""
    return NewJob(job_id, "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "a kite", 2, now + 600)


@pytest.fixture
async def relay_on_postgres(tmp_path: Path) -> AsyncIterator[tuple[Relay, SwitchableUpstream, KeyRecord]]:
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 1) as ((relay,), key):
        yield relay, upstream, key


@pytest.mark.postgres
async def test_only_the_jobs_a_gone_process_never_sent_are_claimed_to_be_ended() -> None:
    """Not one it marked (it may run upstream), nor one whose task a hook noted, nor one of a live process, nor one
    of a process known only by its lease (a release before presence, which marks nothing), nor the claimer's own;
    and a job so claimed is not the gone process's to mark any more."""
    async with migrated() as (url, database):
        record, _ = await KeyStore(database.engine).create("k", 100, NOW)
        ids = [f"job_{i:08d}" for i in range(1, 8)]
        stores = {owner: JobStore(database.engine, owner=owner, lease_s=LEASE) for owner in ("a", "b", "old", "c")}
        for owner, mine in (("a", ids[:4]), ("b", ids[4:5]), ("old", ids[5:6]), ("c", ids[6:])):
            assert await stores[owner].open(record.id, [job(i) for i in mine], NOW)
        assert await stores["a"].mark_sending_many([Sending(ids[1], "up")], NOW) == [True]
        assert await stores["a"].note_task(ids[2], "up", "task-3", NOW)
        dying, alive = await connect(url), await connect(url)
        try:
            assert await presence.announce(dying, "a", presence.new_key(), NOW)
            assert await presence.announce(alive, "b", presence.new_key(), NOW)
            survivor = Leases(database.engine, "c", LEASE, presence=True)
            assert await survivor.claim_unsent(NOW + 1) == []  # every process alive
            await dying.close()
            rows = await survivor.claim_unsent(NOW + 1)
            assert sorted(row.id for row in rows) == [ids[0], ids[3]]
            assert all(row.owner == "c" and row.state is JobState.PENDING for row in rows)
            # Should "a" only have looked gone (its listening connection being made again), it sends neither now.
            again = [Sending(ids[0], "up"), Sending(ids[3], "up")]
            assert await stores["a"].mark_sending_many(again, NOW + 1) == [False] * 2
            assert not await Slots(database.engine, LEASE, "a").take(ids[0], "up", 5, NOW + 1)
            # One known only by its lease is left to the pending sweep, its lease run out or not; without presence
            # (SQLite) nothing is claimed so.
            assert await survivor.claim_unsent(NOW + LEASE + 100) == []
            assert await Leases(database.engine, "d", LEASE).claim_unsent(NOW + 1) == []
        finally:
            await alive.close()


@EITHER_STORE
async def test_a_job_is_marked_in_the_database_before_its_submit_leaves(
    relay_on_either: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    relay, upstream, key = relay_on_either
    seen: list[str] = []
    mark, send = relay.store.mark_sending_many, upstream.engine.submit

    async def marking(items: list[Sending]) -> list[bool]:
        marked = await mark(items, relay.clock.now())
        seen.extend(f"marked {item.provider}" for item, ok in zip(items, marked, strict=True) if ok)
        return marked

    def sending(*args: object, **kwargs: object) -> object:
        seen.append("sent")
        return send(*args, **kwargs)  # type: ignore[arg-type]

    relay.store.mark_sending_many = marking  # type: ignore[method-assign]
    relay.submitter._sending._flush = marking  # type: ignore[assignment]
    upstream.engine.submit = sending  # type: ignore[method-assign]
    generation = await relay.jobs.start(key, relay.jobs.plan(model="mj-fast", prompt="a kite", n=1))
    rows = await relay.jobs.wait(generation)
    generation.close()
    assert [row.state for row in rows] == [JobState.SUCCEEDED]
    assert seen == ["marked sim", "sent"]


@pytest.mark.postgres
async def test_a_job_another_process_took_for_never_sent_is_not_sent(
    relay_on_postgres: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """The process holding it looked gone while its submit waited for a connection: the job is another's, which
    ends it. It is not sent, and its client is told to retry (interrupted), nothing charged."""
    relay, upstream, key = relay_on_postgres
    upstream.gate.clear()
    started = asyncio.ensure_future(
        relay.jobs.start(key, relay.jobs.plan(model="mj-fast", prompt="a kite", n=1), Attempt("body", retry=False))
    )
    await upstream.waiting.wait()  # held, and on its way out: not yet marked
    async with relay.db.engine.begin() as conn:  # claimed by another process, as `Leases.claim_unsent` does
        await conn.execute(update(jobs).where(jobs.c.state == "PENDING").values(owner="another-process"))
    upstream.gate.set()
    with pytest.raises(JobFailed) as failed:
        await started
    assert failed.value.code is FailureCode.INTERRUPTED and failed.value.reason == TAKEN_REASON
    assert upstream.engine.submits == 0
    current = await relay.keys.get(key.id)
    assert current is not None and (current.balance, current.held) == (100, 0)


@pytest.mark.postgres
async def test_a_job_another_process_took_before_its_slot_was_reserved_is_not_sent(tmp_path: Path) -> None:
    """With `max_in_flight`, a job's slot reservation is its mark. One refused because another process took the job
    for never sent (the holder looked gone meanwhile) is not sent anywhere, and its client is told to retry at once
    (interrupted), not that every provider is full; nothing charged."""
    upstream = SwitchableUpstream()
    provider = {"name": "sim", "dialect": "simulator", "max_in_flight": 5, "simulator": {"fast_s": 0.3}}
    async with relays_on_one_database(tmp_path, upstream, 1, providers=[provider]) as ((relay,), key):
        slots = relay.submitter.slots
        assert slots is not None
        take = slots.take

        async def taken_first(job_id: str, provider: str, limit: int, now: float) -> bool | None:
            async with relay.db.engine.begin() as conn:  # claimed by another process, as `Leases.claim_unsent` does
                await conn.execute(update(jobs).where(jobs.c.id == job_id).values(owner="another-process"))
            return await take(job_id, provider, limit, now)

        slots.take = taken_first  # type: ignore[method-assign]
        with pytest.raises(JobFailed) as failed:
            await relay.jobs.start(key, relay.jobs.plan(model="mj-fast", prompt="a kite", n=1), Attempt("b", False))
        assert failed.value.code is FailureCode.INTERRUPTED and failed.value.reason == TAKEN_REASON
        assert upstream.engine.submits == 0
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (100, 0)


@pytest.mark.postgres
async def test_an_adoption_round_ends_the_jobs_a_gone_process_never_sent(
    relay_on_postgres: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    relay, upstream, key = relay_on_postgres
    dead = JobStore(relay.db.engine, owner="a-process-that-died", lease_s=600)
    now = time.time()
    made = [kite(i, now) for i in ("job_never_sent", "job_maybe_sent")]
    assert await dead.open(key.id, made, now)
    assert await dead.mark_sending_many([Sending("job_maybe_sent", "sim")], now) == [True]
    conn: asyncpg.Connection = await connect(relay.config.database_url())
    assert await presence.announce(conn, dead.owner, presence.new_key(), now)
    await relay.coordinator.adopt()
    assert (await relay.store.get("job_never_sent")).state is JobState.PENDING  # type: ignore[union-attr]
    await conn.close()  # it dies
    await relay.coordinator.adopt()
    never, maybe = await relay.store.get("job_never_sent"), await relay.store.get("job_maybe_sent")
    assert never is not None and maybe is not None
    assert (never.state, never.error_code, never.fail_reason) == (JobState.FAILED, "interrupted", UNSENT_REASON)
    assert maybe.state is JobState.PENDING  # it may run upstream: left to its hook, its lookup, or the pending sweep
    current = await relay.keys.get(key.id)
    assert current is not None and (current.balance, current.held) == (100, 2)  # the one still PENDING holds its price
    assert upstream.engine.submits == 0


async def test_a_restart_on_sqlite_ends_the_jobs_its_earlier_run_never_sent(tmp_path: Path) -> None:
    """A relay alone on SQLite was killed in its submit window and is started again: the jobs that run held and never
    sent are ended as it starts (their holds released), not ten minutes on. One it marked as sent is left (its hook
    adopts it, its provider's task list tells, or the pending sweep ends it), and so are those of a run that wrote no
    row (a release before marks, which may have sent them)."""
    config = relay_config(tmp_path)
    database = Database(config.database_url())
    now = time.time()
    await database.migrate()
    key, _ = await KeyStore(database.engine).create("k", 100, now)

    earlier = JobStore(database.engine, owner="the-run-killed", lease_s=30)
    await presence.register(database.engine, earlier.owner, now)
    assert await earlier.open(key.id, [kite("job_never_sent", now), kite("job_maybe_sent", now)], now)
    assert await earlier.mark_sending_many([Sending("job_maybe_sent", "sim")], now) == [True]
    older = JobStore(database.engine, owner="a-run-of-an-older-release", lease_s=30)
    assert await older.open(key.id, [kite("job_of_an_older_run", now)], now)
    await presence.register(database.engine, "a-run-with-nothing-left", now - 60)
    await database.dispose()
    upstream = SwitchableUpstream()
    relay = Relay(config, SystemClock(), {"sim": upstream})
    await relay.open()
    try:
        never = await relay.store.get("job_never_sent")
        assert never is not None and (never.state, never.error_code) == (JobState.FAILED, "interrupted")
        for left in ("job_maybe_sent", "job_of_an_older_run"):
            row = await relay.store.get(left)
            assert row is not None and row.state is JobState.PENDING
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (100, 4)
        async with relay.db.engine.connect() as conn:
            kept = sorted(row[0] for row in await conn.execute(select(processes.c.owner)))
        assert kept == sorted([relay.process_id, "the-run-killed"])  # the one holding a job still, and this one
        assert upstream.engine.submits == 0
    finally:
        await relay.close()
