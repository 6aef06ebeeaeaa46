"""Client hooks as one process sends them: from the process that holds the job."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable

import pytest
from sqlalchemy.exc import OperationalError

from relay.config import HooksConfig
from relay.core.egress import Egress
from relay.core.events import JobEvent
from relay.core.notify import Notifier
from relay.domain import FailureCode
from relay.store.jobs import JobRow, JobState
from relay.store.leases import Leases
from tests.helpers import Receiver, serve
from tests.unit.test_tracker import World, world

pytestmark = pytest.mark.anyio
__all__ = ["world"]  # the fixture


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def notifier_of(world: World, config: HooksConfig) -> Notifier:
    """This process's client hooks, to loopback receivers, with a task rendered as its id, status and progress."""
    notifier = Notifier(
        config=config,
        egress=Egress(allow_private=True, allow_hosts=[]),
        events=world.events,
        store=world.store,
        metrics=world.pool.metrics,
        clock=world.clock,
    )
    notifier.render = lambda row, base, now: {"id": row.id, "status": row.state.value, "progress": row.progress}
    return notifier


async def test_a_watch_on_a_job_another_live_process_holds_stops_without_sending(world: World) -> None:
    """This process watched two jobs' hooks; another process took one over (a confirmation written there, or an
    adoption while this one stalled) and sends its hooks itself. At the job's next change this process stops
    watching it and sends nothing; the job it still holds goes on."""
    receiver = Receiver()
    notifier = notifier_of(world, HooksConfig())
    with serve(receiver.app()) as hooks:
        mine, theirs = await world.submit("kept here"), await world.submit("taken over")
        for job_id in (mine, theirs):
            notifier.watch(job_id, hooks + "/ok", "a-hook-secret", "http://relay", world.key_id)
        world.clock.advance(31)  # this process stalled past its leases; the other one takes one job
        other = Leases(world.store.engine, "another-process", 30)
        assert [row.id for row in await other.claim([theirs], world.clock.now())] == [theirs]
        await Leases(world.store.engine, world.store.owner, 30).renew(world.clock.now())
        for job_id in (mine, theirs):
            world.events.publish(JobEvent(job_id, JobState.SUBMITTED, 0))
        await until(lambda: len(receiver.tasks(mine)) == 1 and notifier.watching() == 1)
        assert receiver.tasks(theirs) == []
        await notifier.close()


async def test_a_delivery_being_retried_stops_when_another_process_takes_the_job(world: World) -> None:
    """A delivery failed and waits to be tried again; meanwhile another process takes the job over and sends its
    newer states itself. The old state is not tried again, so the receiver never sees the job step back."""
    receiver = Receiver()
    notifier = notifier_of(world, HooksConfig(attempts=3, backoff_s=1))
    with serve(receiver.app()) as hooks:
        job = await world.submit("taken over while retried")
        notifier.watch(job, hooks + "/fail", "a-hook-secret", "http://relay", world.key_id)
        world.events.publish(JobEvent(job, JobState.SUBMITTED, 0))
        await until(lambda: len(receiver.failed) == 1 and bool(world.clock._sleepers))  # waiting to try again
        other = Leases(world.store.engine, "another-process", 30)
        assert [row.id for row in await other.claim([job], world.clock.now() + 31)] == [job]
        world.clock.advance(1)
        worker = notifier._watches[job].worker
        assert worker is not None
        await until(worker.done)
        assert len(receiver.failed) == 1
        await notifier.close()


async def test_a_hook_url_s_credentials_reach_its_receiver_over_the_checked_address(world: World) -> None:
    """A receiver behind basic auth is named with its credentials (`http://user:pass@host/...`). Delivered to the
    address that was checked (its network is allowed, not every private address), the delivery carries them as
    it does when no check applies, or the receiver refuses every delivery."""
    receiver = Receiver()
    notifier = notifier_of(world, HooksConfig())
    notifier.egress = Egress(allow_private=False, allow_hosts=["127.0.0.0/8"])
    with serve(receiver.app()) as hooks:
        job = await world.submit("behind basic auth")
        url = hooks.replace("http://", "http://hook-user:s3cr%40t@") + "/ok"
        assert await notifier.check(url, world.key_id) == url
        notifier.watch(job, url, "a-hook-secret", "http://relay", world.key_id)
        world.events.publish(JobEvent(job, JobState.SUBMITTED, 0))
        await until(lambda: len(receiver.tasks(job)) == 1)
        ((headers, _),) = receiver.deliveries
        assert headers["authorization"] == "Basic " + base64.b64encode(b"hook-user:s3cr@t").decode()
        assert headers["host"] == hooks.removeprefix("http://")
        await notifier.close()


async def test_a_job_s_end_is_delivered_after_a_read_of_it_failed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database did not answer the read that follows the job's end (a restart, a failover): no other change
    of the job will come to bring its end, so the read is made again shortly and the end delivered."""
    receiver = Receiver()
    notifier = notifier_of(world, HooksConfig())
    reads = 0
    read = world.store.get

    async def flaky(job_id: str) -> JobRow | None:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise OperationalError("SELECT", {}, ConnectionError("the connection was closed"))
        return await read(job_id)

    with serve(receiver.app()) as hooks:
        job = await world.submit("ends while the database restarts")
        notifier.watch(job, hooks + "/ok", "a-hook-secret", "http://relay", world.key_id)
        watch = notifier._watches[job]
        monkeypatch.setattr(world.store, "get", flaky)
        await world.tracker.finisher.end(job, succeeded=False, error_code=FailureCode.FAILED, fail_reason="no")
        worker = watch.worker
        assert worker is not None
        await until(lambda: bool(world.clock._sleepers) or worker.done(), 2)
        world.clock.advance(1)
        await until(lambda: len(receiver.tasks(job)) == 1, 2)
        assert receiver.tasks(job)[0]["status"] == "FAILED"
        await until(lambda: notifier.watching() == 0)
        await notifier.close()


async def test_a_job_s_end_at_shutdown_is_not_queued_behind_running_jobs_deliveries(world: World) -> None:
    """The key's receiver for some running jobs takes each delivery and never answers; they hold the key's one
    delivery place and queue for it. A job of the same key ends, its hook on a receiver that answers, and the
    process stops: nobody else sends that end, and it has one delivery's tries to go. The running jobs'
    deliveries (their later states come from the process that follows them next) went on first, each waiting its
    whole timeout, and the end was dropped before it ever got the place."""
    receiver = Receiver()
    notifier = notifier_of(world, HooksConfig(timeout_s=1, attempts=1, max_concurrent_per_key=1))
    held: list[asyncio.StreamWriter] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(asyncio.CancelledError):  # cancelled as the test's loop closes
            await asyncio.Event().wait()

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    black_hole = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/h"
    try:
        with serve(receiver.app()) as hooks:
            running = [await world.submit(f"running {index}") for index in range(4)]
            ending = await world.submit("ends as the process stops")
            for job_id in running:
                notifier.watch(job_id, black_hole, "a-hook-secret", "http://relay", world.key_id)
                world.events.publish(JobEvent(job_id, JobState.SUBMITTED, 0))
            await until(lambda: len(held) == 1)  # the first holds the place, the others wait for it
            notifier.watch(ending, hooks + "/ok", "a-hook-secret", "http://relay", world.key_id)
            await world.tracker.finisher.end(ending, succeeded=False, error_code=FailureCode.FAILED, fail_reason="no")
            await asyncio.sleep(0.1)  # its delivery waits for the key's place
            await notifier.close()
            assert [task["status"] for task in receiver.tasks(ending)] == ["FAILED"]
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
