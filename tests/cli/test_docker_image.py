"""The Docker image's own commands (Dockerfile), run here as the image runs them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from tests.helpers import RunningRelay, free_port

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def _healthcheck() -> str:
    """The shell command of the image's HEALTHCHECK, its continued lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    command = line.split(" CMD ", 1)[1].strip()
    assert command.startswith("python ")
    return shlex.quote(sys.executable) + command.removeprefix("python")


def _run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "all_proxy")}
    return subprocess.run(["/bin/sh", "-c", command], env={**base, **env}, capture_output=True, text=True, timeout=30)


def test_the_health_check_passes_on_a_ready_relay_behind_an_upstream_proxy(relay: RunningRelay) -> None:
    # The relay reaches its providers through HTTP_PROXY when the environment names one (README, "Providers and
    # routing"); the health check asks the relay itself, on the container's loopback, never through that proxy.
    port = str(urlsplit(relay.base).port)
    command = _healthcheck()
    assert _run(command, {"MJ_RELAY_PORT": port}).returncode == 0
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    proxied = _run(command, {"MJ_RELAY_PORT": port, "HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy})
    assert proxied.returncode == 0, proxied.stderr


def test_the_health_check_fails_when_nothing_answers() -> None:
    assert _run(_healthcheck(), {"MJ_RELAY_PORT": str(free_port())}).returncode != 0
