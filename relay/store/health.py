"""Provider health as recorded: one row per provider, its last change of state (never every signal), written by
whichever relay process saw it. Several processes may write; the change made latest wins (a write older than the
row is dropped), so rows written out of order never step back. `mj-relay providers` reads it from outside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.db import changed, connected
from relay.store.tables import provider_health

__all__ = ["HealthRecord", "HealthStore"]


@dataclass(frozen=True, slots=True)
class HealthRecord:
    provider: str
    state: str
    since: float
    reason: str
    process: str
    updated_at: float
    cooling_until: float | None = None


def _record(row: Any) -> HealthRecord:
    return HealthRecord(
        provider=row.provider,
        state=row.state,
        since=float(row.since),
        reason=row.reason,
        process=row.process,
        updated_at=float(row.updated_at),
        cooling_until=None if row.cooling_until is None else float(row.cooling_until),
    )


class HealthStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    async def record(self, record: HealthRecord) -> None:
        """Write a provider's change of state, unless the row already holds a later one."""
        values = {
            "provider": record.provider,
            "state": record.state,
            "since": record.since,
            "cooling_until": record.cooling_until,
            "reason": record.reason,
            "process": record.process,
            "updated_at": record.updated_at,
        }
        statement = self._insert(provider_health).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[provider_health.c.provider],
            set_={key: statement.excluded[key] for key in values if key != "provider"},
            where=provider_health.c.since <= statement.excluded.since,
        )
        await changed(self.engine, statement)

    async def all(self) -> dict[str, HealthRecord]:
        """Every recorded provider's last change, by provider name."""
        async with connected(self.engine) as conn:
            rows = (await conn.execute(select(provider_health))).all()
        return {row.provider: _record(row) for row in rows}
