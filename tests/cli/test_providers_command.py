"""`mj-relay providers`: another process reads the health a running relay recorded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from relay.config import load_config
from tests.helpers import running_relay, serve, sql, wait_for


def providers_command(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "providers", *args],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(tmp_path: Path, refusing_base: str) -> Path:
    path = tmp_path / "relay.yaml"
    data = {
        "data_dir": str(tmp_path / "data"),
        "jobs": {"poll_interval_s": 0.05},
        "health": {"cooldown_s": 600, "probe_interval_s": 600},
        "providers": [
            {
                "name": "refusing",
                "dialect": "midjourney-proxy",
                "base_url": refusing_base,
                "secret": "a-wrong-secret",
                "modes": ["fast", "relax"],
            },
            {"name": "spare", "dialect": "simulator", "priority": 1, "simulator": {"fast_s": 0.2, "tile_px": 32}},
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_providers_shows_each_provider_with_its_recorded_health(tmp_path: Path) -> None:
    engine = SimEngine(SimSettings(fast_s=0.2, tile_px=32))
    with serve(build_sim_app(engine, "midjourney-proxy", "the-right-secret")) as base:
        path = write_config(tmp_path, base)
        before = providers_command(tmp_path, "--config", str(path))
        assert before.returncode == 0, before.stderr
        assert [line.split()[3] for line in before.stdout.splitlines()[1:]] == ["healthy", "healthy"]

        config = load_config(path)
        with running_relay(config) as relay:
            relay.openai().images.generate(model="mj-fast", prompt="a heron")
            wait_for(lambda: sql(config, "SELECT state FROM provider_health") == [("cooling",)])
            shown = providers_command(tmp_path, "--config", str(path))  # while the relay runs
            as_json = providers_command(tmp_path, "--config", str(path), "--json")

    assert shown.returncode == 0, shown.stderr
    header, refusing, spare = shown.stdout.splitlines()
    assert header.split() == ["NAME", "DIALECT", "MODES", "STATE", "SINCE", "(UTC)", "UNTIL", "(UTC)", "REASON"]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(
        rf"refusing +midjourney-proxy +fast,relax +cooling +{stamp} +{stamp} +"
        r"upstream refused the credentials \(HTTP 401\)",
        refusing,
    ), refusing
    assert re.fullmatch(r"spare +simulator +fast,relax,turbo +healthy +- +- +-", spare), spare
    assert "a-wrong-secret" not in shown.stdout

    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["name"], r["dialect"], r["modes"], r["state"]) for r in rows] == [
        ("refusing", "midjourney-proxy", ["fast", "relax"], "cooling"),
        ("spare", "simulator", ["fast", "relax", "turbo"], "healthy"),
    ]
    assert rows[0]["until"] - rows[0]["since"] == 600
    assert rows[0]["process"].endswith(f":{os.getpid()}")


def test_an_upstreams_words_cannot_drive_the_operators_terminal(tmp_path: Path) -> None:
    """A provider's reason is the upstream's own text. Escape sequences in it (here: set the clipboard, clear the
    screen, a right-to-left override) are shown as escapes, never sent to the terminal as they are."""
    hostile = "no balance\x1b]52;c;Y3VybCBldmlsfHNo\x07\x1b[2J\x1b[H\u202eevil\r\x9b31m"

    async def refuse(request: Request) -> JSONResponse:
        return JSONResponse({"code": 25, "description": hostile})

    upstream = Starlette(routes=[Route("/{path:path}", refuse, methods=["GET", "POST"])])
    with serve(upstream) as base:
        path = write_config(tmp_path, base)
        config = load_config(path)
        with running_relay(config) as relay:
            relay.openai().images.generate(model="mj-fast", prompt="a heron")
            wait_for(lambda: sql(config, "SELECT state FROM provider_health") == [("cooling",)])
        shown = providers_command(tmp_path, "--config", str(path))

    assert shown.returncode == 0, shown.stderr
    refusing = shown.stdout.splitlines()[1]
    assert refusing.isprintable(), refusing
    assert refusing.endswith(r"no balance\x1b]52;c;Y3VybCBldmlsfHNo\x07\x1b[2J\x1b[H\u202eevil\r\x9b31m"), refusing
