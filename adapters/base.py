"""The one contract between the relay and an upstream Midjourney-proxy provider.

Every upstream speaks a dialect of the midjourney-proxy `/mj/...` API. What differs (paths, auth headers, how the
mode is chosen, result codes, odd bodies, how an unknown task id is answered) lives in one adapter per dialect and is
normalised into the types below, so nothing above `adapters/` knows which dialect it talks to.

    Upstream (Protocol)
      submit(request: SubmitRequest) -> SubmitOutcome   one call that makes or moves a task (see SubmitKind); never
                                                         raises for an upstream answer
      upload(images, mode, bot) -> UploadOutcome         `submit/upload-discord-images`: image links, no task
      seed(upstream_id) -> str | None                    `task/{id}/image-seed`; None when the task has no seed
      parse_hook(body) -> TaskView | None                a `notifyHook` call the provider made, in its dialect;
                                                         None when it is not a task
      fetch(upstream_id) -> TaskView | None              one task; None when the upstream does not know the id
      fetch_many(upstream_ids) -> list[TaskView]         a batch; ids the upstream does not know are left out;
                                                         raises PartialRead when some ids could not be read
      list_tasks() -> Listed | None                      the tasks the upstream keeps, each with the `state` its
                                                         submit carried (midjourney-proxy's `task/list`: every one,
                                                         or the newest 100); None when the dialect has no such list
      download(url) -> bytes                             a finished image, size-limited, never with credentials
      probe() -> bool                                    a cheap call that proves the provider answers and accepts us
      aclose()                                           release connections

    SubmitKind: the upstream endpoint a SubmitRequest goes to, and which of its fields it uses
      imagine     submit/imagine        prompt, images (base64Array)
      blend       submit/blend          images (2-5, base64Array), dimensions
      describe    submit/describe       images[0] (base64)
      shorten     submit/shorten        prompt
      action      submit/action         task_id (upstream id of the parent), custom_id (one of its buttons)
      modal       submit/modal          task_id (the upstream id of the task waiting in MODAL), prompt, mask
      swap_face   insight-face/swap     images[0] (sourceBase64), images[1] (targetBase64)
    Every kind but modal also carries bot, state and notify_hook, and the mode through the dialect's mechanism.

    SubmitOutcome = one of
      Accepted(upstream_id)      the upstream took the task (codes 1 and 22, and 21 that reports a finished task)
      NeedsModal(upstream_id)    the task waits for `submit/modal` on the same provider (code 21 with remix)
      Retryable(reason, sent)    another provider may take it; `sent` = the request may have reached this upstream;
                                 `image` = the upstream could not upload the request's own images (says nothing
                                 of the provider's health)
      ClientError(description)   the request itself is refused (validation, banned prompt, unknown task or button);
                                 retrying cannot help
      ProviderUnusable(reason)   this provider cannot serve anything now (auth, balance, broken answers)

    UploadOutcome = Uploaded(links) | Retryable | ClientError | ProviderUnusable

    UpstreamUnavailable          raised by fetch/fetch_many/seed/download/probe when the provider cannot answer
    PartialRead                  an UpstreamUnavailable of fetch_many that read some ids: the views it has, and the
                                 ids it could not read (neither known nor unknown)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "BOTS",
    "MODES",
    "SUBMIT_KINDS",
    "Accepted",
    "Bot",
    "Button",
    "ClientError",
    "Dimensions",
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
]

Mode = Literal["fast", "relax", "turbo"]
MODES: tuple[Mode, ...] = ("fast", "relax", "turbo")
Bot = Literal["MID_JOURNEY", "NIJI_JOURNEY"]
BOTS: tuple[Bot, ...] = ("MID_JOURNEY", "NIJI_JOURNEY")
SubmitKind = Literal["imagine", "blend", "describe", "shorten", "action", "modal", "swap_face"]
SUBMIT_KINDS: tuple[SubmitKind, ...] = ("imagine", "blend", "describe", "shorten", "action", "modal", "swap_face")
Dimensions = Literal["PORTRAIT", "SQUARE", "LANDSCAPE"]


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


class Button(NamedTuple):
    """One button of a finished task (a tuple: a task has ten or so, made for every end an upstream reports)."""

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
    # The prompt as the upstream ran it, and the text result of a task that gives text (describe's four prompts,
    # shorten's analysis): `properties.finalPrompt`, else `promptEn`.
    final_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class Listed:
    """An upstream's list of the tasks it keeps, newest first (`Upstream.list_tasks`): the tasks read, the states of
    those that could not be read as tasks (a task of those states may be among them), and how many it listed."""

    views: tuple[TaskView, ...]
    unreadable: frozenset[str]
    count: int


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """One submit call in the relay's terms; each adapter renders it in its dialect (see SubmitKind for the fields
    each kind uses).

    `prompt` is sent as it is (an imagine's already carries the mode flag); `mode` also goes through the dialect's
    own mechanism (path prefix, `accountFilter.modes` or body `model`). `images` are data URLs. `task_id` is the
    upstream's id of the task an action or a modal acts on. `state` is echoed back by the upstream in every task
    view.
    """

    kind: SubmitKind
    prompt: str = ""
    mode: Mode = "fast"
    bot: Bot = "MID_JOURNEY"
    images: tuple[str, ...] = ()
    dimensions: Dimensions | None = None
    task_id: str | None = None
    custom_id: str | None = None
    mask: str | None = None
    state: str | None = None
    notify_hook: str | None = None
    # Asked once the call is about to leave (a connection to the upstream ready), just before it is written: False,
    # and nothing is sent (the adapter answers `Retryable(WITHHELD, withheld=True)`). The relay writes down there that
    # the job may have been sent, so that a job its process dies with unsent is told from one that may run.
    sending: Callable[[], Awaitable[bool]] | None = field(default=None, compare=False)


# What a submit withheld by its `sending` answers.
WITHHELD = "the relay withheld the submit"


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
    # The upstream could not upload the request's reference images (to Discord, or to its own storage first) and did
    # not take the task: often the image itself (too large, a format Discord refuses), at times a passing fault of
    # that account. Another provider may take it; the provider answered, and is not the worse for it.
    image: bool = False
    # The relay withheld it before it left (`SubmitRequest.sending` said no): the provider saw nothing of it.
    withheld: bool = False


@dataclass(frozen=True, slots=True)
class ClientError:
    description: str
    banned: bool = False


@dataclass(frozen=True, slots=True)
class ProviderUnusable:
    reason: str


SubmitOutcome = Accepted | NeedsModal | Retryable | ClientError | ProviderUnusable


@dataclass(frozen=True, slots=True)
class Uploaded:
    """The links an upload gave (in the upstream's own terms: Discord attachments or the reseller's CDN)."""

    links: tuple[str, ...]


UploadOutcome = Uploaded | Retryable | ClientError | ProviderUnusable


class UpstreamUnavailable(Exception):
    """The provider could not answer a read (transport error, 5xx, refused credentials, a broken body)."""


class PartialRead(UpstreamUnavailable):
    """A batch read the provider answered for some ids only: `views` of the ids it answered for (those it does not
    know left out, as ever), and the ids it could not answer for (`unread`), which say nothing of their tasks. One
    task whose read fails (a 5xx, a body that is no task) must not cost its neighbours their read, nor be taken
    for a task the upstream forgot."""

    def __init__(self, reason: str, views: Sequence[TaskView], unread: frozenset[str]) -> None:
        super().__init__(reason)
        self.views = list(views)
        self.unread = unread


@runtime_checkable
class Upstream(Protocol):
    name: str

    @property
    def carries_mode(self) -> bool:
        """Whether a submit's mode reaches the upstream by the dialect's own mechanism (a path, `accountFilter`, a
        body `model`). Without one only a prompt's flag picks the mode, and a button, which sends no prompt, runs
        in its parent's mode."""
        ...

    async def submit(self, request: SubmitRequest) -> SubmitOutcome: ...

    async def upload(self, images: Sequence[str], mode: Mode, bot: Bot) -> UploadOutcome: ...

    async def seed(self, upstream_id: str) -> str | None: ...

    def parse_hook(self, body: bytes) -> TaskView | None: ...

    async def fetch(self, upstream_id: str) -> TaskView | None: ...

    async def fetch_many(self, upstream_ids: Sequence[str]) -> list[TaskView]: ...

    async def list_tasks(self) -> Listed | None: ...

    async def download(self, url: str) -> bytes: ...

    async def probe(self) -> bool: ...

    async def aclose(self) -> None: ...
