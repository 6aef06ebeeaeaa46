"""The job service wired as in the app, driven directly: what happens when a request goes away mid-submit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from adapters import Retryable, SubmitOutcome, SubmitRequest
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import Clock, SystemClock
from relay.core.events import JobEvent
from relay.core.jobs import DEADLINE_GRACE_S, QUIET_S, Attempt, Generation, ImageSpec
from relay.domain import FailureCode, JobState
from relay.errors import IdempotencyKeyReused, InsufficientQuota, JobFailed
from relay.services import Relay
from relay.store.db import Unreachable
from relay.store.jobs import JobRow
from relay.store.keys import KeyRecord
from relay.store.tables import jobs
from tests.helpers import FakeClock, pg_database, relay_config

pytestmark = pytest.mark.anyio

# One process on SQLite, one on PostgreSQL, two on one PostgreSQL database.
ONE_OR_TWO_PROCESSES = pytest.mark.parametrize(
    ("processes", "postgres"),
    [(1, False), pytest.param(1, True, marks=pytest.mark.postgres), pytest.param(2, True, marks=pytest.mark.postgres)],
)


class SwitchableUpstream(SimulatorUpstream):
    """The simulator, with submits that can be made to wait at a gate (`waiting` tells one arrived) or to answer
    "queue full"."""

    def __init__(self) -> None:
        super().__init__("sim", SimEngine(SimSettings(fast_s=0.2, tile_px=16)))
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()
        self.full = False

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        self.waiting.set()
        await self.gate.wait()
        if self.full:
            return Retryable("queue full")
        return await super().submit(request)


@pytest.fixture
async def switchable(tmp_path: Path) -> AsyncIterator[tuple[Relay, SwitchableUpstream, KeyRecord]]:
    upstream = SwitchableUpstream()
    relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": upstream})
    await relay.open()
    key, _ = await relay.keys.create("k", 100, 0)
    yield relay, upstream, key
    await relay.close()


@pytest.fixture
async def unmoving(tmp_path: Path) -> AsyncIterator[tuple[Relay, KeyRecord, ImageSpec]]:
    """A relay whose clock never moves (whatever waits on it never ends), a key, and a request's spec."""
    clock = FakeClock()
    relay = Relay(relay_config(tmp_path), clock, {"sim": SwitchableUpstream()})
    await relay.open()
    key, _ = await relay.keys.create("k", 100, clock.now())
    yield relay, key, relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    await relay.close()


async def test_a_request_that_goes_away_mid_submit_still_runs_its_job_to_the_end(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    service, upstream, key = switchable
    upstream.gate.clear()
    spec = service.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    request = asyncio.ensure_future(service.jobs.start(key, spec))
    await upstream.waiting.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    upstream.gate.set()
    for _ in range(300):
        if not await service.store.active():
            break
        await asyncio.sleep(0.02)
    async with service.db.engine.connect() as conn:
        rows = (await conn.execute(select(jobs.c.state, jobs.c.hold_state))).all()
    assert [tuple(row) for row in rows] == [("SUCCEEDED", "captured")]
    current = await service.keys.get(key.id)
    assert current is not None and (current.balance, current.held) == (98, 0)


async def test_a_retry_follows_only_the_latest_attempt_that_was_not_a_retry(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    service, upstream, key = switchable
    spec = service.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    first = await service.jobs.start(key, spec, Attempt("same-body", retry=False))
    first.close()
    upstream.full = True  # the same body, sent again later as a new request, finds no provider
    with pytest.raises(JobFailed) as refused:
        await service.jobs.start(key, spec, Attempt("same-body", retry=False))
    assert refused.value.code is FailureCode.UNAVAILABLE
    upstream.full = False
    retried = await service.jobs.start(key, spec, Attempt("same-body", retry=True))
    retried.close()
    assert retried.request_id != first.request_id  # a fresh start, not the older request's images


async def test_a_retry_during_the_first_attempts_submission_waits_for_it_and_follows_it(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    service, upstream, key = switchable
    upstream.gate.clear()
    spec = service.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    first = asyncio.ensure_future(service.jobs.start(key, spec, Attempt("body", retry=False)))
    await asyncio.sleep(0.05)
    retry = asyncio.ensure_future(service.jobs.start(key, spec, Attempt("body", retry=True)))
    await asyncio.sleep(0.05)
    first.cancel()  # the client gave up on the first attempt
    upstream.gate.set()
    followed = await retry
    rows = await service.jobs.wait(followed)
    followed.close()
    assert [row.state.value for row in rows] == ["SUCCEEDED"]
    current = await service.keys.get(key.id)
    assert current is not None and (current.balance, current.held) == (98, 0)  # one job, charged once
    assert followed.spec.references == ()


async def test_no_job_is_sent_upstream_before_its_attempt_is_written(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """A retry on another process (the first attempt's connection was cut) finds the attempt by its row: were a job
    sent upstream before that row is written, such a retry would start and charge a second job."""
    service, upstream, key = switchable
    attempts = service.jobs.attempts
    write = attempts.begin_many
    writing = asyncio.Event()
    let_write = asyncio.Event()

    async def slow_write(*args: Any) -> list[None]:
        writing.set()
        await let_write.wait()
        return await write(*args)

    attempts.begin_many = slow_write  # type: ignore[method-assign]
    found_at_submit: list[bool] = []
    submit = upstream.submit

    async def seen_submit(request: SubmitRequest) -> SubmitOutcome:
        found_at_submit.append(await attempts.get("body", 0) is not None)
        return await submit(request)

    upstream.submit = seen_submit  # type: ignore[method-assign]
    spec = service.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    first = asyncio.ensure_future(service.jobs.start(key, spec, Attempt("body", retry=False)))
    await writing.wait()
    submitted = asyncio.ensure_future(upstream.waiting.wait())
    await asyncio.wait([submitted], timeout=0.5)  # the submit comes now, or only once the row is written
    let_write.set()
    generation = await first
    submitted.cancel()
    rows = await service.jobs.wait(generation)
    generation.close()
    assert [row.state.value for row in rows] == ["SUCCEEDED"]
    assert found_at_submit == [True]


async def test_a_job_is_first_read_one_interval_after_the_upstream_took_it(tmp_path: Path) -> None:
    clock = FakeClock()
    relay = Relay(relay_config(tmp_path, jobs={"poll_interval_s": 1}), clock, {"sim": SwitchableUpstream()})
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 100, clock.now())
        write = relay.store.mark_submitted_many

        async def slow_write(*args: object) -> list[None]:
            clock.advance(0.25)  # writing down the submit takes a while
            return await write(*args)  # type: ignore[arg-type]

        relay.store.mark_submitted_many = slow_write  # type: ignore[method-assign]
        accepted_at = clock.now()
        generation = await relay.jobs.start(key, relay.jobs.plan(model="mj-fast", prompt="a kite", n=1))
        generation.close()
        assert relay.lifecycle._by_job[generation.job_ids[0]].due_at == accepted_at + 1
    finally:
        await relay.close()


async def test_a_request_waiting_for_its_images_is_woken_by_endings_alone(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """`wait` (an answer given once every job has ended) is not woken by each step of progress: a job with progress
    hooks takes eight or so, for nothing the waiter looks at."""
    service, _, key = switchable
    generation = await service.jobs.start(key, service.jobs.plan(model="mj-fast", prompt="a kite", n=1))
    queued: list[str] = []
    put = generation.subscription.put

    def seen(event: JobEvent) -> None:
        put(event)
        queued.extend(f"{e.state.value}" for e in generation.subscription._events)

    generation.subscription.put = seen  # type: ignore[method-assign]
    rows = await service.jobs.wait(generation)
    generation.close()
    assert [row.state.value for row in rows] == ["SUCCEEDED"]
    assert queued and set(queued) == {"SUCCEEDED"}  # progress events went by without a wake-up


@contextlib.asynccontextmanager
async def relays_on_one_database(
    tmp_path: Path,
    upstream: SwitchableUpstream,
    count: int,
    *,
    postgres: bool = True,
    clock: Clock | None = None,
    **sections: Any,
) -> AsyncIterator[tuple[list[Relay], KeyRecord]]:
    """`count` relays (as processes would be) on one fresh database, in front of one upstream, and a key; their
    clock is `clock` (None: the system's); `sections` of their configuration as `relay_config` takes them."""
    async with contextlib.AsyncExitStack() as stack:
        database = {"url": await stack.enter_async_context(pg_database())} if postgres else {}
        relays: list[Relay] = []
        for i in range(count):
            config = relay_config(tmp_path / f"relay-{i}", database=database, **sections)
            relay = Relay(config, clock or SystemClock(), {"sim": upstream})
            await relay.open()
            stack.push_async_callback(relay.close)
            relays.append(relay)
        key, _ = await relays[0].keys.create("k", 100, 0)
        yield relays, key


async def failing_write(*args: Any, **kwargs: Any) -> list[None]:
    """A write the database does not take."""
    raise OSError("the database went away")


async def job_count(relay: Relay) -> int:
    async with relay.db.engine.connect() as conn:
        return len((await conn.execute(select(jobs.c.id))).all())


@pytest.mark.postgres
async def test_a_retry_follows_the_attempt_made_after_its_process_s_own(tmp_path: Path) -> None:
    """A request refused on one process (every provider busy: a 503 the SDK retries), retried on another, which
    starts it, then retried on the first again (the second's answer timed out): the last retry follows the job the
    second started, not the first process's memory of its own attempt, which started nothing."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 2) as ((a, b), key):
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        upstream.full = True
        with pytest.raises(JobFailed):
            await a.jobs.start(key, spec, Attempt("body", retry=False))
        upstream.full = False
        started = await b.jobs.start(key, spec, Attempt("body", retry=True))
        started.close()
        followed = await a.jobs.start(key, spec, Attempt("body", retry=True))
        followed.close()
        assert followed.request_id == started.request_id
        assert await job_count(a) == 2  # the refused one and the one started: none for the last retry


@pytest.mark.postgres
async def test_a_retry_follows_the_repeat_of_a_request_made_on_another_process(tmp_path: Path) -> None:
    """The same body sent again as a new request (for new images) on another process; that one's retry, back on the
    first process, follows the repeat, not the first request the first process made."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 2) as ((a, b), key):
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        earlier = await a.jobs.start(key, spec, Attempt("body", retry=False))
        await a.jobs.wait(earlier)
        earlier.close()
        again = await b.jobs.start(key, spec, Attempt("body", retry=False))
        again.close()
        retried = await a.jobs.start(key, spec, Attempt("body", retry=True))
        retried.close()
        assert retried.request_id == again.request_id


@ONE_OR_TWO_PROCESSES
async def test_one_idempotency_key_sent_twice_at_once_starts_one_job(
    tmp_path: Path, processes: int, postgres: bool
) -> None:
    """Two requests with one `Idempotency-Key` (each a retry, as far as the relay can tell) at the same moment, on
    one process or two: one job starts, and both follow it."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, processes, postgres=postgres) as (relays, key):
        spec = relays[0].jobs.plan(model="mj-fast", prompt="a kite", n=1)
        one, two = await asyncio.gather(
            relays[0].jobs.start(key, spec, Attempt("idempotency", retry=True)),
            relays[-1].jobs.start(key, spec, Attempt("idempotency", retry=True)),
        )
        one.close()
        two.close()
        assert one.request_id == two.request_id
        assert await job_count(relays[0]) == 1


@ONE_OR_TWO_PROCESSES
async def test_one_idempotency_key_sent_with_two_bodies_at_once_starts_one_and_refuses_the_other(
    tmp_path: Path, processes: int, postgres: bool
) -> None:
    """Two requests naming one `Idempotency-Key` with different bodies at the same moment, on one process or two:
    one starts its job, the other is refused, neither follows the other's job."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, processes, postgres=postgres) as (relays, key):
        kite = relays[0].jobs.plan(model="mj-fast", prompt="a kite", n=1)
        boat = relays[0].jobs.plan(model="mj-fast", prompt="a boat", n=1)
        outcomes = await asyncio.gather(
            relays[0].jobs.start(key, kite, Attempt("idempotency", retry=True, body="kite")),
            relays[-1].jobs.start(key, boat, Attempt("idempotency", retry=True, body="boat")),
            return_exceptions=True,
        )
        (started,) = [o for o in outcomes if isinstance(o, Generation)]
        (refused,) = [o for o in outcomes if isinstance(o, BaseException)]
        started.close()
        assert isinstance(refused, IdempotencyKeyReused)
        assert await job_count(relays[0]) == 1
        (row,) = await relays[0].store.by_request(started.request_id)
        assert row.prompt == started.spec.prompt


async def test_an_idempotency_key_of_an_attempt_under_way_here_with_another_body_is_refused(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """The first request naming a key is still being submitted here when the key comes again with another body:
    refused, starting nothing; the same body follows the first request."""
    relay, upstream, key = switchable
    upstream.gate.clear()
    upstream.waiting.clear()
    kite = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    first = asyncio.ensure_future(relay.jobs.start(key, kite, Attempt("idempotency", retry=True, body="kite")))
    await upstream.waiting.wait()
    boat = relay.jobs.plan(model="mj-fast", prompt="a boat", n=1)
    other = asyncio.ensure_future(relay.jobs.start(key, boat, Attempt("idempotency", retry=True, body="boat")))
    same = asyncio.ensure_future(relay.jobs.start(key, kite, Attempt("idempotency", retry=True, body="kite")))
    upstream.gate.set()
    with pytest.raises(IdempotencyKeyReused):
        await other
    one, two = await first, await same
    one.close()
    two.close()
    assert one.request_id == two.request_id
    assert await job_count(relay) == 1


async def test_a_retry_of_an_attempt_refused_while_it_was_held_starts_afresh_at_once(
    unmoving: tuple[Relay, KeyRecord, ImageSpec],
) -> None:
    """A retry that waited on an attempt under way here, which then held nothing (refused at admission: no job
    rows to wait for), starts afresh at once, without waiting for rows that never come (the clock never moves)."""
    relay, key, spec = unmoving
    admit, gate = relay.submitter.admit, asyncio.Event()

    async def refused(*args: object) -> None:
        relay.submitter.admit = admit  # type: ignore[method-assign]  # the retry's own admission goes through
        await gate.wait()
        raise InsufficientQuota("no credits left")

    relay.submitter.admit = refused  # type: ignore[method-assign]
    first = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=False)))
    while "body" not in relay.jobs._local:
        await asyncio.sleep(0)
    retry = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=True)))
    gate.set()
    with pytest.raises(InsufficientQuota):
        await first
    generation = await asyncio.wait_for(retry, 10)
    generation.close()
    assert len(await relay.store.by_request(generation.request_id)) == 1


async def test_a_retry_that_went_away_as_it_claimed_its_body_holds_up_no_later_retry(
    unmoving: tuple[Relay, KeyRecord, ImageSpec],
) -> None:
    """A retry cancelled once its claim was written (and before its jobs were made): the next retry starts afresh
    at once, instead of waiting for jobs that never come (the clock never moves)."""
    relay, key, spec = unmoving
    claim, written, held = relay.attempts.claim_many, asyncio.Event(), asyncio.Event()

    async def slow_claim(*args: Any, **kwargs: Any) -> list[bool]:
        claimed = await claim(*args, **kwargs)
        written.set()
        await held.wait()
        return claimed

    relay.attempts.claim_many = slow_claim  # type: ignore[method-assign]
    first = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("idempotency", retry=True)))
    await written.wait()
    first.cancel()
    relay.attempts.claim_many = claim  # type: ignore[method-assign]
    held.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    generation = await asyncio.wait_for(relay.jobs.start(key, spec, Attempt("idempotency", retry=True)), 10)
    generation.close()
    assert len(await relay.store.by_request(generation.request_id)) == 1


async def test_a_retry_follows_an_attempt_whose_row_could_not_be_written(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """The database failed as a request's attempt was written: a retry here follows that request, not an older one
    of the same body whose row is there."""
    relay, _, key = switchable
    spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    older = await relay.jobs.start(key, spec, Attempt("body", retry=False))
    older.close()
    begin_many = relay.attempts.begin_many

    relay.attempts.begin_many = failing_write  # type: ignore[method-assign]
    newer = await relay.jobs.start(key, spec, Attempt("body", retry=False))
    newer.close()
    relay.attempts.begin_many = begin_many  # type: ignore[method-assign]
    retried = await relay.jobs.start(key, spec, Attempt("body", retry=True))
    retried.close()
    assert retried.request_id == newer.request_id != older.request_id


async def test_copies_of_one_request_sent_at_once_without_credits_are_each_refused_for_that(tmp_path: Path) -> None:
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 1, postgres=False) as ((relay,), _):
        poor, _ = await relay.keys.create("poor", 0, 0)
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        copies = [relay.jobs.start(poor, spec, Attempt("idempotency", retry=True)) for _ in range(8)]
        refused = await asyncio.gather(*copies, return_exceptions=True)
        assert [type(outcome) for outcome in refused] == [InsufficientQuota] * 8


async def test_a_retry_that_went_away_hides_no_attempt_under_way_here(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """A retry whose claim was written goes away while a new request of the same body is being started here (its
    row not written yet): a retry of that request still follows it, and starts no second job."""
    relay, upstream, key = switchable
    spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    claim, begin_many = relay.attempts.claim_many, relay.attempts.begin_many
    claimed, held, slow, writing = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def held_claim(*args: Any, **kwargs: Any) -> list[bool]:
        outcome = await claim(*args, **kwargs)
        claimed.set()
        await held.wait()
        return outcome

    async def slow_begin(*args: Any, **kwargs: Any) -> list[None]:
        writing.set()
        await slow.wait()  # the database is slow, nothing fails
        return await begin_many(*args, **kwargs)

    relay.attempts.claim_many = held_claim  # type: ignore[method-assign]
    gone = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=True)))
    await claimed.wait()
    relay.attempts.claim_many, relay.attempts.begin_many = claim, slow_begin  # type: ignore[method-assign]
    upstream.gate.clear()
    new = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=False)))
    await writing.wait()  # its jobs are being held, its row written (its submit waits for that row)
    gone.cancel()
    held.set()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.gather(*relay.jobs._abandoned)
    retry = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=True)))
    for _ in range(100):  # the retry's turns, while the new request's row is still not written
        await asyncio.sleep(0)
    slow.set()
    upstream.gate.set()
    started, followed = await new, await retry
    started.close()
    followed.close()
    assert followed.request_id == started.request_id


async def test_an_older_attempt_written_and_ending_later_leaves_a_newer_unwritten_one_to_follow(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    relay, _, key = switchable
    spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    admit_and_submit, begin_many = relay.jobs._admit_and_submit, relay.attempts.begin_many
    written, older_goes_on = asyncio.Event(), asyncio.Event()

    async def noted_begin(*args: Any, **kwargs: Any) -> list[None]:
        done = await begin_many(*args, **kwargs)
        written.set()
        return done

    async def older_is_slow(*args: Any) -> list[JobRow]:
        relay.jobs._admit_and_submit = admit_and_submit  # type: ignore[method-assign]
        await older_goes_on.wait()  # a busy provider: it ends after the newer one
        return await admit_and_submit(*args)

    async def failing(*args: Any, **kwargs: Any) -> list[None]:
        raise OSError("the database went away")

    relay.attempts.begin_many, relay.jobs._admit_and_submit = noted_begin, older_is_slow  # type: ignore[method-assign]
    older = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=False)))
    await written.wait()
    relay.attempts.begin_many = failing  # type: ignore[method-assign]
    newer = await relay.jobs.start(key, spec, Attempt("body", retry=False))  # its row is not written
    newer.close()
    relay.attempts.begin_many = begin_many  # type: ignore[method-assign]
    older_goes_on.set()
    (await older).close()
    retried = await relay.jobs.start(key, spec, Attempt("body", retry=True))
    retried.close()
    assert retried.request_id == newer.request_id


async def test_a_claimed_retry_hides_no_newer_request_under_way_here(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """A retry's claim lands; then a new request of the same body starts here and its row replaces the claim; then
    the retry learns its claim landed. A retry made while both are submitted follows the new request, which owns
    the body."""
    relay, upstream, key = switchable
    spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    claim, claimed, held = relay.attempts.claim_many, asyncio.Event(), asyncio.Event()

    async def held_claim(*args: Any, **kwargs: Any) -> list[bool]:
        outcome = await claim(*args, **kwargs)
        claimed.set()
        await held.wait()
        return outcome

    relay.attempts.claim_many = held_claim  # type: ignore[method-assign]
    upstream.gate.clear()
    claiming = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=True)))
    await claimed.wait()
    relay.attempts.claim_many = claim  # type: ignore[method-assign]
    new = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=False)))
    await upstream.waiting.wait()  # the new request is held and at the upstream
    while (owner := await relay.attempts.get("body", 0)) is None or owner.state != "starting":
        await asyncio.sleep(0)
    held.set()
    for _ in range(100):  # the claiming retry launches its jobs
        await asyncio.sleep(0)
    retry = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=True)))
    for _ in range(100):
        await asyncio.sleep(0)
    upstream.gate.set()
    generations = [await claiming, await new, await retry]
    for generation in generations:
        generation.close()
    assert generations[2].request_id == generations[1].request_id


@pytest.mark.postgres
async def test_a_retry_follows_a_newer_request_elsewhere_not_one_under_way_here(tmp_path: Path) -> None:
    """A request of a body is being submitted on one process (a slow provider) when a new request of the same body
    starts on another. The new one's retry, sent to the first process, follows the new one, not the one it was
    waiting on there."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 2) as ((a, b), key):
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        admit_and_submit, goes_on = a.jobs._admit_and_submit, asyncio.Event()

        async def slow(*args: Any) -> list[JobRow]:
            a.jobs._admit_and_submit = admit_and_submit  # type: ignore[method-assign]
            await goes_on.wait()
            return await admit_and_submit(*args)

        a.jobs._admit_and_submit = slow  # type: ignore[method-assign]
        older = asyncio.ensure_future(a.jobs.start(key, spec, Attempt("body", retry=False)))
        while await a.attempts.get("body", 0) is None:  # its row is written
            await asyncio.sleep(0.01)
        newer = await b.jobs.start(key, spec, Attempt("body", retry=False))
        newer.close()
        retry = asyncio.ensure_future(a.jobs.start(key, spec, Attempt("body", retry=True)))
        for _ in range(100):  # the retry waits on the older one, under way on this process
            await asyncio.sleep(0)
        goes_on.set()
        (await older).close()
        retried = await retry
        retried.close()
        assert retried.request_id == newer.request_id


async def test_a_retry_of_a_refused_attempt_whose_row_could_not_be_settled_starts_afresh_at_once(
    unmoving: tuple[Relay, KeyRecord, ImageSpec],
) -> None:
    """A request refused at admission (nothing held), whose row could not be settled: a retry here goes by what
    this process knows, instead of waiting for jobs that never come (the clock never moves)."""
    relay, key, spec = unmoving
    admit, settle_many = relay.submitter.admit, relay.attempts.settle_many

    async def refused(*args: object) -> None:
        relay.submitter.admit = admit  # type: ignore[method-assign]
        raise InsufficientQuota("no credits left")

    async def failing(*args: Any, **kwargs: Any) -> list[None]:
        relay.attempts.settle_many = settle_many  # type: ignore[method-assign]
        raise OSError("the database went away")

    relay.submitter.admit, relay.attempts.settle_many = refused, failing  # type: ignore[method-assign]
    with pytest.raises(InsufficientQuota):
        await relay.jobs.start(key, spec, Attempt("body", retry=False))
    generation = await asyncio.wait_for(relay.jobs.start(key, spec, Attempt("body", retry=True)), 10)
    generation.close()
    assert len(await relay.store.by_request(generation.request_id)) == 1


async def test_a_retry_waiting_on_an_older_attempt_here_follows_a_newer_unwritten_one(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """A retry waits on a request of its body under way here; meanwhile a newer request of the body starts here,
    whose row the database fails to take, and the older one is refused: the retry follows the newer one."""
    relay, _, key = switchable
    spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    admit, begin_many, gate = relay.submitter.admit, relay.attempts.begin_many, asyncio.Event()

    async def refused(*args: object) -> None:
        relay.submitter.admit = admit  # type: ignore[method-assign]
        await gate.wait()
        raise InsufficientQuota("no credits left")

    relay.submitter.admit = refused  # type: ignore[method-assign]
    older = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=False)))
    while await relay.attempts.get("body", 0) is None:
        await asyncio.sleep(0)
    retry = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=True)))
    for _ in range(100):  # the retry waits on the older one
        await asyncio.sleep(0)
    relay.attempts.begin_many = failing_write  # type: ignore[method-assign]
    newer = await relay.jobs.start(key, spec, Attempt("body", retry=False))
    newer.close()
    relay.attempts.begin_many = begin_many  # type: ignore[method-assign]
    gate.set()
    with pytest.raises(InsufficientQuota):
        await older
    followed = await retry
    followed.close()
    assert followed.request_id == newer.request_id


async def test_a_claimed_retry_ending_later_leaves_a_newer_unwritten_request_to_follow(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """A retry's claim lands; a new request of the body then starts here, its row not taken by the database, and
    ends; the retry, refused, ends after it: a later retry follows the new request."""
    relay, upstream, key = switchable
    spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    claim, begin_many, admit_and_submit = (
        relay.attempts.claim_many,
        relay.attempts.begin_many,
        relay.jobs._admit_and_submit,
    )
    claimed, held, claimer_goes_on, calls = asyncio.Event(), asyncio.Event(), asyncio.Event(), []

    async def held_claim(*args: Any, **kwargs: Any) -> list[bool]:
        outcome = await claim(*args, **kwargs)
        claimed.set()
        await held.wait()
        return outcome

    async def claimer_is_slow(*args: Any) -> list[JobRow]:
        calls.append(args)
        if len(calls) == 2:  # the claiming retry's, after the new request's
            await claimer_goes_on.wait()
        return await admit_and_submit(*args)

    relay.attempts.claim_many, relay.jobs._admit_and_submit = held_claim, claimer_is_slow  # type: ignore[method-assign]
    upstream.gate.clear()
    claiming = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=True)))
    await claimed.wait()
    relay.attempts.claim_many, relay.attempts.begin_many = claim, failing_write  # type: ignore[method-assign]
    new = asyncio.ensure_future(relay.jobs.start(key, spec, Attempt("body", retry=False)))
    await upstream.waiting.wait()
    relay.attempts.begin_many = begin_many  # type: ignore[method-assign]
    held.set()
    for _ in range(100):  # the claiming retry launches, and waits in its admission
        await asyncio.sleep(0)
    upstream.gate.set()
    started = await new
    started.close()
    upstream.full = True  # the claiming retry finds no provider
    claimer_goes_on.set()
    with pytest.raises(JobFailed):
        await claiming
    upstream.full = False
    retried = await relay.jobs.start(key, spec, Attempt("body", retry=True))
    retried.close()
    assert retried.request_id == started.request_id


@pytest.mark.parametrize("retry", [False, True], ids=["plain", "idempotency-key"])
async def test_the_first_requests_of_many_bodies_are_group_committed(tmp_path: Path, retry: bool) -> None:
    """Forty first requests at once, plain or each with an `Idempotency-Key` (a retry as far as the relay can
    tell, which claims its body before its jobs are held): a handful of commits, not one each."""
    upstream = SimulatorUpstream("sim", SimEngine(SimSettings(fast_s=5, tile_px=16)))
    relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": upstream})
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 1000, 0)
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        commits: list[object] = []
        event.listen(relay.db.engine.sync_engine, "commit", commits.append)
        starts = [relay.jobs.start(key, spec, Attempt(f"body-{i}", retry=retry)) for i in range(40)]
        for generation in await asyncio.gather(*starts):
            generation.close()
        assert len(commits) <= 10
    finally:
        await relay.close()


class CutOnce:
    """A store write that lands, then, the first time, fails as if its connection were cut before the commit was
    answered (a failover, a pooler or a firewall closing it)."""

    def __init__(self, write: Callable[..., Awaitable[Any]]) -> None:
        self.write = write
        self.cuts = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        written = await self.write(*args, **kwargs)
        if self.cuts == 0:
            self.cuts += 1
            raise OSError("the connection was cut as the commit was answered")
        return written


@pytest.mark.postgres
async def test_an_ending_written_as_its_connection_was_cut_still_wakes_every_waiter(tmp_path: Path) -> None:
    """The connection is cut as a job's ending is committed (a failover, a pooler or a firewall closing it): the
    ending landed, but the process was told it failed, and its next try finds the job ended already. The waiters,
    here and in the other process, still learn of the end at once, not after a quiet spell."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 2) as ((a, b), key):
        cut = CutOnce(a.store.finish_many)
        a.store.finish_many = cut  # type: ignore[method-assign]
        generation = await a.jobs.start(key, a.jobs.plan(model="mj-fast", prompt="a kite", n=1))
        elsewhere = b.events.subscribe(generation.job_ids)
        try:
            async with asyncio.timeout(QUIET_S / 2):  # a lost wake-up costs a quiet spell
                (row,) = await a.jobs.wait(generation)
                change = await elsewhere.next(QUIET_S)
                while change is not None and not change.state.terminal:
                    change = await elsewhere.next(QUIET_S)
        finally:
            generation.close()
            elsewhere.close()
        assert cut.cuts == 1
        assert (row.state, row.hold_state) == (JobState.SUCCEEDED, "captured")
        assert change is not None and change.state is JobState.SUCCEEDED
        current = await a.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (key.balance - row.price, 0)


@pytest.mark.postgres
async def test_credits_held_by_an_admission_written_as_its_connection_was_cut_are_released_at_once(
    tmp_path: Path,
) -> None:
    """The connection is cut as a request's admission is committed: the hold and the jobs landed, but the process
    was told it failed, and the request failed. Those jobs are never submitted: their hold is released at once, not
    kept from the key until the pending sweep ten minutes on, and the key's next request is taken."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 1) as ((relay,), _):
        key, _ = await relay.keys.create("one job's worth", 2, 0)
        cut = CutOnce(relay.store.open_many)
        relay.store.open_many = cut  # type: ignore[method-assign]
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)  # every credit the key has
        with pytest.raises(OSError):
            await relay.jobs.start(key, spec)
        assert cut.cuts == 1 and upstream.engine.submits == 0
        current = await relay.keys.get(key.id)
        assert current is not None and (current.balance, current.held) == (key.balance, 0)
        generation = await relay.jobs.start(key, spec)
        try:
            rows = await relay.jobs.wait(generation)
        finally:
            generation.close()
        assert {row.state for row in rows} == {JobState.SUCCEEDED}


class Outage:
    """A store read that fails, as during a database outage, `times` times once `begin` is called."""

    def __init__(self, read: Callable[..., Awaitable[Any]], times: int) -> None:
        self.read = read
        self.left = 0
        self.times = times
        self.failed = 0

    def begin(self) -> None:
        self.left = self.times

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.left:
            self.left -= 1
            self.failed += 1
            raise OSError("the database went away")
        return await self.read(*args, **kwargs)


@contextlib.asynccontextmanager
async def a_retry_elsewhere(tmp_path: Path) -> AsyncIterator[tuple[Relay, Generation]]:
    """Two relays on one database: relay a runs a request's job, and relay b (yielded) has a retry of that request,
    which follows the job a runs."""
    async with relays_on_one_database(tmp_path, SwitchableUpstream(), 2) as ((a, b), key):
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        first = await a.jobs.start(key, spec, Attempt("body", retry=False))
        first.close()
        generation = await b.jobs.start(key, spec, Attempt("body", retry=True))
        try:
            yield b, generation
        finally:
            generation.close()


async def followed_to_its_answer(relay: Relay, generation: Generation) -> list[JobRow]:
    """What the request is answered with, once its waiter has followed its jobs to their ends (at most 30 s)."""
    async with asyncio.timeout(30):
        async for _ in relay.jobs.follow(generation, idle_s=0.01):
            pass
        return await relay.jobs.results(generation)


@pytest.mark.postgres
async def test_a_waiter_whose_read_after_a_quiet_spell_fails_reads_again_later(tmp_path: Path) -> None:
    """A waiter for jobs another process follows reads their endings after each quiet spell; one such read failing
    (the database is briefly away) is read again after the next, not the request's failure: its jobs run on and are
    charged either way."""
    async with a_retry_elsewhere(tmp_path) as (b, generation):
        outage = Outage(b.store.by_request, times=3)
        b.store.by_request = outage  # type: ignore[method-assign]
        outage.begin()
        rows = await followed_to_its_answer(b, generation)
        assert outage.failed == 3
        assert [row.state for row in rows] == [JobState.SUCCEEDED]


async def test_endings_that_find_their_jobs_ended_read_them_back_in_one_statement(
    switchable: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    """Endings that find their jobs ended already (an earlier write landed as its connection was cut) tell the
    waiters of those ends, reading the jobs back together: one statement for the batch, not one a job."""
    relay, _, key = switchable
    generation = await relay.jobs.start(key, relay.jobs.plan(model="mj-fast", prompt="a kite", n=10))
    try:
        ended = await relay.jobs.wait(generation)
    finally:
        generation.close()
    assert [row.state for row in ended] == [JobState.SUCCEEDED] * 3
    write = relay.store.finish_many
    statements: list[str] = []
    written = False

    async def marked(*args: Any, **kwargs: Any) -> Any:
        nonlocal written
        rows = await write(*args, **kwargs)
        written = True
        return rows

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if written:
            statements.append(statement)

    relay.store.finish_many = marked  # type: ignore[method-assign]
    event.listen(relay.db.engine.sync_engine, "before_cursor_execute", seen)
    heard = relay.events.subscribe(generation.job_ids)
    try:
        outcomes = await relay.finisher.end_many([relay.finisher.ending(row.id, False) for row in ended])
        told = [await heard.next(5) for _ in ended]
    finally:
        heard.close()
        event.remove(relay.db.engine.sync_engine, "before_cursor_execute", seen)
    assert outcomes == [None, None, None]  # nothing settled twice
    assert len(statements) == 1
    assert {(e.job_id, e.state) for e in told if e is not None} == {(row.id, JobState.SUCCEEDED) for row in ended}


@pytest.mark.postgres
async def test_a_waiter_whose_read_of_a_job_past_its_deadline_fails_reads_it_again(tmp_path: Path) -> None:
    """A waiter past its deadline reads a job another process follows to end the wait once that job ended; that read
    failing (the database is briefly away) is made again shortly, not the request's failure: the job runs on (here,
    its grid still being delivered) and is charged either way."""
    async with a_retry_elsewhere(tmp_path) as (b, generation):
        generation.deadline_at = b.clock.now() - DEADLINE_GRACE_S  # the wait is up; a delivers the grid still
        outage = Outage(b.store.get, times=3)
        b.store.get = outage  # type: ignore[method-assign]
        outage.begin()
        rows = await followed_to_its_answer(b, generation)
        assert outage.failed == 3
        assert [row.state for row in rows] == [JobState.SUCCEEDED]


@pytest.mark.postgres
async def test_reading_the_results_of_ended_jobs_is_made_again_when_it_fails(tmp_path: Path) -> None:
    """A waiter that heard its jobs ended in another process reads them back for the answer; that read failing (the
    database is briefly away) is made again shortly, not a 500 for images that exist and are charged."""
    async with a_retry_elsewhere(tmp_path) as (b, generation):
        async with asyncio.timeout(30):
            async for _ in b.jobs.follow(generation, idle_s=QUIET_S):
                pass
            assert generation.done and not generation.rows  # heard of, not read yet
            outage = Outage(b.store.by_request, times=2)
            b.store.by_request = outage  # type: ignore[method-assign]
            outage.begin()
            rows = await b.jobs.results(generation)
        assert outage.failed == 2
        assert [row.state for row in rows] == [JobState.SUCCEEDED]


async def test_a_retry_within_a_long_deadline_follows_its_first_attempt(tmp_path: Path) -> None:
    """Deadlines may be set up to a day: a retry that comes while its first attempt's job may still run (here over an
    hour on, past the attempts sweep) follows that job rather than starting and charging a second one."""
    clock = FakeClock()
    config = relay_config(tmp_path, jobs={"deadline_s": {"fast": 7200}})
    relay = Relay(config, clock, {"sim": SwitchableUpstream()})
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 100, clock.now())
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        first = await relay.jobs.start(key, spec, Attempt("body", retry=False))
        first.close()
        clock.advance(3700)
        await relay.coordinator._forget()  # as the sweep of old attempts does
        retried = await relay.jobs.start(key, spec, Attempt("body", retry=True))
        retried.close()
        assert retried.request_id == first.request_id
    finally:
        await relay.close()


class OneTaken(SwitchableUpstream):
    """Takes the first submit and answers "queue full" to every later one."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        if self.taken:
            return Retryable("queue full")
        self.taken += 1
        return await super().submit(request)


async def test_an_attempt_whose_other_job_could_not_be_ended_is_followed_by_its_retry(tmp_path: Path) -> None:
    """Of a request's two jobs the upstream took one, and the other's ending could not be written (the database went
    away): the request fails (503, which clients retry), yet a job of it runs and is charged. Its retry follows that
    job rather than starting two more and charging the request twice."""
    upstream = OneTaken()
    relay = Relay(relay_config(tmp_path), SystemClock(), {"sim": upstream})
    await relay.open()
    try:
        key, _ = await relay.keys.create("k", 100, 0)
        spec = relay.jobs.plan(model="mj-fast", prompt="a kite", n=8)
        end = relay.submitter.finisher.end

        async def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise Unreachable("the database did not answer")

        relay.submitter.finisher.end = unreachable  # type: ignore[method-assign]
        with pytest.raises(Unreachable):
            await relay.jobs.start(key, spec, Attempt("body", retry=False))
        relay.submitter.finisher.end = end  # type: ignore[method-assign]
        assert upstream.taken == 1
        first = await relay.attempts.get("body", 0)
        assert first is not None and first.state == "started"
        retried = await relay.jobs.start(key, spec, Attempt("body", retry=True))
        retried.close()
        assert retried.request_id == first.request_id
        async with relay.db.engine.connect() as conn:
            assert len((await conn.execute(select(jobs.c.id))).all()) == 2  # no job started twice
    finally:
        await relay.close()
