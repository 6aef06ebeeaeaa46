"""The simulator as a standalone HTTP server speaking one upstream dialect, so the real HTTP adapters can be
exercised over loopback (`mj-relay simulate --port P --dialect D`).

Every dialect serves `submit/{imagine,blend,describe,shorten,action,modal,upload-discord-images}`,
`insight-face/swap`, `task/{id}/fetch`, `task/{id}/image-seed` and `task/list-by-condition`, with its quirks:

    midjourney-proxy  (trueai-like) `mj-api-secret` header (401 with an empty body when wrong); `GET task/list`, its
                      newest 100 tasks (`list_at_most`; None: every one, as novicezk); `/mj/...` and
                      `/mj-{mode}/mj/...`; mode from the path, then `accountFilter.modes`, then the prompt flag;
                      unknown fetch = 200 empty; action, modal or image-seed on an unknown task = HTTP 404 code 3;
                      a fault = HTTP 500 `{"success": false, "code": -1, "message"}`
    new-api           Bearer; `/mj/...` and `/mj-{mode}/mj/...` with the prefix ignored (mode from the prompt flag);
                      codes 22 and 21 become 1, except a 21 for INPAINT or CUSTOM_ZOOM (so a remix variation looks
                      accepted, then sits in MODAL); its own faults as HTTP 400 `upstream_error`; an unknown task on
                      action, modal or image-seed = 400 `task_not_found`; unknown fetch = 400 `task_no_found`; a
                      button it cannot map (describe's and shorten's) = 400 `new_api_error` `unknown_action:<id>`
    mj-v1             Bearer; `/v1/mj/...` only; mode from body `model`; a numeric `result` as an integer (ids,
                      seeds); an action or modal on an unknown task = 200 code 3; unknown fetch or image-seed = 404;
                      list-by-condition takes at most 100 ids
A follow-up without a mode of its own runs in its parent's. Images are served without credentials at `/cdn/<file>`,
as a CDN would.

With `hooks` given, a submit's `notifyHook` is called on each change of its task (`adapters.simulator.hooks`),
except on new-api, which drops a client's `notifyHook` (its operators seldom enable it). `GET /sim/stats` counts
the submits, status reads, hook calls (and the changes and endings they were made for) and image downloads made
(and how many images were downloaded more than once; with `?since=<epoch seconds>`, also how many of those were
first downloaded at or after that time, and how long the hook calls due since then waited for a lane and for their
answers), for benchmarks and tests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.base import MODES, Mode, SubmitKind
from adapters.nesting import nests_deeper
from adapters.replies import MAX_NESTING
from adapters.simulator.answers import SubmitReply
from adapters.simulator.engine import SimEngine, steering
from adapters.simulator.hooks import HookSender, HookSettings
from adapters.simulator.hooks import summary as hook_summary
from adapters.simulator.pictures import media_type
from adapters.wire import ENDPOINTS

Dialect = Literal["midjourney-proxy", "new-api", "mj-v1"]
DIALECTS: tuple[Dialect, ...] = ("midjourney-proxy", "new-api", "mj-v1")
Handler = Callable[[Request], Awaitable[Response]]
# How late the answer to a submit whose prompt says `sim:late-answer` comes (the task is taken at once).
LATE_ANSWER_S = 3.0
# new-api passes a code 21 through only for the actions that always need a modal.
_NEWAPI_MODAL_ACTIONS = ("INPAINT", "CUSTOM_ZOOM")


def _new_api_error(description: str, code: int) -> Response:
    return JSONResponse({"description": description, "type": "upstream_error", "code": code}, status_code=400)


def _new_api_maps(custom_id: str) -> bool:
    """Whether new-api turns a button into one of its own actions (`CoverPlusActionToNormalAction`): the word after
    `MJ::JOB::`, or after `MJ::`, names upsample, variation, pan or reroll, or is Outpaint, CustomZoom or Inpaint.
    Describe's and shorten's buttons (`MJ::Job::...`, `MJ::Picread::Retry`) are not among them."""
    parts = custom_id.split("::")
    if len(parts) < 2:
        return False
    action = parts[2] if parts[1] == "JOB" and len(parts) > 2 else parts[1]
    words = ("upsample", "variation", "pan", "reroll")
    return any(word in action for word in words) or action in ("Outpaint", "CustomZoom", "Inpaint")


def _as_mode(value: object) -> Mode | None:
    text = str(value or "").lower()
    return text if text in MODES else None


def build_sim_app(
    engine: SimEngine,
    dialect: Dialect = "midjourney-proxy",
    secret: str = "",
    hooks: HookSettings | None = None,
    *,
    late_answer_s: float = LATE_ANSWER_S,
    list_at_most: int | None = 100,
) -> Starlette:
    sender = HookSender(engine, hooks, "") if hooks is not None and dialect != "new-api" else None

    def authorised(request: Request) -> bool:
        if not secret:
            return True
        if dialect == "midjourney-proxy":
            given = request.headers.get("mj-api-secret", "")
        else:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), secret.encode())

    def refused() -> Response:
        if dialect == "midjourney-proxy":
            return Response(status_code=401)
        return JSONResponse({"error": {"message": "invalid token", "type": "new_api_error"}}, status_code=401)

    def guarded(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            return await handler(request) if authorised(request) else refused()

        return run

    def image_base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/cdn"

    async def body_of(request: Request) -> dict[str, Any] | None:
        raw = await request.body()
        if nests_deeper(raw, MAX_NESTING):  # read as the relay reads it: never by a parser at its recursion limit
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def choose_mode(request: Request, body: dict[str, Any]) -> Mode | None:
        """The mode the dialect's own mechanism names; None leaves it to the prompt flag (or the parent's)."""
        if dialect == "midjourney-proxy":
            account_filter = body.get("accountFilter")
            modes = account_filter.get("modes") if isinstance(account_filter, dict) else None
            named = [request.path_params.get("mode"), *(modes if isinstance(modes, list) else [])]
            return next((mode for mode in map(_as_mode, named) if mode), None)
        if dialect == "mj-v1":
            return _as_mode(str(body.get("model") or "").removeprefix("mj-"))
        return None

    def render(reply: SubmitReply, *, seed: bool = False) -> Response:
        if reply.raw is not None:
            return Response(reply.raw, status_code=reply.http_status, media_type="text/html")
        body = dict(reply.body)
        if dialect == "new-api":
            if reply.unknown_task:
                return _new_api_error("task_not_found", 4)
            if reply.http_status >= 500:
                return _new_api_error("do_request_failed ", 5)
            if body.get("code") == 22 or (body.get("code") == 21 and reply.action not in _NEWAPI_MODAL_ACTIONS):
                body["code"] = 1
        if dialect == "mj-v1":
            if reply.unknown_task and not seed:
                return JSONResponse(
                    {"code": 3, "description": "关联任务不存在或已失效", "properties": {}, "result": None}
                )
            if isinstance(body.get("result"), str) and body["result"].isdigit():
                body["result"] = int(body["result"])
        return JSONResponse(body, status_code=reply.http_status)

    def submitter(kind: SubmitKind) -> Handler:
        async def submit(request: Request) -> Response:
            body = await body_of(request)
            if body is None:
                return JSONResponse({"code": 4, "description": "invalid JSON", "result": None}, status_code=400)
            if dialect == "new-api" and kind == "action" and not _new_api_maps(str(body.get("customId") or "")):
                # refused in its middleware, before any channel is chosen: the upstream never hears of it
                message = f"Invalid request, unknown_action:{body.get('customId')} (request id: sim)"
                return JSONResponse({"error": {"message": message, "type": "new_api_error"}}, status_code=400)
            if sender is None:
                body.pop("notifyHook", None)
            else:
                sender.image_base = image_base(request)
            mode = None if kind == "modal" else choose_mode(request, body)
            answer = engine.submit(kind, body, mode)
            if "sim:late-answer" in steering(str(body.get("prompt") or "")):
                await asyncio.sleep(late_answer_s)  # the task is taken; its caller hears of it only now
            return render(answer)

        return submit

    async def upload(request: Request) -> Response:
        body = await body_of(request)
        if body is None:
            return JSONResponse({"code": 4, "description": "invalid JSON", "result": None}, status_code=400)
        return render(engine.upload(body, image_base(request)))

    async def image_seed(request: Request) -> Response:
        return render(engine.seed(request.path_params["task_id"]), seed=True)

    async def fetch(request: Request) -> Response:
        engine.reads += 1
        task = engine.task(request.path_params["task_id"], image_base(request))
        if task is not None:
            return JSONResponse(task)
        if dialect == "new-api":
            return _new_api_error("task_no_found ", 4)
        if dialect == "mj-v1":
            return JSONResponse({"code": 3, "description": "task not found", "result": None}, status_code=404)
        return Response(status_code=200)

    async def list_by_condition(request: Request) -> Response:
        body = await body_of(request)
        ids = (body or {}).get("ids")
        if not isinstance(ids, list):
            return JSONResponse({"code": 4, "description": "ids must be a list", "result": None}, status_code=400)
        if dialect == "mj-v1" and len(ids) > 100:
            return JSONResponse({"code": 4, "description": "at most 100 ids", "result": None}, status_code=400)
        engine.reads += 1
        return JSONResponse(engine.tasks([str(i) for i in ids], image_base(request)))

    async def list_all(request: Request) -> Response:
        engine.reads += 1
        return JSONResponse(engine.listing(image_base(request), list_at_most))

    async def stats(request: Request) -> Response:
        sent = sender.sent if sender is not None else 0
        changes = (sender.changes, sender.endings) if sender is not None else (0, 0)
        downloads = engine.downloads
        twice = [key for key, count in downloads.items() if count > 1]
        stats: dict[str, Any] = {
            "submits": engine.submits,
            "reads": engine.reads,
            "hooks": sent,
            "hook_changes": changes[0],
            "hook_endings": changes[1],
            "downloads": sum(downloads.values()),
            "downloaded_twice": len(twice),
        }
        try:
            since = float(request.query_params["since"])
        except (KeyError, ValueError):
            return JSONResponse(stats)
        stats["downloaded_twice_since"] = sum(1 for key in twice if engine.first_downloaded[key] >= since)
        if sender is not None:
            stats["hook_calls_since"] = hook_summary(sender.timings, since)
        return JSONResponse(stats)

    async def image(request: Request) -> Response:
        key = str(request.path_params["file"]).rpartition(".")[0]
        # Drawn already (a grid variant, a kept upload): served at once, as a CDN would; drawing is done on a thread.
        data = engine.cached_image(key)
        if data is None:
            data = await run_in_threadpool(engine.image, key)
        if data is None:
            return Response(status_code=404)
        engine.downloads[key] += 1
        engine.first_downloaded.setdefault(key, engine.now())
        return Response(data, media_type=media_type(data))

    api: list[tuple[str, Handler, str]] = [(ENDPOINTS[kind], submitter(kind), "POST") for kind in ENDPOINTS]
    api += [
        ("submit/upload-discord-images", upload, "POST"),
        ("task/{task_id}/fetch", fetch, "GET"),
        ("task/{task_id}/image-seed", image_seed, "GET"),
        ("task/list-by-condition", list_by_condition, "POST"),
    ]
    if dialect == "midjourney-proxy":
        api.append(("task/list", list_all, "GET"))
    prefixes = ["/v1/mj"] if dialect == "mj-v1" else ["/mj", "/mj-{mode}/mj"]
    routes = [
        Route(f"{prefix}/{path}", guarded(handler), methods=[method])
        for prefix in prefixes
        for path, handler, method in api
    ]
    routes.append(Route("/cdn/{file}", image, methods=["GET"]))
    routes.append(Route("/sim/stats", stats, methods=["GET"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if sender is not None:
                await sender.aclose()

    return Starlette(routes=routes, lifespan=lifespan)
