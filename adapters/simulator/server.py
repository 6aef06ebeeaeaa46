"""The simulator as a standalone HTTP server speaking one upstream dialect, so the real HTTP adapters can be
exercised over loopback (`mj-relay simulate --port P --dialect D`).

    midjourney-proxy  `mj-api-secret` header (401 with an empty body when wrong); `/mj/...` and `/mj-{mode}/mj/...`;
                      mode from the path, then `accountFilter.modes`, then the prompt flag; unknown fetch = 200 empty
    new-api           Bearer; `/mj/...` and `/mj-{mode}/mj/...` with the prefix ignored (mode from the prompt flag);
                      codes 21/22 become 1; faults as HTTP 400 `upstream_error`; unknown fetch = 400 `task_no_found`
    mj-v1             Bearer; `/v1/mj/...`; mode from body `model`; `result` as an integer; list-by-condition takes at
                      most 100 ids; unknown fetch = 404
Images are served without credentials at `/cdn/<id>.png`, as a CDN would.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.base import MODES, Mode
from adapters.simulator.engine import SimEngine, SubmitReply, mode_from_prompt

Dialect = Literal["midjourney-proxy", "new-api", "mj-v1"]
DIALECTS: tuple[Dialect, ...] = ("midjourney-proxy", "new-api", "mj-v1")


def build_sim_app(engine: SimEngine, dialect: Dialect = "midjourney-proxy", secret: str = "") -> Starlette:
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

    def image_base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/cdn"

    async def body_of(request: Request) -> dict[str, Any] | None:
        try:
            data = json.loads(await request.body())
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def choose_mode(request: Request, body: dict[str, Any]) -> Mode:
        prompt = str(body.get("prompt") or "")
        path_mode = request.path_params.get("mode")
        if dialect == "midjourney-proxy":
            if path_mode in MODES:
                return path_mode  # type: ignore[no-any-return]
            modes = (body.get("accountFilter") or {}).get("modes") or []
            for m in modes:
                if str(m).lower() in MODES:
                    return str(m).lower()  # type: ignore[return-value]
        if dialect == "mj-v1":
            model = str(body.get("model") or "")
            if model.removeprefix("mj-") in MODES:
                return model.removeprefix("mj-")  # type: ignore[return-value]
        return mode_from_prompt(prompt) or "fast"

    def render(reply: SubmitReply) -> Response:
        body = dict(reply.body)
        if dialect == "new-api":
            if reply.http_status >= 500:
                return JSONResponse(
                    {"description": "do_request_failed ", "type": "upstream_error", "code": 5}, status_code=400
                )
            if body.get("code") in (21, 22):
                body["code"] = 1
        if dialect == "mj-v1" and isinstance(body.get("result"), str) and body["result"].isdigit():
            body["result"] = int(body["result"])
        return JSONResponse(body, status_code=reply.http_status)

    async def imagine(request: Request) -> Response:
        if not authorised(request):
            return refused()
        body = await body_of(request)
        if body is None:
            return JSONResponse({"code": 4, "description": "invalid JSON", "result": None}, status_code=400)
        return render(engine.submit_imagine(body, choose_mode(request, body)))

    async def fetch(request: Request) -> Response:
        if not authorised(request):
            return refused()
        task = engine.task(request.path_params["task_id"], image_base(request))
        if task is not None:
            return JSONResponse(task)
        if dialect == "new-api":
            return JSONResponse({"description": "task_no_found ", "type": "upstream_error", "code": 4}, 400)
        if dialect == "mj-v1":
            return JSONResponse({"code": 3, "description": "task not found", "result": None}, status_code=404)
        return Response(status_code=200)

    async def list_by_condition(request: Request) -> Response:
        if not authorised(request):
            return refused()
        body = await body_of(request)
        ids = (body or {}).get("ids")
        if not isinstance(ids, list):
            return JSONResponse({"code": 4, "description": "ids must be a list", "result": None}, status_code=400)
        if dialect == "mj-v1" and len(ids) > 100:
            return JSONResponse({"code": 4, "description": "at most 100 ids", "result": None}, status_code=400)
        return JSONResponse(engine.tasks([str(i) for i in ids], image_base(request)))

    async def image(request: Request) -> Response:
        data = await run_in_threadpool(engine.image, request.path_params["task_id"])
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    prefix = "/v1/mj" if dialect == "mj-v1" else "/mj"
    routes = [
        Route(f"{prefix}/submit/imagine", imagine, methods=["POST"]),
        Route(f"{prefix}/task/{{task_id}}/fetch", fetch, methods=["GET"]),
        Route(f"{prefix}/task/list-by-condition", list_by_condition, methods=["POST"]),
        Route("/cdn/{task_id}.png", image, methods=["GET"]),
    ]
    if dialect != "mj-v1":
        routes += [
            Route("/mj-{mode}/mj/submit/imagine", imagine, methods=["POST"]),
            Route("/mj-{mode}/mj/task/{task_id}/fetch", fetch, methods=["GET"]),
            Route("/mj-{mode}/mj/task/list-by-condition", list_by_condition, methods=["POST"]),
        ]
    return Starlette(routes=routes)
