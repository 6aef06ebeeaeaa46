"""GET /files/{job}/{name}: the relay's own copies of finished images, behind signed, expiring links."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from relay.api.common import relay_of
from relay.core.images import NAMES
from relay.errors import LinkRefused, NotFound


async def get_file(request: Request) -> Response:
    relay = relay_of(request)
    job_id, name = request.path_params["job_id"], request.path_params["name"]
    if name not in NAMES:
        raise NotFound("No such image.", what="image")
    expires, signature = request.query_params.get("exp", ""), request.query_params.get("sig", "")
    if not relay.images.verify(job_id, name, expires, signature, relay.clock.now()):
        raise LinkRefused("This image link is invalid or has expired.")
    try:
        path = await asyncio.to_thread(relay.images.ensure, job_id, name)
    except (ValueError, FileNotFoundError):
        raise NotFound("No such image.", what="image") from None
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
