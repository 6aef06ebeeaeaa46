"""Jobs, and the quota held for them.

A job moves `PENDING -> SUBMITTED -> IN_PROGRESS -> SUCCEEDED | FAILED`; a follow-up the upstream parks for a
confirmation goes `PENDING -> MODAL -> SUBMITTED -> ...`. Every move is one guarded UPDATE
(`... WHERE id = :id AND state IN (:allowed)`); when no row changes, someone else already moved the job and the
caller does nothing.

Money rides on the same statements. `open` holds the price of every job of a request with one conditional UPDATE of
the key (`held = held + :total WHERE balance - held >= :total`, never read-then-write) in the transaction that
inserts the jobs. `finish` moves a job to its end and, in the same transaction, captures its hold (success) or
releases it (any other end); the job's own guard makes each happen at most once. Each movement is also a ledger row
(`store.ledger`) written in the same transaction, set-based: one executemany of the holds a batch admitted, one of
the captures and releases a batch of endings made (only for the jobs the guarded UPDATE actually ended).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Float, String, and_, bindparam, case, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.domain import ACTIVE_STATES as ACTIVE
from relay.domain import RUNNING_STATES as RUNNING
from relay.domain import TASKS, FailureCode, JobState, TaskKind, TaskSpec
from relay.store.db import changed, connected, transaction
from relay.store.ledger import ENTRIES, entry
from relay.store.many import Many
from relay.store.tables import jobs, keys

log = logging.getLogger("relay.jobs")

__all__ = [
    "ACTIVE",
    "RUNNING",
    "Admission",
    "Ending",
    "JobRow",
    "JobState",
    "JobStore",
    "NewJob",
    "ProgressChange",
    "Submitted",
]


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
    custom_id: str | None = None
    client_state: str | None = None
    notify_hook: str | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """One request's jobs, to be held and inserted together."""

    key_id: str
    jobs: tuple[NewJob, ...]

    @property
    def total(self) -> int:
        return sum(job.price for job in self.jobs)


@dataclass(frozen=True, slots=True)
class Submitted:
    job_id: str
    provider: str
    upstream_id: str


@dataclass(frozen=True, slots=True)
class Sending:
    """A job about to be sent to a provider (`JobStore.mark_sending_many`)."""

    job_id: str
    provider: str


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
    buttons_json: str | None
    error_code: str | None
    fail_reason: str | None
    price: int
    hold_state: str
    parent_id: str | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    finished_at: float | None
    deadline_at: float
    custom_id: str | None = None
    client_state: str | None = None
    notify_hook: str | None = None
    result_text: str | None = None
    started_at: float | None = None
    owner: str | None = None
    lease_until: float | None = None
    confirming_until: float | None = None
    confirmed_at: float | None = None

    @property
    def kind(self) -> TaskKind:
        return TaskKind(self.action)

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.kind]

    def held_elsewhere(self, owner: str, now: float) -> bool:
        """Whether a live process other than `owner` holds the job (its lease has not run out)."""
        return self.owner not in (None, owner) and (self.lease_until or 0.0) >= now

    @property
    def buttons(self) -> list[dict[str, Any]]:
        """The upstream's buttons of a finished job (read when asked: most readers never need them)."""
        return json.loads(self.buttons_json) if self.buttons_json else []


@dataclass(frozen=True, slots=True)
class ProgressChange:
    """A running job's new state and progress; `was`, the state its follower knew when it saw the change;
    `deadline_at`, the deadline it has from now on (a job the upstream parked in MODAL: its modal window)."""

    job_id: str
    state: JobState
    progress: int
    was: JobState
    deadline_at: float | None = None


@dataclass(frozen=True, slots=True)
class Ending:
    """How one job ends: succeeded (its hold is captured) or failed (its hold is released). A job the upstream
    finished also keeps the upstream's image URL (internal only), buttons (JSON) and text (its final prompt, or a
    text result)."""

    job_id: str
    succeeded: bool
    error_code: str | None = None
    fail_reason: str | None = None
    image_url: str | None = None
    buttons: str | None = None
    text: str | None = None


_FIELDS = tuple(field.name for field in fields(JobRow))
_STATE = _FIELDS.index("state")
# For each shape of result (its column names), where each of JobRow's fields is in it.
_POSITIONS: dict[tuple[str, ...], tuple[int, ...]] = {}


def _positions(names: tuple[str, ...]) -> tuple[int, ...]:
    """Where each of JobRow's fields is in a row of these column names."""
    positions = _POSITIONS.get(names)
    if positions is None:
        where = {("buttons_json" if name == "buttons" else name): i for i, name in enumerate(names)}
        positions = _POSITIONS[names] = tuple(where[name] for name in _FIELDS)
    return positions


def _made(row: Any, positions: tuple[int, ...]) -> JobRow:
    values = [row[i] for i in positions]
    values[_STATE] = JobState(values[_STATE])
    return JobRow(*values)


def row_of(row: Any) -> JobRow:
    """A job as read: a row of every column of `jobs`, in any order (made by position, several times faster than
    by name: a thousand jobs ending together are read back at once)."""
    return _made(row, _positions(row._fields))


def rows_of(rows: Sequence[Any]) -> list[JobRow]:
    """Jobs as read, the rows of one result (see `row_of`): the positions are looked up once."""
    if not rows:
        return []
    positions = _positions(rows[0]._fields)
    return [_made(row, positions) for row in rows]


# The statements of `finish_many`, made once: a thousand jobs ending together make a few dozen group commits, and
# building a statement costs more than running it.
_STILL_HELD = (jobs.c.state.in_([s.value for s in ACTIVE]), jobs.c.hold_state == "held")
_KEEP_RESULT = Many(  # many rows at once: no IN list, which an executemany cannot take
    update(jobs)
    .where(
        jobs.c.id == bindparam("job_id"), or_(*(jobs.c.state == s.value for s in ACTIVE)), jobs.c.hold_state == "held"
    )
    .values(
        upstream_image_url=bindparam("new_image_url"),
        buttons=bindparam("new_buttons"),
        result_text=bindparam("new_text"),
    ),
    ("job_id", "new_image_url", "new_buttons", "new_text"),
)


def _ending(succeeded: bool, *, overdue: bool = False, pending: bool = False) -> Any:
    """The set-based ending of jobs that succeeded or failed; `overdue`: failed for passing their deadline, which
    holds only while the stored deadline has passed (a confirmation written meanwhile moved it on); `pending`:
    failed as never submitted, which holds only while the job is still PENDING (an upstream hook may have adopted
    it, in any process, since the sweep read it)."""
    values: dict[str, Any] = {
        "state": (JobState.SUCCEEDED if succeeded else JobState.FAILED).value,
        "hold_state": "captured" if succeeded else "released",
        "error_code": bindparam("new_error"),
        "fail_reason": bindparam("new_reason"),
        "finished_at": bindparam("now"),
        "updated_at": bindparam("now"),
    }
    if succeeded:
        values["progress"] = 100
        # A job never seen running (its progress read or written after its end, or none read between its start and
        # its end) started by the time it ended: a finished task always has a start time.
        values["started_at"] = func.coalesce(jobs.c.started_at, bindparam("now"))
    where = [jobs.c.id.in_(bindparam("ids", expanding=True)), *_STILL_HELD]
    if overdue:
        where.append(jobs.c.deadline_at <= bindparam("now"))
    if pending:
        where.append(jobs.c.state == JobState.PENDING.value)
        # The process that ends a job another process left in its submit window is its last holder: the one that
        # sends its client hook (`core.notify`). Other endings are written by the job's holder, its owner already
        # (one written by a process that stalled past its lease leaves the owner that took the job meanwhile).
        values["owner"] = bindparam("me")
    return update(jobs).where(*where).values(**values).returning(*jobs.c)


_SUCCEED, _FAIL, _FAIL_OVERDUE = _ending(True), _ending(False), _ending(False, overdue=True)
# A failure whose ending holds only under a guard of its own, by its code.
_FAIL_GUARDED = {
    FailureCode.TIMEOUT.value: _FAIL_OVERDUE,
    FailureCode.INTERRUPTED.value: _ending(False, pending=True),
}
_SETTLE = (
    update(keys)
    .where(keys.c.id == bindparam("key"))
    .values(held=keys.c.held - bindparam("settled"), balance=keys.c.balance - bindparam("captured"))
)


# `record_progress`, made once: a job with progress hooks has eight or so written.
_PROGRESS = Many(
    update(jobs)
    # IN (...) expands its parameters, which executemany cannot do: spell the states out.
    .where(
        jobs.c.id == bindparam("job_id"),
        or_(*(jobs.c.state == s.value for s in RUNNING)),
        # two views applied at once may be written in either order: progress never goes back
        or_(jobs.c.state != bindparam("new_state"), jobs.c.progress <= bindparam("new_progress")),
        # a job is parked in MODAL only by the process that holds it, from the state it saw: a confirmation
        # written meanwhile (by this process or another) took it out of MODAL for good
        or_(
            bindparam("new_state", type_=String) != JobState.MODAL.value,
            and_(jobs.c.state == bindparam("was"), jobs.c.owner == bindparam("me")),
        ),
    )
    .values(
        state=bindparam("new_state"),
        progress=bindparam("new_progress"),
        updated_at=bindparam("now"),
        deadline_at=func.coalesce(bindparam("new_deadline", type_=Float), jobs.c.deadline_at),
        started_at=case(
            (
                jobs.c.started_at.is_(None) & (bindparam("new_state", type_=String) == JobState.IN_PROGRESS.value),
                bindparam("now"),
            ),
            else_=jobs.c.started_at,
        ),
    ),
    ("job_id", "new_state", "new_progress", "was", "new_deadline", "me", "now"),
)


_ADMITTED = (
    "id",
    "request_id",
    "key_id",
    "model",
    "mode",
    "bot",
    "action",
    "prompt",
    "price",
    "parent_id",
    "custom_id",
    "client_state",
    "notify_hook",
    "now",
    "deadline_at",
    "owner",
    "lease_until",
)
# The most ids one statement names in an `IN` list or an array (a round may end, a task list name, thousands).
_IDS_AT_ONCE = 500
# A job admitted: PENDING, its price held.
_ADMIT = Many(
    insert(jobs).values(
        {
            **{name: bindparam(name) for name in _ADMITTED if name != "now"},
            "state": JobState.PENDING.value,
            "progress": 0,
            "hold_state": "held",
            "created_at": bindparam("now"),
            "updated_at": bindparam("now"),
        }
    ),
    _ADMITTED,
)


def handed_over(owner: str, job_ids: Sequence[str] | None = None) -> Any:
    """The statement handing over the leases `owner` holds (of `job_ids` only, when given): claimed by another
    process at once."""
    held = update(jobs).where(jobs.c.owner == owner, jobs.c.state.in_([s.value for s in ACTIVE]))
    return (held if job_ids is None else held.where(jobs.c.id.in_(list(job_ids)))).values(lease_until=0.0)


class JobStore:
    """Jobs and their holds. `owner` is this relay process: a job it admits, submits, parks or adopts is written
    as followed by it for `lease_s` (renewed by `store.leases`). Once the process hands its leases over (`handing
    over`, at shutdown), a job it takes all the same (a submit answered only then) is handed over as it is written:
    nothing follows it here any more, and no other process must wait for that lease to run out."""

    def __init__(self, engine: AsyncEngine, owner: str = "", lease_s: float = 30.0) -> None:
        self.engine = engine
        self.owner = owner
        self.lease_s = lease_s
        self.handing_over = False

    async def open(self, key_id: str, new_jobs: Sequence[NewJob], now: float) -> bool:
        """Hold the price of every job and insert them; see `open_many`."""
        return (await self.open_many([Admission(key_id, tuple(new_jobs))], now))[0]

    async def open_many(self, admissions: Sequence[Admission], now: float) -> list[bool]:
        """Admit requests in one transaction: for each, hold the price of all its jobs and insert them, or (False)
        change nothing when the key's available balance is short, or the key is revoked or expired.

        Every hold is one conditional UPDATE (`held = held + :p WHERE balance - held >= :p`), never read-then-write.
        The requests of one key are first tried as one hold of their total; only when that does not fit is each
        tried alone, in order."""
        by_key: dict[str, list[int]] = {}
        for index, admission in enumerate(admissions):
            by_key.setdefault(admission.key_id, []).append(index)

        async def work(conn: AsyncConnection) -> list[bool]:
            admitted = [False] * len(admissions)

            async def hold(key_id: str, amount: int) -> bool:
                result = await conn.execute(
                    update(keys)
                    .where(
                        keys.c.id == key_id,
                        keys.c.revoked_at.is_(None),
                        or_(keys.c.expires_at.is_(None), keys.c.expires_at > now),
                        keys.c.balance - keys.c.held >= amount,
                    )
                    .values(held=keys.c.held + amount)
                )
                return bool(result.rowcount == 1)

            for key_id, indexes in sorted(by_key.items()):  # keys locked in one order everywhere: no deadlocks
                if len(indexes) > 1 and await hold(key_id, sum(admissions[i].total for i in indexes)):
                    for index in indexes:
                        admitted[index] = True
                    continue
                for index in indexes:
                    admitted[index] = await hold(key_id, admissions[index].total)
            held = [
                (admission.key_id, job)
                for admission, ok in zip(admissions, admitted, strict=True)
                if ok
                for job in admission.jobs
            ]
            if held:
                rows = [
                    (
                        job.id,
                        job.request_id,
                        key_id,
                        job.model,
                        job.mode,
                        job.bot,
                        job.action,
                        job.prompt,
                        job.price,
                        job.parent_id,
                        job.custom_id,
                        job.client_state,
                        job.notify_hook,
                        now,
                        job.deadline_at,
                        self.owner,
                        now + self.lease_s,
                    )
                    for key_id, job in held
                ]
                await _ADMIT.run(conn, rows)
                holds = [
                    entry("hold", key_id, job.price, now, job_id=job.id, model=job.model, action=job.action)
                    for key_id, job in held
                ]
                await ENTRIES.run(conn, holds)
            return admitted

        return await transaction(self.engine, work)

    def _taken(self, provider: Any, upstream_id: Any, now: float) -> dict[str, Any]:
        """What a PENDING job's row says once a provider took it: the provider, its task id, and that this process
        follows it (a fresh lease)."""
        return {
            "provider": provider,
            "upstream_id": upstream_id,
            "submitted_at": now,
            "owner": self.owner,
            "lease_until": now + self.lease_s,
            "updated_at": now,
        }

    async def mark_submitted(self, job_id: str, provider: str, upstream_id: str, now: float) -> None:
        await self.mark_submitted_many([Submitted(job_id, provider, upstream_id)], now)

    async def mark_submitted_many(self, items: Sequence[Submitted], now: float) -> list[None]:
        """PENDING -> SUBMITTED with the provider and its task id, for many jobs in one statement; a job that
        already ended is left alone."""
        statement = (
            update(jobs)
            .where(jobs.c.id == bindparam("job_id"), jobs.c.state == JobState.PENDING.value)
            .values(
                state=JobState.SUBMITTED.value,
                **self._taken(bindparam("new_provider"), bindparam("new_upstream_id"), now),
            )
        )
        params = [{"job_id": i.job_id, "new_provider": i.provider, "new_upstream_id": i.upstream_id} for i in items]
        if params:
            await changed(self.engine, statement, params)
            await self._hand_over_late([i.job_id for i in items])
        return [None] * len(items)

    async def mark_sending_many(self, items: Sequence[Sending], now: float) -> list[bool]:
        """Write, before each job's submit leaves, the provider it goes to on its PENDING row, and when (`updated_at`):
        whether each may be sent. Only a job still PENDING, still this process's and with no task noted is marked;
        one that is not (a process that took this one for gone claimed it as never sent, and ends it) must not be
        sent. So a PENDING job with no provider was never sent by anybody: when its process dies, another ends it at
        once (`Leases.claim_unsent`), where one that may have been sent waits for its hook, for its task to be looked
        up by its state once its submit is surely over (`core.maybe_sent`), or for the pending sweep. One statement
        per provider, in one transaction."""
        by_provider: dict[str, list[str]] = {}
        for item in items:
            by_provider.setdefault(item.provider, []).append(item.job_id)

        async def work(conn: AsyncConnection) -> list[bool]:
            marked: set[str] = set()
            for provider, ids in sorted(by_provider.items()):
                statement = (
                    update(jobs)
                    .where(
                        jobs.c.id.in_(ids),
                        jobs.c.state == JobState.PENDING.value,
                        jobs.c.owner == self.owner,
                        jobs.c.upstream_id.is_(None),
                    )
                    .values(provider=provider, updated_at=now)
                    .returning(jobs.c.id)
                )
                marked.update(row.id for row in await conn.execute(statement))
            return [item.job_id in marked for item in items]

        return await transaction(self.engine, work)

    async def adopt(self, job_id: str, provider: str, upstream_id: str, now: float) -> JobRow | None:
        """PENDING -> SUBMITTED for a job whose task a provider reports although its submit was never written down:
        the job as written, or None when it was not PENDING any more."""
        statement = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == JobState.PENDING.value)
            .values(state=JobState.SUBMITTED.value, **self._taken(provider, upstream_id, now))
            .returning(*jobs.c)
        )

        async def work(conn: AsyncConnection) -> list[JobRow]:
            return rows_of((await conn.execute(statement)).all())

        adopted = await transaction(self.engine, work)
        await self._hand_over_late([job_id])
        return adopted[0] if adopted else None

    async def note_task(self, job_id: str, provider: str, upstream_id: str, now: float) -> bool:
        """Write down the task a provider's hook names for a PENDING job whose submit is still waiting for its answer:
        should the process die before that answer, the job is running there, and whichever process claims it next
        follows it (`Leases.claim_expired`), instead of leaving it PENDING for the pending sweep while it runs."""
        statement = (
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.state == JobState.PENDING.value,
                jobs.c.upstream_id.is_(None),
                or_(jobs.c.provider.is_(None), jobs.c.provider == provider),
            )
            .values(provider=provider, upstream_id=upstream_id, updated_at=now)
        )
        return await changed(self.engine, statement) == 1

    async def park_modal(self, job_id: str, provider: str, upstream_id: str, deadline_at: float, now: float) -> bool:
        """PENDING -> MODAL: the upstream took the follow-up but waits for `submit/modal`; the job's deadline is
        now the time a confirmation may take."""
        statement = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == JobState.PENDING.value)
            .values(state=JobState.MODAL.value, deadline_at=deadline_at, **self._taken(provider, upstream_id, now))
        )
        parked = await changed(self.engine, statement) == 1
        await self._hand_over_late([job_id])
        return parked

    async def confirm_modal(
        self, job_id: str, upstream_id: str, deadline_at: float, now: float, prompt: str | None = None
    ) -> JobRow | None:
        """A confirmation the upstream took: MODAL -> SUBMITTED (or as a read already moved it, when the task started
        before this was written), with the upstream id it now has, the deadline it runs to, and its prompt. This
        process follows the job from now on (a fresh lease): the confirmation may have reached it while another
        followed the waiting job. The job as written, or None when it is no longer running."""
        was_modal = jobs.c.state == JobState.MODAL.value
        values: dict[str, Any] = {
            "state": case((was_modal, JobState.SUBMITTED.value), else_=jobs.c.state),
            "progress": case((was_modal, 0), else_=jobs.c.progress),
            "upstream_id": upstream_id,
            "updated_at": now,
            "deadline_at": deadline_at,
            "owner": self.owner,
            "lease_until": now + self.lease_s,
            "confirming_until": None,
            "confirmed_at": now,
        }
        if prompt:
            values["prompt"] = prompt
        running = [s.value for s in (JobState.MODAL, JobState.SUBMITTED, JobState.IN_PROGRESS)]
        statement = (
            update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(running)).values(**values).returning(*jobs.c)
        )

        async def work(conn: AsyncConnection) -> JobRow | None:
            row = (await conn.execute(statement)).first()
            return row_of(row) if row is not None else None

        confirmed = await transaction(self.engine, work)
        await self._hand_over_late([job_id])
        return confirmed

    async def _hand_over_late(self, job_ids: list[str]) -> None:
        """Hand over the leases of jobs just written as this process's, if it has begun handing its leases over.
        Looked at once the write is made, so that either the hand-over began after the write, and took these too,
        or this sees that it began. One that fails is logged, never raised: the write it follows was made (its
        caller must not take it for failed), and the leases run out as a stopped process's do."""
        if not self.handing_over:
            return
        try:
            await changed(self.engine, handed_over(self.owner, job_ids))
        except Exception:
            log.warning(
                "handing over jobs written while stopping failed; their leases run out",
                exc_info=True,
                extra={"fields": {"jobs": job_ids[:20]}},
            )

    async def extend_modal(self, job_id: str, deadline_at: float, now: float, until: float) -> bool:
        """A confirmation of a job waiting in MODAL goes to the upstream, for at most `until`: from now on the job
        may run to `deadline_at`, so that no timeout of its modal window is written meanwhile, and no other
        confirmation starts before this one is answered (or `until` passed: it died with its process). False
        when the job no longer waits, its window closed, or another confirmation is under way."""
        statement = (
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.state == JobState.MODAL.value,
                jobs.c.deadline_at > now,
                or_(jobs.c.confirming_until.is_(None), jobs.c.confirming_until < now),
            )
            .values(deadline_at=deadline_at, confirming_until=until)
        )
        return await changed(self.engine, statement) == 1

    async def restore_modal(self, job_id: str, written: float, deadline_at: float) -> None:
        """The upstream refused a confirmation (`extend_modal`, which wrote `written`): a job still waiting waits
        to its old deadline again, and may be confirmed again; unless another confirmation moved it since."""
        statement = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == JobState.MODAL.value, jobs.c.deadline_at == written)
            .values(deadline_at=deadline_at, confirming_until=None)
        )
        await changed(self.engine, statement)

    async def record_progress(self, changes: Sequence[ProgressChange], now: float) -> None:
        """Many running jobs' progress in one transaction; jobs that already ended are left alone, and so is a
        job already further on in the same state, and one confirmed out of MODAL since its follower saw it there."""
        if not changes:
            return
        rows = [(c.job_id, c.state.value, c.progress, c.was.value, c.deadline_at, self.owner, now) for c in changes]
        await _PROGRESS.changed(self.engine, rows)

    async def finish(
        self,
        job_id: str,
        *,
        succeeded: bool,
        now: float,
        error_code: str | None = None,
        fail_reason: str | None = None,
    ) -> JobRow | None:
        """End one job; see `finish_many`."""
        return (await self.finish_many([Ending(job_id, succeeded, error_code, fail_reason)], now))[0]

    async def finish_many(self, endings: Sequence[Ending], now: float) -> list[JobRow | None]:
        """End jobs and settle their holds (capture on success, release otherwise), each exactly once, in one
        transaction. For each ending: the ended job, or None when it had already ended (someone else's write
        won and nothing was settled twice). Jobs that end alike are ended by one set-based statement, and each
        key's holds are settled by one statement, so a thousand jobs finishing together cost a few statements.

        One job may have several endings here, from writers that ended it at once (the pending sweep's, which holds
        only while the job is PENDING, and the failure of a job an upstream hook adopted meanwhile): they are tried
        in their order, each only while the ones before it left the job running, as they would be written one after
        the other. The first that holds ends the job; an ending given twice is tried once."""
        # Each job's distinct endings, in their order: the first of each job is tried in the first round, the next
        # (only for a job the round left running) in the second, and so on; nearly always one round.
        tries: dict[str, list[int]] = {}
        for index, ending in enumerate(endings):
            of_job = tries.setdefault(ending.job_id, [])
            if all(endings[i] != ending for i in of_job):
                of_job.append(index)

        def round_of(nth: int, ended: dict[str, int]) -> list[int]:
            """The endings tried in round `nth`: each job's nth, of the jobs not `ended` yet."""
            return [of_job[nth] for job_id, of_job in tries.items() if job_id not in ended and nth < len(of_job)]

        async def end_round(conn: AsyncConnection, indexes: list[int]) -> list[JobRow]:
            """Write one round's endings (one per job); the jobs they ended."""
            groups: dict[tuple[bool, str | None, str | None], list[str]] = {}
            results: list[tuple[str, str | None, str | None, str | None]] = []
            for index in indexes:
                ending = endings[index]
                groups.setdefault((ending.succeeded, ending.error_code, ending.fail_reason), []).append(ending.job_id)
                if ending.image_url is not None or ending.buttons is not None or ending.text is not None:
                    results.append((ending.job_id, ending.image_url, ending.buttons, ending.text))
            if results:  # what the upstream gave, on the jobs about to end (the guard below repeats the check)
                await _KEEP_RESULT.run(conn, results)
            rows: list[JobRow] = []
            for (succeeded, error_code, fail_reason), ids in groups.items():
                statement = _SUCCEED if succeeded else _FAIL_GUARDED.get(error_code or "", _FAIL)
                for start in range(0, len(ids), _IDS_AT_ONCE):
                    result = await conn.execute(
                        statement,
                        {
                            "ids": ids[start : start + _IDS_AT_ONCE],
                            "new_error": error_code,
                            "new_reason": fail_reason,
                            "now": now,
                            "me": self.owner,
                        },
                    )
                    rows += rows_of(result.all())
            return rows

        async def work(conn: AsyncConnection) -> tuple[dict[str, JobRow], dict[str, int]]:
            ended: dict[str, JobRow] = {}
            by: dict[str, int] = {}  # job -> the index of the ending that ended it
            nth = 0
            while indexes := round_of(nth, by):
                index_of = {endings[index].job_id: index for index in indexes}
                for row in await end_round(conn, indexes):
                    ended[row.id], by[row.id] = row, index_of[row.id]
                nth += 1
            settle: dict[str, list[int]] = {}  # key -> [captured, released]
            for row in ended.values():
                settle.setdefault(row.key_id, [0, 0])[0 if row.hold_state == "captured" else 1] += int(row.price)
            if ended:  # only the jobs this transaction ended: the guard above makes each outcome happen once
                outcomes = [
                    entry(
                        "capture" if row.hold_state == "captured" else "release",
                        row.key_id,
                        int(row.price),
                        now,
                        job_id=row.id,
                        model=row.model,
                        action=row.action,
                    )
                    for row in ended.values()
                ]
                await ENTRIES.run(conn, outcomes)
            for key_id, (captured, released) in sorted(settle.items()):  # the same key order as admissions
                if captured or released:
                    await conn.execute(_SETTLE, {"key": key_id, "settled": captured + released, "captured": captured})
            return ended, by

        ended, by = await transaction(self.engine, work)
        return [
            ended[ending.job_id] if by.get(ending.job_id) == index else None for index, ending in enumerate(endings)
        ]

    async def get(self, job_id: str) -> JobRow | None:
        async with connected(self.engine) as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return row_of(row) if row is not None else None

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRow]:
        """The jobs among `job_ids` that exist, read in one statement (in no particular order)."""
        if not job_ids:
            return []
        async with connected(self.engine) as conn:
            rows = (await conn.execute(select(jobs).where(jobs.c.id.in_(list(dict.fromkeys(job_ids)))))).all()
        return rows_of(rows)

    async def ids_taken(self, key_id: str, new_jobs: Sequence[NewJob]) -> bool:
        """Whether some of these jobs' ids are another job's (or one of them twice): random ids drawn alike. A row
        these very jobs wrote (the same request, key and deadline) is not another job's."""
        ids = [job.id for job in new_jobs]
        if len(set(ids)) < len(ids):
            return True
        async with connected(self.engine) as conn:
            rows = (
                await conn.execute(
                    select(jobs.c.id, jobs.c.request_id, jobs.c.key_id, jobs.c.deadline_at).where(jobs.c.id.in_(ids))
                )
            ).all()
        mine = {job.id: (job.request_id, key_id, job.deadline_at) for job in new_jobs}
        return any(mine[row.id] != (row.request_id, row.key_id, row.deadline_at) for row in rows)

    async def owned(self, job_ids: Sequence[str], key_id: str) -> list[JobRow]:
        """The jobs among `job_ids` that belong to the key, newest first: another key's job is not there at all."""
        if not job_ids:
            return []
        async with connected(self.engine) as conn:
            rows = (
                await conn.execute(
                    select(jobs)
                    .where(jobs.c.id.in_(list(dict.fromkeys(job_ids))), jobs.c.key_id == key_id)
                    .order_by(jobs.c.created_at.desc(), jobs.c.id)
                )
            ).all()
        return rows_of(rows)

    async def recent(self, key_id: str, limit: int) -> list[JobRow]:
        """The key's newest jobs."""
        async with connected(self.engine) as conn:
            rows = (
                await conn.execute(
                    select(jobs)
                    .where(jobs.c.key_id == key_id)
                    .order_by(jobs.c.created_at.desc(), jobs.c.id)
                    .limit(limit)
                )
            ).all()
        return rows_of(rows)

    async def first_answered(self, job_ids: Sequence[str]) -> float | None:
        """When the earliest answered submit of these jobs was answered (`submitted_at`; their upstream took each
        before then); None when none of them is a job answered here."""
        earliest: float | None = None
        async with connected(self.engine) as conn:
            for start in range(0, len(job_ids), _IDS_AT_ONCE):
                chunk = list(job_ids[start : start + _IDS_AT_ONCE])
                found = (await conn.execute(select(func.min(jobs.c.submitted_at)).where(jobs.c.id.in_(chunk)))).scalar()
                if found is not None and (earliest is None or found < earliest):
                    earliest = float(found)
        return earliest

    async def by_request(self, request_id: str) -> list[JobRow]:
        async with connected(self.engine) as conn:
            rows = (await conn.execute(select(jobs).where(jobs.c.request_id == request_id).order_by(jobs.c.id))).all()
        return rows_of(rows)

    async def stale_pending(self, created_before: float, now: float) -> list[JobRow]:
        """PENDING jobs made before `created_before` that this process admitted, or whose process is gone (their
        lease ran out)."""
        lapsed = or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now, jobs.c.owner == self.owner)
        async with connected(self.engine) as conn:
            rows = (
                await conn.execute(
                    select(jobs).where(
                        jobs.c.state == JobState.PENDING.value, jobs.c.created_at < created_before, lapsed
                    )
                )
            ).all()
        return rows_of(rows)

    async def active(self) -> list[JobRow]:
        async with connected(self.engine) as conn:
            rows = (await conn.execute(select(jobs).where(jobs.c.state.in_([s.value for s in ACTIVE])))).all()
        return rows_of(rows)
