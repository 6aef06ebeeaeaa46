"""The contract suite's worlds: one upstream per dialect (the in-process simulator, and the three HTTP adapters against
the simulator served over loopback in their dialect), all driven by a hand-moved clock."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image

from adapters import HttpOptions, SubmitRequest, Upstream, create_http_upstream
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream, build_sim_app
from tests.helpers import FakeClock, serve

DIALECTS = ["simulator", "midjourney-proxy", "new-api", "mj-v1"]
HTTP_DIALECTS = DIALECTS[1:]
SECRET = "upstream-secret-value"
SETTINGS: dict[str, Any] = {"fast_s": 10, "relax_s": 30, "turbo_s": 5, "tile_px": 32, "seed": 1}


@dataclass
class Env:
    dialect: str
    upstream: Upstream
    engine: SimEngine
    clock: FakeClock
    base: str = ""


def http_upstream(dialect: str, base: str, secret: str = SECRET, batch_size: int = 50) -> Upstream:
    options = HttpOptions(base_url=base, secret=secret, timeout_s=5, batch_size=batch_size)
    return create_http_upstream(dialect, f"p-{dialect}", options)  # type: ignore[arg-type]


@asynccontextmanager
async def world(dialect: str, **settings: Any) -> AsyncIterator[Env]:
    """One upstream of `dialect` in front of a fresh simulator with `settings` over the suite's defaults."""
    clock = FakeClock()
    engine = SimEngine(SimSettings(**{**SETTINGS, **settings}), now=clock.now)
    if dialect == "simulator":
        yield Env("simulator", SimulatorUpstream("sim", engine), engine, clock)
        return
    with serve(build_sim_app(engine, dialect, SECRET)) as base:  # type: ignore[arg-type]
        upstream = http_upstream(dialect, base)
        try:
            yield Env(dialect, upstream, engine, clock, base)
        finally:
            await upstream.aclose()


def imagine(prompt: str, mode: str = "fast", state: str | None = "job_contract") -> SubmitRequest:
    return SubmitRequest(kind="imagine", prompt=prompt, mode=mode, state=state)  # type: ignore[arg-type]


def png(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (8, 8)) -> str:
    """A small real PNG as a data URL."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size
