"""GET /files/{job}/{name}: the relay's own copies of finished images, behind signed, expiring links.

The bytes come from the image store, whichever backend keeps them (a directory, or a bucket any relay process
shares), and are answered here: a client is never sent to where they are kept."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.api.common import relay_of
from relay.errors import InternalError, LinkRefused, NotFound, ServiceUnavailable
from relay.images import NAMES, STORE_RETRY_S, ImageError, ImageMissing, StorageError

HEADERS = {"Cache-Control": "private, max-age=3600"}


async def get_file(request: Request) -> Response:
    relay = relay_of(request)
    job_id, name = request.path_params["job_id"], request.path_params["name"]
    if name not in NAMES:
        raise NotFound("No such image.", what="image")
    expires, signature = request.query_params.get("exp", ""), request.query_params.get("sig", "")
    if not relay.images.verify(job_id, name, expires, signature, relay.clock.now()):
        raise LinkRefused("This image link is invalid or has expired.")
    try:
        data = await relay.images.read(job_id, name)
    except (ValueError, ImageMissing):
        raise NotFound("No such image.", what="image") from None
    except StorageError:
        raise ServiceUnavailable(
            "The image cannot be read right now; try again shortly.", retry_after=STORE_RETRY_S
        ) from None
    except ImageError:
        raise InternalError("The stored image is damaged.") from None
    return Response(data, media_type="image/png", headers=HEADERS)
