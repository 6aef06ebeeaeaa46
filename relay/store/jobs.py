"""Jobs, and the quota held for them.

A job moves `PENDING -> SUBMITTED -> IN_PROGRESS -> SUCCEEDED | FAILED`. Every move is one guarded UPDATE
(`... WHERE id = :id AND state IN (:allowed)`); when no row changes, someone else already moved the job and the
caller does nothing.

Money rides on the same statements. `open` holds the price of every job of a request with one conditional UPDATE of
the key (`held = held + :total WHERE balance - held >= :total`, never read-then-write) in the transaction that
inserts the jobs. `finish` moves a job to its end and, in the same transaction, captures its hold (success) or
releases it (any other end); the job's own guard makes each happen at most once. This is the seam where a ledger
of every movement is appended.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.tables import jobs, keys


class JobState(StrEnum):
    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    IN_PROGRESS = "IN_PROGRESS"
    MODAL = "MODAL"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


ACTIVE = (JobState.PENDING, JobState.SUBMITTED, JobState.IN_PROGRESS, JobState.MODAL)
RUNNING = (JobState.SUBMITTED, JobState.IN_PROGRESS, JobState.MODAL)


@dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    request_id: str
    model: str
    mode: str
    bot: str
    action: str
    prompt: str
    price: int
    deadline_at: float
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    request_id: str
    key_id: str
    model: str
    mode: str
    bot: str
    action: str
    prompt: str
    state: JobState
    progress: int
    provider: str | None
    upstream_id: str | None
    upstream_image_url: str | None
    buttons: list[dict[str, Any]]
    error_code: str | None
    fail_reason: str | None
    price: int
    hold_state: str
    parent_id: str | None
    grid_width: int | None
    grid_height: int | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    finished_at: float | None
    deadline_at: float


@dataclass(frozen=True, slots=True)
class ProgressChange:
    job_id: str
    state: JobState
    progress: int


def _row(row: Any) -> JobRow:
    data = dict(row._mapping)
    data["state"] = JobState(data["state"])
    data["buttons"] = json.loads(data["buttons"]) if data.get("buttons") else []
    return JobRow(**data)


class JobStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def open(self, key_id: str, new_jobs: Sequence[NewJob], now: float) -> bool:
        """Hold the price of every job and insert them, in one transaction; False (and nothing changed) when the
        key's available balance is short or the key is revoked."""
        total = sum(job.price for job in new_jobs)
        async with self.engine.begin() as conn:
            held = await conn.execute(
                update(keys)
                .where(keys.c.id == key_id, keys.c.revoked_at.is_(None), keys.c.balance - keys.c.held >= total)
                .values(held=keys.c.held + total)
            )
            if held.rowcount != 1:
                return False
            await conn.execute(
                jobs.insert(),
                [
                    {
                        "id": job.id,
                        "request_id": job.request_id,
                        "key_id": key_id,
                        "model": job.model,
                        "mode": job.mode,
                        "bot": job.bot,
                        "action": job.action,
                        "prompt": job.prompt,
                        "state": JobState.PENDING.value,
                        "progress": 0,
                        "price": job.price,
                        "hold_state": "held",
                        "parent_id": job.parent_id,
                        "created_at": now,
                        "updated_at": now,
                        "deadline_at": job.deadline_at,
                    }
                    for job in new_jobs
                ],
            )
        return True

    async def mark_submitted(self, job_id: str, provider: str, upstream_id: str, now: float) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.PENDING.value)
                .values(
                    state=JobState.SUBMITTED.value,
                    provider=provider,
                    upstream_id=upstream_id,
                    submitted_at=now,
                    updated_at=now,
                )
            )
        return bool(result.rowcount == 1)

    async def record_progress(self, changes: Sequence[ProgressChange], now: float) -> None:
        """Many running jobs' progress in one transaction; jobs that already ended are left alone."""
        if not changes:
            return
        statement = (
            update(jobs)
            .where(jobs.c.id == bindparam("job_id"), jobs.c.state.in_([s.value for s in RUNNING]))
            .values(state=bindparam("new_state"), progress=bindparam("new_progress"), updated_at=now)
        )
        params = [{"job_id": c.job_id, "new_state": c.state.value, "new_progress": c.progress} for c in changes]
        async with self.engine.begin() as conn:
            await conn.execute(statement, params)

    async def record_result(self, job_id: str, image_url: str, buttons: Sequence[dict[str, Any]], now: float) -> None:
        """The upstream finished: remember where its image is (internal only) before it is downloaded."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_([s.value for s in RUNNING]))
                .values(
                    state=JobState.IN_PROGRESS.value,
                    progress=100,
                    upstream_image_url=image_url,
                    buttons=json.dumps(list(buttons)),
                    updated_at=now,
                )
            )

    async def finish(
        self,
        job_id: str,
        *,
        succeeded: bool,
        now: float,
        error_code: str | None = None,
        fail_reason: str | None = None,
        grid: tuple[int, int] | None = None,
    ) -> JobRow | None:
        """End a job and settle its hold (capture on success, release otherwise), exactly once: None when the job
        had already ended."""
        values: dict[str, Any] = {
            "state": (JobState.SUCCEEDED if succeeded else JobState.FAILED).value,
            "hold_state": "captured" if succeeded else "released",
            "error_code": error_code,
            "fail_reason": fail_reason,
            "finished_at": now,
            "updated_at": now,
        }
        if succeeded:
            values["progress"] = 100
        if grid is not None:
            values["grid_width"], values["grid_height"] = grid
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.state.in_([s.value for s in ACTIVE]),
                        jobs.c.hold_state == "held",
                    )
                    .values(**values)
                    .returning(*jobs.c)
                )
            ).first()
            if row is None:
                return None
            price = int(row.price)
            if price:
                settle = {"held": keys.c.held - price}
                if succeeded:
                    settle["balance"] = keys.c.balance - price
                await conn.execute(update(keys).where(keys.c.id == row.key_id).values(**settle))
        return _row(row)

    async def get(self, job_id: str) -> JobRow | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return _row(row) if row is not None else None

    async def by_request(self, request_id: str) -> list[JobRow]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(jobs).where(jobs.c.request_id == request_id).order_by(jobs.c.id))).all()
        return [_row(row) for row in rows]

    async def active(self) -> list[JobRow]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(jobs).where(jobs.c.state.in_([s.value for s in ACTIVE])))).all()
        return [_row(row) for row in rows]
