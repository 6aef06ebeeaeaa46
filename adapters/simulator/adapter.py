"""The `simulator` dialect: the relay talks to a `SimEngine` in its own process, with no HTTP in between.

Replies still go through the same reply mapping as the HTTP dialects, so the relay sees exactly what it would see
from a midjourney-proxy server. Image URLs are `sim://<provider>/<task id>.png` and only this adapter reads them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from adapters.base import SubmitOutcome, SubmitRequest, TaskView, UpstreamUnavailable
from adapters.replies import classify_submit, parse_task
from adapters.simulator.engine import SimEngine


class SimulatorUpstream:
    dialect = "simulator"

    def __init__(self, name: str, engine: SimEngine) -> None:
        self.name = name
        self.engine = engine
        self._image_base = f"sim://{name}"

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        body = {"prompt": request.prompt, "botType": request.bot, "base64Array": list(request.images)}
        if request.state is not None:
            body["state"] = request.state
        reply = self.engine.submit_imagine(body, request.mode)
        return classify_submit(reply.http_status, json.dumps(reply.body).encode())

    async def fetch(self, upstream_id: str) -> TaskView | None:
        return parse_task(self.engine.task(upstream_id, self._image_base))

    async def fetch_many(self, upstream_ids: Sequence[str]) -> list[TaskView]:
        views = (parse_task(task) for task in self.engine.tasks(upstream_ids, self._image_base))
        return [view for view in views if view is not None]

    async def download(self, url: str) -> bytes:
        prefix = self._image_base + "/"
        if not url.startswith(prefix) or not url.endswith(".png"):
            raise UpstreamUnavailable("not an image URL of this simulator")
        task_id = url[len(prefix) : -len(".png")]
        data = self.engine.cached_image(task_id)  # most grids are drawn already: no thread needed
        if data is None:
            data = await asyncio.to_thread(self.engine.image, task_id)
        if data is None:
            raise UpstreamUnavailable("no such image")
        return data

    async def probe(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
