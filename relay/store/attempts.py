"""Client attempts at a request, kept so that a retry of it finds the jobs its first attempt started: across
restarts and across relay processes.

An attempt is keyed by its fingerprint (the key, the route and the body, or the `Idempotency-Key` it named: then
the row also keeps a digest of its body, so that a request naming that key with another body is told apart). The
latest attempt that was not a retry owns the fingerprint; it is `starting` while its jobs are held and submitted,
then `started` (some job was taken upstream) or `nothing` (none was). A retry that finds no attempt to follow
starts afresh and takes the fingerprint over only from the attempt it found (`claim_many`), so that one request sent to
two processes at once starts once; and only while none of that attempt's jobs is held and not yet ended (such jobs
are followed instead). Such a take-over is written down (`attempts_taken_over`): an attempt whose jobs were held
late asks whether a retry took its fingerprint over from it (`standing`) before it sends them upstream, and the
database decides between the two, so only one of them runs. So does an attempt's own row (`begin_many`), which lands
after the retry's when it stalls: it does not take the fingerprint from a retry that started afresh after the
attempt began (that retry may be its own; a row says when a retry last claimed it, `claimed_at`, and keeps that when
a newer attempt takes it over), nor from a newer attempt that took it from such a retry since, and the attempt learns
so before it sends anything. An attempt that lost the fingerprint only to a newer request of the same body that is not a
retry runs all the same while its client waits for it: that request is one of its own. Attempts (and take-overs)
older than the retry window are forgotten.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import and_, bindparam, delete, exists, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.domain import ACTIVE_STATES
from relay.store.db import changed, connected, transaction
from relay.store.tables import attempts, attempts_taken_over, jobs

AttemptState = Literal["starting", "started", "nothing"]
_ACTIVE = [state.value for state in ACTIVE_STATES]
# Attempts forgotten a statement (a few milliseconds of SQLite's time).
FORGET_BATCH = 1_000


@dataclass(frozen=True, slots=True)
class AttemptRow:
    fingerprint: str
    request_id: str
    state: AttemptState
    job_ids: tuple[str, ...]
    spec: dict[str, Any]  # what a retry needs to follow it (the request in Midjourney terms)
    body: str | None  # a digest of the body of an attempt that named an `Idempotency-Key` (None: any other)
    deadline_at: float
    created_at: float


# An attempt being made: (fingerprint, request id, job ids, spec, body digest, deadline, when it began).
# Its row's `created_at` is that time.
Made = tuple[str, str, tuple[str, ...], dict[str, Any], str | None, float, float]


def _starting(attempt: Made, *, claimed: bool) -> dict[str, Any]:
    """The row of an attempt (fingerprint, request id, job ids, spec, body, deadline, now) that starts, but its
    key; `claimed`: made by a retry that starts afresh."""
    _, request_id, job_ids, spec, body, deadline_at, now = attempt
    return {
        "request_id": request_id,
        "state": "starting",
        "job_ids": json.dumps(list(job_ids)),
        "spec": json.dumps(spec),
        "body": body,
        "deadline_at": deadline_at,
        "created_at": now,
        "updated_at": now,
        **({"claimed_at": now} if claimed else {}),
    }


def _owner(fingerprint: str, conn: AsyncConnection) -> Any:
    """The request id owning `fingerprint`, its row locked on PostgreSQL (`claim_many`, `standing`)."""
    row = select(attempts.c.request_id).where(attempts.c.fingerprint == fingerprint)
    return row.with_for_update() if conn.dialect.name == "postgresql" else row


class AttemptStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def begin_many(self, attempts_made: list[Made]) -> list[bool]:
        """Each attempt (fingerprint, request id, job ids, spec, body, deadline, when it began) now owns its
        fingerprint: an earlier one, retried or not, no longer does. Starts as `starting`.

        Unless a retry that started afresh claimed it after this attempt began (by the two processes' clocks, taken
        to agree closer than a client takes to retry), whether that retry still owns it or a newer attempt took it
        since: this attempt's row was written late (it stalled), and the retry, finding none, may be its own. The
        fingerprint stays with whichever owns it, and the attempt is False: it is not to send its jobs. True for
        every other attempt (an earlier one of a fingerprint twice in a batch too, as two requests, neither a retry,
        both run)."""
        if not attempts_made:
            return []

        async def work(conn: AsyncConnection) -> list[bool]:
            # One fingerprint twice in a batch: written in turn, the later attempt last; one statement per turn.
            turns: list[dict[str, Made]] = []
            seen: dict[str, int] = {}
            for item in attempts_made:
                nth = seen[item[0]] = seen.get(item[0], -1) + 1
                if nth == len(turns):
                    turns.append({})
                turns[nth][item[0]] = item
            taken: set[str] = set()
            for turn in turns:
                # In fingerprint order, as every write of attempts: two processes' transactions lock rows in one order.
                rows = [{"fingerprint": fp, **_starting(turn[fp], claimed=False)} for fp in sorted(turn)]
                statement = self._insert()
                excluded = {k: statement.excluded[k] for k in rows[0] if k != "fingerprint"}
                # `claimed_at` is left as it is: a newer attempt's row taking the body from a retry keeps the claim.
                free = or_(attempts.c.claimed_at.is_(None), attempts.c.claimed_at <= statement.excluded.created_at)
                upsert = statement.on_conflict_do_update(index_elements=["fingerprint"], set_=excluded, where=free)
                written = await conn.execute(upsert.returning(attempts.c.request_id), rows)
                taken.update(written.scalars().all())
            return [item[1] in taken for item in attempts_made]

        return await transaction(self.engine, work)

    async def claim_many(self, claims: Sequence[tuple[Made, str | None, float]]) -> list[bool]:
        """Retries that found no attempt to follow start afresh: each attempt (fingerprint, request id, job ids,
        spec, body, deadline, now), `starting`, owns its fingerprint from now on, if the one it found still does
        (`replacing`: its request id; None: no attempt made since `since`). For each, False when another attempt
        took the fingerprint meanwhile (the same request sent twice at once): that one is to be followed. One
        transaction, the claims in order: of two claims of one body, the second finds the first's.

        An attempt is not taken over while one of its jobs is held and has not ended: the claim is False, and those
        jobs are to be followed. A claim that took the fingerprint over from an attempt writes that down, in the
        same transaction (`standing`). On PostgreSQL the attempt's row is locked first, so that whether it has
        jobs is read once any `standing` of that attempt under way has committed (a statement's own lock wait
        would re-read the row alone, not its jobs): the attempt either learns it was taken over before it sends
        anything, or its jobs are seen here."""

        async def work(conn: AsyncConnection) -> list[bool]:
            claimed = [False] * len(claims)
            for i in sorted(range(len(claims)), key=lambda i: claims[i][0][0]):  # fingerprint order; stable
                attempt, replacing, since = claims[i]
                if replacing is not None and conn.dialect.name == "postgresql":
                    await conn.execute(_owner(attempt[0], conn))
                claimed[i] = (await conn.execute(self._claim(attempt, replacing, since))).rowcount == 1
                if claimed[i] and replacing is not None:
                    taken = self._insert(attempts_taken_over).values(request_id=replacing, created_at=attempt[6])
                    await conn.execute(taken.on_conflict_do_nothing(index_elements=["request_id"]))
            return claimed

        return await transaction(self.engine, work) if claims else []

    def _claim(self, attempt: Made, replacing: str | None, since: float) -> Any:
        fingerprint, values = attempt[0], _starting(attempt, claimed=True)
        if replacing is None:
            insert = self._insert().values(fingerprint=fingerprint, **values)
            return insert.on_conflict_do_update(
                index_elements=["fingerprint"],
                set_={name: insert.excluded[name] for name in values},
                # one older than the window is forgotten already; this claim's own row is this claim's again
                where=or_(attempts.c.created_at < since, attempts.c.request_id == values["request_id"]),
            )
        # Not while a job of that attempt is held and has not ended (PENDING: about to be sent, as far as this can
        # tell); this claim's own row too: a batch whose commit landed but was reported failed is written again,
        # one by one.
        live = select(jobs.c.id).where(jobs.c.request_id == replacing, jobs.c.state.in_(_ACTIVE))
        found = or_(
            and_(attempts.c.request_id == replacing, ~exists(live)), attempts.c.request_id == values["request_id"]
        )
        return update(attempts).where(attempts.c.fingerprint == fingerprint, found).values(**values)

    def _insert(self, table: Any = attempts) -> Any:
        """An insert into `table` in the database's own dialect (which has `on_conflict_do_update`)."""
        return (postgresql if self.engine.dialect.name == "postgresql" else sqlite).insert(table)

    async def standing(self, fingerprint: str, request_id: str) -> tuple[bool, bool]:
        """Whether the attempt (its request id) still owns its fingerprint, and whether a retry took the fingerprint
        over from it (then it must send nothing). One that lost the fingerprint only to a newer request of the same
        body, not a retry, was not taken over: that request is one of its own. On PostgreSQL the fingerprint's row is
        locked first: this waits for a claim of it under way and reads what that wrote; a claim that comes after it
        sees this attempt's jobs (`claim_many`)."""

        async def work(conn: AsyncConnection) -> tuple[bool, bool]:
            owner = (await conn.execute(_owner(fingerprint, conn))).scalar()
            taken = select(attempts_taken_over.c.request_id).where(attempts_taken_over.c.request_id == request_id)
            return owner == request_id, (await conn.execute(taken)).first() is not None

        return await transaction(self.engine, work)

    async def settle_many(self, settled: list[tuple[str, str, bool]], now: float) -> list[None]:
        """How each attempt's (fingerprint, request id, took) submission went, unless a later attempt owns the
        fingerprint by now."""
        for took in (True, False):
            pairs = sorted((fingerprint, request_id) for fingerprint, request_id, t in settled if t is took)
            if not pairs:
                continue
            await changed(
                self.engine,
                update(attempts)
                .where(attempts.c.fingerprint == bindparam("fp"), attempts.c.request_id == bindparam("rid"))
                .values(state="started" if took else "nothing", updated_at=now),
                [{"fp": fp, "rid": rid} for fp, rid in pairs],
            )
        return [None] * len(settled)

    async def get(self, fingerprint: str, since: float) -> AttemptRow | None:
        async with connected(self.engine) as conn:
            row = (
                await conn.execute(
                    select(attempts).where(attempts.c.fingerprint == fingerprint, attempts.c.created_at >= since)
                )
            ).first()
        if row is None:
            return None
        return AttemptRow(
            fingerprint=row.fingerprint,
            request_id=row.request_id,
            state=row.state,
            job_ids=tuple(json.loads(row.job_ids)),
            spec=json.loads(row.spec),
            body=row.body,
            deadline_at=row.deadline_at,
            created_at=row.created_at,
        )

    async def forget_before(self, before: float) -> int:
        """Forget the attempts made before `before`, `FORGET_BATCH` rows a statement, letting the event loop run
        between them: on SQLite a statement holds the loop while it runs, and a relay that was stopped for more than
        the retry window forgets a whole window's attempts at once."""
        old = select(attempts.c.fingerprint).where(attempts.c.created_at < before).limit(FORGET_BATCH)
        forgotten = 0
        while True:
            # The age is checked on the row deleted too: on PostgreSQL a row another transaction rewrote meanwhile
            # (a new attempt of the same body taking the old row over) is checked again as it is now, and the list
            # the subquery made still names it.
            count = await changed(
                self.engine,
                delete(attempts).where(
                    attempts.c.fingerprint.in_(old.scalar_subquery()), attempts.c.created_at < before
                ),
            )
            forgotten += count
            if count < FORGET_BATCH:
                break
            await asyncio.sleep(0)
        # A few rows (one a retry that took a body over): one statement.
        await changed(self.engine, delete(attempts_taken_over).where(attempts_taken_over.c.created_at < before))
        return forgotten
