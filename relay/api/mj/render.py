"""A job in the Midjourney-proxy task shape, and the submit envelope, from the relay's own store.

Only relay ids and relay links appear: `id` and `parentId` are relay task ids, `imageUrl` is a signed link to the
relay's copy (`grid.png` for a grid, `image.png` for one image), never the upstream's URL or task id. `buttons`
carry the upstream's `customId`s, which name Discord components, not upstream tasks; they are what `submit/action`
takes back.

    status      NOT_START (held, not yet submitted), SUBMITTED, MODAL, IN_PROGRESS, SUCCESS, FAILURE
    progress    "0%" .. "100%"; "" for a failure, as midjourney-proxy sends it
    prompt      the prompt sent upstream (a describe: its four prompts), promptEn and properties.finalPrompt the
                prompt as Midjourney ran it, or the text result of a describe or a shorten
    times       submitTime, startTime, finishTime in unix milliseconds (null until they happen)
"""

from __future__ import annotations

import re
from typing import Any

from relay.core.failures import code_of, job_failed
from relay.domain import FailureCode, JobState, ResultShape
from relay.images import GRID, IMAGE, ImageStore
from relay.store.jobs import JobRow

STATUS = {
    JobState.PENDING: "NOT_START",
    JobState.SUBMITTED: "SUBMITTED",
    JobState.IN_PROGRESS: "IN_PROGRESS",
    JobState.MODAL: "MODAL",
    JobState.SUCCEEDED: "SUCCESS",
    JobState.FAILED: "FAILURE",
}
# Failures whose reason is told as it is: Midjourney's own word about the task, or the relay's about a deadline.
# The others are told in the relay's general words, so nothing about a provider (its account, its
# balance) reaches a client.
_TOLD_AS_IS = (FailureCode.FAILED, FailureCode.BANNED, FailureCode.REJECTED, FailureCode.TIMEOUT)

SUBMITTED = 1
MODAL = 21
QUEUED = 22


_LINK = re.compile(r"<?https?://[^\s<>]+>?")


def _own_links_only(text: str, prompt: str) -> str:
    """`text` without the links the client did not write: an upstream puts the Discord links of the reference
    images it uploaded in front of the prompt it ran."""
    own = {link.strip("<>") for link in _LINK.findall(prompt)}
    kept = _LINK.sub(lambda found: found.group(0) if found.group(0).strip("<>") in own else "", text)
    return re.sub(r" {2,}", " ", kept).strip() if kept != text else text


def _ms(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds is not None else None


def fail_reason(row: JobRow) -> str | None:
    if row.state is not JobState.FAILED:
        return None
    code = code_of(row)
    if code in _TOLD_AS_IS and row.fail_reason:
        return row.fail_reason
    return job_failed(row).message


def task(row: JobRow, images: ImageStore, base_url: str, now: float) -> dict[str, Any]:
    spec = row.spec
    succeeded = row.state is JobState.SUCCEEDED
    image_url = None
    if succeeded and spec.shape is not ResultShape.TEXT:
        image_url = images.url(base_url, row.id, GRID if spec.shape is ResultShape.GRID else IMAGE, now)
    final = _own_links_only(row.result_text, row.prompt) if row.result_text else row.prompt
    prompt = row.prompt or (row.result_text or "" if spec.shape is ResultShape.TEXT else "")
    return {
        "id": row.id,
        "action": spec.action,
        "status": STATUS[row.state],
        "progress": "" if row.state is JobState.FAILED else f"{100 if succeeded else row.progress}%",
        "prompt": prompt,
        "promptEn": final,
        "description": f"/{row.kind.value} {row.prompt}".rstrip() if row.prompt else f"/{row.kind.value}",
        "state": row.client_state,
        "submitTime": _ms(row.submitted_at or row.created_at),
        "startTime": _ms(row.started_at),
        "finishTime": _ms(row.finished_at),
        "imageUrl": image_url,
        "failReason": fail_reason(row),
        "properties": {"finalPrompt": final},
        "buttons": row.buttons if succeeded else [],
        "botType": row.bot,
        "mode": row.mode.upper(),
        "parentId": row.parent_id,
    }


def envelope(code: int, description: str, result: Any, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "description": description, "properties": properties or {}, "result": result}
