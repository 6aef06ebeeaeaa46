"""SQLite run on the event loop's own thread, behind the interface SQLAlchemy's aiosqlite dialect drives.

aiosqlite runs every call on a thread of its own: the loop hands the call over, the thread runs it, and hands the
result back. Under a burst that costs far more than the statement. The thread needs the GIL for each step of a
statement, and a busy loop thread gives it up only every switch interval (5 ms), so a group commit of a few hundred
rows waited up to a second. And each hand-back waits behind everything else the loop has queued. A local SQLite
statement itself takes microseconds. So the relay runs it where it is asked for, and a transaction of a thousand
rows costs a few milliseconds of the loop's time instead.

The one thing that could hold the loop is another process's write lock on the file: SQLite is the one-process
store, and the CLI's writes are short. So the relay opens its database with a busy timeout of `BUSY_MS`
(`store.db.Database`, whose connect hook sets it on every connection), and a transaction that found the file locked
is run again by `store.db.transaction`, with the loop free in between.

Only what the dialect calls is here: connect, cursors (execute, executemany, fetch), commit, rollback, close.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

# How long a statement waits for another process's write lock before it fails as "database is locked".
BUSY_MS = 200


class InlineCursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        if parameters is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Sequence[Sequence[Any]]) -> InlineCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    def __aiter__(self) -> InlineCursor:
        return self

    async def __anext__(self) -> Any:
        row = self._cursor.fetchone()
        if row is None:
            raise StopAsyncIteration
        return row


class _Immediate:
    """Stands for aiosqlite's queue of calls to its thread, which the dialect uses to set the isolation level:
    the call is made at once."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def put_nowait(self, call: tuple[Any, Any]) -> None:
        future, function = call
        try:
            future.set_result(function())
        except Exception as exc:  # handed to the dialect through the future, as aiosqlite does
            future.set_exception(exc)


class InlineConnection:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn: sqlite3.Connection | None = connection
        self._tx = _Immediate(connection)

    @property
    def _connection(self) -> sqlite3.Connection | None:  # what the dialect checks before a commit or rollback
        return self._conn

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError("no active connection")
        return self._conn

    @property
    def isolation_level(self) -> str | None:
        return self._open().isolation_level

    def cursor(self) -> InlineCursor:
        return InlineCursor(self._open().cursor())

    async def commit(self) -> None:
        self._open().commit()

    async def rollback(self) -> None:
        self._open().rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._open().create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def connect(path: str) -> InlineConnection:
    """A connection to the database file at `path` (":memory:" for one in memory), for `create_async_engine`'s
    `async_creator`. Its busy timeout is the engine's to set (`store.db`)."""
    connection = sqlite3.connect(path, check_same_thread=False)
    return InlineConnection(connection)
