"""What every route shares: the relay's services, the caller's key, the JSON body, typed validation.

Client text is hostile until checked: the body is parsed with a nesting limit before anything else looks at it,
and every string field a route stores is a `Text`, which refuses what a database cannot store (see core.text).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

from cachetools import TTLCache
from pydantic import AfterValidator, BaseModel, StrictStr, ValidationError
from starlette.requests import ClientDisconnect, Request

from adapters.nesting import as_utf8, nests_deeper
from relay.core.jobs import Attempt
from relay.core.submit import key_refused
from relay.core.text import check_storable
from relay.errors import AuthenticationFailed, InvalidRequest
from relay.store.keys import KeyRecord, KeyStore, hash_key

if TYPE_CHECKING:
    from relay.services import Relay

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# A string a route may store: strict (no coercion from numbers) and storable.
Text = Annotated[StrictStr, AfterValidator(check_storable)]
# How deeply a JSON body may nest; real requests need a handful of levels. Counted over the bytes, before parsing
# (`adapters.nesting`).
MAX_JSON_DEPTH = 32
# How many values a JSON body may hold: strings, and commas and opening brackets outside strings. Real requests
# have a few hundred (a long pasted text is one string); the body limit alone would let one body carry millions of
# tiny values, whose parsing and validation would hold the event loop for seconds. Counted over the bytes before
# parsing, at C speed: commas and brackets with the strings' own first (the count almost every body stops at), then
# strings by their quotes (less those escaped within strings), and only past both, commas and brackets again with
# the strings left out (a scan of at most that many strings). A string never closed runs to the end of the body, as
# the parser (which refuses it) reads it: a pattern that must find the closing quote scans to the end and fails from
# each quote escaped in such a string, a pass over the body per quote.
MAX_JSON_VALUES = 100_000
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)

# How long a looked-up key (or a miss) is remembered; a revocation or a change of policy takes effect within this
# time (a hold itself always checks revocation and expiry in the database).
KEY_CACHE_TTL_S = 5.0
# What the key cache answers for a key it does not hold (None is a remembered miss: a key that does not exist).
_NOT_CACHED = object()


def relay_of(request: Request) -> Relay:
    return request.app.state.relay  # type: ignore[no-any-return]


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, for a request whose body has been read; when its client hangs up first, `work` is cancelled
    and ClientDisconnect raised, so a request nobody waits for ends at once (its jobs run on without it) instead
    of holding its task, and a graceful shutdown, until they end. `work` runs in the request's own task: only the
    watch for the hang-up is a task of its own."""
    task = asyncio.current_task()
    assert task is not None, "called from a request's task"
    waiting, left = True, False

    def hung_up(watch: asyncio.Task[None]) -> None:
        nonlocal left
        if waiting and not watch.cancelled() and watch.exception() is None:
            left = True
            task.cancel()

    watching = asyncio.ensure_future(_disconnected(request))
    watching.add_done_callback(hung_up)
    try:
        return await work
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:  # this function's own cancel, not one from outside
            raise ClientDisconnect() from None
        raise
    finally:
        waiting = False
        watching.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client of a request whose body has been read has hung up."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def base_url(request: Request) -> str:
    """Where clients reach the relay: `server.public_url`, else the address this request came in on."""
    configured = relay_of(request).config.server.public_url
    return configured or str(request.base_url).rstrip("/")


class Authenticator:
    def __init__(self, keys: KeyStore, now: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.now = now
        self._cache: TTLCache[str, KeyRecord | None] = TTLCache(maxsize=10_000, ttl=KEY_CACHE_TTL_S)
        self._lookups: dict[str, asyncio.Task[KeyRecord | None]] = {}

    async def __call__(self, request: Request, *, native: bool = False) -> KeyRecord:
        """The caller's key: `Authorization: Bearer KEY`; on the native surface also `mj-api-secret: KEY` or a bare
        `Authorization: KEY`, as midjourney-proxy clients send it. A revoked or expired key is refused (401); the
        key's other policies (models, requests per minute) are enforced where work is admitted (`core.submit`)."""
        token = credential(request, native)
        if not token:
            hint = "'Authorization: Bearer YOUR_KEY'" + (" or 'mj-api-secret: YOUR_KEY'" if native else "")
            raise AuthenticationFailed(f"You didn't provide an API key. Send it as {hint}.", reason="missing")
        digest = hash_key(token)
        # One read of the cache, at one moment: asking whether it holds the key and then for the key reads its clock
        # twice, and an entry that lapsed in between was a KeyError (a 500) for a good key.
        cached = self._cache.get(digest, _NOT_CACHED)
        record = await self._lookup(digest, token) if cached is _NOT_CACHED else cast(KeyRecord | None, cached)
        if record is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        refused = key_refused(record, self.now())
        if refused is not None:
            raise refused
        return record

    async def _lookup(self, digest: str, token: str) -> KeyRecord | None:
        """One database read per key at a time: concurrent requests with the same key share it."""
        task = self._lookups.get(digest)
        if task is None:
            task = asyncio.ensure_future(self.keys.by_secret(token))
            self._lookups[digest] = task
            task.add_done_callback(lambda done: self._remember(digest, done))
        return await asyncio.shield(task)

    def _remember(self, digest: str, task: asyncio.Task[KeyRecord | None]) -> None:
        self._lookups.pop(digest, None)
        if not task.cancelled() and task.exception() is None:
            self._cache[digest] = task.result()


# What New API's midjourney forks put in `Authorization` when they call an upstream, the key going in
# `mj-api-secret`; New API reads it as no Authorization at all.
NATIVE_PLACEHOLDER = "midjourney-proxy"


def credential(request: Request, native: bool) -> str:
    """The secret a request presents: a bearer token; on the native surface also `mj-api-secret` or a bare
    Authorization value, and `mj-api-secret` when Authorization is only `NATIVE_PLACEHOLDER`. Empty when there is
    none."""
    header = request.headers.get("authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    bearer = scheme.lower() == "bearer"
    token = rest.strip() if bearer else ""
    if native and (token if bearer else header) == NATIVE_PLACEHOLDER:
        bearer, header = False, ""
    if bearer or not native:
        return token
    return request.headers.get("mj-api-secret", "").strip() or (header if " " not in header else "")


async def attempt_of(request: Request, key: KeyRecord) -> Attempt:
    """How a client's retry of this request is recognised: the same key, route and body, with the OpenAI SDKs'
    `x-stainless-retry-count` above 0; or the same `Idempotency-Key` header, whose attempt keeps a digest of the
    body, so that the key sent again with another body is refused rather than answered with the first one's jobs."""
    idempotency = request.headers.get("idempotency-key", "").strip()
    body = await request.body()
    if idempotency:
        material = f"{key.id}\n{request.url.path}\nidempotency-key\n{idempotency}".encode()
        return Attempt(hashlib.sha256(material).hexdigest(), retry=True, body=hashlib.sha256(body).hexdigest())
    material = f"{key.id}\n{request.url.path}\n".encode() + body
    retries = request.headers.get("x-stainless-retry-count", "0").strip()
    return Attempt(hashlib.sha256(material).hexdigest(), retry=retries not in ("", "0"))


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    if _too_many_values(raw):
        raise InvalidRequest(f"The JSON body holds more than {MAX_JSON_VALUES} values.")
    if nests_deeper(raw, MAX_JSON_DEPTH):
        raise InvalidRequest(f"The JSON body nests more than {MAX_JSON_DEPTH} levels deep.")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send valid JSON with 'Content-Type: application/json'."
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _separators(raw: bytes) -> int:
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def _too_many_values(raw: bytes) -> bool:
    """Whether a body holds more than `MAX_JSON_VALUES` values (see there). A body in UTF-16 or UTF-32 (which
    `json.loads` reads too) is counted as UTF-8 (`as_utf8`): counting its own bytes would let strings swallow real
    values."""
    text = as_utf8(raw)
    if text is None:
        return False  # not JSON in that encoding either: `json.loads` refuses it
    if _separators(text) <= MAX_JSON_VALUES:
        return False
    if text.count(b'"') - text.count(b'\\"') > 2 * MAX_JSON_VALUES:  # quotes, less those escaped in strings
        return True
    return _separators(_JSON_STRING.sub(b'""', text)) > MAX_JSON_VALUES


def validate(model: type[M], data: dict[str, Any]) -> M:
    """Typed validation; the first problem becomes a 400 that names its parameter."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "missing":
            raise InvalidRequest(f"Missing required parameter: {param!r}.", param=param) from None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for {param!r}: {message}.", param=param) from None
