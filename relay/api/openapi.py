"""`GET /openapi.json`: every route the relay serves, OpenAI-style and native, built from the same request models
the routes validate with, so the document cannot drift from what is accepted."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse

from relay.api import hooks
from relay.api.admin import inputs as admin_inputs
from relay.api.common import relay_of
from relay.api.mj import schemas as mj
from relay.api.mj.routes import PREFIXES
from relay.api.openai.chat import ChatRequest
from relay.api.openai.images import ImageGenerationRequest
from relay.images import NAMES

_REF = "#/components/schemas/{model}"
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
# The native surface also takes the key as midjourney-proxy clients send it: `mj-api-secret`, or a bare
# `Authorization: KEY` (`api.common.credential`).
_NATIVE_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"mjApiSecret": []}, {"bareAuthorization": []}]

_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_MJ_ENVELOPE = {
    "type": "object",
    "required": ["code", "description", "result"],
    "properties": {
        "code": {
            "type": "integer",
            "description": "1 submitted, 21 waits for submit/modal, 22 queued; errors: 3 not "
            "found, 4 invalid, 9 failure, 23 no capacity now, 24 banned prompt, 25 quota short",
        },
        "description": {"type": "string"},
        "properties": {"type": "object"},
        "result": {"description": "a task id, a list of links, a seed, or null on an error"},
    },
}
_MJ_TASK_FIELDS: tuple[tuple[str, str | list[str]], ...] = (
    ("id", "string"),
    ("action", "string"),
    ("status", "string"),
    ("progress", "string"),
    ("prompt", "string"),
    ("promptEn", "string"),
    ("description", "string"),
    ("state", ["string", "null"]),
    ("submitTime", ["integer", "null"]),
    ("startTime", ["integer", "null"]),
    ("finishTime", ["integer", "null"]),
    ("imageUrl", ["string", "null"]),
    ("failReason", ["string", "null"]),
    ("properties", "object"),
    ("buttons", "array"),
    ("botType", ["string", "null"]),
    ("mode", "string"),
    ("parentId", ["string", "null"]),
)
_MJ_STATUS = ["NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "SUCCESS", "FAILURE"]
# A task as `relay.api.mj.render.task` answers it: every field, always.
_MJ_TASK = {
    "type": "object",
    "required": [name for name, _ in _MJ_TASK_FIELDS],
    "properties": {
        name: {"type": kind, **({"enum": _MJ_STATUS} if name == "status" else {})} for name, kind in _MJ_TASK_FIELDS
    },
}

# Native routes: path, method, summary, body model (None for a GET).
_NATIVE: list[tuple[str, str, str, type[BaseModel] | None]] = [
    ("/submit/imagine", "post", "Imagine: a prompt, with optional reference images", mj.ImagineBody),
    ("/submit/blend", "post", "Blend 2 to 5 images", mj.BlendBody),
    ("/submit/describe", "post", "Describe an image: four prompts", mj.DescribeBody),
    ("/submit/shorten", "post", "Shorten a prompt", mj.ShortenBody),
    ("/submit/action", "post", "Press a button of a finished task (upscale, vary, zoom, pan, ...)", mj.ActionBody),
    ("/submit/change", "post", "Upscale, vary or re-roll a grid by action and index (U1-U4, V1-V4)", mj.ChangeBody),
    ("/submit/simple-change", "post", 'The same as "<task id> U2", "<task id> V1", "<task id> R"', mj.SimpleChangeBody),
    ("/submit/modal", "post", "Confirm a task waiting in MODAL (prompt, mask)", mj.ModalBody),
    ("/submit/upload-discord-images", "post", "Upload images; answers their links", mj.UploadBody),
    ("/insight-face/swap", "post", "Swap a face onto an image", mj.SwapFaceBody),
    ("/task/{task_id}/fetch", "get", "One of the caller's tasks", None),
    ("/task/{task_id}/image-seed", "get", "The seed of one of the caller's finished tasks", None),
    ("/task/list-by-condition", "post", "The caller's tasks among `ids` (its latest 100 without `ids`)", mj.ListBody),
]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _operation(
    summary: str,
    security: list[dict[str, list[str]]] | None,
    body: str | None,
    ok: dict[str, Any] | None,
    error: str,
    params: list[dict[str, Any]] | None = None,
    status: str = "200",
    media_type: str = "application/json",
) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": "OK"}
    if ok is not None:
        answer["content"] = {media_type: {"schema": ok}}
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {status: answer, "default": {"description": "An error", "content": _json(_ref(error))}},
    }
    if security is not None:
        operation["security"] = security
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if params:
        operation["parameters"] = params
    return operation


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


# The images and chat routes recognise a client's retry by this header (`api.common.attempt_of`).
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The same key sent again is answered with the first request's jobs (with another body: a 422)",
    "schema": {"type": "string"},
}


def _query_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": {"type": "string"}}


def _admin_paths() -> dict[str, Any]:
    """The admin API (`relay.api.admin`), behind the admin token; every path is a 404 when none is configured."""
    key = [_path_param("key_id")]
    since = _query_param("since", "from this time (unix seconds or ISO 8601)")
    until = _query_param("until", "before this time (unix seconds or ISO 8601)")
    of_key = _query_param("key", "one key's id")
    any_json: dict[str, Any] = {"type": "object"}

    def op(summary: str, body: str | None = None, params: list[dict[str, Any]] | None = None, **kw: Any) -> Any:
        return _operation(summary, _ADMIN, body, kw.pop("ok", any_json), "OpenAIError", params, **kw)

    return {
        "/admin/api/keys": {
            "get": op("Every key"),
            "post": op("Create a key (its secret is shown this once)", "KeyCreate", status="201"),
        },
        "/admin/api/keys/{key_id}": {
            "get": op("One key", params=key),
            "patch": op("Change a key's name or policies (null clears a policy)", "KeyUpdate", key),
        },
        "/admin/api/keys/{key_id}/topup": {"post": op("Add credits to a key", "TopUp", key)},
        "/admin/api/keys/{key_id}/revoke": {"post": op("Revoke a key", params=key)},
        "/admin/api/usage": {
            "get": op(
                "Credits captured and released, by key, model, action and UTC day",
                params=[since, until, of_key, _query_param("group_by", "comma-separated: key, model, action, day")],
            )
        },
        "/admin/api/jobs": {
            "get": op(
                "Jobs, newest first, with signed links to their images",
                params=[
                    of_key,
                    _query_param("state", "comma-separated job states"),
                    since,
                    until,
                    _query_param("limit", f"1 to {admin_inputs.MAX_PAGE} (default {admin_inputs.DEFAULT_PAGE})"),
                    _query_param("cursor", "the `next_cursor` of the page before"),
                ],
            )
        },
        "/admin/api/providers": {"get": op("Each provider, its jobs in flight and its health")},
        "/admin/api/ledger.csv": {
            "get": op("The ledger as CSV", params=[of_key, since], ok={"type": "string"}, media_type="text/csv")
        },
        "/admin": {"get": _operation("Redirects to the admin UI", None, None, None, "OpenAIError", status="308")},
        "/admin/": {
            "get": _operation("The admin UI", None, None, {"type": "string"}, "OpenAIError", media_type="text/html")
        },
        "/admin/static/{name}": {
            "get": _operation(
                "The admin UI's script and stylesheet",
                None,
                None,
                {"type": "string"},
                "OpenAIError",
                [_path_param("name")],
                media_type="*/*",
            )
        },
    }


def _date_param(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "string", "format": "date"}
    return {"name": name, "in": "query", "required": True, "description": description, "schema": schema}


def build_spec(version: str, max_n: int) -> dict[str, Any]:
    bodies: list[type[BaseModel]] = [
        ImageGenerationRequest,
        ChatRequest,
        *(m for *_, m in _NATIVE if m is not None),
        admin_inputs.KeyCreate,
        admin_inputs.KeyUpdate,
        admin_inputs.TopUp,
    ]
    _, top = models_json_schema([(model, "validation") for model in bodies], ref_template=_REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    # `n`'s upper bound is the relay's setting (`api.max_n`), checked where the job is planned, not by the model.
    n_schema = schemas["ImageGenerationRequest"]["properties"]["n"]["anyOf"][0]
    n_schema["maximum"] = max_n
    schemas.update({"OpenAIError": _OPENAI_ERROR, "MjEnvelope": _MJ_ENVELOPE, "MjTask": _MJ_TASK})
    any_json: dict[str, Any] = {"type": "object"}
    chat = _operation(
        "A chat completion whose answer is the images (or, with `stream`, its chunks as server-sent events)",
        _BEARER,
        "ChatRequest",
        any_json,
        "OpenAIError",
        [_IDEMPOTENCY_KEY],
    )
    chat["responses"]["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    readyz = _operation("Readiness", None, None, any_json, "OpenAIError")
    readyz["responses"]["503"] = {"description": "Not ready: the checks that failed", "content": _json(any_json)}
    paths: dict[str, Any] = {
        "/v1/images/generations": {
            "post": _operation(
                "Generate images (Midjourney grids, split into tiles)",
                _BEARER,
                "ImageGenerationRequest",
                any_json,
                "OpenAIError",
                [_IDEMPOTENCY_KEY],
            )
        },
        "/v1/chat/completions": {"post": chat},
        "/v1/models": {"get": _operation("The image models", _BEARER, None, any_json, "OpenAIError")},
        "/v1/models/{model}": {
            "get": _operation("One image model", _BEARER, None, any_json, "OpenAIError", [_path_param("model")])
        },
        "/files/{job_id}/{name}": {
            "get": _operation(
                "A finished image behind a signed, expiring link (no key: the link is the credential)",
                None,
                None,
                {"type": "string", "format": "binary"},
                "OpenAIError",
                [
                    _path_param("job_id"),
                    {**_path_param("name"), "schema": {"type": "string", "enum": list(NAMES)}},
                    {"name": "exp", "in": "query", "required": True, "schema": {"type": "string"}},
                    {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
                ],
            )
        },
        "/healthz": {"get": _operation("Liveness", None, None, any_json, "OpenAIError")},
        "/readyz": {"get": readyz},
        "/metrics": {"get": _operation("Prometheus metrics", None, None, {"type": "string"}, "OpenAIError")},
        "/openapi.json": {"get": _operation("This document", None, None, any_json, "OpenAIError")},
        hooks.PATH: {
            "post": _operation(
                "A provider's notifyHook call about one of its tasks (the token in the path is the credential)",
                None,
                None,
                None,
                "OpenAIError",
                [_path_param("provider"), _path_param("token")],
                status="204",
            )
        },
        **_admin_paths(),
    }
    for prefix in ("", "/v1"):
        paths[f"{prefix}/dashboard/billing/subscription"] = {
            "get": _operation(
                "The calling key's quota in dollars (chat front ends)", _BEARER, None, any_json, "OpenAIError"
            )
        }
        paths[f"{prefix}/dashboard/billing/usage"] = {
            "get": _operation(
                "What the calling key spent in a range of UTC days, in cents (chat front ends)",
                _BEARER,
                None,
                any_json,
                "OpenAIError",
                [_date_param("start_date", "first day, included"), _date_param("end_date", "last day, excluded")],
            )
        }
    for prefix in PREFIXES:
        for path, method, summary, model in _NATIVE:
            ok = (
                _ref("MjTask")
                if path.endswith("/fetch")
                else (
                    {"type": "array", "items": _ref("MjTask")}
                    if path.endswith("list-by-condition")
                    else _ref("MjEnvelope")
                )
            )
            params = [_path_param("task_id")] if "{task_id}" in path else None
            body = model.__name__ if model is not None else None
            paths[prefix + path] = {method: _operation(summary, _NATIVE_AUTH, body, ok, "MjEnvelope", params)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mj-relay",
            "version": version,
            "description": "OpenAI-compatible and native Midjourney-proxy API in front of Midjourney providers.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "`server.admin_token`"},
                "mjApiSecret": {"type": "apiKey", "in": "header", "name": "mj-api-secret"},
                "bareAuthorization": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "The key alone, without `Bearer` (native routes only)",
                },
            },
        },
    }


async def openapi(request: Request) -> JSONResponse:
    relay = relay_of(request)
    if relay.openapi is None:
        relay.openapi = build_spec(relay.version, relay.config.api.max_n)
    return JSONResponse(relay.openapi)
