"""Domain errors in the Midjourney-proxy envelope `{"code", "description", "properties", "result": null}`.

The codes are those midjourney-proxy servers answer with: 3 not found (an unknown task), 4 a validation error, 9 a
failure, 21 waiting for a modal, 22 queued, 23 no capacity now (queue full), 24 a banned prompt; 25 means the key's
quota is short. A path the relay does not serve is 4, not 3: New API forwards every `/mj/submit/...` it routes
(`edits`, `video`, ...) and disables its channel on a submit answered 3, midjourney-proxy's "no account instance".
The HTTP status says the same as on the OpenAI surface (400, 401, 404, 429, 502, 503, ...), so both clients that
read `code` and clients that read the status see the error.
"""

from __future__ import annotations

from relay.api.openai.errors import Rendered
from relay.api.openai.errors import render as render_openai
from relay.domain import FailureCode
from relay.errors import (
    AuthenticationFailed,
    InsufficientQuota,
    InvalidRequest,
    JobFailed,
    MethodNotAllowed,
    ModelNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    ServiceUnavailable,
)

NOT_FOUND = 3
VALIDATION = 4
FAILURE = 9
BUSY = 23
BANNED = 24
QUOTA = 25

_JOB_CODES = {
    FailureCode.BANNED: BANNED,
    FailureCode.REJECTED: VALIDATION,
    FailureCode.UNAVAILABLE: BUSY,
    FailureCode.INTERRUPTED: BUSY,  # never sent (the relay process holding it went away): a retry starts it afresh
}


def code_of(error: RelayError) -> int:
    if isinstance(error, NotFound):
        return NOT_FOUND if error.what == "task" else VALIDATION
    if isinstance(error, InsufficientQuota):
        return QUOTA
    if isinstance(error, ServiceUnavailable | RateLimited):
        return BUSY
    if isinstance(error, JobFailed):
        return _JOB_CODES.get(error.code, FAILURE)
    if isinstance(error, InvalidRequest | AuthenticationFailed | ModelNotAllowed | MethodNotAllowed | PayloadTooLarge):
        return VALIDATION
    return FAILURE


def render(error: RelayError) -> Rendered:
    """The same HTTP status and headers as on the OpenAI surface, with the Midjourney-proxy body."""
    openai = render_openai(error)
    body = {"code": code_of(error), "description": error.message, "properties": {}, "result": None}
    return Rendered(openai.status, body, openai.headers)
