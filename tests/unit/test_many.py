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


async def test_the_stores_statements_write_what_sqlalchemys_executemany_wrote(db: Database) -> None:
    """The store's own statements (admission, progress, a finished job's result, ledger rows), each run once
    through SQLAlchemy's executemany of named parameters and once through `Many`, on twin jobs: every column of
    every row ends alike. PostgreSQL numbers a parameter used twice once (`now`, `new_state` in the progress write),
    SQLite repeats it: both must take each value where the statement names it."""
    from relay.store import jobs as store_jobs
    from relay.store.ledger import ENTRIES
    from relay.store.tables import jobs, keys, ledger

    async def seed(conn: Any) -> None:
        await conn.execute(
            keys.insert().values(
                id="k", name="k", key_hash="h", prefix="p", balance=1000, held=0, created_at=0.0, hook_secret="s"
            )
        )

    await transaction(db.engine, seed)
    now = 1_700_000_000.25
    # (suffix, state at the start, progress, owner, started_at)
    start = [
        ("a", "SUBMITTED", 0, "me", None),
        ("b", "IN_PROGRESS", 40, "me", now - 5),
        ("c", "IN_PROGRESS", 40, "me", None),
        ("d", "MODAL", 0, "me", None),
        ("e", "MODAL", 0, "other", None),
        ("f", "SUCCEEDED", 100, "me", now - 9),
        ("g", "SUBMITTED", 0, "other", None),
    ]
    # (suffix, new state, new progress, was, new deadline)
    changes = [
        ("a", "IN_PROGRESS", 10, "SUBMITTED", None),  # its start: started_at is now
        ("b", "IN_PROGRESS", 30, "IN_PROGRESS", None),  # never back
        ("c", "IN_PROGRESS", 60, "IN_PROGRESS", now + 500.5),  # on, with a deadline; its start is now
        ("d", "MODAL", 0, "MODAL", now + 77),  # parked here: its window
        ("e", "MODAL", 0, "MODAL", now + 77),  # another's MODAL: left alone
        ("f", "IN_PROGRESS", 90, "IN_PROGRESS", None),  # ended: left alone
        ("g", "MODAL", 0, "SUBMITTED", now + 3),  # into MODAL while another holds it: left alone
    ]

    def admitted(prefix: str) -> list[tuple[Any, ...]]:
        return [
            (
                f"{prefix}{s}",
                f"r{prefix}",
                "k",
                "mj-fast",
                "fast",
                "MID_JOURNEY",
                "imagine",
                f"prompt {s} \u2028 \U0001f600",
                3 + i,
                None if i % 2 else f"{prefix}a",
                "cid" if i % 3 == 0 else None,
                None,
                "https://example.com/hook" if i % 2 else None,
                now - 60 + i,  # now
                now + 600,
                owner,
                now - 60 + i + 30.0,
            )
            for i, (s, _, _, owner, _) in enumerate(start)
        ]

    def named(many: Many, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        return [dict(zip(many.fields, row, strict=True)) for row in rows]

    def progress(prefix: str) -> list[tuple[Any, ...]]:
        return [(f"{prefix}{s}", state, p, was, deadline, "me", now) for s, state, p, was, deadline in changes]

    def results(prefix: str) -> list[tuple[Any, ...]]:
        return [(f"{prefix}b", "https://up/b.png", '["U1"]', None), (f"{prefix}f", "https://up/f.png", None, "t")]

    def entries(prefix: str) -> list[tuple[Any, ...]]:
        return [("hold", "k", f"{prefix}{s}", 3, "mj-fast", "imagine", None, now + 0.5) for s, *_ in start]

    async def placed(conn: Any, prefix: str) -> None:  # each job where its change finds it
        for s, state, p, _, started in start:
            where = jobs.c.id == f"{prefix}{s}"
            await conn.execute(update(jobs).where(where).values(state=state, progress=p, started_at=started))

    async def old(conn: Any) -> None:
        await conn.execute(store_jobs._ADMIT.statement, named(store_jobs._ADMIT, admitted("o")))
        await placed(conn, "o")
        await conn.execute(store_jobs._PROGRESS.statement, named(store_jobs._PROGRESS, progress("o")))
        await conn.execute(store_jobs._KEEP_RESULT.statement, named(store_jobs._KEEP_RESULT, results("o")))
        await conn.execute(ENTRIES.statement, named(ENTRIES, entries("o")))

    async def new(conn: Any) -> None:
        await store_jobs._ADMIT.run(conn, admitted("n"))
        await placed(conn, "n")
        await store_jobs._PROGRESS.run(conn, progress("n"))
        await store_jobs._KEEP_RESULT.run(conn, results("n"))
        await ENTRIES.run(conn, entries("n"))

    await transaction(db.engine, old)
    await transaction(db.engine, new)

    def twin(value: Any, prefix: str) -> Any:
        return value[1:] if isinstance(value, str) and value[:1] == prefix and len(value) == 2 else value

    async with db.engine.connect() as conn:
        found = [row._asdict() for row in (await conn.execute(select(jobs).order_by(jobs.c.id))).all()]
        kept = [row._asdict() for row in (await conn.execute(select(ledger).order_by(ledger.c.id))).all()]
    by_side: dict[str, list[dict[str, Any]]] = {"o": [], "n": []}
    for row in found:
        prefix = row["id"][0]
        by_side[prefix].append({name: twin(value, prefix) for name, value in row.items() if name != "request_id"})
    assert len(by_side["o"]) == len(start)
    assert by_side["o"] == by_side["n"]
    # what the progress write did, spelled out: a and c moved on (each started now: none had a start), d took its
    # window
    rows = {row["id"]: row for row in by_side["n"]}
    assert (rows["a"]["state"], rows["a"]["progress"], rows["a"]["started_at"]) == ("IN_PROGRESS", 10, now)
    assert (rows["b"]["progress"], rows["c"]["progress"], rows["c"]["deadline_at"]) == (40, 60, now + 500.5)
    assert (rows["b"]["started_at"], rows["c"]["started_at"], rows["d"]["deadline_at"]) == (now - 5, now, now + 77)
    assert rows["e"]["deadline_at"] == rows["g"]["deadline_at"] == now + 600 and rows["g"]["state"] == "SUBMITTED"
    assert rows["f"]["upstream_image_url"] is None and rows["b"]["buttons"] == '["U1"]'
    sides: dict[str, list[dict[str, Any]]] = {"o": [], "n": []}
    for row in kept:
        prefix = row["job_id"][0]
        sides[prefix].append({name: twin(value, prefix) for name, value in row.items() if name != "id"})
    assert sides["o"] == sides["n"] and len(sides["n"]) == len(start)

    async def gone(conn: Any) -> None:  # rows made to be compared, not a ledger that balances (the fixture checks)
        for table in (ledger, jobs, keys):
            await conn.execute(table.delete())

    await transaction(db.engine, gone)


async def test_a_value_the_dialects_processing_refuses_fails_as_execute_would(db: Database) -> None:
    """A float column given text: SQLite's processing of floats refuses it, and the failure is SQLAlchemy's
    StatementError as from `execute` (what callers that tell a refused statement from a bug catch), not a bare
    ValueError; PostgreSQL's driver refuses it itself."""
    await _made(db)

    async def many(conn: Any) -> None:
        await ADD.run(conn, [("a", "not a number", 1, None), ("b", 1.0, 1, None)])

    async def execute(conn: Any) -> None:
        await conn.execute(
            probe.insert(),
            [{"id": "a", "state": "open", "at": "not a number"}, {"id": "b", "state": "open", "at": 1.0}],
        )

    for work in (many, execute):
        with pytest.raises(SQLAlchemyError):
            await transaction(db.engine, work)
    assert await _rows(db) == {}
