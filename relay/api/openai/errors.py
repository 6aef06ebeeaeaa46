"""Domain errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status the
OpenAI SDKs map to their exception classes.

Answers where a retry cannot help, or could start a job twice (4xx, 500, 504, a job that may have run), carry
`x-should-retry: false`, which the official SDKs obey.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from relay.domain import FailureCode
from relay.errors import (
    AuthenticationFailed,
    IdempotencyKeyReused,
    InsufficientQuota,
    InvalidImage,
    InvalidRequest,
    JobFailed,
    LinkRefused,
    MethodNotAllowed,
    ModelNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    ServiceUnavailable,
    UpstreamFailed,
)

_AUTH_CODES = {
    "missing": "missing_api_key",
    "invalid": "invalid_api_key",
    "revoked": "key_revoked",
    "expired": "key_expired",
}

# How each job failure is shown: status, type, code.
_JOB: dict[FailureCode, tuple[int, str, str]] = {
    FailureCode.BANNED: (400, "invalid_request_error", "content_policy_violation"),
    FailureCode.REJECTED: (400, "invalid_request_error", "invalid_request"),
    FailureCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    # never sent (the relay process holding it went away): the SDKs' retry starts the request afresh
    FailureCode.INTERRUPTED: (503, "server_error", "service_unavailable"),
    FailureCode.TIMEOUT: (504, "server_error", "timeout"),
    FailureCode.INTERNAL: (500, "server_error", "internal_error"),
}
_NO_RETRY_JOBS = (FailureCode.UNCONFIRMED,)


@dataclass(frozen=True, slots=True)
class Rendered:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """ASCII JSON: an error may quote client text, which need not be encodable."""
        return json.dumps(self.body).encode()


def _classify(error: RelayError) -> tuple[int, str, str]:
    if isinstance(error, InvalidImage):
        return 400, "invalid_request_error", "invalid_image"
    if isinstance(error, IdempotencyKeyReused):
        return 422, "invalid_request_error", "idempotency_key_reused"
    if isinstance(error, InvalidRequest):
        return 400, "invalid_request_error", "invalid_request"
    if isinstance(error, AuthenticationFailed):
        return 401, "invalid_request_error", _AUTH_CODES[error.reason]
    if isinstance(error, ModelNotAllowed):
        return 403, "invalid_request_error", "model_not_allowed"
    if isinstance(error, LinkRefused):
        return 403, "invalid_request_error", "invalid_signature"
    if isinstance(error, NotFound):
        return 404, "invalid_request_error", "model_not_found" if error.what == "model" else "not_found"
    if isinstance(error, MethodNotAllowed):
        return 405, "invalid_request_error", "method_not_allowed"
    if isinstance(error, PayloadTooLarge):
        return 413, "invalid_request_error", "request_too_large"
    if isinstance(error, InsufficientQuota):
        return 429, "insufficient_quota", "insufficient_quota"
    if isinstance(error, RateLimited):
        return 429, "requests", "rate_limit_exceeded"
    if isinstance(error, ServiceUnavailable):
        return 503, "server_error", "service_unavailable"
    if isinstance(error, UpstreamFailed):
        return 502, "upstream_error", "upstream_error"
    if isinstance(error, JobFailed):
        return _JOB.get(error.code, (502, "upstream_error", "upstream_error"))
    return 500, "server_error", "internal_error"


def render(error: RelayError) -> Rendered:
    status, type_, code = _classify(error)
    headers: dict[str, str] = {}
    if isinstance(error, MethodNotAllowed) and error.allow:
        headers["allow"] = error.allow
    retry_after = error.retry_after if isinstance(error, ServiceUnavailable | RateLimited) else None
    if isinstance(error, JobFailed) and error.code is FailureCode.UNAVAILABLE:
        retry_after = 10
    if isinstance(error, JobFailed) and error.code is FailureCode.INTERRUPTED:
        retry_after = 1
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    # A rate limit is the one 4xx a retry fixes (after `Retry-After`): the SDKs may retry it.
    no_retry = (status < 500 and not isinstance(error, RateLimited)) or status in (500, 504)
    if no_retry or (isinstance(error, JobFailed) and error.code in _NO_RETRY_JOBS):
        headers["x-should-retry"] = "false"
    body = {"error": {"message": error.message, "type": type_, "param": error.param, "code": code}}
    return Rendered(status, body, headers)
