"""A `SubmitRequest` on the wire, in the midjourney-proxy shape every dialect shares. Pure, no I/O.

    kind        endpoint (under the API prefix)   body
    imagine     submit/imagine                    prompt, botType, base64Array
    blend       submit/blend                      botType, base64Array, dimensions (SQUARE when not given)
    describe    submit/describe                   botType, base64 (images[0])
    shorten     submit/shorten                    botType, prompt
    action      submit/action                     taskId, customId
    modal       submit/modal                      taskId, prompt, maskBase64 (only when given)
    swap_face   insight-face/swap                 sourceBase64 (images[0]), targetBase64 (images[1])

Every kind but modal adds `state` and `notifyHook` when given. How the mode travels (a path prefix, the
`accountFilter`, a body `model`) is the dialect's part and is added by its adapter; a modal carries no mode.
"""

from __future__ import annotations

from typing import Any

from adapters.base import SubmitKind, SubmitRequest

__all__ = ["ENDPOINTS", "FOLLOW_UPS", "missing_fields", "render_body"]

ENDPOINTS: dict[SubmitKind, str] = {
    "imagine": "submit/imagine",
    "blend": "submit/blend",
    "describe": "submit/describe",
    "shorten": "submit/shorten",
    "action": "submit/action",
    "modal": "submit/modal",
    "swap_face": "insight-face/swap",
}
# Calls that act on an existing task: there an unknown task is the client's mistake, not a missing account.
FOLLOW_UPS: frozenset[SubmitKind] = frozenset({"action", "modal"})


def missing_fields(request: SubmitRequest) -> str | None:
    """Why the request cannot be rendered at all (a field its kind needs is missing), or None."""
    if request.kind in FOLLOW_UPS and not request.task_id:
        return f"{request.kind} needs the id of the task it acts on"
    if request.kind == "action" and not request.custom_id:
        return "action needs the customId of a button"
    if request.kind == "describe" and not request.images:
        return "describe needs an image"
    if request.kind == "swap_face" and len(request.images) < 2:
        return "swap_face needs a source and a target image"
    return None


def render_body(request: SubmitRequest) -> dict[str, Any]:
    """The JSON body of one submit call, without the dialect's mode fields."""
    kind = request.kind
    body: dict[str, Any]
    if kind == "modal":
        body = {"taskId": request.task_id, "prompt": request.prompt}
        if request.mask is not None:
            body["maskBase64"] = request.mask
        return body
    if kind == "action":
        body = {"taskId": request.task_id, "customId": request.custom_id}
    elif kind == "imagine":
        body = {"prompt": request.prompt, "botType": request.bot, "base64Array": list(request.images)}
    elif kind == "blend":
        body = {
            "botType": request.bot,
            "base64Array": list(request.images),
            "dimensions": request.dimensions or "SQUARE",
        }
    elif kind == "describe":
        body = {"botType": request.bot, "base64": request.images[0] if request.images else None}
    elif kind == "shorten":
        body = {"botType": request.bot, "prompt": request.prompt}
    else:  # swap_face
        images = request.images
        body = {
            "sourceBase64": images[0] if images else None,
            "targetBase64": images[1] if len(images) > 1 else None,
        }
    if request.state is not None:
        body["state"] = request.state
    if request.notify_hook is not None:
        body["notifyHook"] = request.notify_hook
    return body
