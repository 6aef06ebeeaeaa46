"""What the simulator answers a submit-like call, before any dialect renders it: trueai's `SubmitResultVO` shape
(`{code, description, properties, result}`) with its HTTP status, plus what a dialect needs to answer its own way.

    code 1   accepted                     code 21  waits in MODAL ("Waiting for window confirm", remix)
    code 22  accepted, queued (`properties.numberOfQueues`)
    code 3   no account (HTTP 200); an unknown task (HTTP 404, `unknown_task`)
    code 4   invalid input                code 23  queue full          code 24  banned prompt
    code 9   the submit's images could not be uploaded (`sim:upload-failed`)
    HTTP 500 `{"success": false, "code": -1, "message"}`: a fault (the task not taken)
    HTTP 502 with an HTML page: a gateway that lost the answer (the task taken all the same: `sim:crash`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SubmitReply:
    """An HTTP status and a SubmitResultVO-shaped body, with what a dialect needs to render it its own way:
    `unknown_task` (the call named a task the upstream does not know) and `action` (new-api's name of the action a
    new task runs, e.g. INPAINT or CUSTOM_ZOOM)."""

    http_status: int
    body: dict[str, Any]
    unknown_task: bool = False
    action: str = ""
    raw: bytes | None = None  # sent instead of the JSON body (an answer that is not the server's own)


def reply(
    code: int, description: str, result: Any = None, status: int = 200, *, queues: int | None = None, **extra: Any
) -> SubmitReply:
    properties = {} if queues is None else {"numberOfQueues": queues}
    body = {"code": code, "description": description, "properties": properties, "result": result}
    return SubmitReply(status, body, **extra)


def invalid(description: str) -> SubmitReply:
    return reply(4, description)


def unknown_task() -> SubmitReply:
    return reply(3, "任务不存在", status=404, unknown_task=True)


def fault() -> SubmitReply:
    return SubmitReply(500, {"success": False, "code": -1, "message": "simulated upstream fault"})


def lost_answer() -> SubmitReply:
    return SubmitReply(502, {}, raw=b"<html><body><h1>502 Bad Gateway</h1></body></html>")


def needs_modal(task_id: str, prompt: str, action: str) -> SubmitReply:
    body = {
        "code": 21,
        "description": "Waiting for window confirm",
        "properties": {"finalPrompt": prompt, "remix": True},
        "result": task_id,
    }
    return SubmitReply(200, body, action=action)


def banned(prompt: str, word: str) -> SubmitReply:
    body = {
        "code": 24,
        "description": "可能包含敏感词",
        "properties": {"promptEn": prompt, "bannedWord": word},
        "result": None,
    }
    return SubmitReply(200, body)
