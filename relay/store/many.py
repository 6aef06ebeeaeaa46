"""A Core statement run for many rows at once through the driver's own executemany.

SQLAlchemy's executemany of a compiled statement builds every row's parameters through its compiler (a dict per row
in, a dict per row processed): for the short rows of a group commit that is several times the cost of running the
statement, and a burst of a thousand jobs writes each of them several times over (admitted, progress, result,
ended, settled). `Many` compiles its statement once per dialect and hands the driver positional tuples, each made
by index from the row the caller gives, in the order the caller names the row's fields. What the statement itself
fixes (a state it compares with) goes in as the constant it is. Errors are SQLAlchemy's, as from `execute`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import Insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.store.db import transaction


class Many:
    """`statement`, whose bind parameters named in `fields` are given per row (a sequence in that order) and
    whose other bind parameters are constants of the statement. A value the dialect processes on its way in (SQLite
    takes a float through `float`) is processed here alike. An insert is run `inline` (no primary key read back)."""

    def __init__(self, statement: Any, fields: Sequence[str]) -> None:
        self.statement = statement.inline() if isinstance(statement, Insert) else statement
        self.fields = tuple(fields)
        self._plans: dict[str, _Plan] = {}

    def _plan(self, dialect: Dialect) -> _Plan:
        compiled = self.statement.compile(dialect=dialect)
        if compiled.positiontup is None:
            raise ValueError(f"{dialect.name}: Many needs a positional paramstyle")
        processors = compiled._bind_processors
        steps: list[tuple[int, Any, Callable[[Any], Any] | None]] = []
        for name in compiled.positiontup:
            process = cast("Callable[[Any], Any] | None", processors.get(name))  # one processor per parameter
            if name in self.fields:
                steps.append((self.fields.index(name), None, process))
                continue
            bind = compiled.binds[name]
            if bind.required or bind.effective_value is None:
                raise ValueError(f"the parameter {name} is neither a field nor a constant")
            value = bind.effective_value
            steps.append((-1, process(value) if process is not None else value, None))
        plain = all(index >= 0 and process is None for index, _, process in steps)
        return _Plan(compiled.string, tuple(steps), tuple(index for index, _, _ in steps) if plain else None)

    async def run(self, conn: AsyncConnection, rows: Sequence[Sequence[Any]]) -> int:
        """Run the statement for each row in one executemany; the rows it changed, as the driver counts them (asyncpg
        does not for several rows: -1)."""
        if not rows:
            return 0
        plan = self._plans.get(conn.dialect.name)
        if plan is None:
            plan = self._plans[conn.dialect.name] = self._plan(conn.dialect)
        if plan.plain is not None:
            indexes = plan.plain
            params = [tuple([row[index] for index in indexes]) for row in rows]
        else:
            steps = plan.steps
            try:
                params = [
                    tuple(
                        [
                            value if index < 0 else row[index] if process is None else process(row[index])
                            for index, value, process in steps
                        ]
                    )
                    for row in rows
                ]
            except (TypeError, ValueError) as exc:  # a value the dialect's processing refuses, as `execute` says it
                raise StatementError(str(exc), plan.sql, None, exc) from exc
        # One row goes as one set of parameters: a list of one would be taken for a single row's values.
        result = await conn.exec_driver_sql(plan.sql, params if len(params) > 1 else params[0])
        return int(result.rowcount)

    async def changed(self, engine: AsyncEngine, rows: Sequence[Sequence[Any]]) -> int:
        """`run` in a transaction of its own, as `store.db.changed` runs a statement."""

        async def work(conn: AsyncConnection) -> int:
            return await self.run(conn, rows)

        return await transaction(engine, work)


class _Plan(NamedTuple):
    """A statement compiled for one dialect: its SQL; for each positional parameter, the row's field it takes (or
    -1), the constant it is (for -1), and the dialect's processing of the value; `plain`, the fields' indexes when
    every parameter is a field taken as it is."""

    sql: str
    steps: tuple[tuple[int, Any, Callable[[Any], Any] | None], ...]
    plain: tuple[int, ...] | None
