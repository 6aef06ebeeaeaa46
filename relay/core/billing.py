"""What the billing endpoints of chat front ends show for a key: its quota and what it spent, in dollars.

Credits become dollars at `billing.usd_per_credit`; usage is reported in cents, as OpenAI's legacy billing API did.
Usage is what a key's jobs captured (succeeded jobs are charged; failed ones released their hold), counted on the
UTC day the job finished; the figures are read by `store.reports`. This module turns them into what clients read.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from relay.errors import InvalidRequest

# The longest range one usage query may span, as OpenAI's legacy endpoint allowed.
MAX_RANGE_DAYS = 100
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


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
