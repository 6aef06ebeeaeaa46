"""In-process notice of job changes: whoever waits on a job (a request, a stream) subscribes before the job is
submitted, and every change the relay writes is published here right after it is written."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
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


class Subscription:
    def __init__(self, hub: JobEvents, job_ids: tuple[str, ...]) -> None:
        self.hub = hub
        self.job_ids = job_ids
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()

    async def next(self, timeout: float) -> JobEvent | None:
        """The next event, or None when `timeout` seconds pass without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)


class JobEvents:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}

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
            subscription.queue.put_nowait(event)

    def __len__(self) -> int:
        return len(self._subscribers)
