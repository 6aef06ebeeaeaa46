"""POST /v1/chat/completions with an image model: the last user message is the prompt, its `image_url` parts are
reference images, and the answer is one assistant message with the images in Markdown.

Streamed answers follow OpenAI's chunk format: the role chunk first, progress as content (`Generating… 46%`) as it
happens, an SSE comment (`: keep-alive`) whenever nothing else was sent for `api.keepalive_s`, the images, a chunk
with `finish_reason: "stop"`, an optional usage chunk, and `data: [DONE]`. A failure mid-stream is shown as text,
then sent as an `{"error": ...}` event (which the OpenAI SDKs raise), the stream's last: `[DONE]` says an answer
is whole, so it never follows an error. Any failure is told so, in the envelope it would have had unstreamed: a failed
job's, or (as `Guard` would render it, counted and logged once) a database that cannot serve now (503) or a bug (500).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from relay.api.common import Text, attempt_of, base_url, json_body, relay_of, unless_disconnected, validate
from relay.api.openai.errors import render
from relay.core import housekeeping
from relay.core.jobs import Generation, JobService, unknown_model
from relay.core.submit import model_not_allowed
from relay.errors import InvalidRequest, JobFailed, RelayError
from relay.logs import event
from relay.middleware import STOPPING, as_relay_error
from relay.store.jobs import JobRow
from relay.store.keys import KeyRecord

log = logging.getLogger("relay.housekeeping")

# Discord's command, as a user types or pastes it before a prompt: `/imagine a cat`, `/imagine prompt: a cat`. Only
# the whole word is the command (`/imagined cities` is a prompt), and `prompt:` only right after it.
IMAGINE_COMMAND = re.compile(r"/imagine(?:[\s:]+|$)(?:prompt:\s*)?", re.IGNORECASE)
ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
# Headers of an event stream: never cached, and not buffered by a proxy in front (nginx).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat fields we act on; sampling fields (temperature, ...) mean nothing here and are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    messages: list[dict[str, Any]] = Field(min_length=1, fail_fast=True)  # one error is enough: not one per item
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, ge=1, le=1)
    user: StrictStr | None = None


def last_user_turn(messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The prompt (text of the last user message, without a leading `/imagine` command) and its image URLs. A part
    of that message that is neither text nor an image (audio, a file) is refused: the job would not use it."""
    turn = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if turn is None:
        raise InvalidRequest("The messages hold no user message to use as a prompt.", param="messages")
    content = turn.get("content")
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                raise InvalidRequest("Each content part must be an object.", param="messages")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidRequest("A text part's text must be a string.", param="messages")
                texts.append(part["text"])
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str) or not url:
                    raise InvalidRequest("An image_url part has no url.", param="messages")
                images.append(url)
            else:  # audio, a file, a type of another API: a job would run without it, and be charged
                what = "has no type" if kind is None else f"of type {str(kind)[:64]!r} cannot be used for an image"
                raise InvalidRequest(f"A content part {what}: send text and image_url parts.", param="messages")
    elif content is not None:
        raise InvalidRequest("A message's content must be a string or a list of parts.", param="messages")
    text = " ".join(t.strip() for t in texts if t.strip())
    command = IMAGINE_COMMAND.match(text)
    if command is not None:
        text = text[command.end() :]
    if not text:
        raise InvalidRequest("The last user message has no text to use as a prompt.", param="messages")
    return text, images


def about_messages(error: RelayError) -> RelayError:
    """The error as chat tells it: a refused prompt (`JobFailed` names `prompt`, the images routes' field) names
    `messages`, where a chat's prompt came from, as chat's other errors about it do."""
    if isinstance(error, JobFailed) and error.param == "prompt":
        error.param = "messages"  # raised for this request alone: each failure is made anew from its job's row
    return error


def markdown(request: Request, rows: list[JobRow]) -> str:
    """The grid as one image, and a link to each tile at full size."""
    relay = relay_of(request)
    root, now = base_url(request), relay.clock.now()
    tiles = JobService.tiles(rows, len(rows) * 4)  # raises the first failure when no job succeeded
    blocks = []
    for job_id in dict.fromkeys(tile.job_id for tile in tiles):
        grid = relay.images.url(root, job_id, "grid.png", now)
        links = " · ".join(
            f"[Image {tile.name[0]}]({relay.images.url(root, job_id, tile.name, now)})"
            for tile in tiles
            if tile.job_id == job_id
        )
        blocks.append(f"![Midjourney grid]({grid})\n\n{links}")
    return "\n\n".join(blocks)


# Characters JSON leaves as they are that a line reader splitting as str.splitlines does (httpx's iter_lines, and so
# httpx-sse) takes for a line's end: escaped, so a chunk stays one `data:` line (control characters JSON escapes).
_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    return b"data: " + json.dumps(body, ensure_ascii=False).translate(_LINE_BREAKS).encode() + b"\n\n"


async def chat_completions(request: Request) -> Response:
    relay = relay_of(request)
    key = await relay.auth(request)
    body = validate(ChatRequest, await json_body(request))
    chore = _housekeeping(request, key, body)
    if chore is not None:
        return chore
    text, image_urls = last_user_turn(body.messages)
    spec = relay.jobs.plan(model=body.model, prompt=text, prompt_param="messages")
    references: Callable[[], Awaitable[tuple[str, ...]]] | None = None
    if image_urls:
        if not key.allows(spec.model):  # refused before anything is fetched for it, as its job would be
            raise model_not_allowed(spec.model)

        async def load() -> tuple[str, ...]:
            # Only when the request starts jobs (a retry that follows its first attempt's fetches none); a client
            # that leaves while they download gets no job started (nor charged) for nobody.
            return await unless_disconnected(request, relay.references.load(image_urls, key.id))

        references = load
    try:
        generation = await relay.jobs.start(key, spec, await attempt_of(request, key), references)
        completion_id = f"chatcmpl-{generation.request_id}"
        created = int(relay.clock.now())
        if not body.stream:
            try:
                rows = await unless_disconnected(request, relay.jobs.wait(generation))
            finally:
                generation.close()
            return JSONResponse(_completion(completion_id, created, spec.model, markdown(request, rows)))
    except JobFailed as exc:
        about_messages(exc)
        raise
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return _GenerationStream(
        generation,
        _stream(request, generation, completion_id, created, usage),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


def _completion(completion_id: str, created: int, model: str, content: str) -> dict[str, Any]:
    """A whole (not streamed) chat completion with one answer."""
    message = {"role": "assistant", "content": content, "refusal": None}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
        "usage": ZERO_USAGE,
    }


def _usage_chunk(completion_id: str, created: int, model: str) -> bytes:
    """The last chunk of a stream whose client asked for usage (`stream_options.include_usage`)."""
    tail = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    return b"data: " + json.dumps({**tail, "choices": [], "usage": ZERO_USAGE}).encode() + b"\n\n"


def _housekeeping(request: Request, key: KeyRecord, body: ChatRequest) -> Response | None:
    """A front end's own housekeeping request (a title, tags, a summary: `relay.core.housekeeping`) is answered with
    `api.housekeeping.answer`, in the shape asked for, without a job, a hold or a charge; None for any other. Its
    model is refused as a job of it would be (unknown: 404; one the key may not use: 403), so that a key kept from
    a model is not answered in its name."""
    relay = relay_of(request)
    settings = relay.config.api.housekeeping
    if not settings.enabled:
        return None
    chore = housekeeping.matcher(tuple(settings.patterns)).match(body.messages)
    if chore is None:
        return None
    if body.model not in relay.config.models:
        raise unknown_model(body.model)
    if not key.allows(body.model):
        raise model_not_allowed(body.model)
    event(log, "housekeeping answered", prompt=chore, model=body.model, stream=bool(body.stream))
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(relay.clock.now())
    if not body.stream:
        return JSONResponse(_completion(completion_id, created, body.model, settings.answer))
    usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[bytes]:
        yield _chunk(completion_id, created, body.model, {"role": "assistant", "content": ""})
        yield _chunk(completion_id, created, body.model, {"content": settings.answer})
        yield _chunk(completion_id, created, body.model, {}, "stop")
        if usage:
            yield _usage_chunk(completion_id, created, body.model)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream", headers=SSE_HEADERS)


class _GenerationStream(StreamingResponse):
    """A stream that lets go of its jobs' events however it ends, even when the client left before it began.

    A client that hangs up before the stream's end ends it (Starlette stops it once the server says so), and the
    request is then told as one whose client went away (`ClientDisconnect`, which `Guard` logs and counts as 499),
    as an unstreamed request whose client left is: not as a 200, answered."""

    def __init__(self, generation: Generation, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.generation = generation
        self.ended = False  # the stream's last bytes were sent
        self.client_left = False  # the client hung up before them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watched(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.ended = True

        try:
            await super().__call__(scope, receive, watched)
        finally:
            self.generation.close()
        if self.client_left:
            raise ClientDisconnect()

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await super().listen_for_disconnect(receive)
        # Told also once the answer is complete; only a hang-up before it is a client that left. Once it has, the
        # stream may still run to its end, its bytes sent to nobody: that does not make it answered.
        self.client_left = not self.ended


async def _stream(
    request: Request, generation: Generation, completion_id: str, created: int, usage: bool
) -> AsyncIterator[bytes]:
    relay = relay_of(request)
    model = generation.spec.model

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _chunk(completion_id, created, model, delta, finish)

    try:
        yield chunk({"role": "assistant", "content": ""})
        yield chunk({"content": "Generating… 0%\n\n"})
        shown, content = 0, ""
        error: RelayError | None = None
        try:
            async for percent in relay.jobs.follow(generation, idle_s=relay.config.api.keepalive_s):
                if percent is None:
                    yield b": keep-alive\n\n"
                elif percent != shown:
                    shown = percent
                    yield chunk({"content": f"Generating… {percent}%\n\n"})
            content = markdown(request, await relay.jobs.results(generation))
        except asyncio.CancelledError:
            # The relay is stopping and its graceful shutdown ran out (or the client left, and reads nothing more):
            # the stream is ended here, with the error, rather than cut.
            error = STOPPING
        except Exception as exc:  # the status is sent: the error can only be told in the stream (and is, once)
            error = about_messages(as_relay_error(exc, request.url.path, relay.metrics))
        if error is not None:
            yield chunk({"content": f"**Error:** {error.message}"})
            yield chunk({}, "stop")
            yield b"data: " + render(error).to_bytes() + b"\n\n"
            return
        yield chunk({"content": content})
        yield chunk({}, "stop")
        if usage:
            yield _usage_chunk(completion_id, created, model)
        yield b"data: [DONE]\n\n"
    finally:
        generation.close()
