"""The native Midjourney-proxy API, behind relay keys: every seed endpoint under `/mj/...`, `/mj-{mode}/mj/...`
and `/v1/mj/...`. Routes parse and answer; `core.tasks` does the work. Keys come as `Authorization: Bearer KEY`,
`mj-api-secret: KEY`, or a bare `Authorization: KEY`.

    POST submit/imagine | blend | describe | shorten | action | change | simple-change | modal
    POST submit/upload-discord-images
    POST insight-face/swap
    GET  task/{id}/fetch       GET task/{id}/image-seed       POST task/list-by-condition
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.api.common import base_url, json_body, relay_of, validate
from relay.api.mj import render, schemas
from relay.core.buttons import Change, change_button
from relay.core.modes import ModeHints
from relay.core.tasks import ActionOrder, Submission, TaskOrder
from relay.domain import JobState, Mode, TaskKind
from relay.errors import InvalidRequest, NotFound
from relay.store.keys import KeyRecord

if TYPE_CHECKING:
    from relay.services import Relay

B = TypeVar("B", bound=BaseModel)

PREFIXES = ("/mj", "/mj-fast/mj", "/mj-relax/mj", "/mj-turbo/mj", "/v1/mj")
_PATH_MODE = re.compile(r"^/mj-(fast|relax|turbo)/")
RECENT_TASKS = 100
# Past this many tasks, a list is rendered on a thread (each task's links are signed): a poll of a few is not.
RENDERED_AT_ONCE = 100


def _path_mode(request: Request) -> Mode | None:
    found = _PATH_MODE.match(request.url.path)
    return found.group(1) if found else None  # type: ignore[return-value]


def _hints(request: Request, body: schemas._Submit, prompt: str = "") -> ModeHints:
    modes = body.accountFilter.modes if body.accountFilter else []
    return ModeHints(path=_path_mode(request), model=body.model, filter_modes=modes, prompt=prompt)


async def _caller(request: Request, schema: type[B]) -> tuple[Relay, KeyRecord, B]:
    relay = relay_of(request)
    key = await relay.auth(request, native=True)
    return relay, key, validate(schema, await json_body(request))


async def _images(relay: Relay, values: list[str], param: str) -> tuple[str, ...]:
    """Inline images checked to be images (decoding is CPU work: off the event loop)."""
    return tuple(await asyncio.to_thread(lambda: [relay.references.decode(v, param) for v in values]))


def _submitted(request: Request, submission: Submission) -> JSONResponse:
    # `/v1/mj` resellers type the task id as an integer (seed 002); the relay's ids are numbers, so it can.
    result: str | int = int(submission.job_id) if request.url.path.startswith("/v1/mj/") else submission.job_id
    if submission.state is JobState.MODAL:
        body = render.envelope(render.MODAL, "Waiting for window confirm", result, {"remix": True})
    elif submission.queued:
        body = render.envelope(render.QUEUED, "In queue", result)
    else:
        body = render.envelope(render.SUBMITTED, "Submit success", result)
    return JSONResponse(body)


async def _order(request: Request, relay: Relay, key: KeyRecord, order: TaskOrder) -> JSONResponse:
    return _submitted(request, await relay.tasks.submit(key, order, base_url(request)))


def _common(body: schemas._Submit) -> dict[str, Any]:
    return {"bot": body.botType, "client_state": body.state, "notify_hook": body.notifyHook}


async def imagine(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.ImagineBody)
    images = await _images(relay, body.base64Array, "base64Array")
    if body.base64 is not None:
        images += await _images(relay, [body.base64], "base64")
    order = TaskOrder(
        TaskKind.IMAGINE, _hints(request, body, body.prompt), prompt=body.prompt, images=images, **_common(body)
    )
    return await _order(request, relay, key, order)


async def blend(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.BlendBody)
    images = await _images(relay, body.base64Array, "base64Array")
    order = TaskOrder(TaskKind.BLEND, _hints(request, body), images=images, dimensions=body.dimensions, **_common(body))
    return await _order(request, relay, key, order)


async def describe(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.DescribeBody)
    images = await _images(relay, [body.base64], "base64")
    order = TaskOrder(TaskKind.DESCRIBE, _hints(request, body), images=images, **_common(body))
    return await _order(request, relay, key, order)


async def shorten(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.ShortenBody)
    order = TaskOrder(TaskKind.SHORTEN, _hints(request, body, body.prompt), prompt=body.prompt, **_common(body))
    return await _order(request, relay, key, order)


async def swap_face(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.SwapFaceBody)
    source = await _images(relay, [body.sourceBase64], "sourceBase64")
    target = await _images(relay, [body.targetBase64], "targetBase64")
    order = TaskOrder(TaskKind.SWAP_FACE, _hints(request, body), images=source + target, **_common(body))
    return await _order(request, relay, key, order)


async def action(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.ActionBody)
    order = ActionOrder(body.taskId, body.customId, _hints(request, body), body.state, body.notifyHook)
    return _submitted(request, await relay.tasks.act(key, order, base_url(request)))


async def _change(
    request: Request,
    relay: Relay,
    key: KeyRecord,
    body: schemas._Submit,
    task_id: str,
    action: Change,
    index: int | None,
) -> Response:
    """A press of the button of `task_id` that a `submit/change` names by action and index."""
    if action != "REROLL" and index not in (1, 2, 3, 4):
        raise InvalidRequest(f"An {action.lower()} takes an index from 1 to 4.", param="index")
    row = await relay.tasks.get(key, task_id)
    custom_id = change_button((button.get("customId", "") for button in row.buttons), action, index)
    if custom_id is None:
        raise InvalidRequest(f"The task has no {action.lower()} button{f' {index}' if index else ''}.", param="action")
    order = ActionOrder(task_id, custom_id, _hints(request, body), body.state, body.notifyHook)
    return _submitted(request, await relay.tasks.act(key, order, base_url(request)))


async def change(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.ChangeBody)
    return await _change(request, relay, key, body, body.taskId, body.action, body.index)


async def simple_change(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.SimpleChangeBody)
    parsed = schemas.simple_change(body.content)
    if parsed is None:
        raise InvalidRequest('The content is "<task id> U1" to "U4", "V1" to "V4", or "R".', param="content")
    return await _change(request, relay, key, body, *parsed)


async def modal(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.ModalBody)
    mask = (await _images(relay, [body.maskBase64], "maskBase64"))[0] if body.maskBase64 else None
    return _submitted(request, await relay.tasks.confirm(key, body.taskId, body.prompt or "", mask, base_url(request)))


async def upload(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.UploadBody)
    images = await _images(relay, body.base64Array, "base64Array")
    links = await relay.uploads.keep(key.id, images, base_url(request))
    return JSONResponse(render.envelope(render.SUBMITTED, "Upload success", list(links)))


def _path_task_id(request: Request) -> str:
    try:
        return schemas.task_id(request.path_params["task_id"])
    except ValueError:
        raise NotFound("No such task.", what="task") from None


async def fetch(request: Request) -> Response:
    relay = relay_of(request)
    key = await relay.auth(request, native=True)
    row = await relay.tasks.get(key, _path_task_id(request))
    return JSONResponse(render.task(row, relay.images, base_url(request), relay.clock.now()))


async def image_seed(request: Request) -> Response:
    relay = relay_of(request)
    key = await relay.auth(request, native=True)
    seed = await relay.tasks.seed(key, _path_task_id(request))
    return JSONResponse(render.envelope(render.SUBMITTED, "success", seed))


async def list_by_condition(request: Request) -> Response:
    relay, key, body = await _caller(request, schemas.ListBody)
    if body.ids is None:
        rows = await relay.tasks.recent(key, RECENT_TASKS)
    else:
        rows = await relay.tasks.find(key, body.ids)
    root, now = base_url(request), relay.clock.now()

    def answer() -> JSONResponse:
        return JSONResponse([render.task(row, relay.images, root, now) for row in rows])

    # A list of thousands of the caller's tasks is rendered off the event loop; a poll's few tasks, at once.
    return answer() if len(rows) <= RENDERED_AT_ONCE else await asyncio.to_thread(answer)


Endpoint = Callable[[Request], Awaitable[Response]]
_ROUTES: list[tuple[str, Endpoint, str]] = [
    ("/submit/imagine", imagine, "POST"),
    ("/submit/blend", blend, "POST"),
    ("/submit/describe", describe, "POST"),
    ("/submit/shorten", shorten, "POST"),
    ("/submit/action", action, "POST"),
    ("/submit/change", change, "POST"),
    ("/submit/simple-change", simple_change, "POST"),
    ("/submit/modal", modal, "POST"),
    ("/submit/upload-discord-images", upload, "POST"),
    ("/insight-face/swap", swap_face, "POST"),
    ("/task/{task_id}/fetch", fetch, "GET"),
    ("/task/{task_id}/image-seed", image_seed, "GET"),
    ("/task/list-by-condition", list_by_condition, "POST"),
]


def routes() -> list[Route]:
    return [
        Route(prefix + path, endpoint, methods=[method]) for prefix in PREFIXES for path, endpoint, method in _ROUTES
    ]
