"""The `mj-relay` command: serve | simulate | check-config | providers | keys create/list/topup/adjust/update/
hook-secret/revoke | ledger check/export.

`--config FILE` (or `MJ_RELAY_CONFIG`) may come before or after the verb; with none, the embedded defaults apply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from relay.config import DAY_S, Config, ConfigError, load_config

T = TypeVar("T")

CONFIG_HELP = "YAML configuration file (default: $MJ_RELAY_CONFIG, else the embedded defaults)."


def _config_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)(function)


# The data folder `serve --data-dir` takes from the environment (the Docker image sets it to its volume).
DATA_DIR_ENV = "MJ_RELAY_DATA_DIR"


def _data_dir_from_env(config: Config) -> Config:
    """`config` with `data_dir` from `MJ_RELAY_DATA_DIR` when it is set, over the file. Every command that opens the
    relay's database reads it, not `serve` alone: a key made with the file's folder while `serve` kept its data in
    the environment's would be in another database, and the relay would answer it as an incorrect key."""
    folder = os.environ.get(DATA_DIR_ENV)
    return config.model_copy(update={"data_dir": folder}) if folder else config


def _load(ctx: click.Context, config_path: str | None) -> Config:
    path = config_path or (ctx.obj or {}).get("config_path") or os.environ.get("MJ_RELAY_CONFIG") or None
    try:
        return _data_dir_from_env(load_config(path))
    except ConfigError as exc:
        click.echo(f"mj-relay: invalid configuration in {exc.source}:", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_config_option
@click.version_option(package_name="mj-relay")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """mj-relay: an OpenAI-compatible relay for Midjourney-proxy providers."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


@main.command()
@_config_option
@click.option("--host", envvar="MJ_RELAY_HOST", show_envvar=True, help="Address to listen on (overrides server.host).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    envvar="MJ_RELAY_PORT",
    show_envvar=True,
    help="Port to listen on, 0 for any free one (overrides server.port).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    envvar=DATA_DIR_ENV,
    show_envvar=True,
    help="Folder of the SQLite database, images and signing key (overrides data_dir).",
)
@click.pass_context
def serve(
    ctx: click.Context, config_path: str | None, host: str | None, port: int | None, data_dir: str | None
) -> None:
    """Run the relay."""
    from relay import collector, logs
    from relay.app import build_app
    from relay.images import SigningKeyError
    from relay.server import RelayServer, ServeConfig, bind, fit_connections

    config = _load(ctx, config_path)
    server = config.server.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    logs.setup(server.log_level)
    short = fit_connections(server.max_connections)
    if short is not None:
        logging.getLogger("relay").warning(
            "too few descriptors for server.max_connections: raise the hard limit (ulimit -Hn) or lower it",
            extra={"fields": {"max_connections": server.max_connections, "descriptors": short}},
        )
    config = config.model_copy(update={"server": server, **({"data_dir": data_dir} if data_dir else {})})
    address = f"[{server.host}]:{server.port}" if ":" in server.host else f"{server.host}:{server.port}"
    try:
        sockets = bind(server.host, server.port)
    except OSError as exc:
        click.echo(f"mj-relay: cannot listen on {address}: {exc.strerror or exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    # The port taken (`--port 0`: any free one) is the relay's own from here on: what it says of its address (the
    # image links in the client hooks of the tasks it adopts, without `server.public_url`) names it, not 0.
    bound = sockets[0].getsockname()[1]
    server = server.model_copy(update={"port": bound})
    config = config.model_copy(update={"server": server})
    _make_folders(config)
    _check_bucket(config)
    # The database, brought up to date here first: one it cannot use (not answering yet, a newer mj-relay's) is one
    # line and exit 3, as for every command on it, not the traceback of a failed start.
    _run_with_db(config, _nothing)
    url = f"http://{address.rsplit(':', 1)[0]}:{bound}"
    try:
        app = build_app(config)
    except SigningKeyError as exc:
        click.echo(f"mj-relay: {exc}", err=True)
        sys.exit(2)

    s3 = config.images.s3
    # Where the images are kept: a relay that keeps them in a bucket never writes the image directory.
    images = f"the bucket {s3.bucket} under {s3.prefix or '/'}" if s3 is not None else str(config.images_dir())

    def ready() -> None:
        click.echo(
            f"mj-relay listening on {url} "
            f"(database {_safe_url(config.database_url())}, images in {images}, "
            f"providers: {', '.join(p.name for p in config.providers)})"
        )

    collector.tune()  # now: the app and the server are made, their objects kept for good
    RelayServer(ServeConfig(app, server), on_ready=ready).run(sockets=sockets)


# What `serve` exits with when it cannot start (uvicorn's code for the same).
STARTUP_FAILURE = 3


def _check_bucket(config: Config) -> None:
    """The bucket of `images.s3`, checked as the relay's start checks it, before anything is opened: one that cannot
    be used (not made, not reached yet, the keys refused) is one line naming it and why, and exit
    `STARTUP_FAILURE`, not the traceback of a failed start."""
    s3 = config.images.s3
    if s3 is None:
        return
    from relay.images import StorageError
    from relay.images.s3 import S3Backend

    async def check() -> None:
        backend = S3Backend(s3)
        try:
            await backend.open()
        finally:
            await backend.close()

    try:
        asyncio.run(check())
    except StorageError as exc:
        click.echo(f"mj-relay: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)


async def _nothing(_db: Any) -> None:
    """No work: the database is only opened (and upgraded)."""


def _folders(config: Config, *, database_only: bool = False) -> list[tuple[str, Path]]:
    """The folders a configuration keeps files in, each with the setting that names it: the SQLite database's,
    and for a relay its image directory and the folder of its own signing key."""
    folders = []
    url = config.database_url()
    if url.startswith("sqlite") and ":///" in url and url.split(":///", 1)[1] not in ("", ":memory:"):
        folders.append(("database.url" if config.database.url else "data_dir", Path(url.split(":///", 1)[1]).parent))
    if not database_only:
        if config.images.s3 is None:
            folders.append(("images.dir" if config.images.dir else "data_dir", config.images_dir()))
        if not config.images.secrets():
            folders.append(("data_dir", Path(config.data_dir)))
    return folders


def _make_folders(config: Config, *, database_only: bool = False) -> None:
    """Make the configuration's folders, or exit naming the setting whose folder cannot be made (a path that is a
    file, or runs through one; no permission), before anything starts."""
    for setting, folder in _folders(config, database_only=database_only):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = "a file is in the way" if isinstance(exc, FileExistsError | NotADirectoryError) else exc.strerror
            click.echo(f"mj-relay: {setting}: cannot make the folder {folder} ({reason or exc})", err=True)
            sys.exit(2)


def _folder_in_the_way(folder: Path) -> Path | None:
    """The file that stands where `folder` or one of the folders above it would be, if any; nothing is made."""
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            return None if path.is_dir() else path
    return None


def _safe_url(url: str) -> str:
    """A database URL without its password, before the host or (as asyncpg also takes it) in the query."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        url = f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else url
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True)
@click.option(
    "--dialect",
    type=click.Choice(["midjourney-proxy", "new-api", "mj-v1"]),
    default="midjourney-proxy",
    show_default=True,
)
@click.option("--secret", default="", help="Credential clients must send (header or Bearer, by dialect).")
@click.option(
    "--fast-s", type=click.FloatRange(0, DAY_S), default=2.0, show_default=True, help="Duration of a fast job."
)
@click.option(
    "--relax-s", type=click.FloatRange(0, DAY_S), default=6.0, show_default=True, help="Duration of a relax job."
)
@click.option(
    "--turbo-s", type=click.FloatRange(0, DAY_S), default=1.0, show_default=True, help="Duration of a turbo job."
)
@click.option(
    "--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share of jobs that fail."
)
@click.option(
    "--error-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share of submits answered 500."
)
@click.option("--tile-px", type=click.IntRange(16, 2048), default=256, show_default=True, help="Long side of one tile.")
@click.option("--capacity", type=click.IntRange(1), default=None, help="Unfinished tasks before code 23 (queue full).")
@click.option("--seed", type=int, default=None, help="Seed for the failure draws (tasks and hook calls).")
@click.option("--remix", is_flag=True, help="Variations, rerolls and pans wait in MODAL for submit/modal.")
@click.option("--hooks/--no-hooks", default=True, show_default=True, help="Call each submit's notifyHook.")
@click.option("--hook-progress/--no-hook-progress", default=True, show_default=True, help="Hook progress steps too.")
@click.option(
    "--hook-drop", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share of hook calls lost."
)
@click.option("--hook-duplicate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share made twice.")
@click.option(
    "--hook-reorder", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share held back 0.5 s."
)
@click.option("--hook-delay-s", type=click.FloatRange(0), default=0.0, show_default=True, help="Added to each call.")
@click.option(
    "--list-at-most",
    type=click.IntRange(0),
    default=100,
    show_default=True,
    help="Tasks GET task/list answers, newest first (trueai: 100; 0: every one, as novicezk).",
)
def simulate(
    host: str,
    port: int,
    dialect: str,
    secret: str,
    fast_s: float,
    relax_s: float,
    turbo_s: float,
    fail_rate: float,
    error_rate: float,
    tile_px: int,
    capacity: int | None,
    seed: int | None,
    remix: bool,
    hooks: bool,
    hook_progress: bool,
    hook_drop: float,
    hook_duplicate: float,
    hook_reorder: float,
    hook_delay_s: float,
    list_at_most: int,
) -> None:
    """Run a fake Midjourney-proxy upstream over HTTP."""
    import uvicorn

    from adapters.simulator import SimEngine, SimSettings, build_sim_app
    from adapters.simulator.hooks import HookSettings
    from relay.server import bind

    settings = SimSettings(
        fast_s=fast_s,
        relax_s=relax_s,
        turbo_s=turbo_s,
        fail_rate=fail_rate,
        error_rate=error_rate,
        tile_px=tile_px,
        capacity=capacity,
        seed=seed,
        remix=remix,
    )
    calls = HookSettings(
        drop=hook_drop,
        duplicate=hook_duplicate,
        reorder=hook_reorder,
        delay_s=hook_delay_s,
        progress=hook_progress,
        seed=seed,  # the hook faults are failure draws too: one seed makes a run repeatable
    )
    app = build_sim_app(
        SimEngine(settings),
        dialect,  # type: ignore[arg-type]
        secret,
        calls if hooks else None,
        list_at_most=list_at_most or None,
    )
    # Taken first, as `serve` takes its port: the line names the port listened on (`--port 0`: any free one), and
    # only once it is.
    shown = f"[{host}]" if ":" in host else host
    try:
        sockets = bind(host, port)
    except OSError as exc:
        click.echo(f"mj-relay: cannot listen on {shown}:{port}: {exc.strerror or exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    click.echo(f"simulator ({dialect}) listening on http://{shown}:{sockets[0].getsockname()[1]}")
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=sockets)


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config(file: str) -> None:
    """Validate a configuration file and summarise it; when it is invalid, list every problem (unset environment
    variables and validation errors alike) and exit 2."""
    try:
        config = _data_dir_from_env(load_config(file))  # the folders `serve` would use
        folders: dict[str, str] = {}  # one problem a setting (data_dir names three folders)
        for setting, folder in _folders(config):
            if setting not in folders and (blocked := _folder_in_the_way(folder)) is not None:
                folders[setting] = f"{setting}: cannot make the folder {folder} (a file is in the way: {blocked})"
        if folders:  # as `serve` would refuse them (which makes the folders; this does not)
            raise ConfigError(list(folders.values()), file)
    except ConfigError as exc:
        count = len(exc.problems)
        click.echo(f"{exc.source}: invalid, {count} problem{'s' if count != 1 else ''}:", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)
    click.echo(f"{file}: ok")
    click.echo(f"  models: {', '.join(config.models)}")
    click.echo(f"  providers: {', '.join(f'{p.name} ({p.dialect})' for p in config.providers)}")
    click.echo(f"  database: {_safe_url(config.database_url())}")


@main.group()
def keys() -> None:
    """Manage API keys."""


# What a command on the database exits with when the database cannot be used (as `serve` when it cannot start):
# not 1, which is `ledger check`'s broken ledger and the keys commands' unknown key.
DATABASE_FAILURE = 3


def _run_with_db(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(database)` against the configuration's database (migrated first). A database that cannot be used
    (not reached, refusing the connection, not a database, a schema this mj-relay does not know, an upgrade it
    refuses) is one line naming it and why, and exit `DATABASE_FAILURE`."""
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from relay.store.db import Database, Unreachable, UpgradeRefused

    _make_folders(config, database_only=True)

    async def run() -> T:
        db = Database(config.database_url(), pool_size=2)
        try:
            await db.migrate()
            return await work(db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except (DBAPIError, Unreachable, PoolTimeout, CommandError, UpgradeRefused) as exc:
        if isinstance(exc, CommandError):  # alembic's: the recorded revision is none of this mj-relay's migrations
            reason = f"its schema is not one this mj-relay knows, perhaps a newer one's ({exc})"
        elif isinstance(exc, UpgradeRefused):
            reason = f"it cannot be upgraded: {exc} (mend or remove those rows, then run the command again)"
        else:
            reason = str(exc.orig if isinstance(exc, DBAPIError) else exc)
        click.echo(f"mj-relay: the database {_safe_url(config.database_url())} cannot be used: {reason}", err=True)
        sys.exit(DATABASE_FAILURE)


def _run_with_store(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    from relay.store.keys import KeyStore

    try:
        return _run_keys(config, lambda db: work(KeyStore(db.engine)))
    except ValueError as exc:
        click.echo(f"mj-relay: {exc}.", err=True)
        sys.exit(2)


_NEVER = ("never", "none", "")
_DURATION = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LONGEST_S = 100 * 366 * 86400  # a duration longer is a typing mistake (and past a float's range, a crash)


# More digits than any value an option takes; `int` refuses to read thousands of them.
_MAX_DIGITS = 18


def _whole(text: str) -> bool:
    """Whether `text` is a whole number: ASCII digits only (`str.isdigit` is also true of `²`, which `int` does
    not read)."""
    return text.isascii() and text.isdigit()


def _parse_when(value: str, now: float, option: str, *, ago: bool = False) -> float | None:
    """A time an operator writes: an ISO date or date-time (UTC unless it says otherwise), a duration from now
    (`30d`, `12h`, `90m`, `2w`; back from now with `ago`), or `never`."""
    text = value.strip().lower()
    if text in _NEVER:
        return None
    if _whole(text[:-1]) and text[-1:] in _DURATION:
        digits = text[:-1]
        if len(digits) > _MAX_DIGITS or int(digits) * _DURATION[text[-1]] > _LONGEST_S:
            raise click.BadParameter("give a duration of at most 100 years", param_hint=option)
        return now + (-1 if ago else 1) * int(digits) * _DURATION[text[-1]]
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        # A start (`--since`) is a time back from now; `never` is an end's word (`--expires never`).
        takes = "a duration back from now (30d, 12h)" if ago else "a duration (30d, 12h) or 'never'"
        raise click.BadParameter(
            f"give a date (2026-12-31), a date-time (2026-12-31T18:00:00Z), {takes}", param_hint=option
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _parse_models(value: str, config: Config) -> tuple[str, ...] | None:
    """`all` (or `*`) for every model, else model names separated by commas, each one the configuration has."""
    if value.strip().lower() in ("all", "*"):
        return None
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise click.BadParameter("give model names separated by commas, or 'all'", param_hint="--models")
    unknown = [name for name in names if name not in config.models]
    if unknown:
        raise click.BadParameter(
            f"unknown model{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (configured: "
            f"{', '.join(config.models)})",
            param_hint="--models",
        )
    return names


def _parse_rpm(value: str) -> int | None:
    if value.strip().lower() in _NEVER:
        return None
    if not _whole(value.strip()) or len(value.strip()) > _MAX_DIGITS or int(value) < 1:
        raise click.BadParameter("give a whole number of requests a minute (1 or more), or 'none'", param_hint="--rpm")
    return int(value)


def _when(at: float | None) -> str:
    return "never" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M")


@keys.command("create")
@_config_option
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--quota", type=click.IntRange(0), required=True, help="Credits the key may spend.")
@click.option("--models", default=None, help="Models the key may use, separated by commas (default: all).")
@click.option("--rpm", default=None, help="Requests that start work the key may make a minute (default: no limit).")
@click.option("--expires", default=None, help="When the key stops working: 2026-12-31, an ISO date-time, 30d, 12h.")
@click.pass_context
def keys_create(
    ctx: click.Context,
    config_path: str | None,
    name: str,
    quota: int,
    models: str | None,
    rpm: str | None,
    expires: str | None,
) -> None:
    """Create a key; it is printed once and never shown again."""
    config = _load(ctx, config_path)
    now = time.time()
    allowed = _parse_models(models, config) if models is not None else None
    limit = _parse_rpm(rpm) if rpm is not None else None
    expires_at = _parse_when(expires, now, "--expires") if expires is not None else None
    if expires_at is not None and expires_at <= now:
        # A key made expired never works: a typo (2025 for 2026), refused as the admin API refuses it.
        raise click.BadParameter("the time is in the past; give one to come", param_hint="--expires")
    record, secret = _run_with_store(
        config, lambda store: store.create(name, quota, now, models=allowed, rpm=limit, expires_at=expires_at)
    )
    click.echo(f"Created key {record.id} ({record.name}) with {record.balance} credits:")
    click.echo(secret)
    click.echo("Keep it now: it is stored hashed and cannot be shown again.", err=True)
    click.echo(f"Its hook secret (signs deliveries to the key's notifyHook URLs): {record.hook_secret}", err=True)


@keys.command("list")
@_config_option
@click.pass_context
def keys_list(ctx: click.Context, config_path: str | None) -> None:
    """List keys (never their secrets)."""
    config = _load(ctx, config_path)
    records = _run_with_store(config, lambda store: store.list())
    now = time.time()
    click.echo(
        f"{'ID':<17} {'NAME':<20} {'PREFIX':<12} {'BALANCE':>10} {'HELD':>8} {'STATUS':<8} {'CREATED':<16} "
        f"{'EXPIRES':<16} {'RPM':>6} MODELS"
    )
    for r in records:
        created = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        rpm = "-" if r.rpm is None else str(r.rpm)
        allowed = "all" if r.models is None else (",".join(r.models) or "none")
        click.echo(
            f"{r.id:<17} {r.name[:20]:<20} {r.prefix + '…':<12} {r.balance:>10} {r.held:>8} {r.status(now):<8} "
            f"{created:<16} {_when(r.expires_at):<16} {rpm:>6} {allowed}"
        )


@keys.command("hook-secret")
@_config_option
@click.argument("key_id")
@click.pass_context
def keys_hook_secret(ctx: click.Context, config_path: str | None, key_id: str) -> None:
    """Print the secret that signs a key's client hook deliveries (X-MJ-Relay-Signature)."""
    config = _load(ctx, config_path)
    record = _run_with_store(config, lambda store: store.get(key_id))
    if record is None:
        click.echo(f"No key with id {key_id!r}.", err=True)
        sys.exit(1)
    click.echo(record.hook_secret)


@keys.command("topup")
@_config_option
@click.argument("id_or_name")
@click.argument("amount", type=click.IntRange(1))
@click.option("--note", default="", help="Why (kept in the ledger).")
@click.pass_context
def keys_topup(ctx: click.Context, config_path: str | None, id_or_name: str, amount: int, note: str) -> None:
    """Add AMOUNT credits to a key (its id, or the name of one active key)."""
    config = _load(ctx, config_path)
    record = _run_with_store(config, lambda store: store.topup(id_or_name, amount, time.time(), note))
    click.echo(f"Added {amount} credits to {record.id} ({record.name}): balance {record.balance}, held {record.held}.")


@keys.command("adjust", context_settings={"ignore_unknown_options": True})  # AMOUNT may be negative: `-3`
@_config_option
@click.argument("id_or_name")
@click.argument("amount", type=int)
@click.option("--note", required=True, help="Why (kept in the ledger).")
@click.pass_context
def keys_adjust(ctx: click.Context, config_path: str | None, id_or_name: str, amount: int, note: str) -> None:
    """Correct a key's balance by AMOUNT credits (negative takes away; never below what the key holds)."""
    config = _load(ctx, config_path)
    record = _run_with_store(config, lambda store: store.adjust(id_or_name, amount, time.time(), note))
    click.echo(f"Adjusted {record.id} ({record.name}) by {amount}: balance {record.balance}, held {record.held}.")


@keys.command("update")
@_config_option
@click.argument("id_or_name")
@click.option("--name", default=None, help="A new name.")
@click.option("--models", default=None, help="Models the key may use, separated by commas, or 'all'.")
@click.option("--rpm", default=None, help="Requests that start work a minute, or 'none'.")
@click.option("--expires", default=None, help="When the key stops working (2026-12-31, 30d, ...), or 'never'.")
@click.pass_context
def keys_update(
    ctx: click.Context,
    config_path: str | None,
    id_or_name: str,
    name: str | None,
    models: str | None,
    rpm: str | None,
    expires: str | None,
) -> None:
    """Change a key's name, models, rate limit or expiry; what is not given stays."""
    from relay.store.keys import UNSET

    config = _load(ctx, config_path)
    now = time.time()
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if models is not None:
        changes["models"] = _parse_models(models, config)
    if rpm is not None:
        changes["rpm"] = _parse_rpm(rpm)
    if expires is not None:
        changes["expires_at"] = _parse_when(expires, now, "--expires")
    if not changes:
        raise click.UsageError("nothing to change: give --name, --models, --rpm or --expires")
    record = _run_with_store(
        config,
        lambda store: store.update(
            id_or_name,
            now,
            name=changes.get("name", UNSET),
            models=changes.get("models", UNSET),
            rpm=changes.get("rpm", UNSET),
            expires_at=changes.get("expires_at", UNSET),
        ),
    )
    allowed = "all" if record.models is None else ",".join(record.models)
    rate = "no limit" if record.rpm is None else f"{record.rpm}/min"
    click.echo(
        f"Updated {record.id} ({record.name}): models {allowed}, rate {rate}, expires {_when(record.expires_at)}."
    )


@keys.command("revoke")
@_config_option
@click.argument("id_or_name")
@click.pass_context
def keys_revoke(ctx: click.Context, config_path: str | None, id_or_name: str) -> None:
    """Revoke a key by id, or every active key with that name."""
    config = _load(ctx, config_path)
    count = _run_with_store(config, lambda store: store.revoke(id_or_name, time.time()))
    if not count:
        click.echo(f"No active key with id or name {id_or_name!r}.", err=True)
        sys.exit(1)
    click.echo(f"Revoked {count} key{'s' if count != 1 else ''}.")


@main.group()
def ledger() -> None:
    """Prove and export the ledger of credit movements."""


# What `ledger check` exits with when it finds a break.
LEDGER_BROKEN = 1


@ledger.command("check")
@_config_option
@click.pass_context
def ledger_check(ctx: click.Context, config_path: str | None) -> None:
    """Prove, for every key, balance = top-ups - captures + adjustments and held = open holds, and that no job has
    two outcomes; print a short report and exit 1 naming every break. Safe beside running relays."""
    from relay.store import ledger as book

    config = _load(ctx, config_path)
    report = _run_with_db(config, lambda db: book.check(db.engine))
    for line in book.describe(report):
        click.echo(line)
    if not report.ok:
        sys.exit(LEDGER_BROKEN)


@ledger.command("export")
@_config_option
@click.option("--key", "id_or_name", default=None, help="Only this key (its id, or the name of one active key).")
@click.option("--since", default=None, help="Only rows from this time (2026-01-01, an ISO date-time, 30d, 12h).")
@click.pass_context
def ledger_export(ctx: click.Context, config_path: str | None, id_or_name: str | None, since: str | None) -> None:
    """Write the ledger as CSV to standard output."""
    from relay.store import ledger as book
    from relay.store.keys import KeyStore

    config = _load(ctx, config_path)
    start = _parse_when(since, time.time(), "--since", ago=True) if since is not None else None  # 30d: back 30 days

    async def rendered(db: Any) -> str:
        key_id = (await KeyStore(db.engine).find(id_or_name, time.time())).id if id_or_name else None
        return await book.export_csv(db.engine, key_id=key_id, since=start)

    click.echo(_run_keys(config, rendered), nl=False)


def _run_keys(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    """`_run_with_db`, answering an unknown or ambiguous key as the keys commands do."""
    from relay.store.keys import AmbiguousKey, KeyNotFound

    try:
        return _run_with_db(config, work)
    except (KeyNotFound, AmbiguousKey) as exc:
        click.echo(f"mj-relay: {exc.args[0] if exc.args else exc}.", err=True)
        sys.exit(1)


def _shown(text: str) -> str:
    """Text from elsewhere (an upstream's words) as a terminal may show it: a character that is not printable
    (an escape sequence's ESC or CSI, a carriage return, a bidirectional override) is written as its escape, `\\x1b`,
    so it can neither move the cursor, retitle the window, write the clipboard, nor reorder what is shown."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


@main.command("providers")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line instead of a table.")
@click.pass_context
def providers(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Each configured provider: dialect, modes, health state, since when and why, as the relay processes on this
    database last recorded it. A provider with no recorded change is healthy."""
    import json

    from relay.store.health import HealthRecord, HealthStore

    config = _load(ctx, config_path)

    async def read(db: Any) -> dict[str, HealthRecord]:
        return await HealthStore(db.engine).all()

    records = _run_with_db(config, read)

    def when(at: float | None) -> str:
        return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")

    shown = [(p, records.get(p.name)) for p in config.providers]
    if as_json:
        for p, record in shown:
            recorded: dict[str, object] = {}
            if record is not None:
                recorded = {"state": record.state, "since": record.since, "until": record.cooling_until}
                recorded |= {"reason": record.reason, "process": record.process}
            described = {"name": p.name, "dialect": p.dialect, "modes": list(p.modes), "state": "healthy"}
            click.echo(json.dumps(described | recorded))
        return
    table = [["NAME", "DIALECT", "MODES", "STATE", "SINCE (UTC)", "UNTIL (UTC)", "REASON"]]
    for p, record in shown:
        line = [p.name, p.dialect, ",".join(p.modes)]
        if record is None:
            line += ["healthy", "-", "-", "-"]
        else:
            line += [record.state, when(record.since), when(record.cooling_until), _shown(record.reason) or "-"]
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1])


if __name__ == "__main__":  # pragma: no cover
    main()
