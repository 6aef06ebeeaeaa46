"""Group commit: concurrent calls that each need one write are written together.

Each caller queues its item and waits. One drain task hands everything queued so far to `flush`, which writes it
in one transaction and returns one result per item, and wakes the callers; items queued meanwhile form the next
batch. The drain lets one turn of the event loop pass before it takes a batch, and under load (the last batch
held more than one item) waits `LOADED_WAIT_S`, so that batches fill. Under no load a batch is one item and costs
nothing extra; under load a thousand writes become a few dozen.

A Batcher made with `every_s` starts a write at most that often instead: an item that comes after a quiet spell is
written at the next turn of the loop, and what comes within `every_s` of a write's start waits for the next one.
That is for writes whose callers can wait that long and that come steadily rather than together, such as the
progress that upstream hooks report all through a job: spread over a burst's seconds, they never fill a batch
within `LOADED_WAIT_S`, and each transaction costs far more than its rows. A Batcher made with `patient=False` never
waits for company: each write takes what came by the next turn of the loop. That is for writes a scarce resource
waits on (a connection to an upstream held while its job's mark is written): the wait would be paid by every
caller queued behind that resource, in turn.

One caller's bad item must not fail its neighbours: when a batch of several fails, its transaction was rolled back,
and each item is written again on its own, so only the item that cannot be written fails (every flush of the relay
is safe to repeat: its writes are guarded by the rows' own states). A batch that failed because the database could
not serve it now (`store.db.unavailable`: unreachable, a connection cut, a statement past its time limit, SQLite's
file locked by another process) fails whole, every item with that error, at once: no item of it is at fault, and
each written again alone would wait out the same failure in turn (on a silent network, a statement time limit
each, and the batches queued behind them with it). Its callers take it as they take a write of their own that
could not be made: a 503 for a request, a later try for the background loops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from relay.store.db import unavailable

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")
# How long a batch waits for company under load. A flush costs about a millisecond of CPU whatever its size, and
# SQLite statements run on the loop's thread without giving it up, so batches would otherwise hold only what one
# turn of the loop brought (a few items) and a burst would pay for hundreds of flushes; waiting this long makes
# them several times larger, at this much more latency for the items that wait.
LOADED_WAIT_S = 0.01


class Batcher(Generic[I, R]):
    def __init__(
        self,
        flush: Callable[[list[I]], Awaitable[list[R]]],
        name: str,
        *,
        every_s: float | None = None,
        patient: bool = True,
    ) -> None:
        self._flush = flush
        self._name = name
        self.every_s = every_s  # None: a write as soon as a turn has passed (and LOADED_WAIT_S under load)
        self._loaded_wait_s = LOADED_WAIT_S if patient else 0.0
        self._last_write = float("-inf")  # when the last write started, by the loop's clock (with `every_s`)
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def __call__(self, item: I) -> R:
        # The write goes on even if this caller is cancelled: others share it, and the batch holds the item whatever
        # becomes of its future (one cancelled is left as it is). The future is awaited bare: wrapped (a shield, a
        # gather), each layer would put one more turn of the loop between the write and its caller.
        return await self._queued(item)

    async def many(self, items: list[I]) -> list[R]:
        """Several items of one caller, in the same batch: their results in order, or the first failure."""
        results: list[R] = []
        for outcome in await self.each(items):
            if isinstance(outcome, Exception):
                raise outcome
            results.append(outcome)
        return results

    async def each(self, items: list[I]) -> list[R | Exception]:
        """Several items of one caller, in the same batch: each one's result or failure, in order."""
        futures = [self._queued(item) for item in items]
        settled: list[R | Exception] = []
        for future in futures:  # one batch: once the first is settled, so are the others (unless it was split)
            try:
                settled.append(await future)
            except Exception as exc:
                settled.append(exc)
        return settled

    def _queued(self, item: I) -> asyncio.Future[R]:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._write_all(), name=self._name)
        return future

    async def _write_all(self) -> None:
        last = 1
        loop = asyncio.get_running_loop()
        while self._queue:
            # Let the callers of this turn of the loop join the batch; under load (the last batch had company),
            # those of the next few milliseconds too; with `every_s`, those until that long after the last write.
            if self.every_s is not None:
                await asyncio.sleep(max(0.0, self._last_write + self.every_s - loop.time()))
                self._last_write = loop.time()
            else:
                await asyncio.sleep(self._loaded_wait_s if last > 1 else 0)
            batch, self._queue = self._queue, []
            last = len(batch)
            try:
                await self._write(batch)
            except Exception as exc:
                if len(batch) == 1:
                    continue
                # Not one item's fault: the database could not serve the batch (unreachable, too slow, its file
                # locked by another process). Written one by one, each item would wait out the same failure in
                # turn, and the batches queued behind them with it.
                if unavailable(exc):
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                            future.exception()
                    continue
                for single in batch:  # find the item that cannot be written; the others go through
                    with contextlib.suppress(Exception):
                        await self._write([single])

    async def _write(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        """Flush one batch and settle its callers; a failure settles them with the error only when the batch is one
        item (a larger one is split by the caller) and is raised either way."""
        try:
            results = list(await self._flush([item for item, _ in batch]))
            if len(results) != len(batch):  # a broken flush must not leave its callers waiting forever
                raise RuntimeError(f"{self._name}: {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                _, future = batch[0]
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved here too, so a caller that went away leaves no warning
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        """Wait until what is queued has been written."""
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain
