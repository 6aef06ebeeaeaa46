"""The `simulator` dialect: the relay talks to a `SimEngine` in its own process, with no HTTP in between.

Requests are rendered in the same wire shape as the HTTP dialects (`adapters.wire`) and replies go through the same
reply mapping, so the relay sees exactly what it would see from a trueai-style midjourney-proxy server. Image links
are `sim://<provider>/<key>.<ext>` (results, described images, uploads) and only this adapter reads them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from adapters.base import (
    WITHHELD,
    Bot,
    ClientError,
    Listed,
    Mode,
    Retryable,
    SubmitOutcome,
    SubmitRequest,
    TaskView,
    UploadOutcome,
    UpstreamUnavailable,
)
from adapters.replies import (
    classify_submit,
    classify_upload,
    parse_all_tasks,
    parse_hook,
    parse_seed,
    parse_task,
)
from adapters.simulator.answers import SubmitReply
from adapters.simulator.engine import SimEngine
from adapters.wire import FOLLOW_UPS, missing_fields, render_body


def _wire(reply: SubmitReply) -> tuple[int, bytes]:
    return reply.http_status, reply.raw if reply.raw is not None else json.dumps(reply.body).encode()


class SimulatorUpstream:
    dialect = "simulator"

    def __init__(self, name: str, engine: SimEngine) -> None:
        self.name = name
        self.engine = engine
        self._image_base = f"sim://{name}"

    @property
    def carries_mode(self) -> bool:
        return True  # every submit names its mode to the engine

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        missing = missing_fields(request)
        if missing:
            return ClientError(missing)
        if request.sending is not None and not await request.sending():
            return Retryable(WITHHELD, withheld=True)
        mode = None if request.kind == "modal" else request.mode
        reply = self.engine.submit(request.kind, render_body(request), mode)
        return classify_submit(*_wire(reply), follow_up=request.kind in FOLLOW_UPS)

    async def upload(self, images: Sequence[str], mode: Mode, bot: Bot) -> UploadOutcome:
        if not images:
            return ClientError("an upload needs at least one image")
        return classify_upload(*_wire(self.engine.upload({"base64Array": list(images)}, self._image_base)))

    def parse_hook(self, body: bytes) -> TaskView | None:
        return parse_hook(body)

    async def seed(self, upstream_id: str) -> str | None:
        try:
            return parse_seed(*_wire(self.engine.seed(upstream_id)))
        except ValueError as exc:
            raise UpstreamUnavailable(str(exc)) from None

    async def fetch(self, upstream_id: str) -> TaskView | None:
        return parse_task(self.engine.task(upstream_id, self._image_base))

    async def fetch_many(self, upstream_ids: Sequence[str]) -> list[TaskView]:
        views = (parse_task(task) for task in self.engine.tasks(upstream_ids, self._image_base))
        return [view for view in views if view is not None]

    async def list_tasks(self) -> Listed | None:
        """As a novicezk server's `task/list` answers: every task kept."""
        return parse_all_tasks(200, json.dumps(self.engine.listing(self._image_base)).encode())

    async def download(self, url: str) -> bytes:
        prefix = self._image_base + "/"
        key, dot, _ = url.removeprefix(prefix).rpartition(".")
        if not url.startswith(prefix) or not dot or "/" in key:
            raise UpstreamUnavailable("not an image URL of this simulator")
        data = self.engine.cached_image(key)  # most images are drawn already: no thread needed
        if data is None:
            data = await asyncio.to_thread(self.engine.image, key)
        if data is None:
            raise UpstreamUnavailable("no such image")
        return data

    async def probe(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
