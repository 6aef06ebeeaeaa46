"""`mj-relay keys ...` and `mj-relay ledger check|export` as an operator runs them, on a fresh working directory."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sqlite3
from pathlib import Path

from tests.cli.test_cli import cli
from tests.helpers import database_at


def _config(tmp_path: Path) -> Path:
    # Written by hand (not `relay_config`): this test breaks its ledger on purpose.
    path = tmp_path / "relay.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n")
    return path


def test_keys_commands_and_a_corrupted_ledger_fails_the_check(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    made = cli(
        tmp_path,
        "--config",
        config,
        "keys",
        "create",
        "--name",
        "shop",
        "--quota",
        "50",
        "--models",
        "mj-fast,mj-relax",
        "--rpm",
        "30",
        "--expires",
        "2999-01-01",
    )
    assert made.returncode == 0, made.stderr
    assert cli(tmp_path, "--config", config, "keys", "topup", "shop", "25", "--note", "invoice 7").returncode == 0
    assert (
        cli(tmp_path, "--config", config, "keys", "adjust", "shop", "-5", "--note", "goodwill undone").returncode == 0
    )
    updated = cli(tmp_path, "--config", config, "keys", "update", "shop", "--rpm", "none", "--models", "all")
    assert "models all, rate no limit, expires 2999-01-01 00:00" in updated.stdout, updated.stderr
    listed = cli(tmp_path, "--config", config, "keys", "list").stdout
    assert " 70 " in listed and "active" in listed and "2999-01-01" in listed
    refused = cli(tmp_path, "--config", config, "keys", "update", "shop", "--models", "gpt-4")
    assert refused.returncode == 2 and "unknown model gpt-4" in refused.stderr
    assert cli(tmp_path, "--config", config, "keys", "topup", "nobody", "5").returncode == 1

    checked = cli(tmp_path, "--config", config, "ledger", "check")
    assert checked.returncode == 0 and checked.stdout.startswith("ledger ok: 1 keys, 0 jobs, 3 ledger rows")
    exported = cli(tmp_path, "--config", config, "ledger", "export", "--key", "shop")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["kind"], r["amount"], r["note"]) for r in rows] == [
        ("topup", "50", "initial quota"),
        ("topup", "25", "invoice 7"),
        ("adjust", "-5", "goodwill undone"),
    ]

    with sqlite3.connect(tmp_path / "data" / "mj-relay.db") as db:
        db.execute("UPDATE keys SET balance = balance + 1000, held = 3")  # credits no ledger row explains
    broken = cli(tmp_path, "--config", config, "ledger", "check")
    assert broken.returncode == 1
    assert "2 breaks" in broken.stdout
    assert "balance 1070 but top-ups 75 - captures 0 + adjustments -5 = 70" in broken.stdout
    assert "held 3 but its open holds are 0" in broken.stdout


def test_a_revoked_key_is_not_topped_up(tmp_path: Path) -> None:
    """Credits put on a revoked key could never be spent: the command refuses, as the admin API does, and the
    balance and the ledger stay as they were. A correction (`adjust`) is still possible."""
    config = str(_config(tmp_path))
    made = cli(tmp_path, "--config", config, "keys", "create", "--name", "gone", "--quota", "10")
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.split()[2]
    assert cli(tmp_path, "--config", config, "keys", "revoke", key_id).returncode == 0

    refused = cli(tmp_path, "--config", config, "keys", "topup", key_id, "100", "--note", "late invoice")
    assert refused.returncode == 2, refused.stdout
    assert "revoked" in refused.stderr and "Added" not in refused.stdout
    assert cli(tmp_path, "--config", config, "keys", "adjust", key_id, "-10", "--note", "closed").returncode == 0

    exported = cli(tmp_path, "--config", config, "ledger", "export", "--key", key_id)
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["kind"], r["amount"]) for r in rows] == [("topup", "10"), ("adjust", "-10")]
    assert cli(tmp_path, "--config", config, "ledger", "check").returncode == 0


def test_digits_that_are_not_ascii_are_a_usage_error_not_a_crash(tmp_path: Path) -> None:
    """`²` is a digit to Python's `str.isdigit` but no number `int` reads, nor are 5000 digits: such a typo is
    refused with a message."""
    config = str(_config(tmp_path))
    digits = "9" * 5000  # more than `int` reads
    for option, value in [
        ("--rpm", "²"),
        ("--rpm", "1²"),
        ("--rpm", digits),
        ("--expires", "²d"),
        ("--expires", "3²h"),
        ("--expires", digits + "d"),
    ]:
        made = cli(tmp_path, "--config", config, "keys", "create", "--name", "x", "--quota", "1", option, value)
        assert made.returncode == 2, (option, value, made.stdout)
        assert "Traceback" not in made.stderr and option in made.stderr, made.stderr
    assert cli(tmp_path, "--config", config, "keys", "list").stdout.count("\n") == 1  # the header only: none made


def test_a_key_is_not_created_already_expired(tmp_path: Path) -> None:
    """A past `--expires` is a typo (2025 for 2026): the key would never work, so none is made, as the admin API
    refuses it. `keys update` may still end a key's access now (`--expires 0m`)."""
    config = str(_config(tmp_path))
    for value in ["2020-01-01", "2000-01-01T00:00:00Z", "0m"]:
        made = cli(tmp_path, "--config", config, "keys", "create", "--name", "late", "--quota", "5", "--expires", value)
        assert made.returncode == 2, (value, made.stdout)
        assert "--expires" in made.stderr and "past" in made.stderr, made.stderr
    assert cli(tmp_path, "--config", config, "keys", "list").stdout.count("\n") == 1  # the header only: none made

    made = cli(tmp_path, "--config", config, "keys", "create", "--name", "soon", "--quota", "5", "--expires", "1h")
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.split()[2]
    ended = cli(tmp_path, "--config", config, "keys", "update", key_id, "--expires", "0m")
    assert ended.returncode == 0, ended.stderr
    assert "expired" in cli(tmp_path, "--config", config, "keys", "list").stdout


def test_a_since_that_is_no_time_is_refused_naming_what_since_takes(tmp_path: Path) -> None:
    """`--since` is a start, back from now: the refusal offers what it reads, not the `never` of `--expires`."""
    config = str(_config(tmp_path))
    refused = cli(tmp_path, "--config", config, "ledger", "export", "--since", "1x")
    assert refused.returncode == 2 and "--since" in refused.stderr
    assert "a duration back from now (30d, 12h)" in refused.stderr and "never" not in refused.stderr, refused.stderr
    expiring = cli(tmp_path, "--config", config, "keys", "create", "--name", "x", "--quota", "1", "--expires", "1x")
    assert expiring.returncode == 2 and "'never'" in expiring.stderr, expiring.stderr


def test_a_name_that_looks_like_a_key_id_is_refused_as_the_admin_api_refuses_it(tmp_path: Path) -> None:
    """Commands name a key by its id first, then by its name: a key named like another key's id could not be
    reached by its name, and `keys revoke NAME` revoked the other key."""
    config = str(_config(tmp_path))
    first = cli(tmp_path, "--config", config, "keys", "create", "--name", "shop", "--quota", "5")
    key_id = first.stdout.split()[2]
    for name in (key_id, "key_", "Shop\x1b[2J"):
        made = cli(tmp_path, "--config", config, "keys", "create", "--name", name, "--quota", "5")
        assert made.returncode == 2 and "name must not" in made.stderr, (name, made.stdout, made.stderr)
        renamed = cli(tmp_path, "--config", config, "keys", "update", "shop", "--name", name)
        assert renamed.returncode == 2 and "name must not" in renamed.stderr, (name, renamed.stderr)
    listed = cli(tmp_path, "--config", config, "keys", "list").stdout
    assert listed.count("\n") == 2 and " shop " in listed  # the header and the one key, named as it was


def test_a_database_that_cannot_be_used_is_one_line_and_not_a_broken_ledger(tmp_path: Path) -> None:
    """A database that is no database, that a newer mj-relay upgraded, or that does not answer: each command says so
    in one line and exits 3, as `serve` does when it cannot start; a traceback's exit 1 was `ledger check`'s broken
    ledger (and the keys commands' unknown key), so a cron job could not tell a break from an outage."""
    config = str(_config(tmp_path))
    assert cli(tmp_path, "--config", config, "keys", "create", "--name", "shop", "--quota", "5").returncode == 0
    database = tmp_path / "data" / "mj-relay.db"
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_a_newer_relay'")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "mj-relay.db").write_text("not a database\n" * 100)
    (tmp_path / "down.yaml").write_text("database: {url: 'postgresql+asyncpg://relay:pw@127.0.0.1:1/relay'}\n")
    down = ["--config", str(tmp_path / "down.yaml")]
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--config", config], {}, "9999_from_a_newer_relay"),
        (["--config", config], {"MJ_RELAY_DATA_DIR": str(tmp_path / "garbage")}, "file is not a database"),
        (down, {}, "did not answer"),
    ]
    for options, env, reason in cases:
        for command in (["keys", "list"], ["keys", "topup", "shop", "1"], ["ledger", "check"], ["providers"]):
            result = cli(tmp_path, *options, *command, env=env)
            assert result.returncode == 3, (command, result)
            (line,) = result.stderr.strip().splitlines()
            assert line.startswith("mj-relay: the database ") and reason in line, (command, line)
            assert ":pw@" not in line  # the password is never shown


def test_a_key_named_in_bytes_that_are_not_utf8_is_no_key_not_a_crash(tmp_path: Path) -> None:
    """`café` typed in a Latin-1 terminal reaches the command as bytes that are not UTF-8 (Python's surrogate
    escapes), which no database stores: looked up as it came, it was a traceback (`ledger export --key`) or the
    encoder's own words, exit 2. No key has such an id or name."""
    config = str(_config(tmp_path))
    assert cli(tmp_path, "--config", config, "keys", "create", "--name", "caf\u00e9", "--quota", "5").returncode == 0
    typed = os.fsdecode("caf\u00e9".encode("latin-1"))
    for command in (
        ["ledger", "export", "--key", typed],
        ["keys", "topup", typed, "5"],
        ["keys", "adjust", typed, "5", "--note", "n"],
        ["keys", "update", typed, "--rpm", "5"],
        ["keys", "hook-secret", typed],
        ["keys", "revoke", typed],
    ):
        result = cli(tmp_path, "--config", config, *command)
        assert result.returncode == 1, (command, result.stderr)
        assert "Traceback" not in result.stderr and "codec" not in result.stderr, result.stderr
        assert "key with id" in result.stderr, result.stderr
    # and nothing changed
    (line,) = cli(tmp_path, "--config", config, "keys", "list").stdout.splitlines()[1:]
    balance, rpm, status = line.split()[3], line.split()[9], line.split()[5]
    assert (balance, rpm, status) == ("5", "-", "active"), line


def test_a_key_deleted_by_hand_is_a_break_the_check_names_not_a_database_it_cannot_open(tmp_path: Path) -> None:
    """A key deleted in the `sqlite3` shell (which enforces no foreign keys) leaves its ledger rows naming it. The
    check is the tool that finds such a break: it names it and exits 1, and the other commands still work. Every
    start of a database already current checked its foreign keys as if it had just been copied by an upgrade, and
    refused it with a traceback, `ledger check` included."""
    config = str(_config(tmp_path))
    assert cli(tmp_path, "--config", config, "keys", "create", "--name", "gone", "--quota", "5").returncode == 0
    made = cli(tmp_path, "--config", config, "keys", "create", "--name", "kept", "--quota", "7")
    assert made.returncode == 0, made.stderr
    with sqlite3.connect(tmp_path / "data" / "mj-relay.db") as db:
        (gone,) = db.execute("SELECT id FROM keys WHERE name = 'gone'").fetchone()
        db.execute("DELETE FROM keys WHERE name = 'gone'")
    checked = cli(tmp_path, "--config", config, "ledger", "check")
    assert "Traceback" not in checked.stderr, checked.stderr
    assert checked.returncode == 1, checked
    assert f"BREAK ledger rows name key {gone}, which does not exist" in checked.stdout
    listed = cli(tmp_path, "--config", config, "keys", "list")
    assert listed.returncode == 0 and " kept " in listed.stdout, listed.stderr


def test_an_upgrade_that_would_keep_a_row_whose_key_is_gone_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """An older database with a job whose key is gone cannot be upgraded (the upgrade copies the tables, and the
    copy is checked): each command says so in one line and exits 3, as for any database it cannot use; a traceback's
    exit 1 was `ledger check`'s broken ledger."""
    config = str(_config(tmp_path))
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'mj-relay.db'}"
    asyncio.run(database_at(url, "0001"))
    with sqlite3.connect(tmp_path / "data" / "mj-relay.db") as db:  # the sqlite3 shell: foreign keys not enforced
        db.execute(
            "INSERT INTO jobs (id, request_id, key_id, model, mode, bot, action, prompt, state, progress, price, "
            "hold_state, created_at, updated_at, deadline_at) VALUES ('job_gone_aaaaaaa', 'r', 'key_gone', "
            "'mj-fast', 'fast', 'MID_JOURNEY', 'imagine', 'p', 'SUCCEEDED', 100, 2, 'captured', 1, 2, 3)"
        )
    for command in (["keys", "list"], ["ledger", "check"]):
        result = cli(tmp_path, "--config", config, *command)
        assert result.returncode == 3, (command, result)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("mj-relay: the database ") and "key is gone" in line, line
