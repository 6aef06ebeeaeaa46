"""Which surface a request is on, and the error answer in that surface's envelope: the Midjourney-proxy envelope on
the native routes (`/mj/...`, `/mj-{mode}/mj/...`, `/v1/mj/...`), OpenAI's everywhere else."""

from __future__ import annotations

import re

from starlette.responses import Response

from relay.api.mj import errors as mj_errors
from relay.api.openai import errors as openai_errors
from relay.api.openai.errors import Rendered
from relay.errors import RelayError

_NATIVE = re.compile(r"^/(?:mj|mj-(?:fast|relax|turbo)/mj|v1/mj)(?:/|$)")


def native(path: str) -> bool:
    return _NATIVE.match(path) is not None


def render(path: str, error: RelayError) -> Rendered:
    if native(path):
        return mj_errors.render(error)
    return openai_errors.render(error)


def error_response(path: str, error: RelayError) -> Response:
    rendered = render(path, error)
    return Response(rendered.to_bytes(), rendered.status, rendered.headers, media_type="application/json")
