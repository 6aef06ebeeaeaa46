"""The database: one async engine over SQLite (WAL) or PostgreSQL (asyncpg), schema by migrations.

SQLite allows one writer at a time, so the relay keeps a single connection to it and every statement queues for it
in order, which is faster than connections fighting over the file lock. Its statements run on the event loop's
own thread (`store.sqlite_inline`: the `sqlite+aiosqlite` dialect, without aiosqlite's thread). A statement that
finds the file locked by another process (the CLI) waits `busy_ms` for it: briefly in the relay, whose loop waits
with it, then the transaction is run again with the loop free; long in the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from relay.store import sqlite_inline

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
log = logging.getLogger("relay.store")

# SQLSTATEs of a transaction that lost a race and may simply be run again: deadlock, serialization failure.
_RETRY_STATES = {"40P01", "40001"}
# SQLSTATEs (and their classes) of a database that cannot serve now: a connection failure (08), too few resources
# (53: too many connections, a full disk), the server shutting down, crashed or starting (57P01-57P03), a statement
# cancelled (57014: a server-side time limit, an operator's cancel).
_UNAVAILABLE_CLASSES = ("08", "53")
_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "57014"}
# What SQLite says when its file cannot be written or read now (busy, a disk that is full or failing, a file that
# cannot be opened; a lock past the waits for it is `transient`), as opposed to a statement it cannot run (a bug).
_SQLITE_UNAVAILABLE = ("busy", "unable to open database file", "disk i/o error", "database or disk is full")
ATTEMPTS = 4
# How long a PostgreSQL connection may take to be made, and a statement's caller waits for a free connection.
CONNECT_TIMEOUT_S = 15.0
POOL_TIMEOUT_S = 60.0


def locked(exc: BaseException) -> bool:
    """Whether a write failed because another process held SQLite's write lock (past the wait for it)."""
    return isinstance(exc, OperationalError) and "locked" in str(exc.orig).lower()


def transient(exc: BaseException) -> bool:
    """Whether a transaction failed in a way that certainly changed nothing and may be run again: a deadlock, a
    serialization failure, a locked SQLite file. A lost connection is not retried: its commit may have landed."""
    if not isinstance(exc, DBAPIError):
        return False
    return _sqlstate(exc) in _RETRY_STATES or locked(exc)


def _sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE of a PostgreSQL driver's error (asyncpg's `sqlstate`, psycopg's `pgcode`); None for SQLite."""
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return state if isinstance(state, str) else None


class Unreachable(ConnectionError):
    """The database could not be reached, or did not answer in time: a connection refused, reset or cut, a
    statement past `statement_timeout_s`, no free connection within `POOL_TIMEOUT_S`. Raised by `connected` in
    place of the driver's own error (its cause), which alone would not say that it came from the database."""


class UpgradeRefused(RuntimeError):
    """The database cannot be upgraded as it is: the upgrade's copy of its tables would keep rows whose key is gone
    (deleted by hand where foreign keys were not enforced). Nothing of the upgrade is kept."""


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot serve now (down, restarting, unreachable, too slow, locked by another
    process past the waits), which time may mend; not a statement it refused (a bug, a constraint), which it won't."""
    if isinstance(exc, Unreachable | PoolTimeout):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or transient(exc):
        return True
    state = _sqlstate(exc)
    if state is not None and (state in _UNAVAILABLE_STATES or state.startswith(_UNAVAILABLE_CLASSES)):
        return True
    return isinstance(exc, OperationalError) and any(text in str(exc.orig).lower() for text in _SQLITE_UNAVAILABLE)


# The engines whose statements run on the event loop's own thread (`sqlite_inline`): made by `Database`.
_INLINE: weakref.WeakSet[AsyncEngine] = weakref.WeakSet()


@contextlib.asynccontextmanager
async def connected(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection of `engine`, given back on the way out (as `engine.connect()`).

    SQLAlchemy gives a connection back in a task of its own, so that a cancellation cannot cut the close short;
    that costs two turns of the event loop, which under a burst take longer than the statements, and a group
    commit's next batch waits them out. On SQLite run on the loop's thread (`sqlite_inline`) nothing in the close
    waits, so no cancellation can reach it there: it is closed in place. Other engines keep SQLAlchemy's way.

    The driver's own failures to reach the database (an OSError: refused, reset, a statement's time limit; a wait
    for a pooled connection that timed out) are raised as `Unreachable`."""
    try:
        if engine not in _INLINE:
            async with engine.connect() as conn:
                yield conn
            return
        conn = await engine.connect().start()
        try:
            yield conn
        finally:
            await conn.close()
    except (OSError, PoolTimeout) as exc:
        if isinstance(exc, Unreachable):
            raise
        raise Unreachable(f"the database did not answer: {type(exc).__name__}: {exc}") from exc


@contextlib.asynccontextmanager
async def begun(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection of `engine` in a transaction, committed on the way out or rolled back on an error (as
    `engine.begin()`; see `connected`)."""
    async with connected(engine) as conn, conn.begin():
        yield conn


async def transaction(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run `work` in one transaction, again (a few times, briefly apart) when it failed for a transient reason.
    Every write of the relay is safe to repeat this way: the failed attempt was rolled back."""
    for attempt in range(ATTEMPTS):
        try:
            async with begun(engine) as conn:
                return await work(conn)
        except DBAPIError as exc:
            if attempt + 1 == ATTEMPTS or not transient(exc):
                raise
            log.warning("transaction retried", extra={"fields": {"attempt": attempt + 1, "error": type(exc).__name__}})
            await asyncio.sleep(0.02 * 2**attempt)
    raise AssertionError("unreachable")


async def changed(engine: AsyncEngine, statement: Any, params: list[dict[str, Any]] | None = None) -> int:
    """Run one statement (with many parameter sets when `params` is a list) in a `transaction` of its own; the
    rows it changed."""

    async def work(conn: AsyncConnection) -> int:
        return int((await conn.execute(statement, params)).rowcount)

    return await transaction(engine, work)


def _sqlite_pragmas(busy_ms: int) -> Callable[[Any, Any], None]:
    def apply(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={busy_ms}", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    return apply


# Alembic is imported only where a schema is looked at (a tenth of a second at every start of a command or a
# simulator that never opens a database otherwise).


def _revision(connection: Connection) -> str | None:
    """The schema revision the database records (None: none yet)."""
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class Database:
    def __init__(
        self, url: str, *, pool_size: int = 10, busy_ms: int = 10_000, statement_timeout_s: float | None = None
    ) -> None:
        """`statement_timeout_s`: on PostgreSQL, how long a statement is waited for before it fails (None: for as
        long as it takes). A connection whose network path went silent (a firewall dropping it without a reset)
        answers nothing, and without a limit its statements would wait until TCP gives up, many minutes on."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                url,
                async_creator=lambda: sqlite_inline.connect(path or ":memory:"),
                pool_size=1,
                max_overflow=0,
                pool_timeout=300,
                hide_parameters=True,
            )
            _INLINE.add(self.engine)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas(busy_ms))
        else:
            connect_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_S}
            if statement_timeout_s is not None:
                connect_args["command_timeout"] = statement_timeout_s
            self.engine = create_async_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_timeout=POOL_TIMEOUT_S,
                pool_pre_ping=True,
                hide_parameters=True,  # error text never carries prompts or key hashes
                connect_args=connect_args,
            )

    async def migrate(self) -> None:
        """Bring the schema to the newest version; safe to run at every start. On PostgreSQL the upgrade holds an
        advisory lock for its transaction, so processes starting together upgrade one after the other (the later
        ones find the schema current) instead of running the same migrations at once. There, the upgrade has a
        connection of its own, without the statement time limit: waiting for another process's upgrade, or building
        an index over a large table, may take longer than any other statement."""
        if not self.is_sqlite:
            engine = create_async_engine(
                self.url, poolclass=NullPool, hide_parameters=True, connect_args={"timeout": CONNECT_TIMEOUT_S}
            )
            try:
                async with begun(engine) as conn:
                    await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('mj-relay migrations'))"))
                    await conn.run_sync(_upgrade)
            finally:
                await engine.dispose()
            return
        async with connected(self.engine) as conn:
            # A migration that alters a table SQLite cannot ALTER copies it to a new one and drops the old: with
            # foreign keys enforced, dropping `keys` while jobs refer to it fails (and the pragma can only be changed
            # outside a transaction). The copy keeps every row, which is checked before it is kept.
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            await conn.commit()
            try:
                async with conn.begin():
                    # Python's sqlite3 opens a transaction before a row is written, not before DDL: an ALTER run
                    # first would be kept however the upgrade ends, and a failed one (the foreign key check below, a
                    # migration's error) would leave a half-upgraded database that no later start can upgrade
                    # ("duplicate column"). Begun here, the whole upgrade is kept or none of it.
                    await conn.exec_driver_sql("BEGIN")
                    before = await conn.run_sync(_revision)
                    await conn.run_sync(_upgrade)
                    # Only an upgrade copies tables: a database already current is opened as it is (a row whose key
                    # an operator deleted by hand is a break `ledger check` names, not a reason to refuse it).
                    upgraded = await conn.run_sync(_revision) != before
                    if upgraded and (await conn.exec_driver_sql("PRAGMA foreign_key_check")).first():
                        raise UpgradeRefused("the upgraded database has rows whose key is gone")
            finally:
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()

    async def ping(self) -> bool:
        try:
            async with connected(self.engine) as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def dispose(self) -> None:
        await self.engine.dispose()
