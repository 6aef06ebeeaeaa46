"""Keys, jobs and the quota held for them, on a real SQLite file."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.store import jobs as jobs_module
from relay.store.db import Database, transaction
from relay.store.jobs import Admission, Ending, JobState, JobStore, NewJob, ProgressChange
from relay.store.keys import KeyStore, hash_key
from tests.helpers import pg_database

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0


def job(job_id: str, price: int = 2) -> NewJob:
    return NewJob(job_id, "req", "mj-fast", "fast", "MID_JOURNEY", "imagine", "p --fast", price, NOW + 600)


async def test_keys_are_stored_hashed_and_shown_once(db: Database) -> None:
    keys = KeyStore(db.engine)
    record, secret = await keys.create("team", 50, NOW)
    assert secret.startswith("sk-mjr-") and len(secret) > 40
    assert record.prefix == secret[:11] and record.available == 50
    assert (await keys.by_secret(secret)) == record
    assert await keys.by_secret(secret + "x") is None
    async with db.engine.connect() as conn:
        stored = (await conn.execute(text("SELECT key_hash FROM keys"))).scalar_one()
    assert stored == hash_key(secret) and secret not in stored
    assert [k.id for k in await keys.list()] == [record.id]
    assert await keys.revoke("team", NOW) == 1 and await keys.revoke(record.id, NOW) == 0
    revoked = await keys.get(record.id)
    assert revoked is not None and revoked.revoked


async def test_concurrent_holds_never_overdraw(db: Database) -> None:
    record, _ = await KeyStore(db.engine).create("k", 10, NOW)
    store = JobStore(db.engine)
    results = await asyncio.gather(*(store.open(record.id, [job(f"job_{i:08d}")], NOW) for i in range(20)))
    assert results.count(True) == 5
    key = await KeyStore(db.engine).get(record.id)
    assert key is not None and (key.balance, key.held) == (10, 10)
    assert not await store.open(record.id, [job("job_extra000")], NOW)


async def test_a_request_holds_all_its_jobs_or_none(db: Database) -> None:
    record, _ = await KeyStore(db.engine).create("k", 5, NOW)
    store = JobStore(db.engine)
    assert not await store.open(record.id, [job("job_a0000000"), job("job_b0000000"), job("job_c0000000")], NOW)
    assert await store.active() == []
    assert await store.open(record.id, [job("job_a0000000"), job("job_b0000000")], NOW)
    assert len(await store.by_request("req")) == 2


async def test_a_revoked_key_holds_nothing(db: Database) -> None:
    keys = KeyStore(db.engine)
    record, _ = await keys.create("k", 100, NOW)
    await keys.revoke(record.id, NOW)
    assert not await JobStore(db.engine).open(record.id, [job("job_a0000000")], NOW)


async def test_each_job_settles_exactly_once(db: Database) -> None:
    keys = KeyStore(db.engine)
    record, _ = await keys.create("k", 10, NOW)
    store = JobStore(db.engine)
    await store.open(record.id, [job("job_ok000000"), job("job_bad00000", price=3)], NOW)
    await store.mark_submitted("job_ok000000", "sim", "u1", NOW)
    await store.mark_submitted("job_ok000000", "sim", "u2", NOW)  # no longer PENDING: left alone

    done = await asyncio.gather(*(store.finish("job_ok000000", succeeded=True, now=NOW) for _ in range(5)))
    assert sum(row is not None for row in done) == 1
    failed = await store.finish("job_bad00000", succeeded=False, now=NOW, error_code="failed", fail_reason="x")
    assert failed is not None and failed.hold_state == "released" and failed.state is JobState.FAILED
    assert await store.finish("job_bad00000", succeeded=True, now=NOW) is None

    key = await keys.get(record.id)
    assert key is not None and (key.balance, key.held) == (8, 0)
    ok = await store.get("job_ok000000")
    assert ok is not None and (ok.state, ok.hold_state, ok.upstream_id) == (JobState.SUCCEEDED, "captured", "u1")


async def test_a_modal_view_written_after_the_confirmation_does_not_park_the_job_again(db: Database) -> None:
    """A follower saw the job waiting in MODAL with new progress; before that write lands, a confirmation is
    written (by this process or another). The late write leaves the job confirmed, so a second submit/modal is
    refused; a first parking, and progress once confirmed, are written as before."""
    record, _ = await KeyStore(db.engine).create("k", 10, NOW)
    store = JobStore(db.engine)
    await store.open(record.id, [job("job_mod00000"), job("job_new00000")], NOW)
    await store.park_modal("job_mod00000", "sim", "u1", NOW + 900, NOW)
    await store.mark_submitted("job_new00000", "sim", "u2", NOW)
    confirmed = await JobStore(db.engine, owner="confirmer").confirm_modal("job_mod00000", "u1", NOW + 600, NOW)
    assert confirmed is not None and confirmed.state is JobState.SUBMITTED
    assert (confirmed.owner, confirmed.deadline_at) == ("confirmer", NOW + 600)  # it follows the job from now on
    late = ProgressChange("job_mod00000", JobState.MODAL, 10, JobState.MODAL)
    parks = ProgressChange("job_new00000", JobState.MODAL, 0, JobState.SUBMITTED)
    await store.record_progress([late, parks], NOW)
    kept, parked = await store.get("job_mod00000"), await store.get("job_new00000")
    assert kept is not None and (kept.state, kept.progress) == (JobState.SUBMITTED, 0)
    assert parked is not None and parked.state is JobState.MODAL
    await store.record_progress([ProgressChange("job_mod00000", JobState.IN_PROGRESS, 20, JobState.MODAL)], NOW)
    running = await store.get("job_mod00000")
    assert running is not None and (running.state, running.progress) == (JobState.IN_PROGRESS, 20)
    # a process that no longer holds a job parks it nowhere, even from the state it saw
    await store.record_progress([ProgressChange("job_new00000", JobState.SUBMITTED, 0, JobState.MODAL)], NOW)
    await JobStore(db.engine, owner="stalled").record_progress(
        [ProgressChange("job_new00000", JobState.MODAL, 5, JobState.SUBMITTED)], NOW
    )
    still = await store.get("job_new00000")
    assert still is not None and (still.state, still.progress) == (JobState.SUBMITTED, 0)


async def test_a_timeout_is_written_only_once_the_stored_deadline_has_passed(db: Database) -> None:
    """A confirmation under way moves a waiting job's deadline on (`extend_modal`, while the window is open) and
    says it is under way: another one is refused until it is answered or its time is up, and a timeout decided by
    the old deadline is not written. A refused confirmation puts the old deadline back (unless another moved it
    since), and the timeout holds again."""
    record, _ = await KeyStore(db.engine).create("k", 10, NOW)
    store = JobStore(db.engine)
    await store.open(record.id, [job("job_mod00000")], NOW)
    await store.park_modal("job_mod00000", "sim", "u1", NOW + 900, NOW)
    assert not await store.extend_modal("job_mod00000", NOW + 2000, NOW + 900, NOW + 940)  # its window closed
    assert await store.extend_modal("job_mod00000", NOW + 1500, NOW + 899, NOW + 939)
    assert not await store.extend_modal("job_mod00000", NOW + 1600, NOW + 920, NOW + 960)  # one is under way
    overdue = Ending("job_mod00000", succeeded=False, error_code="timeout", fail_reason="nobody confirmed it")
    assert await store.finish_many([overdue], NOW + 901) == [None]
    await store.restore_modal("job_mod00000", NOW + 1600, NOW + 900)  # not the one written: nothing
    assert await store.finish_many([overdue], NOW + 901) == [None]
    # the first one's process died with it under way: once its time is up, another may start
    assert await store.extend_modal("job_mod00000", NOW + 1600, NOW + 940, NOW + 980)
    await store.restore_modal("job_mod00000", NOW + 1600, NOW + 900)
    ended = (await store.finish_many([overdue], NOW + 901))[0]
    assert ended is not None and (ended.state, ended.error_code) == (JobState.FAILED, "timeout")
    assert not await store.extend_modal("job_mod00000", NOW + 1500, NOW, NOW + 40)  # no longer waiting


async def test_progress_never_touches_ended_jobs(db: Database) -> None:
    record, _ = await KeyStore(db.engine).create("k", 10, NOW)
    store = JobStore(db.engine)
    await store.open(record.id, [job("job_run00000"), job("job_end00000")], NOW)
    for job_id in ("job_run00000", "job_end00000"):
        await store.mark_submitted(job_id, "sim", job_id, NOW)
    await store.finish("job_end00000", succeeded=False, now=NOW, error_code="failed")
    await store.record_progress(
        [ProgressChange(j, JobState.IN_PROGRESS, 46, JobState.SUBMITTED) for j in ("job_run00000", "job_end00000")], NOW
    )
    await store.record_progress([], NOW)
    # two views written out of order: the older one does not take the job back
    await store.record_progress([ProgressChange("job_run00000", JobState.IN_PROGRESS, 31, JobState.SUBMITTED)], NOW)
    running, ended = await store.get("job_run00000"), await store.get("job_end00000")
    assert running is not None and (running.state, running.progress) == (JobState.IN_PROGRESS, 46)
    assert ended is not None and (ended.state, ended.progress) == (JobState.FAILED, 0)
    assert [row.id for row in await store.active()] == ["job_run00000"]
    done = Ending("job_run00000", succeeded=True, image_url="http://up/1.png", buttons='[{"customId": "x"}]')
    row = await store.finish_many([done], NOW)
    assert row[0] is not None and row[0].upstream_image_url == "http://up/1.png" and row[0].buttons
    late = Ending("job_run00000", succeeded=True, image_url="http://up/2.png")
    assert await store.finish_many([late], NOW) == [None]  # an ended job keeps what it ended with
    kept = await store.get("job_run00000")
    assert kept is not None and kept.upstream_image_url == "http://up/1.png"
    assert await db.ping()


async def test_many_endings_settle_in_one_transaction_each_once(db: Database) -> None:
    keys = KeyStore(db.engine)
    first, _ = await keys.create("a", 1000, NOW)
    second, _ = await keys.create("b", 100, NOW)
    store = JobStore(db.engine)
    ids = [f"job_{i:08d}" for i in range(650)]
    assert await store.open(first.id, [job(i, price=1) for i in ids[:600]], NOW)
    assert await store.open(second.id, [job(i, price=1) for i in ids[600:]], NOW)
    endings = [Ending(i, succeeded=n % 3 != 0, error_code=None if n % 3 else "failed") for n, i in enumerate(ids)]
    endings.append(Ending(ids[1], succeeded=False, error_code="lost"))  # a second ending of one job in the batch
    endings.append(Ending("job_unknown0", succeeded=True))
    rows = await store.finish_many(endings, NOW)
    assert sum(row is not None for row in rows) == 650
    assert rows[-2] is None and rows[-1] is None
    assert rows[1] is not None and rows[1].hold_state == "captured"
    assert await store.finish_many(endings[:10], NOW) == [None] * 10
    a, b = await keys.get(first.id), await keys.get(second.id)
    assert a is not None and (a.balance, a.held) == (1000 - sum(1 for n in range(600) if n % 3), 0)
    assert b is not None and (b.balance, b.held) == (100 - sum(1 for n in range(600, 650) if n % 3), 0)


async def test_an_ending_keeps_the_jobs_holder_and_the_pending_sweeps_makes_the_sweeper_it(db: Database) -> None:
    """The job's `owner` says which process sends its client hook. An ending written by a process that stalled
    past its lease leaves the owner that took the job over meanwhile; a job the pending sweep ends, left PENDING by
    a process gone in its submit window, has the sweeping process as its owner from then on."""
    record, _ = await KeyStore(db.engine).create("k", 10, NOW)
    holder = JobStore(db.engine, owner="holder")
    await holder.open(record.id, [job("job_run00000"), job("job_pen00000")], NOW)
    await holder.mark_submitted("job_run00000", "sim", "u1", NOW)
    stalled = await JobStore(db.engine, owner="stalled").finish("job_run00000", succeeded=True, now=NOW)
    assert stalled is not None and stalled.owner == "holder"
    swept = await JobStore(db.engine, owner="sweeper").finish(
        "job_pen00000", succeeded=False, now=NOW, error_code="interrupted", fail_reason="never confirmed upstream"
    )
    assert swept is not None and swept.owner == "sweeper"
    rows = {row.id: row.owner for row in await holder.by_request("req")}
    assert rows == {"job_run00000": "holder", "job_pen00000": "sweeper"}


async def test_a_hand_over_that_fails_after_a_write_leaves_the_write_made_and_its_caller_told_so(
    db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A submit answered while the process stops is handed over as it is written down; when that hand-over fails
    (the database went away as the process stops), the write was made all the same: its caller must not take it
    for failed. The lease runs out as a stopped process's does."""
    record, _ = await KeyStore(db.engine).create("k", 10, NOW)
    store = JobStore(db.engine, owner="stopping")
    await store.open(record.id, [job("job_run00000")], NOW)
    store.handing_over = True

    def unreachable(owner: str, job_ids: object = None) -> object:
        raise OperationalError("UPDATE jobs ...", None, Exception("connection refused"))

    monkeypatch.setattr(jobs_module, "handed_over", unreachable)
    await store.mark_submitted("job_run00000", "sim", "u1", NOW)
    (row,) = await store.get_many(["job_run00000"])
    assert (row.state, row.upstream_id, row.owner) == (JobState.SUBMITTED, "u1", "stopping")
    assert "handing over jobs written while stopping failed" in caplog.text


async def test_a_transient_failure_is_run_again_and_others_are_not(db: Database) -> None:
    calls = []

    async def flaky(conn: AsyncConnection) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE keys ...", None, Exception("database is locked"))
        return "done"

    assert await transaction(db.engine, flaky) == "done" and len(calls) == 2

    async def broken(conn: AsyncConnection) -> None:
        raise IntegrityError("INSERT ...", None, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        await transaction(db.engine, broken)


async def test_concurrent_holds_and_settlements_over_many_keys_never_deadlock(db: Database) -> None:
    store, keys = JobStore(db.engine), KeyStore(db.engine)
    key_ids = [(await keys.create(f"k{i}", 10_000, NOW))[0].id for i in range(8)]
    rng = random.Random(5)
    for round_ in range(30):
        previous = [Admission(k, (job(f"job_p{round_:03d}{n:05d}", price=1),)) for n, k in enumerate(key_ids)]
        assert all(await store.open_many(previous, NOW))
        fresh = [Admission(k, (job(f"job_f{round_:03d}{n:05d}", price=1),)) for n, k in enumerate(key_ids)]
        rng.shuffle(fresh)
        endings = [Ending(a.jobs[0].id, succeeded=True) for a in previous]
        rng.shuffle(endings)
        admitted, ended = await asyncio.gather(store.open_many(fresh, NOW), store.finish_many(endings, NOW))
        assert all(admitted) and all(row is not None for row in ended)
    for key_id in key_ids:
        key = await keys.get(key_id)
        assert key is not None and (key.balance, key.held) == (10_000 - 30, 30)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_keys_made_before_hook_secrets_get_one_each_when_migrated(store: str, tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy.engine import Connection

    from relay.store.db import MIGRATIONS

    def upgrade_to(revision: str) -> Callable[[Connection], None]:
        def run(connection: Connection) -> None:
            config = AlembicConfig()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        return run

    async with AsyncExitStack() as stack:
        url = (
            await stack.enter_async_context(pg_database())
            if store == "postgres"
            else f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        )
        database = Database(url, pool_size=2)
        stack.push_async_callback(database.dispose)
        async with database.engine.begin() as conn:
            await conn.run_sync(upgrade_to("0001"))
            for key_id in ("key_a", "key_b"):
                await conn.execute(
                    text(
                        "INSERT INTO keys (id, name, key_hash, prefix, balance, held, created_at) "
                        "VALUES (:id, 'old', :hash, 'sk-mjr-x', 10, 0, 0)"
                    ),
                    {"id": key_id, "hash": hash_key(key_id)},
                )
        await database.migrate()
        keys = KeyStore(database.engine)
        secrets = [(await keys.get(key_id)).hook_secret for key_id in ("key_a", "key_b")]  # type: ignore[union-attr]
        assert all(secret.startswith("whsec_") and len(secret) > 40 for secret in secrets)
        assert secrets[0] != secrets[1]


async def test_a_job_never_seen_running_has_a_start_time_once_it_succeeded(db: Database) -> None:
    """Its running state was not read between its start and its end, or its progress write came after its end."""
    record, _ = await KeyStore(db.engine).create("k", 10, NOW)
    store = JobStore(db.engine)
    await store.open(record.id, [job("job_fast0000"), job("job_seen0000")], NOW)
    for job_id in ("job_fast0000", "job_seen0000"):
        await store.mark_submitted(job_id, "sim", job_id, NOW)
    await store.record_progress([ProgressChange("job_seen0000", JobState.IN_PROGRESS, 15, JobState.SUBMITTED)], NOW + 1)
    fast, seen = await store.finish_many([Ending("job_fast0000", True), Ending("job_seen0000", True)], NOW + 5)
    assert fast is not None and (fast.started_at, fast.finished_at) == (NOW + 5, NOW + 5)
    assert seen is not None and (seen.started_at, seen.finished_at) == (NOW + 1, NOW + 5)
