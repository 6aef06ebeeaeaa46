"""API keys. A key is shown once, when it is made; the store keeps only its SHA-256 (keys are 256-bit random, so
a fast hash is enough) and a short prefix to recognise it by in listings.

Each key also has a hook secret (`whsec_...`), which signs the task updates the relay sends to the key's client
hooks. The relay must know it to sign, so it is stored as it is; it grants nothing but the ability to check that a
delivery came from the relay.

A key's policies: the models it may use (None: all), how many requests that start work it may make a minute (None:
no limit; counted in the database, so the limit holds across relay processes), and when it expires (None: never).
Credits move only with a ledger row written in the same transaction (`store.ledger`): a key's initial quota and
every top-up is a `topup`, an operator's correction an `adjust`."""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

from sqlalchemy import and_, case, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.core.text import unstorable
from relay.domain import MAX_CREDITS
from relay.store.db import changed, connected, transaction
from relay.store.ledger import ENTRIES, entry
from relay.store.tables import keys

KEY_PREFIX = "sk-mjr-"
HOOK_SECRET_PREFIX = "whsec_"

# Bounds on what an operator (or the admin API, on an operator's word) may set (credits: `MAX_CREDITS`).
MAX_NAME = 200
MAX_MODELS = 100
MAX_MODEL_NAME = 64
MAX_NOTE = 1000
MAX_RPM = 1_000_000
RATE_WINDOW_S = 60.0


class KeyNotFound(LookupError):
    """No key has this id (or, for a name, no live key has it)."""


class AmbiguousKey(LookupError):
    """Several live keys have this name: use the key's id."""


class Unset(enum.Enum):
    """A policy `update` leaves as it is (None is a value: all models, no limit, never expires)."""

    UNSET = 0


UNSET = Unset.UNSET


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    prefix: str
    balance: int
    held: int
    created_at: float
    revoked_at: float | None
    hook_secret: str = ""
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    expires_at: float | None = None

    @property
    def available(self) -> int:
        return self.balance - self.held

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def status(self, now: float) -> Literal["active", "revoked", "expired"]:
        if self.revoked:
            return "revoked"
        return "expired" if self.expired(now) else "active"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _models_of(stored: str | None) -> tuple[str, ...] | None:
    if stored is None:
        return None
    try:
        value = json.loads(stored)
    except ValueError:
        return ()  # unreadable: allows nothing rather than everything
    return tuple(m for m in value if isinstance(m, str)) if isinstance(value, list) else ()


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        balance=int(row.balance),
        held=int(row.held),
        created_at=float(row.created_at),
        revoked_at=row.revoked_at,
        hook_secret=row.hook_secret,
        models=_models_of(row.models),
        rpm=None if row.rpm is None else int(row.rpm),
        expires_at=None if row.expires_at is None else float(row.expires_at),
    )


# -- checking what an operator gives -----------------------------------------------------------------------------


def _text(value: object, what: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text")
    if not empty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    if unstorable(value):
        raise ValueError(f"{what} contains characters a database cannot store")
    return value


# Commands address a key by its id or, failing that, its name (`keys revoke ID_OR_NAME`): a name that looks like an
# id could be another key's id, which the command would act on, and the key so named could not be reached by it.
_ID_LIKE = re.compile(r"key_[0-9A-Za-z_-]*")


def check_name(name: object) -> str:
    """A key's name, as the CLI and the admin API both take it: not empty, not like a key id, and no control or
    format characters (an escape sequence in a name would act on the terminal that lists the keys)."""
    text = _text(name, "name", MAX_NAME).strip()
    if _ID_LIKE.fullmatch(text):
        raise ValueError("name must not look like a key id (key_...)")
    if any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in text):
        raise ValueError("name must not contain control or format characters")
    return text


def check_models(models: Iterable[object] | None) -> tuple[str, ...] | None:
    """None (every model) or the distinct model names, in order."""
    if models is None:
        return None
    if isinstance(models, str | bytes):
        raise ValueError("models must be a list of model names")
    names = tuple(dict.fromkeys(_text(m, "a model name", MAX_MODEL_NAME).strip() for m in models))
    if len(names) > MAX_MODELS:
        raise ValueError(f"at most {MAX_MODELS} models")
    return names


def check_rpm(rpm: object) -> int | None:
    if rpm is None:
        return None
    if isinstance(rpm, bool) or not isinstance(rpm, int) or not 1 <= rpm <= MAX_RPM:
        raise ValueError(f"rpm must be a whole number from 1 to {MAX_RPM}, or none")
    return rpm


def check_expiry(expires_at: object) -> float | None:
    if expires_at is None:
        return None
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float) or not math.isfinite(expires_at):
        raise ValueError("expires_at must be a time (unix seconds), or none")
    if not 0 <= expires_at < 1e11:
        raise ValueError("expires_at is out of range")
    return float(expires_at)


def check_credits(amount: object, what: str, *, lowest: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or not lowest <= amount <= MAX_CREDITS:
        raise ValueError(f"{what} must be a whole number of credits from {lowest} to {MAX_CREDITS}")
    return amount


def _models_value(models: tuple[str, ...] | None) -> str | None:
    return None if models is None else json.dumps(list(models))


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self,
        name: str,
        quota: int,
        now: float,
        *,
        models: Sequence[str] | None = None,
        rpm: int | None = None,
        expires_at: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key with `quota` credits (a `topup` in the ledger, in the same transaction); returns the record and
        the secret, which is never stored. Raises ValueError for a value out of bounds."""
        name = check_name(name)
        quota = check_credits(quota, "quota", lowest=0)
        allowed = check_models(models)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        values: dict[str, Any] = {
            "id": key_id,
            "name": name,
            "key_hash": hash_key(secret),
            "prefix": secret[: len(KEY_PREFIX) + 4],
            "balance": quota,
            "held": 0,
            "created_at": now,
            "revoked_at": None,
            "hook_secret": HOOK_SECRET_PREFIX + secrets.token_urlsafe(32),
            "models": _models_value(allowed),
            "rpm": check_rpm(rpm),
            "expires_at": check_expiry(expires_at),
        }

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(keys.insert().values(**values))
            await ENTRIES.run(conn, [entry("topup", key_id, quota, now, note="initial quota")])

        await transaction(self.engine, work)
        return _record(SimpleNamespace(**values)), secret

    async def by_secret(self, secret: str) -> KeyRecord | None:
        async with connected(self.engine) as conn:
            row = (await conn.execute(select(keys).where(keys.c.key_hash == hash_key(secret)))).first()
        return _record(row) if row is not None else None

    async def get(self, key_id: str) -> KeyRecord | None:
        if unstorable(key_id):  # no key has it (and the database could not be asked)
            return None
        async with connected(self.engine) as conn:
            row = (await conn.execute(select(keys).where(keys.c.id == key_id))).first()
        return _record(row) if row is not None else None

    async def find(self, id_or_name: str, now: float) -> KeyRecord:
        """The key with this id, else the one active key with this name at `now`, else the one live key with it
        (KeyNotFound, AmbiguousKey)."""
        async with connected(self.engine) as conn:
            return _record(await _resolve(conn, id_or_name, now))

    async def list(self) -> list[KeyRecord]:
        async with connected(self.engine) as conn:
            rows = (await conn.execute(select(keys).order_by(keys.c.created_at, keys.c.id))).all()
        return [_record(row) for row in rows]

    async def revoke(self, id_or_name: str, now: float) -> int:
        """Revoke the key with this id, or (when it is no key's id) every live key with this name; returns how many
        were revoked. An id names one key only, even when another key's name is the same text."""
        if unstorable(id_or_name):  # no key has it (and the database could not be asked)
            return 0
        other = keys.alias("other")
        is_id = exists().where(other.c.id == id_or_name)
        return await changed(
            self.engine,
            update(keys)
            .where(
                or_(keys.c.id == id_or_name, and_(keys.c.name == id_or_name, ~is_id)),
                keys.c.revoked_at.is_(None),
            )
            .values(revoked_at=now),
        )

    async def topup(self, id_or_name: str, amount: int, now: float, note: str = "") -> KeyRecord:
        """Add credits to a key (its id, or the name of one live key), with a `topup` row in the same transaction.
        A revoked key is refused (ValueError), also when it is revoked while this runs: its credits could never be
        spent."""
        amount = check_credits(amount, "amount", lowest=1)
        note = _text(note, "note", MAX_NOTE, empty=True)
        return await self._move("topup", id_or_name, amount, now, note)

    async def adjust(self, id_or_name: str, amount: int, now: float, note: str = "") -> KeyRecord:
        """Correct a key's balance by `amount` (negative takes credits away, never below what it holds), with an
        `adjust` row in the same transaction."""
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < abs(amount) <= MAX_CREDITS:
            raise ValueError(f"amount must be a whole number of credits, not 0, at most {MAX_CREDITS} either way")
        note = _text(note, "note", MAX_NOTE, empty=True)
        return await self._move("adjust", id_or_name, amount, now, note)

    async def _move(
        self, kind: Literal["topup", "adjust"], id_or_name: str, amount: int, now: float, note: str
    ) -> KeyRecord:
        # A top-up only adds, so it fails only on a revoked key; a correction may go to a revoked key (to close it).
        allowed = keys.c.revoked_at.is_(None) if kind == "topup" else keys.c.balance + amount >= keys.c.held

        async def work(conn: AsyncConnection) -> KeyRecord:
            row = await _resolve(conn, id_or_name, now)
            result = await conn.execute(
                update(keys)
                .where(keys.c.id == row.id, allowed)
                .values(balance=keys.c.balance + amount)
                .returning(*keys.c)
            )
            changed = result.first()
            if changed is None:
                if kind == "topup":
                    raise ValueError("the key is revoked; a revoked key cannot be topped up")
                raise ValueError("the key's balance cannot go below what it holds")
            await ENTRIES.run(conn, [entry(kind, row.id, amount, now, note=note or None)])
            return _record(changed)

        return await transaction(self.engine, work)

    async def update(
        self,
        id_or_name: str,
        now: float,
        *,
        name: str | Unset = UNSET,
        models: Sequence[str] | None | Unset = UNSET,
        rpm: int | None | Unset = UNSET,
        expires_at: float | None | Unset = UNSET,
    ) -> KeyRecord:
        """Change a key's name or policies; what is not given stays. `now` is when the change was made."""
        values: dict[str, Any] = {}
        if not isinstance(name, Unset):
            values["name"] = check_name(name)
        if not isinstance(models, Unset):
            values["models"] = _models_value(check_models(models))
        if not isinstance(rpm, Unset):
            values["rpm"] = check_rpm(rpm)
        if not isinstance(expires_at, Unset):
            values["expires_at"] = check_expiry(expires_at)

        async def work(conn: AsyncConnection) -> KeyRecord:
            row = await _resolve(conn, id_or_name, now)
            if not values:
                return _record(row)
            changed = (
                await conn.execute(update(keys).where(keys.c.id == row.id).values(**values).returning(*keys.c))
            ).one()
            return _record(changed)

        return await transaction(self.engine, work)

    async def take_rate(self, key_id: str, now: float) -> float | None:
        """Count one request that starts work against the key's requests-per-minute limit (windows are whole
        minutes). None when it fits (or the key has no limit); else the seconds until the next window opens."""
        return await self._take_in_window(
            key_id,
            keys.c.rate_window,
            keys.c.rate_count,
            RATE_WINDOW_S,
            now,
            1,
            lambda fresh: or_(keys.c.rpm.is_(None), fresh, keys.c.rate_count < keys.c.rpm),
        )

    async def take_uploads(self, key_id: str, count: int, limit: int, window_s: float, now: float) -> float | None:
        """Count `count` uploaded images against the key's bound of `limit` per window of `window_s` seconds. None
        when they fit; else the seconds until the next window opens."""
        return await self._take_in_window(
            key_id,
            keys.c.upload_window,
            keys.c.upload_count,
            window_s,
            now,
            count,
            lambda fresh: case((fresh, 0), else_=keys.c.upload_count) + count <= limit,
        )

    async def give_back_uploads(self, key_id: str, count: int, window_s: float, taken_at: float) -> None:
        """Uncount `count` images counted by `take_uploads` at `taken_at` that were not kept after all; nothing when
        the key's window has moved on since (a new window counts from 0)."""
        window = _window_start(taken_at, window_s)
        await changed(
            self.engine,
            update(keys)
            .where(keys.c.id == key_id, keys.c.upload_window == window, keys.c.upload_count >= count)
            .values(upload_count=keys.c.upload_count - count),
        )

    async def _take_in_window(
        self,
        key_id: str,
        window_column: Any,
        count_column: Any,
        window_s: float,
        now: float,
        count: int,
        fits: Callable[[Any], Any],
    ) -> float | None:
        """Count `count` against a key's counter of the current window (`window_column`, `count_column`), in one
        conditional UPDATE shared by every relay process on the database, so requests at once cannot pass the
        bound: `fits(fresh)` says whether they do (`fresh`: the key's window is an older one, counted from 0). None
        when counted; else the seconds until the next window opens, having counted nothing."""
        window = _window_start(now, window_s)
        fresh = window_column < window
        counted = await changed(
            self.engine,
            update(keys)
            .where(keys.c.id == key_id, fits(fresh))
            .values(
                {
                    count_column: case((fresh, count), else_=count_column + count),
                    window_column: case((fresh, window), else_=window_column),
                }
            ),
        )
        if counted == 1:
            return None
        return max(1.0, math.ceil(window + window_s - now))


async def _resolve(conn: AsyncConnection, id_or_name: str, now: float) -> Any:
    """The key with this id, else the one active key (neither revoked nor expired at `now`) with this name, else the
    one live key with it (an expired key is still named, to be extended or looked at); an expired key never makes
    an active one of the same name ambiguous."""
    if not isinstance(id_or_name, str) or not id_or_name:
        raise KeyNotFound("no key given")
    if unstorable(id_or_name):
        # No key has an id or name a database cannot store (bytes that are not UTF-8 reach a command as surrogate
        # escapes: `café` typed in a Latin-1 terminal), and the database could not even be asked: its driver fails.
        raise KeyNotFound(f"no key with id or name {id_or_name!r}")
    row = (await conn.execute(select(keys).where(keys.c.id == id_or_name))).first()
    if row is not None:
        return row
    live = (keys.c.name == id_or_name, keys.c.revoked_at.is_(None))
    unexpired = or_(keys.c.expires_at.is_(None), keys.c.expires_at > now)
    rows = (await conn.execute(select(keys).where(*live, unexpired).limit(2))).all()
    if not rows:
        rows = (await conn.execute(select(keys).where(*live).limit(2))).all()
    if not rows:
        raise KeyNotFound(f"no key with id or name {id_or_name!r}")
    if len(rows) > 1:
        raise AmbiguousKey(f"several keys are named {id_or_name!r}: use the key's id")
    return rows[0]


def _window_start(now: float, window_s: float) -> float:
    """When the counting window `now` falls in began (windows of `window_s`, from the epoch)."""
    return math.floor(now / window_s) * window_s
