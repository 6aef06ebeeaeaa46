"""The ledger: every movement of credits, one append-only row each, written in the transaction that makes it.

    topup     credits added to a key (its initial quota, a top-up)         balance += amount
    adjust    an operator's correction (signed)                            balance += amount
    hold      a job's price set aside when the job is admitted              held += amount
    capture   a job that succeeded pays its hold                           held -= amount, balance -= amount
    release   a job that ended any other way gives its hold back           held -= amount

So for every key, at any moment: balance = top-ups - captures + adjustments, and held = the holds of its jobs that
have neither a capture nor a release yet; a job has one hold and at most one outcome. `check` proves exactly this
(and that each job's own `hold_state` says the same as the ledger, and fits its state: a running job holds, a
succeeded one was captured, a failed one released), reading one consistent snapshot, so it may run
beside live relay processes. `export_csv` gives the rows to operators (the admin download, `ledger export`), as
`render_csv` of `export_rows` would, a page at a time; `usage` sums them.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import BigInteger, and_, bindparam, case, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from relay.domain import ACTIVE_STATES, JobState
from relay.store.db import connected
from relay.store.many import Many
from relay.store.tables import LEDGER_KINDS, jobs, keys, ledger

__all__ = [
    "LedgerReport",
    "LedgerRow",
    "UsageRow",
    "check",
    "describe",
    "ENTRIES",
    "entry",
    "export_csv",
    "export_rows",
    "open_holds",
    "render_csv",
    "usage",
    "whole_seconds",
]

Kind = Literal["topup", "hold", "capture", "release", "adjust"]
OUTCOMES = ("capture", "release")


_ENTRY_FIELDS = ("kind", "key_id", "job_id", "amount", "model", "action", "note", "created_at")
# Ledger rows, written many at once (`entry` makes each).
ENTRIES = Many(ledger.insert().values({name: bindparam(name) for name in _ENTRY_FIELDS}), _ENTRY_FIELDS)


def entry(
    kind: Kind,
    key_id: str,
    amount: int,
    now: float,
    *,
    job_id: str | None = None,
    model: str | None = None,
    action: str | None = None,
    note: str | None = None,
) -> tuple[Any, ...]:
    """One ledger row, as a row of `ENTRIES`."""
    return (kind, key_id, job_id, amount, model, action, note, now)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    id: int
    kind: str
    key_id: str
    key_name: str
    job_id: str | None
    amount: int
    model: str | None
    action: str | None
    note: str | None
    created_at: float


# Ledger rows read at once by an export (about 40 ms of the event loop's time on SQLite).
EXPORT_PAGE = 5_000


@contextlib.asynccontextmanager
async def _pages(engine: AsyncEngine) -> AsyncIterator[Callable[[Any], Awaitable[Sequence[Any]]]]:
    """How an export reads its pages. On PostgreSQL, in one REPEATABLE READ snapshot: a row's id is taken when it
    is written, not when its transaction commits, so a page read on its own could miss a row below the last id
    of the page before that committed meanwhile. On SQLite a row's id follows the commits (one writer at a time),
    so each page is read on its own and the relay's one connection is free between them."""
    if engine.dialect.name != "postgresql":

        async def alone(statement: Any) -> Sequence[Any]:
            async with connected(engine) as conn:
                return (await conn.execute(statement)).all()

        yield alone
        return
    async with _in_snapshot(engine) as conn:

        async def read(statement: Any) -> Sequence[Any]:
            return (await conn.execute(statement)).all()

        yield read


async def _export_pages(
    engine: AsyncEngine, key_id: str | None, since: float | None
) -> AsyncGenerator[list[LedgerRow], None]:
    """The rows of `export_rows`, a page at a time as they are read."""
    query = select(ledger, keys.c.name.label("key_name")).join(keys, keys.c.id == ledger.c.key_id)
    if key_id is not None:
        query = query.where(ledger.c.key_id == key_id)
    if since is not None:
        query = query.where(ledger.c.created_at >= since)
    after = 0
    async with _pages(engine) as read:
        while True:  # in pages, letting the loop run between them: on SQLite a read holds it while it runs
            page = await read(query.where(ledger.c.id > after).order_by(ledger.c.id).limit(EXPORT_PAGE))
            yield [
                LedgerRow(
                    id=int(row.id),
                    kind=row.kind,
                    key_id=row.key_id,
                    key_name=row.key_name,
                    job_id=row.job_id,
                    amount=int(row.amount),
                    model=row.model,
                    action=row.action,
                    note=row.note,
                    created_at=float(row.created_at),
                )
                for row in page
            ]
            if len(page) < EXPORT_PAGE:
                break
            after = int(page[-1].id)
            await asyncio.sleep(0)


async def export_rows(engine: AsyncEngine, key_id: str | None = None, since: float | None = None) -> list[LedgerRow]:
    """The ledger's rows in the order they were written, of one key and from a time when asked."""
    rows: list[LedgerRow] = []
    async with contextlib.aclosing(_export_pages(engine, key_id, since)) as pages:
        async for page in pages:
            rows.extend(page)
    return rows


async def export_csv(engine: AsyncEngine, key_id: str | None = None, since: float | None = None) -> str:
    """`render_csv` of `export_rows`, written a page at a time as each is read, so the loop runs between pages
    here too: written all at once, a ledger of a million rows would hold it for seconds (and keep every row)."""
    out = io.StringIO()
    writer = _writer(out)
    async with contextlib.aclosing(_export_pages(engine, key_id, since)) as pages:
        async for page in pages:
            _write_rows(writer, page)
    return out.getvalue()


CSV_COLUMNS = ("id", "time", "kind", "key_id", "key_name", "job_id", "amount", "model", "action", "note")


# Where a spreadsheet may start a cell within a text cell: a separator other than the comma (`;` for Excel in much
# of Europe, a tab for importers) or a line break, each perhaps followed by quotes, which count only at a cell's start.
_FORMULA_START = re.compile(r'(\A|[;\t\r\n]"*)(?=[=+\-@\t\r])')


def _cell(text: str | None) -> str:
    """Text as a spreadsheet shows it, never as a formula (a key's name or a note may start with `=`). A spreadsheet
    that splits on `;` or tabs starts cells within the text too (quoting the cell does not stop it: there the line's
    first cell, the id, is not quoted, so neither quote nor line break is read as CSV's), so a formula character
    after one of those gets the `'` as well."""
    if not text:
        return ""
    return _FORMULA_START.sub(r"\1'", text)


def _writer(out: io.StringIO) -> Any:
    """A CSV writer on `out`, the header line written."""
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    return writer


def _write_rows(writer: Any, rows: Iterable[LedgerRow]) -> None:
    for row in rows:
        when = datetime.fromtimestamp(row.created_at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        writer.writerow(
            [
                row.id,
                when,
                row.kind,
                row.key_id,
                _cell(row.key_name),
                row.job_id or "",
                row.amount,
                _cell(row.model),
                _cell(row.action),
                _cell(row.note),
            ]
        )


def render_csv(rows: Iterable[LedgerRow]) -> str:
    """The rows as CSV with a header line; times are UTC ISO 8601."""
    out = io.StringIO()
    _write_rows(_writer(out), rows)
    return out.getvalue()


# -- usage -------------------------------------------------------------------------------------------------------


class whole_seconds(FunctionElement[int]):
    """A time in unix seconds (a float column) cut to its whole second, the same on both databases: a plain cast
    truncates on SQLite but rounds on PostgreSQL, which would put the last half second of a day in the next."""

    type = BigInteger()
    inherit_cache = True
    name = "whole_seconds"


@compiles(whole_seconds)
def _whole_seconds(element: whole_seconds, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS BIGINT)"  # SQLite: truncates (times are positive)


@compiles(whole_seconds, "postgresql")
def _whole_seconds_pg(element: whole_seconds, compiler: Any, **kw: Any) -> str:
    return f"CAST(FLOOR({compiler.process(element.clauses, **kw)}) AS BIGINT)"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What one key spent on one model and kind of task in one UTC day."""

    key_id: str
    model: str
    action: str
    day: str  # YYYY-MM-DD, UTC
    jobs: int  # captured jobs
    credits: int  # credits captured
    released_jobs: int
    released_credits: int


async def usage(
    engine: AsyncEngine, *, key_id: str | None = None, since: float | None = None, until: float | None = None
) -> list[UsageRow]:
    """Captures and releases summed by key, model, kind of task (`action`) and UTC day, within [since, until)."""
    day = whole_seconds(ledger.c.created_at) // 86400
    captured = ledger.c.kind == "capture"
    query = (
        select(
            ledger.c.key_id,
            func.coalesce(ledger.c.model, "").label("model"),
            func.coalesce(ledger.c.action, "").label("action"),
            day.label("day"),
            func.sum(case((captured, 1), else_=0)).label("jobs"),
            func.sum(case((captured, ledger.c.amount), else_=0)).label("credits"),
            func.sum(case((captured, 0), else_=1)).label("released_jobs"),
            func.sum(case((captured, 0), else_=ledger.c.amount)).label("released_credits"),
        )
        .where(ledger.c.kind.in_(OUTCOMES))
        .group_by(ledger.c.key_id, "model", "action", day)
        .order_by(day, ledger.c.key_id, "model", "action")
    )
    if key_id is not None:
        query = query.where(ledger.c.key_id == key_id)
    if since is not None:
        query = query.where(ledger.c.created_at >= since)
    if until is not None:
        query = query.where(ledger.c.created_at < until)
    async with connected(engine) as conn:
        rows = (await conn.execute(query)).all()
    return [
        UsageRow(
            key_id=row.key_id,
            model=row.model,
            action=row.action,
            day=datetime.fromtimestamp(int(row.day) * 86400, UTC).strftime("%Y-%m-%d"),
            jobs=int(row.jobs or 0),
            credits=int(row.credits or 0),
            released_jobs=int(row.released_jobs or 0),
            released_credits=int(row.released_credits or 0),
        )
        for row in rows
    ]


async def open_holds(engine: AsyncEngine) -> tuple[int, int]:
    """How many jobs hold credits now, and how many credits they hold (for the metrics)."""
    active = [state.value for state in ACTIVE_STATES]
    query = select(func.count(), func.coalesce(func.sum(jobs.c.price), 0)).where(
        jobs.c.state.in_(active), jobs.c.hold_state == "held"
    )
    async with connected(engine) as conn:
        count, credits = (await conn.execute(query)).one()
    return int(count), int(credits)


# -- the check ---------------------------------------------------------------------------------------------------


@dataclass
class LedgerReport:
    keys: int = 0
    jobs: int = 0
    rows: int = 0
    breaks: list[str] = field(default_factory=list)
    checked_at: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.breaks

    def summary(self) -> str:
        state = "ok" if self.ok else f"{len(self.breaks)} break{'s' if len(self.breaks) != 1 else ''}"
        return f"ledger {state}: {self.keys} keys, {self.jobs} jobs, {self.rows} ledger rows"


def _sum(kind: str) -> Any:
    return func.coalesce(func.sum(case((ledger.c.kind == kind, ledger.c.amount), else_=0)), 0)


@contextlib.asynccontextmanager
async def _in_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection whose reads are one consistent snapshot (a live relay may write meanwhile): REPEATABLE READ on
    PostgreSQL, a WAL read transaction on SQLite. Nothing is written on it: it is rolled back."""
    async with connected(engine) as plain:
        conn = plain
        if plain.dialect.name == "postgresql":
            conn = await plain.execution_options(isolation_level="REPEATABLE READ")
        elif plain.dialect.name == "sqlite":
            await conn.exec_driver_sql("BEGIN")  # every read sees the same commit
        try:
            yield conn
        finally:
            await conn.rollback()


async def check(engine: AsyncEngine) -> LedgerReport:
    """Prove the ledger against the keys and jobs: see the module's docstring. Every break is named."""
    report = LedgerReport(checked_at=time.time())
    async with _in_snapshot(engine) as conn:
        await _check(conn, report)
    return report


async def _check(conn: AsyncConnection, report: LedgerReport) -> None:
    breaks = report.breaks
    known = (
        await conn.execute(
            select(func.count())
            .select_from(ledger)
            .where(
                ledger.c.kind.not_in(LEDGER_KINDS)
                | ((ledger.c.kind != "adjust") & (ledger.c.amount < 0))
                | (ledger.c.kind.in_(["hold", *OUTCOMES]) & ledger.c.job_id.is_(None))
            )
        )
    ).scalar_one()
    if known:
        breaks.append(f"{known} ledger rows have an unknown kind, a negative amount or no job where one is needed")

    # Per key: balance and held against the sums of its rows.
    outcome = ledger.alias("outcome")
    hold = ledger.alias("hold")
    open_holds = (
        select(hold.c.key_id, func.sum(hold.c.amount).label("amount"))
        .where(
            hold.c.kind == "hold",
            ~exists().where(outcome.c.job_id == hold.c.job_id, outcome.c.kind.in_(OUTCOMES)),
        )
        .group_by(hold.c.key_id)
        .subquery()
    )
    sums = (
        select(
            ledger.c.key_id,
            _sum("topup").label("topups"),
            _sum("capture").label("captures"),
            _sum("adjust").label("adjusts"),
            func.count().label("rows"),
        )
        .group_by(ledger.c.key_id)
        .subquery()
    )
    per_key = (
        select(
            keys.c.id,
            keys.c.name,
            keys.c.balance,
            keys.c.held,
            func.coalesce(sums.c.topups, 0).label("topups"),
            func.coalesce(sums.c.captures, 0).label("captures"),
            func.coalesce(sums.c.adjusts, 0).label("adjusts"),
            func.coalesce(sums.c.rows, 0).label("rows"),
            func.coalesce(open_holds.c.amount, 0).label("open_holds"),
        )
        .select_from(keys)
        .outerjoin(sums, sums.c.key_id == keys.c.id)
        .outerjoin(open_holds, open_holds.c.key_id == keys.c.id)
        .order_by(keys.c.id)
    )
    for row in (await conn.execute(per_key)).all():
        report.keys += 1
        report.rows += int(row.rows)
        expected = int(row.topups) - int(row.captures) + int(row.adjusts)
        if int(row.balance) != expected:
            breaks.append(
                f"key {row.id} ({row.name}): balance {row.balance} but top-ups {row.topups} - captures "
                f"{row.captures} + adjustments {row.adjusts} = {expected}"
            )
        if int(row.held) != int(row.open_holds):
            breaks.append(f"key {row.id} ({row.name}): held {row.held} but its open holds are {row.open_holds}")
    strays = (
        await conn.execute(select(ledger.c.key_id).where(~exists().where(keys.c.id == ledger.c.key_id)).distinct())
    ).all()
    for stray in strays:
        breaks.append(f"ledger rows name key {stray.key_id}, which does not exist")

    # Per job: one hold of its price, at most one outcome, and the outcome its own hold_state says.
    def count(kind: str) -> Any:
        return func.sum(case((ledger.c.kind == kind, 1), else_=0))

    per_job = (
        select(
            ledger.c.job_id,
            count("hold").label("holds"),
            count("capture").label("captures"),
            count("release").label("releases"),
            func.sum(case((ledger.c.kind == "hold", ledger.c.amount), else_=0)).label("held"),
            func.sum(case((ledger.c.kind.in_(OUTCOMES), ledger.c.amount), else_=0)).label("settled"),
            func.min(ledger.c.key_id).label("first_key"),
            func.max(ledger.c.key_id).label("last_key"),
        )
        .where(ledger.c.job_id.is_not(None))
        .group_by(ledger.c.job_id)
        .subquery()
    )
    report.jobs = int((await conn.execute(select(func.count()).select_from(jobs))).scalar_one())
    outcomes = per_job.c.captures + per_job.c.releases
    hold_state_fits = or_(
        and_(jobs.c.hold_state == "held", outcomes == 0),
        and_(jobs.c.hold_state == "captured", per_job.c.captures == 1, per_job.c.releases == 0),
        and_(jobs.c.hold_state == "released", per_job.c.releases == 1, per_job.c.captures == 0),
    )
    # A job's state says which hold_state it must have: running, held; succeeded, captured; failed, released.
    active = [state.value for state in ACTIVE_STATES]
    state_fits = or_(
        and_(jobs.c.state.in_(active), jobs.c.hold_state == "held"),
        and_(jobs.c.state == JobState.SUCCEEDED.value, jobs.c.hold_state == "captured"),
        and_(jobs.c.state == JobState.FAILED.value, jobs.c.hold_state == "released"),
    )
    broken = (
        select(
            jobs.c.id,
            jobs.c.key_id,
            jobs.c.price,
            jobs.c.state,
            jobs.c.hold_state,
            per_job.c.job_id.label("ledger_job"),
            per_job.c.holds,
            per_job.c.captures,
            per_job.c.releases,
            per_job.c.held,
            per_job.c.settled,
            per_job.c.first_key,
            per_job.c.last_key,
        )
        .select_from(jobs)
        .outerjoin(per_job, per_job.c.job_id == jobs.c.id)
        .where(
            or_(
                per_job.c.job_id.is_(None),
                per_job.c.holds != 1,
                outcomes > 1,
                per_job.c.held != jobs.c.price,
                and_(outcomes == 1, per_job.c.settled != per_job.c.held),
                per_job.c.first_key != jobs.c.key_id,
                per_job.c.last_key != jobs.c.key_id,
                ~hold_state_fits,
                ~state_fits,
            )
        )
        .order_by(jobs.c.id)
    )
    for job in (await conn.execute(broken)).all():
        breaks.append(f"job {job.id} (key {job.key_id}): {_job_break(job)}")
    orphans = (
        await conn.execute(
            select(per_job.c.job_id).where(~exists().where(jobs.c.id == per_job.c.job_id)).order_by(per_job.c.job_id)
        )
    ).all()
    for orphan in orphans:
        breaks.append(f"ledger rows name job {orphan.job_id}, which does not exist")


_ACTIVE = frozenset(state.value for state in ACTIVE_STATES)
_HOLD_OF_STATE = {JobState.SUCCEEDED.value: "captured", JobState.FAILED.value: "released"}


def _job_break(row: Any) -> str:
    problems: list[str] = []
    expected = _HOLD_OF_STATE.get(row.state, "held" if row.state in _ACTIVE else None)
    if row.hold_state != expected:
        problems.append(f"the job is {row.state} but its hold is {row.hold_state}")
    if row.ledger_job is None:
        return "; ".join([*problems, "no ledger rows at all (its hold was never written down)"])
    captures, releases = int(row.captures), int(row.releases)
    if captures + releases > 1:
        problems.append(f"{captures + releases} outcomes ({captures} captures, {releases} releases)")
    if int(row.holds) != 1:
        problems.append(f"{row.holds} holds")
    if int(row.held) != int(row.price):
        problems.append(f"held {row.held} for a price of {row.price}")
    if captures + releases == 1 and int(row.settled) != int(row.held):
        problems.append(f"settled {row.settled} of a hold of {row.held}")
    if row.first_key != row.key_id or row.last_key != row.key_id:
        problems.append("ledger rows of another key")
    outcome = "capture" if captures else "release" if releases else "none"
    fits = {"held": (0, 0), "captured": (1, 0), "released": (0, 1)}.get(row.hold_state)
    if fits != (captures, releases) and captures + releases <= 1:
        problems.append(f"the job says {row.hold_state} but the ledger's outcome is {outcome}")
    return "; ".join(problems) or "inconsistent"


def describe(report: LedgerReport, limit: int | None = None) -> Sequence[str]:
    """The report as lines: the summary, then each break (all of them unless `limit`)."""
    shown = report.breaks if limit is None else report.breaks[:limit]
    lines = [report.summary(), *(f"  BREAK {text}" for text in shown)]
    if limit is not None and len(report.breaks) > limit:
        lines.append(f"  ... and {len(report.breaks) - limit} more")
    return lines
