"""Domain errors: what went wrong, in the relay's own terms. Core raises them; each surface renders them once, in
its own envelope: OpenAI's on `/v1` and the other OpenAI-style routes (`relay.api.openai.errors`), the
Midjourney-proxy envelope on the native routes (`relay.api.mj.errors`).

    RelayError                  base: a message, and the request field it is about (`param`) when there is one
      InvalidRequest            a bad body, field or value
        InvalidImage            an image in the request is unusable (not an image, too large, a private address)
        IdempotencyKeyReused    an `Idempotency-Key` sent again with another body
      AuthenticationFailed      no key, a wrong key, a revoked or an expired one (`reason`)
      ModelNotAllowed           the key may not use this model
      LinkRefused               an image link that is wrong, tampered with or expired
      NotFound                  no such route, model, task or image (`what`)
      MethodNotAllowed          a wrong method on a known route (`allow`)
      PayloadTooLarge           a body over the limit
      InsufficientQuota         the key's available credits are short
      RateLimited               the key made its requests-per-minute already (`retry_after` seconds)
      ServiceUnavailable        no provider can take the work now (`retry_after` seconds)
        DatabaseUnavailable     the database cannot serve now: down, unreachable, too slow, locked (`retry_after`)
      UpstreamFailed            a provider failed a call that is not a job (an upload, a seed)
      JobFailed                 a job ended without success (`code`: a FailureCode, `reason`)
      InternalError             a bug; the details stay in the log
"""

from __future__ import annotations

from typing import Literal

from relay.domain import FailureCode

__all__ = [
    "AuthenticationFailed",
    "DatabaseUnavailable",
    "IdempotencyKeyReused",
    "InsufficientQuota",
    "InternalError",
    "InvalidImage",
    "InvalidRequest",
    "JobFailed",
    "LinkRefused",
    "MethodNotAllowed",
    "ModelNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RelayError",
    "ServiceUnavailable",
    "UpstreamFailed",
]


class RelayError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RelayError):
    pass


class InvalidImage(InvalidRequest):
    pass


class IdempotencyKeyReused(InvalidRequest):
    pass


class AuthenticationFailed(RelayError):
    def __init__(
        self, message: str, *, reason: Literal["missing", "invalid", "revoked", "expired"] = "invalid"
    ) -> None:
        super().__init__(message)
        self.reason = reason


class ModelNotAllowed(RelayError):
    def __init__(self, message: str, *, param: str | None = "model") -> None:
        super().__init__(message, param=param)


class LinkRefused(RelayError):
    pass


class NotFound(RelayError):
    def __init__(
        self,
        message: str,
        *,
        what: Literal["route", "model", "task", "image"] = "route",
        param: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.what = what


class MethodNotAllowed(RelayError):
    def __init__(self, message: str, *, allow: str = "") -> None:
        super().__init__(message)
        self.allow = allow


class PayloadTooLarge(RelayError):
    pass


class InsufficientQuota(RelayError):
    pass


class RateLimited(RelayError):
    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServiceUnavailable(RelayError):
    def __init__(self, message: str, *, retry_after: int = 10) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DatabaseUnavailable(ServiceUnavailable):
    """The relay's database cannot serve now (see `store.db.unavailable`); the client is told only that, to retry."""

    def __init__(
        self,
        message: str = "The relay cannot reach its database right now; try again shortly.",
        *,
        retry_after: int = 5,
    ) -> None:
        super().__init__(message, retry_after=retry_after)


class UpstreamFailed(RelayError):
    pass


class JobFailed(RelayError):
    """A job that ended without success. `reason` is what the upstream or the relay said, in its words."""

    def __init__(self, code: FailureCode, message: str, *, reason: str | None = None) -> None:
        super().__init__(message, param="prompt" if code is FailureCode.BANNED else None)
        self.code = code
        self.reason = reason


class InternalError(RelayError):
    pass
