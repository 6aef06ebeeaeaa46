"""`store.many.Many`: a statement run for many rows through the driver's executemany, on SQLite and PostgreSQL
alike, writes what SQLAlchemy's own executemany would, honours the statement's constants, and fails as it would."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, bindparam, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import TypeDecorator

from relay.store.db import Database, transaction
from relay.store.many import Many

pytestmark = pytest.mark.anyio


class Shouted(TypeDecorator[str]):
    """Text the type itself changes on its way in: a value processed by the dialect."""

    impl = String(40)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value.upper()


_meta = MetaData()
probe = Table(
    "many_probe",
    _meta,
    Column("id", String(40), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("at", Float, nullable=True),
    Column("count", Integer, nullable=True),
    Column("note", Text, nullable=True),
    Column("loud", Shouted, nullable=True),
)
# The state is the statement's own constant; the rest come from each row, in the order named.
ADD = Many(
    probe.insert().values(
        id=bindparam("id"), state="open", at=bindparam("at"), count=bindparam("count"), note=bindparam("note")
    ),
    ("id", "at", "count", "note"),
)
# `count` appears twice (positional dialects repeat it or number it once); the state guard is a constant.
BUMP = Many(
    update(probe)
    .where(
        probe.c.id == bindparam("id"),
        probe.c.state == "open",
        or_(probe.c.count.is_(None), probe.c.count <= bindparam("count")),
    )
    .values(count=bindparam("count"), note=bindparam("note")),
    ("id", "count", "note"),
)
HOSTILE = [
    "it's; DROP TABLE many_probe; --",
    "?, $1, %s, %(id)s, :id",
    "line\u2028separator, emoji \U0001f600, byte-order mark \ufeff",
    "x" * 20_000,
]


async def _made(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(_meta.create_all)


async def _rows(db: Database) -> dict[str, tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        found = (await conn.execute(select(probe).order_by(probe.c.id))).all()
    return {row.id: (row.state, row.at, row.count, row.note) for row in found}


async def test_rows_are_written_by_position_with_the_statements_constants(db: Database) -> None:
    await _made(db)
    rows = [(f"r{i}", 1.5 + i, i, note) for i, note in enumerate([*HOSTILE, None])]

    async def work(conn: Any) -> int:
        return await ADD.run(conn, rows)

    await transaction(db.engine, work)
    assert await _rows(db) == {f"r{i}": ("open", 1.5 + i, i, note) for i, note in enumerate([*HOSTILE, None])}


async def test_one_row_is_written_alone_and_no_rows_write_nothing(db: Database) -> None:
    await _made(db)

    async def work(conn: Any) -> tuple[int, int]:
        return await ADD.run(conn, []), await ADD.run(conn, [("only", 2, None, "alone")])

    assert await transaction(db.engine, work) == (0, 1)
    # An int given for a float column is stored as the dialect stores it through SQLAlchemy: a float.
    assert await _rows(db) == {"only": ("open", 2.0, None, "alone")}


async def test_an_update_keeps_its_guards_and_takes_a_parameter_used_twice(db: Database) -> None:
    await _made(db)

    async def seed(conn: Any) -> None:
        await ADD.run(conn, [("a", 1.0, 5, "a0"), ("b", 1.0, 5, "b0"), ("c", 1.0, None, "c0")])
        await conn.execute(update(probe).where(probe.c.id == "b").values(state="closed"))

    await transaction(db.engine, seed)

    async def bump(conn: Any) -> None:
        # a: moves on; b: closed (the constant guard holds); c: from nothing; d: no such row
        await BUMP.run(conn, [("a", 7, "a1"), ("b", 9, "b1"), ("c", 3, "c1"), ("d", 1, "d1")])
        await BUMP.run(conn, [("a", 6, "back")])  # never back: `count` compared with itself

    await transaction(db.engine, bump)
    assert await _rows(db) == {
        "a": ("open", 1.0, 7, "a1"),
        "b": ("closed", 1.0, 5, "b0"),
        "c": ("open", 1.0, 3, "c1"),
    }


async def test_a_row_the_database_refuses_fails_the_statement_as_execute_would(db: Database) -> None:
    await _made(db)

    async def work(conn: Any) -> None:
        await ADD.run(conn, [("dup", 1.0, 1, None), ("dup", 1.0, 2, None)])

    with pytest.raises(SQLAlchemyError):
        await transaction(db.engine, work)
    assert await _rows(db) == {}  # rolled back whole: a group commit then writes its items one by one


async def test_a_value_is_processed_on_its_way_in_as_execute_would(db: Database) -> None:
    await _made(db)
    loud = Many(probe.insert().values(id=bindparam("id"), state="open", loud=bindparam("loud")), ("id", "loud"))

    async def work(conn: Any) -> None:
        await loud.run(conn, [("one", "quiet"), ("two", None)])
        await conn.execute(probe.insert(), [{"id": "three", "state": "open", "loud": "quiet"}])

    await transaction(db.engine, work)
    async with db.engine.connect() as conn:
        found = dict((await conn.execute(select(probe.c.id, probe.c.loud))).all())
    assert found == {"one": "QUIET", "two": None, "three": "QUIET"}


def test_a_parameter_neither_given_nor_fixed_is_refused_when_compiled() -> None:
    from sqlalchemy.dialects import sqlite

    loose = Many(probe.insert().values(id=bindparam("id"), state=bindparam("state")), ("id",))
    with pytest.raises(ValueError, match="state"):
        loose._plan(sqlite.dialect())
