"""Ending jobs: the guarded write that also settles each quota hold, then the event, the metric and the log line.
Whoever ends a job (the tracker, or the job service when no provider took it) goes through here. Endings are
group-committed (`core.batch`): a thousand jobs that finish together are ended by a few statements.
"""

from __future__ import annotations

import logging

from relay.clock import Clock
from relay.core.batch import Batcher
from relay.core.events import JobEvent, JobEvents
from relay.core.text import storable
from relay.domain import FailureCode
from relay.logs import event
from relay.metrics import Metrics
from relay.store.jobs import Ending, JobRow, JobStore

log = logging.getLogger("relay.jobs")


class Finisher:
    def __init__(self, store: JobStore, events: JobEvents, metrics: Metrics, clock: Clock) -> None:
        self.store = store
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self._write: Batcher[Ending, JobRow | None] = Batcher(self._end_all, "finisher")

    async def end(
        self, job_id: str, *, succeeded: bool, error_code: FailureCode | None = None, fail_reason: str | None = None
    ) -> JobRow | None:
        """The ended job, or None when it had already ended (nothing was settled twice)."""
        return await self._write(self.ending(job_id, succeeded, error_code, fail_reason))

    async def end_many(self, endings: list[Ending]) -> list[JobRow | None | Exception]:
        """End several jobs in one group commit (see `end`; `ending` makes each, with what the upstream gave for
        a job it finished): each one's outcome, or why it could not be written."""
        return await self._write.each(endings)

    @staticmethod
    def ending(
        job_id: str,
        succeeded: bool,
        error_code: FailureCode | None = None,
        fail_reason: str | None = None,
        *,
        image_url: str | None = None,
        buttons: str | None = None,
        text: str | None = None,
    ) -> Ending:
        """How a job ends, as every database takes it: what an upstream said is made storable, since one bad
        string must not leave a job that can never be ended (and its hold never settled)."""
        code = error_code.value if error_code is not None else None
        return Ending(job_id, succeeded, code, storable(fail_reason), storable(image_url), buttons, storable(text))

    async def _end_all(self, endings: list[Ending]) -> list[JobRow | None]:
        rows = await self.store.finish_many(endings, self.clock.now())
        for ending, row in zip(endings, rows, strict=True):
            if row is not None:
                self._announce(ending, row)
        found_ended = [ending.job_id for ending, row in zip(endings, rows, strict=True) if row is None]
        if found_ended:
            await self.tell_ended(found_ended)
        return rows

    async def tell_ended(self, job_ids: list[str]) -> None:
        """Tell whoever waits of the end of jobs an ending found ended already. That end may be this process's own
        earlier write, which landed as its connection was cut before the commit was answered (a failover, a pooler
        or a firewall closing it): it was taken for failed and announced to nobody, so without this the waiters,
        client hooks and other processes would hear of it only from a later read of their own, or never. Hearing
        of an end twice (another writer announced it) changes nothing for them. The jobs are read back together,
        in one statement: this runs in the batch's turn, which the next batch waits for."""
        try:
            rows = await self.store.get_many(job_ids)  # each job once, however many endings found it ended
        except Exception:  # the ends are written: waiters read them after a quiet spell
            log.warning("reading jobs found ended failed", exc_info=True, extra={"fields": {"jobs": job_ids[:20]}})
            return
        for row in rows:
            if row.state.terminal:
                self.events.publish(JobEvent(row.id, row.state, row.progress, row.error_code, row))

    def _announce(self, ending: Ending, row: JobRow) -> None:
        outcome = "succeeded" if ending.succeeded else (ending.error_code or "failed")
        seconds = max(0.0, (row.finished_at or row.updated_at) - row.created_at)
        self.metrics.of(self.metrics.jobs, row.model, row.action, row.provider or "none", outcome).inc()
        self.metrics.of(self.metrics.job_seconds, row.model, outcome).observe(seconds)
        self.metrics.settled(row.model, row.action, row.hold_state == "captured", row.price)
        self.events.publish(JobEvent(row.id, row.state, row.progress, ending.error_code, row))
        event(
            log,
            "job ended",
            job=row.id,
            kind=row.action,
            state=row.state.value,
            outcome=outcome,
            provider=row.provider,
            hold=row.hold_state,
            seconds=round(seconds, 3),
        )

    async def close(self) -> None:
        await self._write.close()
