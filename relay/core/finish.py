"""Ending a job: the guarded write that also settles its quota hold, then the event, the metric and the log line.
Whoever ends a job (the tracker, or the job service when no provider took it) goes through here."""

from __future__ import annotations

import logging

from relay.clock import Clock
from relay.core.events import JobEvent, JobEvents
from relay.logs import event
from relay.metrics import Metrics
from relay.store.jobs import JobRow, JobStore

log = logging.getLogger("relay.jobs")


class Finisher:
    def __init__(self, store: JobStore, events: JobEvents, metrics: Metrics, clock: Clock) -> None:
        self.store = store
        self.events = events
        self.metrics = metrics
        self.clock = clock

    async def end(
        self,
        job_id: str,
        *,
        succeeded: bool,
        error_code: str | None = None,
        fail_reason: str | None = None,
        grid: tuple[int, int] | None = None,
    ) -> JobRow | None:
        """None when the job had already ended (someone else's write won; nothing was settled twice)."""
        now = self.clock.now()
        row = await self.store.finish(
            job_id, succeeded=succeeded, now=now, error_code=error_code, fail_reason=fail_reason, grid=grid
        )
        if row is None:
            return None
        outcome = "succeeded" if succeeded else (error_code or "failed")
        self.metrics.jobs.labels(row.model, row.provider or "none", outcome).inc()
        self.metrics.job_seconds.labels(row.model, outcome).observe(max(0.0, now - row.created_at))
        self.events.publish(JobEvent(job_id, row.state, row.progress, error_code))
        event(
            log,
            "job ended",
            job=job_id,
            state=row.state.value,
            outcome=outcome,
            provider=row.provider,
            hold=row.hold_state,
            seconds=round(now - row.created_at, 3),
        )
        return row
