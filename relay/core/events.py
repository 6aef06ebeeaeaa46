"""In-process notice of job changes: whoever waits on a job (a request, a stream) subscribes before the job is
submitted, and every change the relay writes is published here right after it is written."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay.store.jobs import JobRow, JobState


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A change of one job; an ending carries the job as it was written."""

    job_id: str
    state: JobState
    progress: int
    error_code: str | None = None
    row: JobRow | None = None
    remote: bool = False  # heard from another relay process (`core.broadcast`), not written here


class Subscription:
    """Events for one waiter, in order. Waiting is on one future with a timer: a thousand waiters woken together
    resume at once, with no task made per wait."""

    def __init__(self, hub: JobEvents, job_ids: tuple[str, ...]) -> None:
        self.hub = hub
        self.job_ids = job_ids
        self._events: deque[JobEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.endings_only = False  # a waiter that shows no progress is woken by endings alone

    def put(self, event: JobEvent) -> None:
        if self.endings_only and not event.state.terminal:
            return
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float) -> JobEvent | None:
        """The next event, or None when `timeout` seconds pass without one."""
        if not self._events:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._events:
                return None
        return self._events.popleft()

    def close(self) -> None:
        self.hub.unsubscribe(self)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class JobEvents:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self._listeners: list[Callable[[JobEvent], None]] = []

    def listen(self, callback: Callable[[JobEvent], None]) -> None:
        """Call `callback` with every event of every job (it must not block: it runs inside `publish`)."""
        self._listeners.append(callback)

    def subscribe(self, job_ids: Iterable[str]) -> Subscription:
        subscription = Subscription(self, tuple(job_ids))
        for job_id in subscription.job_ids:
            self._subscribers.setdefault(job_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        for job_id in subscription.job_ids:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[job_id]

    def publish(self, event: JobEvent) -> None:
        for subscription in self._subscribers.get(event.job_id, ()):
            subscription.put(event)
        for listener in self._listeners:
            listener(event)

    def __len__(self) -> int:
        return len(self._subscribers)
