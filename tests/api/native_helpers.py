"""A relay in front of simulators speaking one dialect over HTTP (or the in-process simulator), and a native client."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from tests.helpers import RunningRelay, relay_config, running_relay, serve, sql, wait_for

SECRET = "upstream-secret-for-tests"
DIALECTS = ["simulator", "midjourney-proxy", "new-api", "mj-v1"]
TERMINAL = ("SUCCESS", "FAILURE")


def png(color: tuple[int, int, int] = (200, 40, 40), size: int = 8) -> str:
    """A small real PNG as a data URL."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@dataclass
class Native:
    relay: RunningRelay
    engines: list[SimEngine]
    client: httpx.Client
    providers: list[str] = field(default_factory=list)

    def post(self, path: str, body: dict[str, Any], prefix: str = "/mj", **kwargs: Any) -> httpx.Response:
        return self.client.post(prefix + path, json=body, **kwargs)

    def submit(self, path: str, body: dict[str, Any], prefix: str = "/mj") -> str:
        reply = self.post(path, body, prefix)
        assert reply.status_code == 200, reply.text
        assert reply.json()["code"] in (1, 21, 22), reply.text
        return str(reply.json()["result"])

    def fetch(self, task_id: str, prefix: str = "/mj") -> dict[str, Any]:
        reply = self.client.get(f"{prefix}/task/{task_id}/fetch")
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]

    def finished(self, task_id: str, status: str = "SUCCESS", timeout: float = 20) -> dict[str, Any]:
        wait_for(lambda: self.fetch(task_id)["status"] in TERMINAL, timeout)
        task = self.fetch(task_id)
        assert task["status"] == status, task
        return task

    def reached(self, task_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
        wait_for(lambda: self.fetch(task_id)["status"] == status, timeout)
        return self.fetch(task_id)

    def button(self, task: dict[str, Any], fragment: str) -> str:
        for button in task["buttons"]:
            if fragment in button["customId"]:
                return str(button["customId"])
        raise AssertionError(f"no button with {fragment!r} in {[b['customId'] for b in task['buttons']]}")

    def job(self, task_id: str) -> dict[str, Any]:
        (row,) = sql(
            self.relay.config,
            "SELECT state, action, provider, price, hold_state, parent_id, mode, upstream_id FROM jobs WHERE id = ?",
            task_id,
        )
        keys = ("state", "action", "provider", "price", "hold_state", "parent_id", "mode", "upstream_id")
        return dict(zip(keys, row, strict=True))


def sim_settings(**overrides: Any) -> dict[str, Any]:
    return {"fast_s": 0.3, "relax_s": 0.5, "turbo_s": 0.2, "tile_px": 32, **overrides}


@contextmanager
def native(
    tmp_path: Path,
    dialect: str = "simulator",
    *,
    providers: int = 1,
    quota: int = 1000,
    sim: dict[str, Any] | None = None,
    provider_settings: dict[str, Any] | list[dict[str, Any]] | None = None,
    **sections: Any,
) -> Iterator[Native]:
    """A relay with `providers` providers of one dialect (each its own simulator, with `provider_settings`, or the
    settings of its place in a list of them) and a native client."""
    settings = sim_settings(**(sim or {}))
    with ExitStack() as stack:
        engines: list[SimEngine] = []
        configured: list[dict[str, Any]] = []
        for index in range(providers):
            name = f"p{index}"
            own = provider_settings[index] if isinstance(provider_settings, list) else provider_settings
            if dialect == "simulator":
                configured.append({"name": name, "dialect": "simulator", "simulator": settings, **(own or {})})
                continue
            engine = SimEngine(SimSettings(**settings))
            engines.append(engine)
            base = stack.enter_context(serve(build_sim_app(engine, dialect, SECRET)))  # type: ignore[arg-type]
            configured.append({"name": name, "dialect": dialect, "base_url": base, "secret": SECRET, **(own or {})})
        config = relay_config(tmp_path, providers=configured, **sections)
        relay = stack.enter_context(running_relay(config, quota=quota))
        client = stack.enter_context(
            httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30)
        )
        yield Native(relay, engines, client, [p["name"] for p in configured])
