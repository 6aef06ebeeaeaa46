"""The ledger and key store on both databases: every movement has its row, `check` finds each kind of break, an
upgraded database balances, and hostile values are refused."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from relay.store import ledger
from relay.store.db import MIGRATIONS, Database
from relay.store.jobs import Ending, JobStore, NewJob
from relay.store.keys import UNSET, AmbiguousKey, KeyNotFound, KeyStore
from tests.helpers import pg_database

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0


def job(job_id: str, price: int = 2, model: str = "mj-fast") -> NewJob:
    return NewJob(job_id, "req", model, "fast", "MID_JOURNEY", "imagine", "p", price, NOW + 600)


async def breaks(db: Database) -> list[str]:
    return (await ledger.check(db.engine)).breaks


async def run_sql(db: Database, *statements: str) -> None:
    async with db.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_every_movement_has_its_row_and_the_ledger_balances(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, store = KeyStore(db.engine), JobStore(db.engine)
    record, _ = await keys.create("team", 20, NOW)
    assert await store.open(record.id, [job("j1"), job("j2")], NOW)
    assert await store.open(record.id, [job("j3", 3)], NOW)
    ended = await store.finish_many([Ending("j1", True), Ending("j2", False), Ending("j1", False)], NOW + 1)
    assert [row is not None for row in ended] == [True, True, False]  # the second ending of j1 settles nothing
    await keys.topup("team", 10, NOW + 2, note="march")
    await keys.adjust(record.id, -4, NOW + 3, note="refund reversed")
    rows = await ledger.export_rows(db.engine)
    assert [(r.kind, r.job_id, r.amount) for r in rows] == [
        ("topup", None, 20),
        ("hold", "j1", 2),
        ("hold", "j2", 2),
        ("hold", "j3", 3),
        ("capture", "j1", 2),
        ("release", "j2", 2),
        ("topup", None, 10),
        ("adjust", None, -4),
    ]
    key = await keys.get(record.id)
    assert key is not None and (key.balance, key.held) == (20 - 2 + 10 - 4, 3)
    report = await ledger.check(db.engine)
    assert report.ok and (report.keys, report.jobs, report.rows) == (1, 3, 8)
    assert await ledger.export_rows(db.engine, key_id="nobody") == []
    assert len(await ledger.export_rows(db.engine, since=NOW + 2)) == 2
    monkeypatch.setattr(ledger, "EXPORT_PAGE", 3)  # read in pages of three: the same rows, in the same order
    assert await ledger.export_rows(db.engine) == rows
    since = await ledger.export_rows(db.engine, since=NOW + 1)
    assert [r.kind for r in since] == ["capture", "release", "topup", "adjust"]
    (use,) = await ledger.usage(db.engine)
    assert (use.model, use.action, use.jobs, use.credits, use.released_jobs, use.released_credits) == (
        "mj-fast",
        "imagine",
        1,
        2,
        1,
        2,
    )
    assert await ledger.open_holds(db.engine) == (1, 3)


async def test_concurrent_admissions_and_endings_keep_it_balanced(db: Database) -> None:
    record, _ = await KeyStore(db.engine).create("k", 30, NOW)
    store = JobStore(db.engine)
    admitted = await asyncio.gather(*(store.open(record.id, [job(f"j{i}")], NOW) for i in range(40)))
    assert admitted.count(True) == 15
    ids = [f"j{i}" for i, ok in enumerate(admitted) if ok]
    await asyncio.gather(*(store.finish(i, succeeded=n % 3 == 0, now=NOW) for n, i in enumerate(ids)))
    await asyncio.gather(*(store.finish(i, succeeded=True, now=NOW) for i in ids))  # all too late
    assert await breaks(db) == []


async def test_the_check_names_every_kind_of_break(db: Database) -> None:
    keys, store = KeyStore(db.engine), JobStore(db.engine)
    record, _ = await keys.create("team", 20, NOW)
    for name in ("a", "b", "c", "d"):
        assert await store.open(record.id, [job(name)], NOW)
    await store.finish_many([Ending("a", True), Ending("b", False)], NOW)
    assert await breaks(db) == []
    await run_sql(
        db,
        "UPDATE keys SET balance = balance + 5",  # credits from nowhere
        "DELETE FROM ledger WHERE job_id = 'c'",  # a hold never written down
        "UPDATE jobs SET hold_state = 'captured' WHERE id = 'd'",  # the job and the ledger disagree
    )
    found = await breaks(db)
    assert any("balance 23 but top-ups 20 - captures 2 + adjustments 0 = 18" in b for b in found), found
    assert any("held 4 but its open holds are 2" in b for b in found), found
    assert any(b.startswith("job c ") and "no ledger rows" in b for b in found), found
    assert any(b.startswith("job d ") and "says captured but the ledger's outcome is none" in b for b in found), found
    assert len(found) == 4
    await run_sql(  # put it right: the check passes again
        db,
        "UPDATE keys SET balance = balance - 5",
        f"INSERT INTO ledger (kind, key_id, job_id, amount, created_at) VALUES ('hold', '{record.id}', 'c', 2, 0)",
        "UPDATE jobs SET hold_state = 'held' WHERE id = 'd'",
    )
    assert await breaks(db) == []


async def test_the_check_names_a_job_whose_state_and_hold_disagree(db: Database) -> None:
    """A job that ended but still holds its price (credits stuck for good), one that succeeded but was not charged,
    one that failed but was charged, and one still running whose hold is already settled: each agrees with the
    ledger, so only the job's own state can show the break."""
    keys, store = KeyStore(db.engine), JobStore(db.engine)
    record, _ = await keys.create("team", 20, NOW)
    for name in ("a", "b", "c", "d"):
        assert await store.open(record.id, [job(name)], NOW)
    await store.finish_many([Ending("b", False), Ending("c", True), Ending("d", False)], NOW)
    assert await breaks(db) == []
    await run_sql(
        db,
        "UPDATE jobs SET state = 'FAILED' WHERE id = 'a'",  # ended, never settled
        "UPDATE jobs SET state = 'SUCCEEDED' WHERE id = 'b'",  # succeeded, released
        "UPDATE jobs SET state = 'FAILED' WHERE id = 'c'",  # failed, captured
        "UPDATE jobs SET state = 'IN_PROGRESS' WHERE id = 'd'",  # running, settled
    )
    found = await breaks(db)
    assert any(b.startswith("job a ") and "FAILED but its hold is held" in b for b in found), found
    assert any(b.startswith("job b ") and "SUCCEEDED but its hold is released" in b for b in found), found
    assert any(b.startswith("job c ") and "FAILED but its hold is captured" in b for b in found), found
    assert any(b.startswith("job d ") and "IN_PROGRESS but its hold is released" in b for b in found), found
    assert len(found) == 4
    await run_sql(
        db,
        "UPDATE jobs SET state = 'IN_PROGRESS' WHERE id = 'a'",
        "UPDATE jobs SET state = 'FAILED' WHERE id IN ('b', 'd')",
        "UPDATE jobs SET state = 'SUCCEEDED' WHERE id = 'c'",
    )
    assert await breaks(db) == []


async def test_a_job_with_two_outcomes_is_refused_by_the_database_and_named_by_the_check(db: Database) -> None:
    record, _ = await KeyStore(db.engine).create("team", 20, NOW)
    store = JobStore(db.engine)
    assert await store.open(record.id, [job("a")], NOW)
    await store.finish("a", succeeded=True, now=NOW)
    second = (
        f"INSERT INTO ledger (kind, key_id, job_id, amount, created_at) VALUES ('release', '{record.id}', 'a', 2, 0)"
    )
    with pytest.raises(IntegrityError):
        await run_sql(db, second)
    await run_sql(db, "DROP INDEX ux_ledger_outcome", second)  # past the database's own guard
    found = await breaks(db)
    assert any(b.startswith("job a ") and "2 outcomes (1 captures, 1 releases)" in b for b in found), found
    await run_sql(db, "DELETE FROM ledger WHERE kind = 'release'")
    assert await breaks(db) == []


async def test_an_upgraded_database_balances(tmp_path: Path) -> None:
    """Keys and jobs made before the ledger existed get the rows that explain them."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    database = Database(url)

    def upgrade_to(revision: str) -> object:
        def run(connection: object) -> None:
            config = AlembicConfig()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        return run

    try:
        async with database.engine.begin() as conn:
            await conn.run_sync(upgrade_to("0004"))  # type: ignore[arg-type]
            await conn.execute(
                text(
                    "INSERT INTO keys (id, name, key_hash, prefix, balance, held, created_at, hook_secret) "
                    "VALUES ('key_old', 'old', 'h', 'sk-mjr-x', 96, 2, 1, 'whsec_x')"
                )
            )
            for job_id, state, hold_state in (
                ("a", "SUCCEEDED", "captured"),
                ("b", "SUCCEEDED", "captured"),
                ("c", "FAILED", "released"),
                ("d", "IN_PROGRESS", "held"),
            ):
                await conn.execute(
                    text(
                        "INSERT INTO jobs (id, request_id, key_id, model, mode, bot, action, prompt, state, progress, "
                        "price, hold_state, created_at, updated_at, deadline_at) VALUES (:id, 'r', 'key_old', "
                        "'mj-fast', 'fast', 'MID_JOURNEY', 'imagine', 'p', :state, 100, 2, :hold, 1, 2, 3)"
                    ),
                    {"id": job_id, "state": state, "hold": hold_state},
                )
        await database.migrate()
        report = await ledger.check(database.engine)
        assert report.ok, report.breaks
        (opening,) = [r for r in await ledger.export_rows(database.engine) if r.kind == "topup"]
        assert opening.amount == 100  # 96 left + 4 charged
    finally:
        await database.dispose()


async def test_keys_by_name_topups_and_updates(db: Database) -> None:
    keys = KeyStore(db.engine)
    one, _ = await keys.create("shared", 0, NOW, models=["mj-fast", "mj-fast", "mj-relax"], rpm=5, expires_at=NOW + 60)
    assert one.models == ("mj-fast", "mj-relax") and one.rpm == 5 and one.expires_at == NOW + 60
    assert one.allows("mj-relax") and not one.allows("mj-turbo")
    assert one.status(NOW) == "active" and one.status(NOW + 60) == "expired"
    assert [r.kind for r in await ledger.export_rows(db.engine)] == ["topup"]  # even a quota of 0
    two, _ = await keys.create("shared", 5, NOW)
    with pytest.raises(AmbiguousKey):
        await keys.topup("shared", 5, NOW)
    with pytest.raises(KeyNotFound):
        await keys.topup("nobody", 5, NOW)
    assert (await keys.topup(two.id, 5, NOW)).balance == 10
    changed = await keys.update(one.id, NOW, models=None, rpm=None, expires_at=None, name="solo")
    assert (changed.name, changed.models, changed.rpm, changed.expires_at) == ("solo", None, None, None)
    kept = await keys.update("solo", NOW, name=UNSET, rpm=7)
    assert (kept.name, kept.rpm, kept.models) == ("solo", 7, None)
    assert (await keys.topup("shared", 1, NOW)).id == two.id  # now one key has the name
    await keys.revoke(two.id, NOW)
    with pytest.raises(KeyNotFound):
        await keys.topup("shared", 1, NOW)  # by name: live keys only
    assert await breaks(db) == []


async def test_a_name_an_expired_key_shares_names_the_active_key(db: Database) -> None:
    """The README's rule: a key is named by its name when exactly one active key has it. A key that expired under
    the name (an operator made a new one to replace it) does not make the name ambiguous; alone, it is still named
    (to be looked at, or given a new expiry)."""
    keys = KeyStore(db.engine)
    old, _ = await keys.create("team", 0, NOW, expires_at=NOW + 60)
    assert (await keys.update("team", NOW + 61, rpm=3)).id == old.id  # expired and alone: still named
    new, _ = await keys.create("team", 0, NOW + 120)
    assert (await keys.topup("team", 5, NOW + 120)).id == new.id
    assert (await keys.find("team", NOW + 120)).id == new.id
    assert (await keys.update("team", NOW + 120, rpm=9)).id == new.id
    assert (await keys.get(old.id)).balance == 0  # type: ignore[union-attr]
    await keys.create("team", 0, NOW + 120)
    with pytest.raises(AmbiguousKey):  # two active keys with the name: the id decides
        await keys.topup("team", 1, NOW + 120)
    assert await breaks(db) == []


@pytest.mark.parametrize(
    "change",
    [
        {"name": ""},
        {"name": "x" * 201},
        {"name": "nul\x00"},
        {"name": 5},
        {"models": "mj-fast"},
        {"models": ["\ud800"]},
        {"models": [""]},
        {"models": [3]},
        {"rpm": 0},
        {"rpm": True},
        {"rpm": 1.5},
        {"rpm": 10**9},
        {"expires_at": float("nan")},
        {"expires_at": float("inf")},
        {"expires_at": "tomorrow"},
        {"expires_at": -1},
    ],
)
async def test_hostile_key_values_are_refused(db: Database, change: dict[str, object]) -> None:
    keys = KeyStore(db.engine)
    record, _ = await keys.create("k", 1, NOW)
    with pytest.raises(ValueError):
        await keys.update(record.id, NOW, **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await keys.create(**{"name": "k", "quota": 1, "now": NOW, **change})  # type: ignore[arg-type]


@pytest.mark.parametrize("amount", [0, -1, True, 1.5, 10**13, "5"])
async def test_hostile_topups_are_refused_and_write_nothing(db: Database, amount: object) -> None:
    keys = KeyStore(db.engine)
    record, _ = await keys.create("k", 1, NOW)
    with pytest.raises(ValueError):
        await keys.topup(record.id, amount, NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await keys.topup(record.id, 1, NOW, note="\x00")
    with pytest.raises(ValueError):
        await keys.adjust(record.id, -2, NOW)  # below what it has
    assert len(await ledger.export_rows(db.engine)) == 1


async def test_the_rate_window_counts_across_stores(db: Database) -> None:
    record, _ = await KeyStore(db.engine).create("k", 1, NOW, rpm=2)
    first, second = KeyStore(db.engine), KeyStore(db.engine)  # two processes' stores on one database
    start = 1_800_000_000.0  # a whole minute
    assert await first.take_rate(record.id, start + 1) is None
    assert await second.take_rate(record.id, start + 2) is None
    assert await first.take_rate(record.id, start + 50) == 10
    assert await second.take_rate(record.id, start + 59.5) == 1
    assert await first.take_rate(record.id, start + 60) is None  # the next minute


def test_the_csv_never_starts_a_formula() -> None:
    row = ledger.LedgerRow(1, "topup", "key_1", "=cmd()", None, 5, None, None, '+1, "quoted"\nline', NOW)
    rendered = ledger.render_csv([row])
    assert rendered.splitlines()[0] == ",".join(ledger.CSV_COLUMNS)
    assert "'=cmd()" in rendered and '"\'+1, ""quoted""\nline"' in rendered
    assert "2027-01-15T08:00:00.000Z" in rendered


@pytest.mark.parametrize("separator", [",", ";", "\t"])
def test_the_csv_starts_no_formula_where_a_spreadsheet_splits_on_another_separator(separator: str) -> None:
    """Excel in much of Europe opens a CSV split on `;` (quotes count only at a cell's start, and the first cell is
    the id), importers take tabs, and a line break ends the row there: text after any of them starts a cell, which
    must not be a formula."""
    names = ["x;=cmd|' /C calc'!A0;", "x;\"=cmd|' /C calc'!A0\";", "x\t@SUM(1)", "-x;+1"]
    notes = ["paid\n=cmd|' /C calc'!A0", "paid\r\n-1+1", "paid\r+1", None]
    rows = [
        ledger.LedgerRow(i, "topup", "key_1", name, None, 5, None, None, note, NOW)
        for i, (name, note) in enumerate(zip(names, notes, strict=True))
    ]
    rendered = ledger.render_csv(rows)
    cells = [cell for line in csv.reader(io.StringIO(rendered, newline=""), delimiter=separator) for cell in line]
    assert not [cell for cell in cells if cell.lstrip('"')[:1] in ("=", "+", "-", "@", "\t", "\r")]
    read = list(csv.DictReader(io.StringIO(rendered, newline="")))  # as CSV: the text, each formula marked
    assert [row["key_name"] for row in read] == [
        "x;'=cmd|' /C calc'!A0;",
        "x;\"'=cmd|' /C calc'!A0\";",
        "x\t'@SUM(1)",
        "'-x;'+1",
    ]
    assert [row["note"] for row in read] == ["paid\n'=cmd|' /C calc'!A0", "paid\r\n'-1+1", "paid\r'+1", ""]


async def test_usage_counts_a_capture_on_the_utc_day_it_was_made_on_both_databases(db: Database) -> None:
    """A capture in the last half second of a day is that day's, not the next (PostgreSQL rounds a float cast to
    an integer; SQLite truncates), in the admin usage and in the chat front ends' billing alike."""
    from relay.store import reports

    midnight = 1_800_057_600.0  # a UTC midnight
    keys, store = KeyStore(db.engine), JobStore(db.engine)
    record, _ = await keys.create("team", 20, midnight - 100)
    assert await store.open(record.id, [job("late")], midnight - 100)
    await store.finish("late", succeeded=True, now=midnight - 0.3)
    (use,) = await ledger.usage(db.engine, since=midnight - 86_400, until=midnight)
    assert (use.day, use.credits) == ("2027-01-15", 2)
    (day,) = await reports.usage_by_day(db.engine, record.id, int(midnight) - 86_400, int(midnight))
    assert (day.day, day.credits) == (int(midnight) - 86_400, 2)
    assert await reports.usage_by_day(db.engine, record.id, int(midnight), int(midnight) + 86_400) == []


@pytest.mark.postgres
async def test_an_export_read_in_pages_is_the_ledger_at_one_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL a row's id is taken when it is written, not when its transaction commits: a transaction that
    commits while an export is between two pages may hold ids below those already read. The export still shows
    the ledger as it was at one moment, never a later row without an earlier one."""
    async with pg_database() as url:
        db = Database(url, pool_size=5)
        try:
            await db.migrate()
            keys = KeyStore(db.engine)
            first, _ = await keys.create("first", 10, NOW)
            second, _ = await keys.create("second", 20, NOW)
            async with db.engine.connect() as slow:  # a top-up of `first` under way: its row's id is taken
                await slow.begin()
                await slow.execute(text("UPDATE keys SET balance = balance + 5 WHERE id = :k"), {"k": first.id})
                await slow.execute(
                    text("INSERT INTO ledger (kind, key_id, amount, created_at) VALUES ('topup', :k, 5, :t)"),
                    {"k": first.id, "t": NOW},
                )
                await keys.topup(second.id, 7, NOW)  # a later id, committed first

                async def between_pages(_: float) -> None:  # both commit while the export is between pages
                    if slow.in_transaction():
                        await slow.commit()
                        await keys.topup(second.id, 9, NOW)

                monkeypatch.setattr(ledger, "EXPORT_PAGE", 3)
                monkeypatch.setattr(ledger, "asyncio", SimpleNamespace(sleep=between_pages))
                rows = await ledger.export_rows(db.engine)
            balances: dict[str, int] = {}
            for row in rows:
                balances[row.key_name] = balances.get(row.key_name, 0) + row.amount
            # the balances were (10, 27) before the slow top-up committed, then (15, 27), then (15, 36)
            assert balances in ({"first": 10, "second": 27}, {"first": 15, "second": 27}, {"first": 15, "second": 36})
            assert await breaks(db) == []
        finally:
            await db.dispose()


async def test_an_ending_that_does_not_hold_leaves_the_next_ending_of_its_job_in_one_group_commit(db: Database) -> None:
    """Two writers may end one job in the same group commit: the pending sweep, which read the job as PENDING, and
    the lifecycle, ending the failure an upstream hook reported once it adopted the job meanwhile. The sweep's
    ending holds only while the job is PENDING, so it does not; the failure must still end the job and release its
    hold, as it would have written on its own, and not be answered "ended already" while the job runs on, held."""
    from relay.clock import SystemClock
    from relay.core.events import JobEvents
    from relay.core.finish import Finisher
    from relay.domain import FailureCode
    from relay.metrics import Metrics

    keys, store = KeyStore(db.engine), JobStore(db.engine, owner="me")
    record, _ = await keys.create("team", 20, NOW)
    assert await store.open(record.id, [job("adopted")], NOW)
    assert await store.adopt("adopted", "sim", "task-1", NOW + 1)  # a hook named it: it runs upstream
    finisher = Finisher(store, JobEvents(), Metrics(), SystemClock())
    try:
        swept, failed = await asyncio.gather(
            finisher.end("adopted", succeeded=False, error_code=FailureCode.INTERRUPTED, fail_reason="never sent"),
            finisher.end("adopted", succeeded=False, error_code=FailureCode.FAILED, fail_reason="upstream failed"),
        )
    finally:
        await finisher.close()
    assert swept is None
    assert failed is not None and (failed.state.value, failed.hold_state, failed.error_code) == (
        "FAILED",
        "released",
        "failed",
    )
    key = await keys.get(record.id)
    assert key is not None and (key.balance, key.held) == (20, 0)
    assert await breaks(db) == []
