"""POST /v1/images/generations: OpenAI's image endpoint, answered with Midjourney grids split into tiles."""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse

from relay.api.common import Text, attempt_of, base_url, json_body, relay_of, unless_disconnected, validate
from relay.core.jobs import JobService
from relay.errors import InternalError, ServiceUnavailable
from relay.images import STORE_RETRY_S, ImageError, ImageMissing, StorageError


class ImageGenerationRequest(BaseModel):
    """The OpenAI fields we act on. Fields of other image models that have no Midjourney meaning (`moderation`,
    `output_compression`, `partial_images`) and unknown fields are ignored; a few are refused when they ask for
    something the relay cannot give."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text
    model: Text | None = None
    n: StrictInt | None = Field(1, ge=1)
    size: Text | None = None
    quality: Text | None = None
    style: Text | None = None
    response_format: Literal["url", "b64_json"] | None = "url"
    user: StrictStr | None = None
    output_format: Literal["png"] | None = None
    background: Literal["auto", "opaque"] | None = None
    stream: Literal[False] | None = None


async def create_image(request: Request) -> JSONResponse:
    relay = relay_of(request)
    key = await relay.auth(request)
    body = validate(ImageGenerationRequest, await json_body(request))
    n = body.n or 1
    spec = relay.jobs.plan(
        model=body.model, prompt=body.prompt, n=n, size=body.size, quality=body.quality, style=body.style
    )
    generation = await relay.jobs.start(key, spec, await attempt_of(request, key))
    try:
        rows = await unless_disconnected(request, relay.jobs.wait(generation))
    finally:
        generation.close()
    tiles = JobService.tiles(rows, n)
    revised = generation.spec.prompt
    now = relay.clock.now()
    if body.response_format == "b64_json":
        try:
            blobs = await asyncio.gather(*(relay.images.read(t.job_id, t.name) for t in tiles))
        except StorageError:
            raise ServiceUnavailable(
                "The images cannot be read right now; try again shortly.", retry_after=STORE_RETRY_S
            ) from None
        except (ImageError, ImageMissing):  # kept whole, then damaged or removed: as its link would answer
            raise InternalError("The stored image is damaged.") from None
        data = [{"b64_json": base64.b64encode(blob).decode(), "revised_prompt": revised} for blob in blobs]
    else:
        root = base_url(request)
        data = [{"url": relay.images.url(root, t.job_id, t.name, now), "revised_prompt": revised} for t in tiles]
    return JSONResponse({"created": int(now), "data": data})
