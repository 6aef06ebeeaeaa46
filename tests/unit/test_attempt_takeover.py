"""A retry that gave up waiting for its first attempt and started afresh, while that attempt, stalled before its
jobs were held, goes on: one job runs upstream, and one is charged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import relay.core.jobs as jobs_module
from adapters import SubmitOutcome, SubmitRequest
from relay.core.jobs import ATTEMPT_CHECK_S, ATTEMPT_WAIT_S, Attempt, Generation, ImageSpec, JobService
from relay.domain import FailureCode, JobState
from relay.services import Relay
from relay.store.jobs import NewJob
from relay.store.keys import KeyRecord
from relay.store.tables import jobs
from tests.helpers import FakeClock, relay_config
from tests.unit.test_jobs import SwitchableUpstream, relays_on_one_database

pytestmark = pytest.mark.anyio


class CountingUpstream(SwitchableUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.submits = 0

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        self.submits += 1
        return await super().submit(request)


class NotedClock:
    """A process's view of the test's clock that tells when that process sleeps on it (`sleeping`)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sleeping = asyncio.Event()

    def now(self) -> float:
        return self.clock.now()

    async def sleep(self, seconds: float) -> None:
        self.sleeping.set()
        await self.clock.sleep(seconds)


@contextlib.asynccontextmanager
async def two_processes(
    tmp_path: Path, upstream: SwitchableUpstream, clock: FakeClock, postgres: bool
) -> AsyncIterator[tuple[Relay, JobService, NotedClock, KeyRecord]]:
    """Two relays on one PostgreSQL database, or one on SQLite: the first relay, and a second job service (on the
    second relay's store, or on the one relay's) whose attempts are the first's only through the database, as two
    processes' are; the second's clock, and a key."""
    async with contextlib.AsyncExitStack() as stack:
        if postgres:
            (a, b), key = await stack.enter_async_context(relays_on_one_database(tmp_path, upstream, 2, clock=clock))
        else:
            a = b = Relay(relay_config(tmp_path), clock, {"sim": upstream})
            await a.open()
            stack.push_async_callback(a.close)
            key, _ = await a.keys.create("k", 100, clock.now())
        noted = NotedClock(clock)
        other = JobService(
            config=b.config,
            store=b.store,
            submitter=b.submitter,
            lifecycle=b.lifecycle,
            events=b.events,
            attempts=b.attempts,
            clock=noted,
        )
        stack.push_async_callback(other.close)
        yield a, other, noted, key


def stalled(relay: Relay, holds: int) -> tuple[list[asyncio.Event], list[asyncio.Event]]:
    """The relay's first `holds` holds wait, each until the test lets it go on: for each, an event set once it is
    stalled, and one the test sets to let it go on. Later holds go on at once."""
    admit = relay.submitter.admit
    arrived = [asyncio.Event() for _ in range(holds)]
    go_on = [asyncio.Event() for _ in range(holds)]
    count = 0

    async def stalling_admit(key: KeyRecord, planned: list[NewJob]) -> None:
        nonlocal count
        index, count = count, count + 1
        if index < holds:
            arrived[index].set()
            await go_on[index].wait()
        await admit(key, planned)

    relay.submitter.admit = stalling_admit  # type: ignore[method-assign]
    return arrived, go_on


def noted_rows(relay: Relay) -> asyncio.Event:
    """An event set each time an attempt's row is written as it begins."""
    begin_many, written = relay.attempts.begin_many, asyncio.Event()

    async def noted_begin(*args: Any) -> list[None]:
        outcome = await begin_many(*args)
        written.set()
        return outcome

    relay.attempts.begin_many = noted_begin  # type: ignore[method-assign]
    return written


def launched(relay: Relay) -> list[asyncio.Future[Any]]:
    """The work of each attempt the relay's job service launches, in turn (it goes on when its caller goes away)."""
    launch, works = relay.jobs._launch, []

    def noted_launch(*args: Any, **kwargs: Any) -> Any:
        generation, work = launch(*args, **kwargs)
        works.append(work)
        return generation, work

    relay.jobs._launch = noted_launch  # type: ignore[method-assign]
    return works


async def asleep_or_done(clock: NotedClock, task: asyncio.Future[Any]) -> None:
    clock.sleeping.clear()
    sleeping = asyncio.ensure_future(clock.sleeping.wait())
    await asyncio.wait([sleeping, task], return_when=asyncio.FIRST_COMPLETED)
    sleeping.cancel()


async def upstream_jobs(relay: Relay) -> dict[str, tuple[str, str, str | None]]:
    """Each job's request id: its state, hold state and failure code."""
    async with relay.db.engine.connect() as conn:
        rows = await conn.execute(select(jobs.c.request_id, jobs.c.state, jobs.c.hold_state, jobs.c.error_code))
        return {row.request_id: (row.state, row.hold_state, row.error_code) for row in rows}


BOTH = pytest.mark.parametrize(
    "postgres", [False, pytest.param(True, marks=pytest.mark.postgres)], ids=["sqlite", "postgres"]
)


async def sent_nothing_and_followed(relay: Relay, retry: str, key_id: str) -> None:
    """The first attempt's job ended unsent (failed, released, interrupted) and the retry's (`retry`, its request id)
    holds: one job's price held, nothing charged twice."""
    ended = await upstream_jobs(relay)
    assert ended.pop(retry)[1] == "held"
    assert list(ended.values()) == [(JobState.FAILED.value, "released", FailureCode.INTERRUPTED.value)]
    current = await relay.keys.get(key_id)
    assert current is not None and current.held == relay.config.price("mj-fast", "imagine")


async def first_held_late(
    a: Relay, key: KeyRecord
) -> tuple[ImageSpec, asyncio.Future[Generation], list[asyncio.Event]]:
    """A request (not a retry) on process A whose attempt row is written and whose hold then stalls: its spec, the
    request under way, and the events that let its holds land."""
    spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    written, (arrived, go_on) = noted_rows(a), stalled(a, 1)
    first = asyncio.ensure_future(a.jobs.start(key, spec, Attempt("body", retry=False)))
    await asyncio.gather(written.wait(), arrived[0].wait())
    return spec, first, go_on


@BOTH
async def test_a_first_attempt_held_after_its_retry_started_afresh_sends_nothing_and_follows_the_retry(
    tmp_path: Path, postgres: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt's row is written, then its hold stalls past the time a retry elsewhere waits for its jobs;
    the retry starts afresh. The first attempt's hold then lands: its job is ended unsent, its hold released, and
    its client follows the retry's job. One submit upstream, one job holding (and later charged)."""
    monkeypatch.setattr(jobs_module, "ATTEMPT_POLL_S", ATTEMPT_WAIT_S)  # the retry's wait: one look, one sleep
    clock, upstream = FakeClock(), CountingUpstream()
    async with two_processes(tmp_path, upstream, clock, postgres) as (a, b_jobs, b_clock, key):
        spec, first, go_on = await first_held_late(a, key)
        retry = asyncio.ensure_future(b_jobs.start(key, spec, Attempt("body", retry=True)))
        await b_clock.sleeping.wait()
        clock.advance(ATTEMPT_WAIT_S)  # the retry gives up waiting, and starts afresh
        retried = await retry
        retried.close()
        assert upstream.submits == 1
        go_on[0].set()  # the first attempt's hold lands
        followed = await first
        followed.close()
        assert upstream.submits == 1
        assert followed.request_id == retried.request_id
        await sent_nothing_and_followed(a, retried.request_id, key.id)


@BOTH
async def test_a_retry_waits_afresh_for_an_attempt_that_took_the_body_over_as_it_waited(
    tmp_path: Path, postgres: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry waits for a stalled first attempt (whose client went away, and sent the retry); the same body, sent
    again as a new request, takes the body over near the end of that wait. The retry waits its whole while for the
    new request's jobs, not what was left of the first's: the new request's hold, quick enough that it asks nothing
    before sending, is followed, not run beside a fresh start. The first attempt, held at last, sends nothing:
    nobody waits for it, and its retry follows the new request."""
    monkeypatch.setattr(jobs_module, "ATTEMPT_POLL_S", ATTEMPT_WAIT_S / 2)
    clock, upstream = FakeClock(), CountingUpstream()
    async with two_processes(tmp_path, upstream, clock, postgres) as (a, b_jobs, b_clock, key):
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        written, (arrived, go_on), works = noted_rows(a), stalled(a, 2), launched(a)
        first = asyncio.ensure_future(a.jobs.start(key, spec, Attempt("body", retry=False)))
        await asyncio.gather(written.wait(), arrived[0].wait())
        first.cancel()  # its client went away, and retries
        with contextlib.suppress(asyncio.CancelledError):
            await first
        retry = asyncio.ensure_future(b_jobs.start(key, spec, Attempt("body", retry=True)))
        await asleep_or_done(b_clock, retry)
        clock.advance(ATTEMPT_WAIT_S / 2)  # half its wait: it looks again, and sleeps
        await asleep_or_done(b_clock, retry)
        clock.advance(1)
        written.clear()
        again = asyncio.ensure_future(a.jobs.start(key, spec, Attempt("body", retry=False)))
        await asyncio.gather(written.wait(), arrived[1].wait())
        clock.advance(ATTEMPT_WAIT_S / 2 - 1)  # the retry's first wait is over; the new request began 4 s ago
        await asleep_or_done(b_clock, retry)
        go_on[1].set()  # the new request's hold lands
        started = await again
        started.close()
        clock.advance(ATTEMPT_WAIT_S / 2)
        followed = await retry
        followed.close()
        assert upstream.submits == 1
        assert followed.request_id == started.request_id
        go_on[0].set()
        await asyncio.wait([works[0]])
        assert upstream.submits == 1


@BOTH
async def test_a_first_attempt_held_late_still_runs_when_only_a_new_request_of_the_same_body_came_since(
    tmp_path: Path, postgres: bool
) -> None:
    """Two requests of one body, neither a retry (a client asking for the same prompt twice): the first one's hold
    stalls past ATTEMPT_CHECK_S, and the second, made meanwhile, owns the body from then on and runs. No retry took
    the first one over: once its hold lands it runs too, its client answered with its own job, not the second's
    images. Two submits upstream, two jobs holding."""
    clock, upstream = FakeClock(), CountingUpstream()
    async with two_processes(tmp_path, upstream, clock, postgres) as (a, b_jobs, _, key):
        spec, first, go_on = await first_held_late(a, key)
        clock.advance(ATTEMPT_CHECK_S)
        second = await b_jobs.start(key, spec, Attempt("body", retry=False))
        second.close()
        assert upstream.submits == 1
        go_on[0].set()  # the first request's hold lands
        ran = await first
        ran.close()
        assert ran.request_id != second.request_id
        assert upstream.submits == 2
        held = await upstream_jobs(a)
        assert sorted(held) == sorted([ran.request_id, second.request_id])
        assert all(hold == "held" for _, hold, _ in held.values())


def stalled_row(relay: Relay) -> tuple[asyncio.Event, asyncio.Event]:
    """The relay's next attempt row waits before it is written, until the test lets it go on: an event set once it
    is stalled, and one the test sets to let it go on. Later rows are written at once."""
    begin_many, arrived, go_on = relay.attempts.begin_many, asyncio.Event(), asyncio.Event()

    async def stalling_begin(*args: Any) -> Any:
        if not arrived.is_set():
            arrived.set()
            await go_on.wait()
        return await begin_many(*args)

    relay.attempts.begin_many = stalling_begin  # type: ignore[method-assign]
    return arrived, go_on


async def second_beside_a_stalled_row(
    a: Relay, b_jobs: JobService, key: KeyRecord, clock: FakeClock, *, retry: bool
) -> tuple[asyncio.Future[Generation], Generation, asyncio.Event]:
    """A request of one body on process A whose attempt row stalls, and a second request of it (a retry, or not) on
    B a second later, run to its submit: A's request still under way, B's generation (closed), and the event that
    lets A's row land."""
    spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
    arrived, go_on = stalled_row(a)
    first = asyncio.ensure_future(a.jobs.start(key, spec, Attempt("body", retry=False)))
    await arrived.wait()
    clock.advance(1)
    second = await b_jobs.start(key, spec, Attempt("body", retry=retry))
    second.close()
    return first, second, go_on


@BOTH
async def test_a_first_attempt_whose_row_lands_after_its_retry_started_afresh_sends_nothing_and_follows_it(
    tmp_path: Path, postgres: bool
) -> None:
    """The first attempt's row stalls (its hold is quick); a retry on another process finds no row, takes the body
    and starts afresh. The first attempt's row then lands: it does not take the body back from the retry, and its
    job is ended unsent, its hold released, its client answered with the retry's job. One submit upstream, one job
    holding (and later charged)."""
    clock, upstream = FakeClock(), CountingUpstream()
    async with two_processes(tmp_path, upstream, clock, postgres) as (a, b_jobs, _, key):
        first, retried, go_on = await second_beside_a_stalled_row(a, b_jobs, key, clock, retry=True)
        assert upstream.submits == 1
        go_on.set()  # the first attempt's row lands
        followed = await first
        followed.close()
        assert upstream.submits == 1
        assert followed.request_id == retried.request_id
        row = await a.attempts.get("body", 0)
        assert row is not None and row.request_id == retried.request_id
        await sent_nothing_and_followed(a, retried.request_id, key.id)


@BOTH
async def test_two_requests_of_one_body_both_run_when_the_first_one_s_row_lands_after_the_second_s(
    tmp_path: Path, postgres: bool
) -> None:
    """A double click: two requests of one body, neither a retry, on two processes; the first one's row stalls until
    the second's is written. Both run (two submits), and the row names one of them, which a retry follows."""
    clock, upstream = FakeClock(), CountingUpstream()
    async with two_processes(tmp_path, upstream, clock, postgres) as (a, b_jobs, _, key):
        first, second, go_on = await second_beside_a_stalled_row(a, b_jobs, key, clock, retry=False)
        go_on.set()
        started = await first
        started.close()
        assert upstream.submits == 2
        assert started.request_id != second.request_id
        row = await a.attempts.get("body", 0)
        assert row is not None and row.request_id in (started.request_id, second.request_id)


@BOTH
async def test_a_first_attempt_whose_row_lands_after_its_retry_and_a_newer_request_sends_nothing(
    tmp_path: Path, postgres: bool
) -> None:
    """The first attempt's row stalls and its client goes away; its retry on another process finds no row and starts
    afresh; then a new request of the same body (not a retry) takes the body from the retry. The first attempt's row
    lands last: a retry started afresh after it began, so it sends nothing (its hold released), though the row it
    would take is the newer request's. Two submits upstream (the retry's and the new request's), not three."""
    clock, upstream = FakeClock(), CountingUpstream()
    async with two_processes(tmp_path, upstream, clock, postgres) as (a, b_jobs, _, key):
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        (arrived, go_on), works = stalled_row(a), launched(a)
        first = asyncio.ensure_future(a.jobs.start(key, spec, Attempt("body", retry=False)))
        await arrived.wait()
        first.cancel()  # its client went away, and retries
        with contextlib.suppress(asyncio.CancelledError):
            await first
        clock.advance(1)
        retried = await b_jobs.start(key, spec, Attempt("body", retry=True))
        retried.close()
        clock.advance(1)
        newer = await b_jobs.start(key, spec, Attempt("body", retry=False))
        newer.close()
        assert upstream.submits == 2
        go_on.set()  # the first attempt's row lands
        await asyncio.wait([works[0]])
        assert upstream.submits == 2
        ended = await upstream_jobs(a)
        assert ended.pop(retried.request_id)[1] == "held"
        assert ended.pop(newer.request_id)[1] == "held"
        assert list(ended.values()) == [(JobState.FAILED.value, "released", FailureCode.INTERRUPTED.value)]
        row = await a.attempts.get("body", 0)
        assert row is not None and row.request_id == newer.request_id
        current = await a.keys.get(key.id)
        assert current is not None and current.held == 2 * a.config.price("mj-fast", "imagine")
