"""The `mj-relay` command: serve | simulate | check-config | providers | keys create/list/hook-secret/revoke.

`--config FILE` (or `MJ_RELAY_CONFIG`) may come before or after the verb; with none, the embedded defaults apply.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from relay.config import Config, ConfigError, load_config

T = TypeVar("T")

CONFIG_HELP = "YAML configuration file (default: $MJ_RELAY_CONFIG, else the embedded defaults)."


def _config_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)(function)


def _load(ctx: click.Context, config_path: str | None) -> Config:
    path = config_path or (ctx.obj or {}).get("config_path") or os.environ.get("MJ_RELAY_CONFIG") or None
    try:
        return load_config(path)
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
    envvar="MJ_RELAY_DATA_DIR",
    show_envvar=True,
    help="Folder of the SQLite database, images and signing key (overrides data_dir).",
)
@click.pass_context
def serve(
    ctx: click.Context, config_path: str | None, host: str | None, port: int | None, data_dir: str | None
) -> None:
    """Run the relay."""
    from relay import logs
    from relay.app import build_app
    from relay.server import RelayServer, ServeConfig, bind

    config = _load(ctx, config_path)
    server = config.server.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    config = config.model_copy(update={"server": server, **({"data_dir": data_dir} if data_dir else {})})
    logs.setup(server.log_level)
    address = f"[{server.host}]:{server.port}" if ":" in server.host else f"{server.host}:{server.port}"
    try:
        sockets = bind(server.host, server.port)
    except OSError as exc:
        click.echo(f"mj-relay: cannot listen on {address}: {exc.strerror or exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    bound = sockets[0].getsockname()[1]
    url = f"http://{address.rsplit(':', 1)[0]}:{bound}"
    app = build_app(config)

    def ready() -> None:
        click.echo(
            f"mj-relay listening on {url} "
            f"(database {_safe_url(config.database_url())}, images in {config.images_dir()}, "
            f"providers: {', '.join(p.name for p in config.providers)})"
        )

    _tune_gc()
    RelayServer(ServeConfig(app, server), on_ready=ready).run(sockets=sockets)


# What `serve` exits with when it cannot start (uvicorn's code for the same).
STARTUP_FAILURE = 3


# The relay starts with about a hundred thousand long-lived objects (modules, SQLAlchemy, pydantic and Starlette
# structures), and a burst of requests makes many short-lived ones. Left as they are, the collector's full passes
# rescan all of them, 60-90 ms each, three times within one burst of a thousand requests. Frozen after start, the
# former are never scanned again, and a larger youngest generation collects the latter less often.
GC_THRESHOLDS = (10_000, 10, 10)


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _safe_url(url: str) -> str:
    """A database URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else url


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option(
    "--dialect",
    type=click.Choice(["midjourney-proxy", "new-api", "mj-v1"]),
    default="midjourney-proxy",
    show_default=True,
)
@click.option("--secret", default="", help="Credential clients must send (header or Bearer, by dialect).")
@click.option("--fast-s", type=float, default=2.0, show_default=True, help="Duration of a fast job.")
@click.option("--relax-s", type=float, default=6.0, show_default=True, help="Duration of a relax job.")
@click.option("--turbo-s", type=float, default=1.0, show_default=True, help="Duration of a turbo job.")
@click.option(
    "--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share of jobs that fail."
)
@click.option(
    "--error-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share of submits answered 500."
)
@click.option("--tile-px", type=click.IntRange(16, 2048), default=256, show_default=True, help="Long side of one tile.")
@click.option("--capacity", type=click.IntRange(1), default=None, help="Unfinished tasks before code 23 (queue full).")
@click.option("--seed", type=int, default=None, help="Seed for the failure draws.")
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
) -> None:
    """Run a fake Midjourney-proxy upstream over HTTP."""
    import uvicorn

    from adapters.simulator import SimEngine, SimSettings, build_sim_app
    from adapters.simulator.hooks import HookSettings

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
        drop=hook_drop, duplicate=hook_duplicate, reorder=hook_reorder, delay_s=hook_delay_s, progress=hook_progress
    )
    app = build_sim_app(SimEngine(settings), dialect, secret, calls if hooks else None)  # type: ignore[arg-type]
    click.echo(f"simulator ({dialect}) listening on http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config(file: str) -> None:
    """Validate a configuration file and summarise it; when it is invalid, list every problem (unset environment
    variables and validation errors alike) and exit 2."""
    try:
        config = load_config(file)
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


def _run_with_store(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    from relay.store.db import Database
    from relay.store.keys import KeyStore

    async def run() -> T:
        db = Database(config.database_url(), pool_size=2)
        try:
            await db.migrate()
            return await work(KeyStore(db.engine))
        finally:
            await db.dispose()

    return asyncio.run(run())


@keys.command("create")
@_config_option
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--quota", type=click.IntRange(0), required=True, help="Credits the key may spend.")
@click.pass_context
def keys_create(ctx: click.Context, config_path: str | None, name: str, quota: int) -> None:
    """Create a key; it is printed once and never shown again."""
    config = _load(ctx, config_path)
    record, secret = _run_with_store(config, lambda store: store.create(name, quota, time.time()))
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
    click.echo(f"{'ID':<17} {'NAME':<20} {'PREFIX':<12} {'BALANCE':>10} {'HELD':>8} {'STATUS':<8} CREATED")
    for r in records:
        created = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        status = "revoked" if r.revoked else "active"
        click.echo(
            f"{r.id:<17} {r.name[:20]:<20} {r.prefix + '…':<12} {r.balance:>10} {r.held:>8} {status:<8} {created}"
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


@main.command("providers")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line instead of a table.")
@click.pass_context
def providers(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Each configured provider: dialect, modes, health state, since when and why, as the relay processes on this
    database last recorded it. A provider with no recorded change is healthy."""
    import json

    from relay.store.db import Database
    from relay.store.health import HealthRecord, HealthStore

    config = _load(ctx, config_path)

    async def read() -> dict[str, HealthRecord]:
        db = Database(config.database_url(), pool_size=2)
        try:
            await db.migrate()
            return await HealthStore(db.engine).all()
        finally:
            await db.dispose()

    records = asyncio.run(read())

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
            line += [record.state, when(record.since), when(record.cooling_until), record.reason or "-"]
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1])


if __name__ == "__main__":  # pragma: no cover
    main()
