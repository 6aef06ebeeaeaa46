"""Every error the relay answers with, rendered as OpenAI's envelope `{"error": {message, type, param, code}}`.

    RelayError                    base: status, type, code, param, message, extra headers
      InvalidRequest              400 invalid_request_error (names the `param`)
        ContentPolicy             400 content_policy_violation (a banned prompt)
      AuthenticationFailed        401 invalid_api_key
      NotFound                    404 not_found (also an unknown model: model_not_found)
      MethodNotAllowed            405 method_not_allowed
      PayloadTooLarge             413 request_too_large
      InsufficientQuota           429 insufficient_quota
      UpstreamFailed              502 upstream_error (the job failed upstream or the provider broke)
      ServiceUnavailable          503 service_unavailable (no provider can take the job now)
      DeadlineExceeded            504 timeout (the job passed its deadline)
      InternalError               500 internal_error (a bug; details stay in the log)

Answers where a retry cannot help (or could start a job twice) carry `x-should-retry: false`, which the OpenAI
SDKs obey.
"""

from __future__ import annotations

import json
from typing import Any


class RelayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    retry = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry is not None:
            self.retry = retry
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if not self.retry:
            headers.setdefault("x-should-retry", "false")
        return headers

    def to_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


class InvalidRequest(RelayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    retry = False


class ContentPolicy(InvalidRequest):
    code = "content_policy_violation"


class AuthenticationFailed(RelayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    retry = False


class NotFound(RelayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    retry = False


class MethodNotAllowed(RelayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    retry = False


class PayloadTooLarge(RelayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    retry = False


class InsufficientQuota(RelayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    retry = False


class UpstreamFailed(RelayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class ServiceUnavailable(RelayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class DeadlineExceeded(RelayError):
    status = 504
    type = "server_error"
    code = "timeout"
    retry = False


class InternalError(RelayError):
    status = 500
    type = "server_error"
    code = "internal_error"
    retry = False  # a job may already be running: a retry could start it again
