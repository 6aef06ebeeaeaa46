"""The machinery every HTTP dialect shares: lanes of keep-alive connections per provider (`adapters.h1`), explicit
timeouts and limits, credentials only on calls to the provider's own API, size-limited downloads without credentials,
from the provider's own host or where `HttpOptions.download_pin` allows.

All of the project's upstream HTTP goes through this module, so a change of HTTP client is one change here.
A dialect subclass says only what differs: its paths, its auth header and how the mode travels (`mode_prefix`,
`mode_fields`). Bodies are the shared midjourney-proxy shape of `adapters.wire`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin

import httpx

from adapters.base import (
    WITHHELD,
    Bot,
    ClientError,
    Listed,
    Mode,
    PartialRead,
    ProviderUnusable,
    Retryable,
    SubmitOutcome,
    SubmitRequest,
    TaskView,
    UploadOutcome,
    UpstreamUnavailable,
)
from adapters.h1 import HttpFailure, Lane, Pin, Proxies, Reply, TooLarge, host_of
from adapters.replies import (
    classify_submit,
    classify_upload,
    parse_all_tasks,
    parse_fetch,
    parse_hook,
    parse_seed,
    parse_task_list,
)
from adapters.wire import ENDPOINTS, FOLLOW_UPS, missing_fields, render_body

__all__ = ["HttpOptions", "HttpUpstream"]

READ_LANES = 4
# Image downloads (to a CDN, without credentials) go in lanes of their own: a finished job's grid never waits behind
# a burst of submits. A lane's answer is taken at the event loop's next turn, which under a burst of endings lasts
# about 10 ms, so a thousand grids finishing together need this many lanes not to queue behind each other.
DOWNLOAD_LANES = 128
# A whole image download may take this many times the per-call timeout (a slow, large grid), never longer.
DOWNLOAD_TIMEOUTS = 4
# A provider whose list-by-condition answered 404 or 405 is read one fetch per task, and asked for the list again
# this much later: a 404 may be a gateway's, passing (a deploy), and one fetch per task costs a read per task.
LIST_RETRY_S = 600.0
# The most an API answer may hold (a list of a few hundred tasks is well under a megabyte).
MAX_API_BYTES = 32_000_000


class _Withheld(Exception):
    """The caller's `SubmitRequest.sending` said no: nothing was sent."""


class _Busy(Exception):
    """No lane to the provider came free in time."""


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """Connection settings of one provider."""

    base_url: str
    secret: str = ""
    connect_timeout_s: float = 5.0
    timeout_s: float = 30.0
    max_connections: int = 16
    max_image_bytes: int = 50_000_000
    batch_size: int = 50
    # Where an image download to a host other than the provider's own may connect (the image URL is the upstream's
    # word, and the relay fetches it from inside its network); None: anywhere.
    download_pin: Pin | None = None


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every lane (making one costs about 25 ms), trusting what httpx trusts."""
    return httpx.create_ssl_context()


class _Lanes:
    """`count` lanes to one provider, each one keep-alive connection: callers wait here for a free one."""

    def __init__(self, count: int, connect_timeout_s: float, proxies: Proxies) -> None:
        self._lanes = [Lane(connect_timeout_s=connect_timeout_s, tls=_tls(), proxies=proxies) for _ in range(count)]
        self._free: asyncio.Queue[Lane] = asyncio.Queue()
        for lane in self._lanes:
            self._free.put_nowait(lane)

    async def take(self) -> Lane:
        return await self._free.get()

    def free(self) -> Lane | None:
        """A lane free now, if any (taken)."""
        return None if self._free.empty() else self._free.get_nowait()

    def release(self, lane: Lane) -> None:
        self._free.put_nowait(lane)

    async def aclose(self) -> None:
        await asyncio.gather(*(lane.aclose() for lane in self._lanes))


class HttpUpstream:
    """Base of the HTTP dialects. Subclasses set `dialect`, `max_batch` and override the hooks below."""

    dialect = "http"
    max_batch = 1000
    api_prefix = "/mj"

    def __init__(self, name: str, options: HttpOptions) -> None:
        self.name = name
        self.options = options
        self._base = options.base_url.rstrip("/")
        # Status reads and downloads have lanes of their own, so neither queues behind a burst of submits.
        proxies = Proxies.from_environment()
        self._submits = _Lanes(options.max_connections, options.connect_timeout_s, proxies)
        self._reads = _Lanes(READ_LANES, options.connect_timeout_s, proxies)
        self._downloads = _Lanes(DOWNLOAD_LANES, options.connect_timeout_s, proxies)
        self._list_refused_at: float | None = None  # when list-by-condition last answered 404 or 405
        self._now = time.monotonic
        # The provider's own host (as the HTTP client reads it): the operator chose it, so images it serves itself
        # are fetched wherever it is.
        self._own_host = host_of(self._base)

    async def _download_pin(self, host: str, port: int) -> str:
        """Where a download's connection to `host` goes: the provider's own host as it is, any other as the
        options' `download_pin` says."""
        if host.lower() == self._own_host or self.options.download_pin is None:
            return host
        return await self.options.download_pin(host, port)

    async def _request(
        self,
        lanes: _Lanes,
        method: str,
        url: str,
        *,
        sending: Callable[[], Awaitable[bool]] | None = None,
        **options: Any,
    ) -> Reply:
        """One call on a lane of `lanes` (`Lane.request`'s options), the lane waited for at most `timeout_s` (then
        `_Busy`) and given back after; `sending` asked once the lane is taken (False: `_Withheld`, nothing sent)."""
        lane = lanes.free()
        if lane is None:
            try:
                async with asyncio.timeout(self.options.timeout_s):
                    lane = await lanes.take()
            except TimeoutError:
                raise _Busy from None
        try:
            if sending is not None and not await sending():
                raise _Withheld
            return await lane.request(method, url, **options)
        finally:
            lanes.release(lane)

    # -- what a dialect says -------------------------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def mode_prefix(self, mode: Mode) -> str:
        """A path prefix in front of `api_prefix` that carries the mode on submit-like calls (`/mj-relax`)."""
        return ""

    def mode_fields(self, mode: Mode) -> dict[str, Any]:
        """Body fields that carry the mode (`accountFilter`, `model`); on every submit-like call but a modal."""
        return {}

    @property
    def carries_mode(self) -> bool:
        """Whether the upstream reads the mode from `mode_prefix` or `mode_fields` (see `Upstream.carries_mode`)."""
        return bool(self.mode_prefix("fast") or self.mode_fields("fast"))

    def submit_path(self, request: SubmitRequest) -> str:
        return f"{self.mode_prefix(request.mode)}{self.api_prefix}/{ENDPOINTS[request.kind]}"

    def submit_body(self, request: SubmitRequest) -> dict[str, Any]:
        return render_body(request) | ({} if request.kind == "modal" else self.mode_fields(request.mode))

    def upload_path(self, mode: Mode) -> str:
        return f"{self.mode_prefix(mode)}{self.api_prefix}/submit/upload-discord-images"

    def upload_body(self, images: Sequence[str], mode: Mode) -> dict[str, Any]:
        return {"base64Array": list(images)} | self.mode_fields(mode)

    def fetch_path(self, upstream_id: str) -> str:
        return f"{self.api_prefix}/task/{quote(upstream_id, safe='')}/fetch"

    def seed_path(self, upstream_id: str) -> str:
        return f"{self.api_prefix}/task/{quote(upstream_id, safe='')}/image-seed"

    def list_path(self) -> str:
        return f"{self.api_prefix}/task/list-by-condition"

    def all_tasks_path(self) -> str | None:
        """`GET` path of the list of the tasks the upstream keeps (midjourney-proxy's `task/list`); None where the
        dialect looks tasks up by their ids only."""
        return None

    # -- the contract --------------------------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        missing = missing_fields(request)
        if missing:
            return ClientError(missing)
        sent = await self._post(self.submit_path(request), self.submit_body(request), request.sending)
        if not isinstance(sent, tuple):
            return sent
        return classify_submit(*sent, follow_up=request.kind in FOLLOW_UPS)

    async def upload(self, images: Sequence[str], mode: Mode, bot: Bot) -> UploadOutcome:
        if not images:
            return ClientError("an upload needs at least one image")
        sent = await self._post(self.upload_path(mode), self.upload_body(images, mode))
        if not isinstance(sent, tuple):
            return sent
        return classify_upload(*sent)

    async def seed(self, upstream_id: str) -> str | None:
        status, body = await self._call("GET", self.seed_path(upstream_id))
        try:
            return parse_seed(status, body)
        except ValueError as exc:
            raise UpstreamUnavailable(str(exc)) from None

    async def fetch(self, upstream_id: str) -> TaskView | None:
        status, body = await self._call("GET", self.fetch_path(upstream_id))
        try:
            return parse_fetch(status, body)
        except ValueError as exc:
            raise UpstreamUnavailable(str(exc)) from None

    async def fetch_many(self, upstream_ids: Sequence[str]) -> list[TaskView]:
        """The batch read in chunks (list-by-condition, else one fetch per id). A chunk that fails, or a fetch that
        fails, leaves its ids unread rather than the whole batch: `PartialRead` with the views read. A chunk none of
        whose ids could be read ends the read (the provider is not asked for the rest); when nothing at all was
        read, the first failure is raised as it came."""
        ids = list(dict.fromkeys(upstream_ids))
        size = max(1, min(self.options.batch_size, self.max_batch))
        views: list[TaskView] = []
        unread: list[str] = []
        failure: UpstreamUnavailable | None = None
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            try:
                if self._list_refused_at is None or self._now() - self._list_refused_at >= LIST_RETRY_S:
                    got = await self._list(chunk)
                    if got is not None:
                        views.extend(got)
                        continue
                read, missed, failed = await self._fetch_each(chunk)
            except UpstreamUnavailable as exc:
                failure = failure or exc
                unread.extend(ids[start:])
                break
            views.extend(read)
            unread.extend(missed)
            failure = failure or failed
            if missed and len(missed) == len(chunk):  # not one of them answered: the provider cannot now
                unread.extend(ids[start + size :])
                break
        if failure is None:
            return views
        if len(unread) == len(ids):
            raise failure
        raise PartialRead(f"{len(unread)} of {len(ids)} tasks unread: {failure}", views, frozenset(unread))

    async def list_tasks(self) -> Listed | None:
        """The tasks the upstream keeps (`all_tasks_path`); None when the dialect, or this server (404, 405), has no
        such list."""
        path = self.all_tasks_path()
        if path is None:
            return None
        status, body = await self._call("GET", path)
        if status in (404, 405):
            return None
        try:
            return parse_all_tasks(status, body)
        except ValueError as exc:
            raise UpstreamUnavailable(str(exc)) from None

    async def download(self, url: str) -> bytes:
        target = url if url.startswith(("http://", "https://")) else urljoin(self._base + "/", url)
        if not target.startswith(("http://", "https://")):
            raise UpstreamUnavailable("the image URL is not http(s)")
        try:
            reply = await self._request(
                self._downloads,
                "GET",
                target,
                timeout_s=self.options.timeout_s * DOWNLOAD_TIMEOUTS,
                max_body=self.options.max_image_bytes,
                follow_redirects=True,
                pin=self._download_pin,
            )
        except _Busy:
            raise UpstreamUnavailable("the image download did not finish in time") from None
        except TooLarge:
            raise UpstreamUnavailable("the image is larger than the download limit") from None
        except HttpFailure as exc:
            if exc.timeout:
                raise UpstreamUnavailable("the image download did not finish in time") from None
            raise UpstreamUnavailable(f"image download failed: {exc}") from None
        if reply.status != 200:
            raise UpstreamUnavailable(f"image download answered HTTP {reply.status}")
        return reply.body

    def parse_hook(self, body: bytes) -> TaskView | None:
        return parse_hook(body)

    async def probe(self) -> bool:
        try:
            status, body = await self._call("POST", self.list_path(), {"ids": []})
        except UpstreamUnavailable:
            return False
        if status == 200:
            return True
        if status in (404, 405):  # no list endpoint: any answer of the fetch route that is not an auth refusal
            try:
                status, body = await self._call("GET", self.fetch_path("0"))
            except UpstreamUnavailable:
                return False
            return status not in (401, 403) and status < 500
        return False

    async def aclose(self) -> None:
        for lanes in (self._submits, self._reads, self._downloads):
            await lanes.aclose()

    # -- helpers -------------------------------------------------------------------------------------------------

    async def _post(
        self, path: str, payload: Mapping[str, Any], sending: Callable[[], Awaitable[bool]] | None = None
    ) -> tuple[int, bytes] | Retryable | ProviderUnusable:
        """One call that makes or moves something upstream, on a submit lane: its HTTP status and body, or why
        there is none (and whether the request may have reached the upstream)."""
        try:
            reply = await self._request(
                self._submits,
                "POST",
                self._base + path,
                sending=sending,
                headers={**self.auth_headers(), "Content-Type": "application/json"},
                body=json.dumps(payload).encode(),
                timeout_s=self.options.timeout_s,
                max_body=MAX_API_BYTES,
            )
        except _Withheld:
            return Retryable(WITHHELD, withheld=True)
        except _Busy:
            return Retryable("every connection to the provider stayed busy", sent=False)
        except HttpFailure as exc:
            if not exc.sent:
                return Retryable(f"cannot connect: {exc}", sent=False)
            if exc.timeout:
                return Retryable(f"no answer in time: {exc}", sent=True)
            return Retryable(f"transport error: {exc}", sent=True)
        if 300 <= reply.status < 400:
            return ProviderUnusable(f"unexpected redirect (HTTP {reply.status})")
        return reply.status, reply.body

    async def _call(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        headers = self.auth_headers()
        content = b""
        if payload is not None:
            content = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        try:
            reply = await self._request(
                self._reads,
                method,
                self._base + path,
                headers=headers,
                body=content,
                timeout_s=self.options.timeout_s,
                max_body=MAX_API_BYTES,
            )
        except _Busy:
            raise UpstreamUnavailable("every read lane to the provider stayed busy") from None
        except HttpFailure as exc:
            raise UpstreamUnavailable(f"{method} failed: {exc}") from None
        if reply.status >= 500 or reply.status == 429:
            raise UpstreamUnavailable(f"{method} answered HTTP {reply.status}")
        return reply.status, reply.body

    async def _list(self, ids: list[str]) -> list[TaskView] | None:
        """A batch through list-by-condition; None when this provider has no such endpoint (it is asked again
        `LIST_RETRY_S` later: a 404 may be a gateway's, passing)."""
        status, body = await self._call("POST", self.list_path(), {"ids": ids})
        if status in (404, 405):
            self._list_refused_at = self._now()
            return None
        self._list_refused_at = None
        try:
            views = parse_task_list(status, body)
        except ValueError as exc:
            raise UpstreamUnavailable(str(exc)) from None
        wanted = set(ids)
        return [view for view in views if view.upstream_id in wanted]

    async def _fetch_each(self, ids: list[str]) -> tuple[list[TaskView], list[str], UpstreamUnavailable | None]:
        """One fetch per id: the views read, the ids whose fetch failed, and the first failure. A fetch answered
        with another task than the one asked for failed: it says nothing of the task asked for (no answer that the
        upstream does not know it, which would count towards the job being lost), and the task it names was not
        asked for (as a list's tasks not asked for are left out)."""
        results = await asyncio.gather(*(self.fetch(i) for i in ids), return_exceptions=True)
        views: list[TaskView] = []
        missed: list[str] = []
        failure: UpstreamUnavailable | None = None
        for upstream_id, result in zip(ids, results, strict=True):
            if isinstance(result, TaskView) and result.upstream_id != upstream_id:
                result = UpstreamUnavailable(f"the fetch of task {upstream_id} answered another task")
            if isinstance(result, UpstreamUnavailable):
                missed.append(upstream_id)
                failure = failure or result
            elif isinstance(result, BaseException):
                raise result
            elif result is not None:
                views.append(result)
        return views, missed, failure
