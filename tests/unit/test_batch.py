from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy.exc import OperationalError

from relay.core.batch import Batcher
from relay.store.db import Unreachable

pytestmark = pytest.mark.anyio


async def test_concurrent_calls_share_a_write_and_get_their_own_result() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [item * 10 for item in items]

    batcher: Batcher[int, int] = Batcher(flush, "test")
    assert await asyncio.gather(*(batcher(i) for i in range(50))) == [i * 10 for i in range(50)]
    assert batches == [list(range(50))]  # all queued before the write began: one write
    await batcher.close()


@pytest.mark.parametrize("way", ["call", "each"])
async def test_a_caller_resumes_in_the_turn_of_the_loop_after_its_write(way: str) -> None:
    """A caller goes on in the turn after its write, with `each` too: each wrapper around its future (a shield, a
    gather) would hold it one turn more, and every group-committed step (a job's mark before its request leaves, an
    admission, an ending) with it. A callback the write schedules runs in that next turn, and one it schedules in
    turn in the one after: the caller must come before the latter."""
    loop = asyncio.get_running_loop()
    events: list[str] = []

    def next_turn() -> None:
        events.append("next turn")
        loop.call_soon(events.append, "the turn after")

    async def flush(items: list[int]) -> list[int]:
        events.append("written")
        loop.call_soon(next_turn)
        return items

    batcher: Batcher[int, int] = Batcher(flush, "test")
    if way == "call":
        assert await batcher(1) == 1
    else:
        assert await batcher.each([1, 2]) == [1, 2]
    events.append("caller")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert events == ["written", "next turn", "caller", "the turn after"]
    await batcher.close()


async def test_a_failed_write_fails_its_callers_and_the_next_batch_goes_on() -> None:
    async def flush(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        if 0 in items:
            raise RuntimeError("disk full")
        return items

    batcher: Batcher[int, int] = Batcher(flush, "test")
    first = asyncio.ensure_future(batcher(0))
    await asyncio.sleep(0)
    rest = asyncio.gather(*(batcher(i) for i in range(1, 4)))
    with pytest.raises(RuntimeError):
        await first
    assert await rest == [1, 2, 3]


async def test_a_caller_that_leaves_does_not_stop_the_write() -> None:
    written: list[int] = []

    async def flush(items: list[int]) -> list[int]:
        await asyncio.sleep(0.02)
        written.extend(items)
        return items

    batcher: Batcher[int, int] = Batcher(flush, "test")
    leaving = asyncio.ensure_future(batcher(7))
    await asyncio.sleep(0.005)
    leaving.cancel()
    await batcher.close()
    assert written == [7]


async def test_a_flush_that_answers_wrongly_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    async def flush(items: list[int]) -> list[int]:
        return items[:-1]  # one result short

    batcher: Batcher[int, int] = Batcher(flush, "test")
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await asyncio.wait_for(asyncio.gather(batcher(1), batcher(2)), 5)


async def test_one_item_that_cannot_be_written_fails_alone_and_its_neighbours_are_written() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0)
        if 13 in items:  # one bad row fails the whole transaction it is part of
            raise ValueError("cannot store 13")
        return [item * 10 for item in items]

    batcher: Batcher[int, int] = Batcher(flush, "test")
    results = await asyncio.gather(*(batcher(i) for i in (11, 12, 13, 14)), return_exceptions=True)
    assert results[:2] == [110, 120] and results[3] == 140
    assert isinstance(results[2], ValueError)
    assert batches[0] == [11, 12, 13, 14] and sorted(map(tuple, batches[1:])) == [(11,), (12,), (13,), (14,)]


async def test_a_batch_refused_for_a_held_lock_fails_whole_without_trying_each_item() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        raise OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))

    batcher: Batcher[int, int] = Batcher(flush, "test")
    results = await asyncio.gather(*(batcher(i) for i in (1, 2, 3)), return_exceptions=True)
    assert all(isinstance(r, OperationalError) for r in results)
    assert batches == [[1, 2, 3]]  # not written again one by one, each waiting for the lock


async def test_one_caller_s_items_go_in_one_batch_and_each_fails_alone() -> None:
    """`many` and `each` queue several items at once: one write for all; a bad item fails alone (`each` gives its
    failure in its place, `many` raises it)."""
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        if 13 in items:
            raise ValueError("thirteen")
        return [item * 10 for item in items]

    batcher: Batcher[int, int] = Batcher(flush, "test")
    assert await batcher.many([1, 2, 3]) == [10, 20, 30]
    assert batches == [[1, 2, 3]]
    outcomes = await batcher.each([4, 13, 5])
    assert outcomes[0] == 40 and outcomes[2] == 50 and isinstance(outcomes[1], ValueError)
    assert batches[1:] == [[4, 13, 5], [4], [13], [5]]  # the batch failed: each item again, alone
    with pytest.raises(ValueError):
        await batcher.many([6, 13])
    await batcher.close()


async def test_with_an_interval_items_after_a_write_wait_for_the_next_window_together() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        return items

    batcher: Batcher[int, int] = Batcher(flush, "test", every_s=0.05)
    assert await batcher(1) == 1  # after a quiet spell: written at the next turn, alone
    second = asyncio.ensure_future(batcher(2))
    for _ in range(5):  # turns of the loop that, without the interval, would each have written what came
        await asyncio.sleep(0)
    third = asyncio.ensure_future(batcher(3))
    assert await asyncio.gather(second, third) == [2, 3]
    assert batches == [[1], [2, 3]]
    await batcher.close()


@pytest.mark.parametrize(
    "error",
    [
        Unreachable("the database did not answer: TimeoutError"),
        OperationalError("UPDATE", {}, ConnectionResetError("connection was closed"), connection_invalidated=True),
    ],
    ids=["unreachable", "connection-invalidated"],
)
async def test_a_batch_the_database_could_not_serve_fails_whole_at_once(error: Exception) -> None:
    """A silent network makes every transaction wait out the statement time limit before it fails: written again
    one by one, a batch of ten would keep its last caller (and every batch queued behind it) ten limits long."""
    batches: list[list[int]] = []
    limit_s = 0.2

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(limit_s)
        raise error

    batcher: Batcher[int, int] = Batcher(flush, "test")
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*(batcher(i) for i in range(10)), return_exceptions=True)
    assert loop.time() - started < 3 * limit_s
    assert all(result is error for result in results)
    assert batches == [list(range(10))]  # no item was at fault: none is written again alone
    assert await batcher.each([10, 11]) == [error, error]  # `each` gives every item the failure, too
    with pytest.raises(type(error)):
        await batcher.many([12, 13])
    assert batches[1:] == [[10, 11], [12, 13]]
    await batcher.close()
