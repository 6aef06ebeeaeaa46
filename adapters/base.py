"""The one contract between the relay and an upstream Midjourney-proxy provider.

Every upstream speaks a dialect of the midjourney-proxy `/mj/...` API. What differs (paths, auth headers, how the
mode is chosen, result codes, odd bodies, how an unknown task id is answered) lives in one adapter per dialect and is
normalised into the types below, so nothing above `adapters/` knows which dialect it talks to.

    Upstream (Protocol)
      submit(request: SubmitRequest) -> SubmitOutcome   one new task; never raises for an upstream answer
      fetch(upstream_id) -> TaskView | None              one task; None when the upstream does not know the id
      fetch_many(upstream_ids) -> list[TaskView]         a batch; ids the upstream does not know are left out
      download(url) -> bytes                             a finished image, size-limited, never with credentials
      probe() -> bool                                    a cheap call that proves the provider answers and accepts us
      aclose()                                           release connections

    SubmitOutcome = one of
      Accepted(upstream_id)      the upstream took the task (codes 1 and 22, and 21 that reports a finished task)
      NeedsModal(upstream_id)    the task waits for `submit/modal` on the same provider (code 21 with remix)
      Retryable(reason, sent)    another provider may take it; `sent` = the request may have reached this upstream
      ClientError(description)   the request itself is refused (validation, banned prompt); retrying cannot help
      ProviderUnusable(reason)   this provider cannot serve anything now (auth, balance, broken answers)

    UpstreamUnavailable          raised by fetch/fetch_many/download/probe when the provider cannot answer
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "BOTS",
    "MODES",
    "Accepted",
    "Bot",
    "Button",
    "ClientError",
    "Mode",
    "NeedsModal",
    "ProviderUnusable",
    "Retryable",
    "SubmitKind",
    "SubmitOutcome",
    "SubmitRequest",
    "TaskStatus",
    "TaskView",
    "Upstream",
    "UpstreamUnavailable",
]

Mode = Literal["fast", "relax", "turbo"]
MODES: tuple[Mode, ...] = ("fast", "relax", "turbo")
Bot = Literal["MID_JOURNEY", "NIJI_JOURNEY"]
BOTS: tuple[Bot, ...] = ("MID_JOURNEY", "NIJI_JOURNEY")
SubmitKind = Literal["imagine"]


class TaskStatus(StrEnum):
    NOT_START = "NOT_START"
    SUBMITTED = "SUBMITTED"
    IN_PROGRESS = "IN_PROGRESS"
    MODAL = "MODAL"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCEL = "CANCEL"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCEL)


@dataclass(frozen=True, slots=True)
class Button:
    custom_id: str
    label: str = ""
    emoji: str = ""
    type: int = 2
    style: int = 2


@dataclass(frozen=True, slots=True)
class TaskView:
    """One upstream task, normalised: progress is an int 0-100, times are unix milliseconds."""

    upstream_id: str
    status: TaskStatus
    progress: int = 0
    image_url: str | None = None
    fail_reason: str | None = None
    banned: bool = False
    state: str | None = None
    action: str | None = None
    buttons: tuple[Button, ...] = ()
    submit_time: int | None = None
    start_time: int | None = None
    finish_time: int | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A new upstream task in the relay's terms; each adapter renders it in its dialect.

    `prompt` is sent as it is (it already carries the mode flag); `mode` also goes through the dialect's own
    mechanism (path prefix, `accountFilter.modes` or body `model`). `images` are data URLs (`base64Array`).
    `state` is echoed back by the upstream in every task view.
    """

    kind: SubmitKind
    prompt: str
    mode: Mode = "fast"
    bot: Bot = "MID_JOURNEY"
    images: tuple[str, ...] = ()
    state: str | None = None
    notify_hook: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    upstream_id: str
    queued: bool = False


@dataclass(frozen=True, slots=True)
class NeedsModal:
    upstream_id: str


@dataclass(frozen=True, slots=True)
class Retryable:
    reason: str
    sent: bool = False


@dataclass(frozen=True, slots=True)
class ClientError:
    description: str
    banned: bool = False


@dataclass(frozen=True, slots=True)
class ProviderUnusable:
    reason: str


SubmitOutcome = Accepted | NeedsModal | Retryable | ClientError | ProviderUnusable


class UpstreamUnavailable(Exception):
    """The provider could not answer a read (transport error, 5xx, refused credentials, a broken body)."""


@runtime_checkable
class Upstream(Protocol):
    name: str

    async def submit(self, request: SubmitRequest) -> SubmitOutcome: ...

    async def fetch(self, upstream_id: str) -> TaskView | None: ...

    async def fetch_many(self, upstream_ids: Sequence[str]) -> list[TaskView]: ...

    async def download(self, url: str) -> bytes: ...

    async def probe(self) -> bool: ...

    async def aclose(self) -> None: ...
