"""Leases and attempts on both stores: which process follows a job, and how a retry finds its first attempt."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from relay.services import Relay
from relay.store.attempts import AttemptStore, Made
from relay.store.db import Database
from relay.store.jobs import JobState, JobStore, Submitted
from relay.store.keys import KeyStore
from relay.store.leases import CLAIM_BATCH, Leases
from relay.store.slots import Slots
from relay.store.tables import attempts as attempts_table
from tests.helpers import FakeClock, pg_database, relay_config
from tests.unit.test_store import NOW, job

pytestmark = pytest.mark.anyio
LEASE = 30.0


async def running_job(database: Database, owner: str, job_id: str = "job_00000001") -> JobStore:
    record, _ = await KeyStore(database.engine).create("k", 100, NOW)
    store = JobStore(database.engine, owner=owner, lease_s=LEASE)
    assert await store.open(record.id, [job(job_id)], NOW)
    await store.mark_submitted(job_id, "up", "task-1", NOW)
    return store


async def test_a_live_lease_is_not_claimed_and_a_lapsed_one_is_claimed_once(db: Database) -> None:
    await running_job(db, "a")
    a, b, c = (Leases(db.engine, name, LEASE) for name in "abc")
    assert await b.claim_expired(NOW + 1, ["up"]) == []
    assert await a.renew(NOW + 20) == {"job_00000001"}  # held until NOW + 50
    assert await b.claim_expired(NOW + 40, ["up"]) == []
    assert await b.claim_expired(NOW + 60, ["other"]) == []  # a provider it does not have
    # a dies: two others race for its job, one wins
    claimed = await asyncio.gather(b.claim_expired(NOW + 60, ["up"]), c.claim(["job_00000001"], NOW + 60))
    assert sorted(len(rows) for rows in claimed) == [0, 1]
    winner = b if claimed[0] else c
    (row,) = claimed[0] or claimed[1]
    assert row.owner == winner.owner and row.lease_until == NOW + 60 + LEASE
    # a comes back from a stall: it holds nothing any more, and delivers nothing
    assert await a.renew(NOW + 61) == set()
    assert await a.hold(["job_00000001"], NOW + 61) == set()
    assert await winner.hold(["job_00000001"], NOW + 61) == {"job_00000001"}


async def test_a_handed_over_lease_is_claimed_at_once(db: Database) -> None:
    await running_job(db, "a")
    a, b = Leases(db.engine, "a", LEASE), Leases(db.engine, "b", LEASE)
    assert await a.release() == 1
    (row,) = await b.claim_expired(NOW + 1, ["up"])
    assert row.owner == "b"


async def test_a_process_alone_claims_every_running_job_at_start(db: Database) -> None:
    await running_job(db, "before-the-restart")
    restarted = Leases(db.engine, "after", LEASE)
    assert await restarted.claim_expired(NOW + 1, ["up"]) == []  # the lease has not run out
    (row,) = await restarted.claim_expired(NOW + 1, ["up"], any_lease=True)
    assert row.owner == "after"
    assert await restarted.claim_expired(NOW + 1, ["up"], any_lease=True) == []  # its own already


async def test_a_pending_job_whose_task_a_hook_named_is_claimed_as_running_once_its_process_is_gone(
    db: Database,
) -> None:
    """A hook named the task of a job whose submit was still waiting for its answer; the process died before the
    answer: the job is claimed as a running job (SUBMITTED, that task), not left PENDING. One whose task no hook
    named is not: nothing says it ever reached an upstream."""
    record, _ = await KeyStore(db.engine).create("k", 100, NOW)
    store = JobStore(db.engine, owner="a", lease_s=LEASE)
    assert await store.open(record.id, [job("job_00000001"), job("job_00000002")], NOW)
    assert await store.note_task("job_00000001", "up", "task-1", NOW)
    assert not await store.note_task("job_00000001", "up", "task-2", NOW)  # the first task named stays
    b = Leases(db.engine, "b", LEASE)
    assert await b.claim_expired(NOW + 1, ["up"]) == []  # its process lives: its submit writes it down
    (row,) = await b.claim_expired(NOW + LEASE + 1, ["up"])
    assert (row.id, row.state, row.provider, row.upstream_id, row.owner) == (
        "job_00000001",
        JobState.SUBMITTED,
        "up",
        "task-1",
        "b",
    )
    assert row.submitted_at == NOW + LEASE + 1
    assert (await store.get("job_00000002")).state is JobState.PENDING  # type: ignore[union-attr]


async def test_ended_jobs_hold_no_lease(db: Database) -> None:
    store = await running_job(db, "a")
    await store.finish("job_00000001", succeeded=False, now=NOW + 1, error_code="failed")
    b = Leases(db.engine, "b", LEASE)
    assert await b.claim_expired(NOW + 999, ["up"]) == []
    assert await b.claim(["job_00000001"], NOW + 999) == []
    assert await Leases(db.engine, "a", LEASE).renew(NOW + 2) == set()


async def test_the_pending_sweep_takes_a_process_s_own_jobs_and_dead_processes_jobs(db: Database) -> None:
    record, _ = await KeyStore(db.engine).create("k", 100, NOW)
    mine = JobStore(db.engine, owner="me", lease_s=LEASE)
    other = JobStore(db.engine, owner="other", lease_s=LEASE)
    assert await mine.open(record.id, [job("job_mine0001")], NOW)
    assert await other.open(record.id, [job("job_other001")], NOW)
    stale = await mine.stale_pending(NOW + 10, NOW + 10)
    assert [row.id for row in stale] == ["job_mine0001"]  # the other process is alive: its submit may be under way
    stale = await mine.stale_pending(NOW + 40, NOW + 40)
    assert sorted(row.id for row in stale) == ["job_mine0001", "job_other001"]
    assert all(row.state is JobState.PENDING for row in stale)


async def test_attempts_are_found_by_fingerprint_until_forgotten(db: Database) -> None:
    attempts = AttemptStore(db.engine)
    spec = {"model": "mj-fast", "prompt": "a lighthouse"}
    await attempts.begin_many([("fp", "req-1", ("job_1",), spec, None, NOW + 600, NOW)])
    row = await attempts.get("fp", NOW - 1)
    assert row is not None and (row.state, row.request_id, row.job_ids, row.spec) == (
        "starting",
        "req-1",
        ("job_1",),
        spec,
    )
    await attempts.settle_many([("fp", "req-1", True)], NOW + 1)
    row = await attempts.get("fp", NOW - 1)
    assert row is not None and row.state == "started"
    # a later first attempt of the same body owns the fingerprint: the earlier one's settling changes nothing
    await attempts.begin_many([("fp", "req-2", ("job_2",), spec, None, NOW + 700, NOW + 2)])
    await attempts.settle_many([("fp", "req-1", False)], NOW + 3)
    row = await attempts.get("fp", NOW - 1)
    assert row is not None and (row.request_id, row.state) == ("req-2", "starting")
    await attempts.settle_many([("fp", "req-2", False)], NOW + 3)
    row = await attempts.get("fp", NOW - 1)
    assert row is not None and row.state == "nothing"
    assert await attempts.get("fp", NOW + 5) is None  # older than the window asked for
    assert await attempts.forget_before(NOW + 5) == 1
    assert await attempts.get("fp", NOW - 1) is None


async def claim(attempts: AttemptStore, attempt: Made, *, replacing: str | None, since: float) -> bool:
    """One retry's claim, as a batch of one."""
    return (await attempts.claim_many([(attempt, replacing, since)]))[0]


async def test_a_retry_takes_a_fingerprint_over_only_from_the_attempt_it_found(db: Database) -> None:
    attempts = AttemptStore(db.engine)
    spec = {"model": "mj-fast", "prompt": "a lighthouse"}
    assert await claim(
        attempts, ("fp", "req-1", ("job_1",), spec, None, NOW + 600, NOW), replacing=None, since=NOW - 60
    )
    # another retry that found nothing a moment ago: the fingerprint is taken by now
    assert not await claim(
        attempts, ("fp", "req-2", ("job_2",), spec, None, NOW + 600, NOW), replacing=None, since=NOW - 60
    )
    assert not await claim(
        attempts, ("fp", "req-2", ("job_2",), spec, None, NOW + 600, NOW), replacing="req-0", since=0
    )
    row = await attempts.get("fp", NOW - 60)
    assert row is not None and (row.request_id, row.state, row.job_ids) == ("req-1", "starting", ("job_1",))
    await attempts.settle_many([("fp", "req-1", False)], NOW + 1)  # it started nothing: the next retry starts afresh
    assert await claim(
        attempts, ("fp", "req-3", ("job_3",), spec, None, NOW + 700, NOW + 2), replacing="req-1", since=0
    )
    row = await attempts.get("fp", NOW - 60)
    assert row is not None and (row.request_id, row.state, row.created_at) == ("req-3", "starting", NOW + 2)
    # once older than the window, an attempt is taken over as if it were not there
    assert await claim(
        attempts, ("fp", "req-4", ("job_4",), spec, None, NOW + 9000, NOW + 5000), replacing=None, since=NOW + 3
    )
    row = await attempts.get("fp", NOW + 3)
    assert row is not None and row.request_id == "req-4"


async def test_a_retry_takes_over_no_attempt_whose_jobs_are_held(db: Database) -> None:
    """A retry that gave up waiting for an attempt's jobs does not take its body over once they are held (they are
    to be followed), until they ended; the attempt learns whether it still owns its body, and whether a retry took
    it over (a newer request of the same body, not a retry, takes it over from nobody). Take-overs are forgotten
    with the attempts."""
    attempts = AttemptStore(db.engine)
    spec = {"model": "mj-fast", "prompt": "a lighthouse"}
    await attempts.begin_many([("fp", "req", ("job_00000001",), spec, None, NOW + 600, NOW)])
    store = await running_job(db, "a")  # `req`'s job, held and running
    taking_over = ("fp", "req-2", ("job_2",), spec, None, NOW + 600, NOW + 11)
    assert not await claim(attempts, taking_over, replacing="req", since=NOW - 60)
    assert await attempts.standing("fp", "req") == (True, False)
    await store.finish("job_00000001", succeeded=False, now=NOW + 13, error_code="failed", fail_reason="it failed")
    assert await claim(attempts, taking_over, replacing="req", since=NOW - 60)
    assert await attempts.standing("fp", "req") == (False, True)
    assert await attempts.standing("fp", "req-2") == (True, False)
    await attempts.begin_many([("fp", "req-3", ("job_3",), spec, None, NOW + 700, NOW + 15)])
    assert await attempts.standing("fp", "req-2") == (False, False)
    assert await attempts.standing("fp", "req") == (False, True)
    await attempts.forget_before(NOW + 12)
    assert await attempts.standing("fp", "req") == (False, False)


async def test_a_claim_written_again_is_still_won(db: Database) -> None:
    """A batch whose commit landed but was reported failed is written again, one claim at a time: each finds its own
    row, and is told it owns the body (not that another attempt took it, which would send it waiting for itself)."""
    attempts = AttemptStore(db.engine)
    spec = {"model": "mj-fast", "prompt": "a lighthouse"}
    fresh = ("fp", "req-1", ("job_1",), spec, None, NOW + 600, NOW)
    assert await attempts.claim_many([(fresh, None, NOW - 60)]) == [True]
    assert await attempts.claim_many([(fresh, None, NOW - 60)]) == [True]
    taking_over = ("fp", "req-2", ("job_2",), spec, None, NOW + 600, NOW + 1)
    assert await attempts.claim_many([(taking_over, "req-1", NOW - 60)]) == [True]
    assert await attempts.claim_many([(taking_over, "req-1", NOW - 60)]) == [True]
    assert await attempts.claim_many([(fresh, None, NOW - 60)]) == [False]  # req-1 lost the body to req-2
    row = await attempts.get("fp", NOW - 60)
    assert row is not None and row.request_id == "req-2"


async def test_an_attempt_s_row_written_late_leaves_its_body_to_a_retry_that_started_afresh_after_it_began(
    db: Database,
) -> None:
    """A row written after a retry that found none claimed the body: the attempt owns it unless that retry claimed it
    after the attempt began (the retry may be its own), even once a newer attempt's row took the body from that
    retry. A newer attempt that was not a retry, or a claim older than the attempt, is taken over as before."""
    attempts = AttemptStore(db.engine)
    spec = {"model": "mj-fast", "prompt": "a lighthouse"}
    assert await claim(attempts, ("fp", "retry", ("job_r",), spec, None, NOW + 600, NOW + 1), replacing=None, since=0)
    late = ("fp", "req-1", ("job_1",), spec, None, NOW + 600, NOW)
    assert await attempts.begin_many([late]) == [False]
    assert await attempts.begin_many([(*late[:6], NOW + 0.9)]) == [False]
    row = await attempts.get("fp", 0)
    assert row is not None and (row.request_id, row.job_ids) == ("retry", ("job_r",))
    newer = ("fp", "req-2", ("job_2",), spec, None, NOW + 600, NOW + 1.1)
    assert await attempts.begin_many([newer]) == [True]  # began after the retry: the newest request owns the body
    assert await attempts.begin_many([newer]) == [True]  # written again (its commit reported failed)
    # The retry's claim outlives its row: the first attempt, landing after both, still leaves the body alone.
    assert await attempts.begin_many([late]) == [False]
    row = await attempts.get("fp", 0)
    assert row is not None and row.request_id == "req-2"
    between = ("fp", "req-1", ("job_1",), spec, None, NOW + 600, NOW + 1.05)
    assert await attempts.begin_many([between]) == [True]  # began after the retry, before req-2: both run
    row = await attempts.get("fp", 0)
    assert row is not None and row.request_id == "req-1"
    assert await claim(
        attempts, ("fp", "retry-2", ("job_s",), spec, None, NOW + 600, NOW + 5), replacing="req-1", since=0
    )
    twice = [
        ("fp", "req-3", ("job_3",), spec, None, NOW + 600, NOW + 4),
        ("fp", "req-4", ("job_4",), spec, None, NOW + 600, NOW + 9),
    ]
    assert await attempts.begin_many(twice) == [False, True]  # in turn: the earlier is the retry's, the later not
    row = await attempts.get("fp", 0)
    assert row is not None and row.request_id == "req-4"


async def test_claims_written_together_decide_as_one_by_one_in_one_lock_order(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of claims: two of one body decide as if made one after the other (the first takes it), and the rows
    are written in fingerprint order, as every write of attempts is, so two processes' batches never deadlock."""
    attempts = AttemptStore(db.engine)
    spec = {"model": "mj-fast", "prompt": "a lighthouse"}
    written: list[str] = []
    claim = attempts._claim

    def noted(attempt: Any, replacing: str | None, since: float) -> Any:
        written.append(attempt[0])
        return claim(attempt, replacing, since)

    monkeypatch.setattr(attempts, "_claim", noted)
    batch = [
        (("fp-b", "req-1", ("job_1",), spec, None, NOW + 600, NOW), None, NOW - 60),
        (("fp-a", "req-2", ("job_2",), spec, None, NOW + 600, NOW), None, NOW - 60),
        (("fp-b", "req-3", ("job_3",), spec, None, NOW + 600, NOW), None, NOW - 60),
    ]
    assert await attempts.claim_many(batch) == [True, True, False]
    assert written == ["fp-a", "fp-b", "fp-b"]
    row = await attempts.get("fp-b", NOW - 60)
    assert row is not None and row.request_id == "req-1"


@pytest.mark.postgres
async def test_a_claim_that_waited_for_an_attempt_s_check_sees_the_jobs_held_before_it() -> None:
    """An attempt's jobs are held, then it checks that no retry took its body over, while a retry's claim of that body
    waits for the row: once the check commits, the claim sees the jobs (and fails), though they were held after it
    began; were it one statement, its wait would read the row again but not the jobs, and both would run."""
    async with pg_database() as url:
        database = Database(url, pool_size=4)
        try:
            await database.migrate()
            attempts = AttemptStore(database.engine)
            spec = {"model": "mj-fast", "prompt": "a lighthouse"}
            await attempts.begin_many([("fp", "req", ("job_00000001",), spec, None, NOW + 600, NOW)])
            async with database.engine.connect() as checking:
                await checking.begin()
                # The check (`standing`: it locks the row) under way, its transaction not yet committed.
                await checking.execute(
                    update(attempts_table).where(attempts_table.c.fingerprint == "fp").values(updated_at=NOW + 11)
                )
                taking_over = ("fp", "req-2", ("job_2",), spec, None, NOW + 600, NOW + 11)
                claiming = asyncio.ensure_future(attempts.claim_many([(taking_over, "req", NOW - 60)]))
                for _ in range(500):  # the claim begins, and waits for the row
                    async with database.engine.connect() as conn:
                        waiting = await conn.scalar(
                            text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                        )
                    if waiting:
                        break
                    await asyncio.sleep(0.01)
                assert waiting and not claiming.done()
                await running_job(database, "a")  # `req`'s job: held before the check, as an attempt's are
                await checking.commit()
            assert await claiming == [False]
            row = await attempts.get("fp", NOW - 60)
            assert row is not None and row.request_id == "req"
        finally:
            await database.dispose()


@pytest.mark.postgres
async def test_provider_slots_are_exact_across_processes() -> None:
    """Ten processes race for a provider's 3 slots: 3 win. A dead process's reservation lapses with its lease, a
    reservation given back frees its slot, and a running job holds one whoever follows it."""
    async with pg_database() as url:
        database = Database(url, pool_size=12)
        try:
            await database.migrate()
            record, _ = await KeyStore(database.engine).create("k", 1000, NOW)
            stores = [JobStore(database.engine, owner=f"process-{i}", lease_s=LEASE) for i in range(10)]
            for i, store in enumerate(stores):
                assert await store.open(record.id, [job(f"job_{i:08d}")], NOW)

            def slots(job_id: str) -> Slots:  # each job's own process reserves for it
                return Slots(database.engine, LEASE, f"process-{int(job_id[4:])}")

            won = await asyncio.gather(
                *(slots(f"job_{i:08d}").take(f"job_{i:08d}", "up", 3, NOW + 1) for i in range(10))
            )
            assert won.count(True) == 3
            winners = [f"job_{i:08d}" for i, took in enumerate(won) if took]
            losers = [f"job_{i:08d}" for i, took in enumerate(won) if not took]
            assert not await slots(losers[0]).take(losers[0], "up", 3, NOW + 1)
            assert await slots(losers[0]).take(losers[0], "other", 3, NOW + 1)  # another provider's slots are its own
            await slots(losers[0]).give_back(losers[0])
            # one winner is taken upstream (it runs there whoever follows it); one gives its slot back
            await stores[int(winners[0][4:])].mark_submitted(winners[0], "up", "task-1", NOW + 2)
            await slots(winners[1]).give_back(winners[1])
            assert await slots(losers[1]).take(losers[1], "up", 3, NOW + 2)
            assert not await slots(losers[2]).take(losers[2], "up", 3, NOW + 2)
            # time passes: the process of losers[1] lives on (renews its leases), winners[2]'s died (its lease ran
            # out); the running job still counts
            later = NOW + LEASE + 5
            alive = stores[int(losers[1][4:])].owner
            assert await Leases(database.engine, alive, LEASE).renew(later) == {losers[1]}
            assert await slots(losers[2]).take(losers[2], "up", 3, later)
            assert not await slots(losers[3]).take(losers[3], "up", 3, later)
            # a process reserves only for its own jobs: one it does not hold is not its to send
            assert not await Slots(database.engine, LEASE, alive).take(losers[3], "other", 3, later)
        finally:
            await database.dispose()


async def test_coordination_writes_wait_out_another_process_holding_the_sqlite_lock(tmp_path: Path) -> None:
    """Leases, attempts and the rate count are written as every other write: refused while another process (the
    CLI) holds SQLite's write lock past the busy wait, then run again, rather than failing the job or request."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}", busy_ms=30)
    await database.migrate()
    try:
        store = await running_job(database, "a")
        leases = Leases(database.engine, "a", LEASE)
        attempts = AttemptStore(database.engine)
        keys = KeyStore(database.engine)
        (key,) = await keys.list()
        spec = {"prompt": "x"}
        other = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
        loop = asyncio.get_running_loop()
        writes = [
            lambda: leases.renew(NOW + 1),
            lambda: leases.hold(["job_00000001"], NOW + 1),
            lambda: attempts.begin_many([("fp", "req-1", ("job_00000001",), spec, None, NOW + 600, NOW)]),
            lambda: attempts.settle_many([("fp", "req-1", True)], NOW + 1),
            lambda: keys.take_rate(key.id, NOW + 1),
            lambda: leases.release(),
        ]
        for write in writes:
            other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write, longer than the busy wait
            loop.call_later(0.08, other.execute, "ROLLBACK")
            await write()
        assert (await attempts.get("fp", NOW - 1)) is not None
        row = await store.get("job_00000001")
        assert row is not None and row.lease_until == 0.0  # released, after the renewals went through
        other.close()
    finally:
        await database.dispose()


async def dead_process_jobs(relay: Relay, count: int, owner: str, now: float, lease_s: float) -> None:
    """`count` jobs running upstream that `owner` followed, its leases running until `now` + `lease_s`."""
    key, _ = await relay.keys.create("k", 2 * count, now)
    store = JobStore(relay.db.engine, owner=owner, lease_s=lease_s)
    new = [job(f"job_{i:08d}") for i in range(count)]
    assert await store.open(key.id, new, now)
    await store.mark_submitted_many([Submitted(j.id, "sim", f"task-{i}") for i, j in enumerate(new)], now)


async def test_a_relay_alone_started_again_follows_every_running_job_however_many(tmp_path: Path) -> None:
    """Alone on SQLite, started again straight after dying with more jobs running than one claim takes: it follows
    every one of them at start, not only the first claim's while the rest wait for their old leases to run out."""
    clock = FakeClock()
    config = relay_config(tmp_path)
    before = Relay(config, clock)
    await before.db.migrate()
    await dead_process_jobs(before, CLAIM_BATCH + 1, "the-run-before", clock.now(), LEASE)
    await before.db.dispose()
    relay = Relay(config, clock)
    await relay.open()
    try:
        assert relay.lifecycle.count() == CLAIM_BATCH + 1
    finally:
        await relay.close()


@pytest.mark.postgres
async def test_one_adoption_round_follows_every_job_of_a_dead_process_however_many(tmp_path: Path) -> None:
    clock = FakeClock()
    async with pg_database() as url:
        relay = Relay(relay_config(tmp_path, database={"url": url}), clock)
        await relay.open()
        try:
            await dead_process_jobs(relay, CLAIM_BATCH + 1, "a-process-that-died", clock.now() - 2 * LEASE, LEASE)
            assert await relay.coordinator.adopt() == CLAIM_BATCH + 1
            assert relay.lifecycle.count() == CLAIM_BATCH + 1
        finally:
            await relay.close()


@pytest.mark.postgres
async def test_jobs_a_claim_took_unheard_are_not_kept_but_adopted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is cut as an adoption's commit is answered (a database failing over, a pooler closing it): the
    claim landed, but the process never learnt which jobs it took, and follows none of them. It does not keep their
    leases alive while following nothing (nobody would ever end them, nor settle their holds): they lapse, and are
    adopted again."""
    clock = FakeClock()
    async with pg_database() as url:
        relay = Relay(relay_config(tmp_path, database={"url": url}, jobs={"lease_s": LEASE}), clock)
        await relay.open()
        try:
            await dead_process_jobs(relay, 1, "a-process-that-died", clock.now() - 2 * LEASE, LEASE)
            claim = relay.leases.claim_expired

            async def cut_as_answered(*args: Any, **kwargs: Any) -> Any:
                await claim(*args, **kwargs)
                raise OSError("the connection was cut as the commit was answered")

            monkeypatch.setattr(relay.leases, "claim_expired", cut_as_answered)
            with pytest.raises(OSError):
                await relay.coordinator.adopt()
            monkeypatch.undo()
            row = await relay.store.get("job_00000000")
            assert row is not None and row.owner == relay.process_id and not relay.lifecycle.following(row.id)
            for _ in range(4):  # the renewals of more than a lease's time
                clock.t += LEASE / 3
                await relay.coordinator.renew()
            assert await relay.coordinator.adopt() == 1
            assert relay.lifecycle.following("job_00000000")
        finally:
            await relay.close()


async def test_a_claim_that_fails_holds_up_none_of_the_round_s_other_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead process's jobs take three claims; the second fails (on PostgreSQL, two processes claiming the same
    jobs at once may deadlock, and one claim is rolled back). The failure is logged and the round goes on: every job
    is followed this round, not those of the later claims a round later."""
    clock = FakeClock()
    relay = Relay(relay_config(tmp_path), clock)
    await relay.open()
    try:
        await dead_process_jobs(relay, 2 * CLAIM_BATCH + 1, "a-process-that-died", clock.now() - 2 * LEASE, LEASE)
        claim = relay.leases.claim_expired
        claims = 0

        async def second_fails(*args: Any, **kwargs: Any) -> Any:
            nonlocal claims
            claims += 1
            if claims == 2:
                raise OSError("deadlock detected")
            return await claim(*args, **kwargs)

        monkeypatch.setattr(relay.leases, "claim_expired", second_fails)
        with caplog.at_level(logging.ERROR, "relay.coordination"):
            assert await relay.coordinator.adopt() == 2 * CLAIM_BATCH + 1
        assert "deadlock detected" in caplog.text
    finally:
        await relay.close()


async def test_two_claims_failing_in_a_row_end_the_round_with_the_later_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim fails, and so does the claim made again: the round ends, raising the later failure (the first is
    logged as it happens), so that neither goes unseen (the database may have failed in another way since)."""
    clock = FakeClock()
    relay = Relay(relay_config(tmp_path), clock)
    await relay.open()
    try:
        failures = iter([OSError("deadlock detected"), OSError("the database went away")])

        async def failing(*args: Any, **kwargs: Any) -> Any:
            raise next(failures)

        monkeypatch.setattr(relay.leases, "claim_expired", failing)
        with caplog.at_level(logging.ERROR, "relay.coordination"), pytest.raises(OSError) as raised:
            await relay.coordinator.adopt()
        assert "deadlock detected" in caplog.text
        assert str(raised.value) == "the database went away"
    finally:
        await relay.close()


async def test_a_job_that_cannot_be_followed_holds_up_none_of_the_others_adopted_with_it(tmp_path: Path) -> None:
    """A dead process's jobs include one of a task kind this release does not know (a newer release's, mid-deploy).
    It is left (its lease runs out, for a process that knows it); every other job, of its claim and of the claims
    after it, is followed this round."""
    clock = FakeClock()
    relay = Relay(relay_config(tmp_path), clock)
    await relay.open()
    try:
        await dead_process_jobs(relay, 2 * CLAIM_BATCH + 1, "a-process-that-died", clock.now() - 2 * LEASE, LEASE)
        async with relay.db.engine.begin() as conn:
            await conn.execute(text("UPDATE jobs SET action = 'video' WHERE id = 'job_00000000'"))
        await relay.coordinator.adopt()
        assert not relay.lifecycle.following("job_00000000")
        assert relay.lifecycle.following("job_00000001") and relay.lifecycle.following(f"job_{2 * CLAIM_BATCH:08d}")
    finally:
        await relay.close()


async def test_a_job_that_cannot_be_followed_is_ended_once_past_its_deadline(tmp_path: Path) -> None:
    """Left while it may still run (a process that knows its kind may follow it); past its deadline nothing will,
    so the process that claims it then ends it as timed out, its hold given back, instead of claiming it again each
    time its lease runs out for as long as the database keeps it."""
    clock = FakeClock()
    relay = Relay(relay_config(tmp_path), clock)
    await relay.open()
    try:
        await dead_process_jobs(relay, 2, "a-process-that-died", clock.now() - 2 * LEASE, LEASE)
        async with relay.db.engine.begin() as conn:
            await conn.execute(text("UPDATE jobs SET action = 'video'"))
            await conn.execute(text("UPDATE jobs SET deadline_at = :past WHERE id = 'job_00000000'"), {"past": 1.0})
        await relay.coordinator.adopt()
        ended, running = await relay.store.get("job_00000000"), await relay.store.get("job_00000001")
        assert ended is not None and running is not None
        assert (ended.state, ended.error_code, ended.hold_state) == (JobState.FAILED, "timeout", "released")
        assert running.state is JobState.SUBMITTED and not relay.lifecycle.following(running.id)
    finally:
        await relay.close()


async def test_a_job_of_a_provider_a_process_lacks_is_claimed_once_past_its_deadline(db: Database) -> None:
    """Left to the processes that have its provider while it may run; past its deadline (no such process followed it
    to its end) any process claims it, to end it. Alone, a process waits for the deadline too: its provider may be
    put back in its configuration before then."""
    await running_job(db, "a")
    b = Leases(db.engine, "b", LEASE)
    assert await b.claim_expired(NOW + 60, ["other"]) == []  # lapsed, but it may still run where "up" is known
    (row,) = await b.claim_expired(NOW + 601, ["other"])  # past its deadline
    assert row.owner == "b"
    await running_job(db, "a", "job_00000002")
    alone = Leases(db.engine, "c", LEASE)
    assert await alone.claim_expired(NOW + 1, [], any_lease=True) == []
    claimed = await alone.claim_expired(NOW + 601, [], any_lease=True)
    assert sorted(row.id for row in claimed) == ["job_00000001", "job_00000002"]
