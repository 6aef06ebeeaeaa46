"""Upstream dialects behind one `Upstream` protocol (documented in `adapters.base`)."""

from __future__ import annotations

from typing import Literal

from adapters.base import (
    BOTS,
    MODES,
    SUBMIT_KINDS,
    WITHHELD,
    Accepted,
    Bot,
    Button,
    ClientError,
    Dimensions,
    Listed,
    Mode,
    NeedsModal,
    PartialRead,
    ProviderUnusable,
    Retryable,
    SubmitKind,
    SubmitOutcome,
    SubmitRequest,
    TaskStatus,
    TaskView,
    Uploaded,
    UploadOutcome,
    Upstream,
    UpstreamUnavailable,
)
from adapters.http import HttpOptions
from adapters.midjourney_proxy import MidjourneyProxyUpstream
from adapters.mj_v1 import MjV1Upstream
from adapters.new_api import NewApiUpstream

Dialect = Literal["midjourney-proxy", "new-api", "mj-v1", "simulator"]
DIALECTS: tuple[Dialect, ...] = ("midjourney-proxy", "new-api", "mj-v1", "simulator")

__all__ = [
    "BOTS",
    "DIALECTS",
    "MODES",
    "SUBMIT_KINDS",
    "WITHHELD",
    "Accepted",
    "Bot",
    "Button",
    "ClientError",
    "Dialect",
    "Dimensions",
    "HttpOptions",
    "Listed",
    "Mode",
    "NeedsModal",
    "PartialRead",
    "ProviderUnusable",
    "Retryable",
    "SubmitKind",
    "SubmitOutcome",
    "SubmitRequest",
    "TaskStatus",
    "TaskView",
    "UploadOutcome",
    "Uploaded",
    "Upstream",
    "UpstreamUnavailable",
    "create_http_upstream",
]


def create_http_upstream(
    dialect: Literal["midjourney-proxy", "new-api", "mj-v1"],
    name: str,
    options: HttpOptions,
    *,
    mode_prefix: bool = False,
    account_filter: bool = True,
) -> Upstream:
    if dialect == "midjourney-proxy":
        return MidjourneyProxyUpstream(name, options, mode_prefix=mode_prefix, account_filter=account_filter)
    if dialect == "new-api":
        return NewApiUpstream(name, options)
    return MjV1Upstream(name, options)
