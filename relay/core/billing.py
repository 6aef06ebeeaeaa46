"""What the billing endpoints of chat front ends show for a key: its quota and what it spent, in dollars.

Credits become dollars at `billing.usd_per_credit`; usage is reported in cents, as OpenAI's legacy billing API did.
Usage is what a key's jobs captured (succeeded jobs are charged; failed ones released their hold), counted on the
UTC day the job finished. The figures are read from the jobs themselves, so they need nothing but the `jobs` table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.errors import InvalidRequest
from relay.store.ledger import whole_seconds
from relay.store.tables import jobs

DAY_S = 86_400
# The longest range one usage query may span, as OpenAI's legacy endpoint allowed.
MAX_RANGE_DAYS = 100
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: int  # unix seconds of the UTC day's start
    model: str
    credits: int


def cents(credits: int, usd_per_credit: float) -> float:
    """Credits in US cents, without binary rounding noise (7 credits at 0.01 are 7 cents, not 7.000000000000001)."""
    return float(Decimal(credits) * Decimal(str(usd_per_credit)) * 100)


def dollars(credits: int, usd_per_credit: float) -> float:
    return float(Decimal(credits) * Decimal(str(usd_per_credit)))


def _day(value: str | None, param: str) -> date:
    if value is None:
        raise InvalidRequest(f"Missing required parameter: {param!r} (a date, YYYY-MM-DD).", param=param)
    if not _DATE.fullmatch(value):
        raise InvalidRequest(f"Invalid value for {param!r}: give a date as YYYY-MM-DD.", param=param)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"Invalid value for {param!r}: not a calendar date.", param=param) from None


def parse_range(start: str | None, end: str | None) -> tuple[int, int]:
    """A usage range as unix seconds [start, end): `start_date` included, `end_date` excluded (OpenAI's rule),
    UTC days, at most `MAX_RANGE_DAYS` long."""
    first, last = _day(start, "start_date"), _day(end, "end_date")
    if last <= first:
        raise InvalidRequest("end_date must be after start_date (it is excluded from the range).", param="end_date")
    if last - first > timedelta(days=MAX_RANGE_DAYS):
        raise InvalidRequest(f"The range may span at most {MAX_RANGE_DAYS} days.", param="end_date")
    midnight = datetime.min.time()
    return (
        int(datetime.combine(first, midnight, UTC).timestamp()),
        int(datetime.combine(last, midnight, UTC).timestamp()),
    )


async def captured_total(engine: AsyncEngine, key_id: str) -> int:
    """Every credit the key's jobs ever captured."""
    query = select(func.coalesce(func.sum(jobs.c.price), 0)).where(
        jobs.c.key_id == key_id, jobs.c.hold_state == "captured"
    )
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def usage_by_day(engine: AsyncEngine, key_id: str, start: int, end: int) -> list[DayUsage]:
    """Credits captured by the key's jobs that finished in [start, end), by UTC day and model. A job's time is its
    `finished_at` in whole seconds, the same expression for the range and the day, so each job lands in one day."""
    second = whole_seconds(jobs.c.finished_at)
    day = (second // DAY_S).label("day")
    query = (
        select(day, jobs.c.model, func.sum(jobs.c.price).label("credits"))
        .where(
            jobs.c.key_id == key_id,
            jobs.c.created_at < end,  # a job finished in the range began before its end (keeps to the key's index)
            jobs.c.hold_state == "captured",
            second >= start,
            second < end,
        )
        .group_by(day, jobs.c.model)
        .order_by(day, jobs.c.model)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [DayUsage(int(row.day) * DAY_S, str(row.model), int(row.credits)) for row in rows]
