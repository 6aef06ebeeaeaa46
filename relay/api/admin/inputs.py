"""What the admin API accepts, every value bounded: credits are whole numbers within `MAX_CREDITS`, names are short
storable text that cannot be mistaken for a key id, times are unix seconds or ISO 8601 within a sane range, and
ids and cursors have a fixed shape. Anything else is a 400 that names the parameter, before anything changes."""

from __future__ import annotations

import base64
import binascii
import math
import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from relay.api.common import Text
from relay.domain import MAX_CREDITS, JobState
from relay.errors import InvalidRequest
from relay.store.keys import MAX_RPM, check_name

MAX_NAME = 100
MAX_NOTE = 200
# Times the API takes: from 2000-01-01 to 2200-01-01.
MIN_TIME = 946_684_800
MAX_TIME = 7_258_118_400
DAY_S = 86_400
MAX_PAGE = 200
DEFAULT_PAGE = 50

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_JOB_ID = re.compile(r"[a-z0-9_]{1,40}")


def _name(value: str) -> str:
    """A key's name as the store takes one (`check_name`), and at most `MAX_NAME` characters in the admin UI."""
    if len(value.strip()) > MAX_NAME:
        raise ValueError(f"a name is at most {MAX_NAME} characters")
    return check_name(value)


def _note(value: str) -> str:
    value = value.strip()
    if len(value) > MAX_NOTE:
        raise ValueError(f"a note is at most {MAX_NOTE} characters")
    return value


Name = Annotated[StrictStr, AfterValidator(_name)]
Note = Annotated[Text, AfterValidator(_note)]
Credits = Annotated[StrictInt, Field(ge=0, le=MAX_CREDITS)]
Models = Annotated[list[Text], Field(min_length=1, max_length=100)]
Rpm = Annotated[StrictInt, Field(ge=1, le=MAX_RPM)]
# Unix seconds, or an ISO 8601 date or time (read as UTC when it names no offset).
When = StrictInt | Annotated[StrictStr, Field(max_length=40)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyCreate(_Body):
    name: Name
    quota: Credits = 0
    models: Models | None = None  # None: every model
    rpm: Rpm | None = None  # None: no limit
    expires_at: When | None = None  # None: never


class KeyUpdate(_Body):
    """A PATCH: the fields given are changed (null clears a policy); the others stay as they are."""

    name: Name | None = None
    models: Models | None = None
    rpm: Rpm | None = None
    expires_at: When | None = None


class TopUp(_Body):
    amount: Annotated[StrictInt, Field(ge=1, le=MAX_CREDITS)]
    note: Note = ""


def key_id(value: str) -> str:
    if not _KEY_ID.fullmatch(value):
        raise InvalidRequest("A key id is 1 to 32 letters, digits, '_' and '-'.", param="key_id")
    return value


def models(value: list[str] | None, known: list[str], param: str = "models") -> list[str] | None:
    """Allowed models: configured ones, each once, in the order given."""
    if value is None:
        return None
    unknown = [m for m in value if m not in known]
    if unknown:
        raise InvalidRequest(f"Unknown model {unknown[0][:64]!r}; the models are {', '.join(known)}.", param=param)
    return list(dict.fromkeys(value))


def when(value: int | str, param: str) -> float:
    """A time the API was given, as unix seconds."""
    if isinstance(value, int):
        # Compared as an int first: a JSON integer may be too large for a float (an OverflowError, not a 400).
        seconds = float(value) if MIN_TIME <= value <= MAX_TIME else -1.0
    else:
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 12:
            seconds = float(int(text))
        else:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise InvalidRequest(
                    f"Invalid value for {param!r}: give unix seconds or an ISO 8601 date or time "
                    "(2026-01-31 or 2026-01-31T12:00:00Z).",
                    param=param,
                ) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
    if not MIN_TIME <= seconds <= MAX_TIME:
        raise InvalidRequest(f"Invalid value for {param!r}: the time is out of range (2000 to 2200).", param=param)
    return seconds


def expiry(value: int | str | None, now: float, param: str = "expires_at") -> float | None:
    """An expiry: none, or a time in the future."""
    if value is None:
        return None
    seconds = when(value, param)
    if seconds <= now:
        raise InvalidRequest(f"Invalid value for {param!r}: the time is in the past.", param=param)
    return seconds


def optional_time(query: dict[str, str], param: str) -> float | None:
    raw = query.get(param)
    return None if raw is None or raw == "" else when(raw, param)


def window(query: dict[str, str], now: float, default_days: int, max_days: int) -> tuple[float, float]:
    """`since` and `until` of a query: by default the last `default_days` days up to now; at most `max_days`."""
    until = optional_time(query, "until")
    until = now if until is None else until
    since = optional_time(query, "since")
    since = until - default_days * DAY_S if since is None else since
    if since >= until:
        raise InvalidRequest("'since' must be before 'until'.", param="since")
    if until - since > max_days * DAY_S:
        raise InvalidRequest(f"The time range is longer than {max_days} days.", param="since")
    return since, until


def limit(query: dict[str, str]) -> int:
    raw = query.get("limit", "")
    if raw == "":
        return DEFAULT_PAGE
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"'limit' is a whole number from 1 to {MAX_PAGE}.", param="limit")
    return int(raw)


def states(query: dict[str, str]) -> list[str] | None:
    raw = query.get("state", "")
    if raw == "":
        return None
    chosen = [part.strip().upper() for part in raw.split(",")]
    known = [state.value for state in JobState]
    for state in chosen:
        if state not in known:
            raise InvalidRequest(f"'state' is a comma-separated list of {', '.join(known)}.", param="state")
    return list(dict.fromkeys(chosen))


def optional_key(query: dict[str, str]) -> str | None:
    raw = query.get("key", "")
    if raw == "":
        return None
    if not _KEY_ID.fullmatch(raw):
        raise InvalidRequest("'key' is a key id.", param="key")
    return raw


def cursor(query: dict[str, str]) -> tuple[float, str] | None:
    """Where the previous page ended: the last job's creation time and id, as `encode_cursor` wrote them."""
    raw = query.get("cursor", "")
    if raw == "":
        return None
    problem = InvalidRequest("'cursor' is not one this API gave.", param="cursor")
    if len(raw) > 120 or not re.fullmatch(r"[A-Za-z0-9_-]+", raw):
        raise problem
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise problem from None
    created, _, job = text.partition(" ")
    try:
        at = float(created)
    except ValueError:
        raise problem from None
    if not math.isfinite(at) or not _JOB_ID.fullmatch(job):
        raise problem
    return at, job


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r} {job_id}".encode()).decode().rstrip("=")
