"""API keys. A key is shown once, when it is made; the store keeps only its SHA-256 (keys are 256-bit random, so
a fast hash is enough) and a short prefix to recognise it by in listings.

Each key also has a hook secret (`whsec_...`), which signs the task updates the relay sends to the key's client
hooks. The relay must know it to sign, so it is stored as it is; it grants nothing but the ability to check that a
delivery came from the relay."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.tables import keys

KEY_PREFIX = "sk-mjr-"
HOOK_SECRET_PREFIX = "whsec_"


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

    @property
    def available(self) -> int:
        return self.balance - self.held

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


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
    )


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, name: str, quota: int, now: float) -> tuple[KeyRecord, str]:
        """A new key with `quota` credits; returns the record and the secret, which is never stored."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        values = {
            "id": key_id,
            "name": name,
            "key_hash": hash_key(secret),
            "prefix": secret[: len(KEY_PREFIX) + 4],
            "balance": quota,
            "held": 0,
            "created_at": now,
            "revoked_at": None,
            "hook_secret": HOOK_SECRET_PREFIX + secrets.token_urlsafe(32),
        }
        async with self.engine.begin() as conn:
            await conn.execute(keys.insert().values(**values))
        return _record(SimpleNamespace(**values)), secret

    async def by_secret(self, secret: str) -> KeyRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(keys).where(keys.c.key_hash == hash_key(secret)))).first()
        return _record(row) if row is not None else None

    async def get(self, key_id: str) -> KeyRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(keys).where(keys.c.id == key_id))).first()
        return _record(row) if row is not None else None

    async def list(self) -> list[KeyRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(keys).order_by(keys.c.created_at))).all()
        return [_record(row) for row in rows]

    async def revoke(self, id_or_name: str, now: float) -> int:
        """Revoke the key with this id, or every live key with this name; returns how many were revoked."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(keys)
                .where(or_(keys.c.id == id_or_name, keys.c.name == id_or_name), keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return int(result.rowcount)
