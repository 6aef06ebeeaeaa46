"""The nouns every layer shares: job states, failure codes, result shapes, and the one table of task kinds.

A job is one upstream Midjourney task. What differs between kinds of task is one row of `TASKS`:

    kind          action      result  direct call   what it is
    imagine       IMAGINE     grid    imagine       a prompt (also PicReader / PromptAnalyzer buttons)
    upscale       UPSCALE     image   -             U1-U4 and the upscale buttons of an upscaled image
    variation     VARIATION   grid    -             V1-V4, Vary (Subtle), Vary (Strong)
    reroll        REROLL      grid    -             the re-roll button
    zoom          ZOOM        grid    -             Zoom Out 2x / 1.5x, Custom Zoom (waits in MODAL)
    pan           PAN         grid    -             the four pan buttons
    vary_region   INPAINT     grid    -             Vary (Region) (waits in MODAL for a mask)
    blend         BLEND       grid    blend         2-5 images
    describe      DESCRIBE    text    describe      an image -> four prompts
    shorten       SHORTEN     text    shorten       a prompt -> shorter prompts
    swap_face     SWAP_FACE   image   swap_face     InsightFace: a face onto an image

A kind with a direct call is submitted on its own, to any provider that serves its mode. A job made from a button
(`custom_id`) is a follow-up: it goes through `submit/action` to the provider that ran its parent, and the upstream
may park it in MODAL until `submit/modal` confirms it. The price key is the kind's name. A new kind (trueai's
`submit/video` or `submit/edits`) is a new row here, a new SubmitKind in `adapters`, and, for a new result shape,
a way to keep its files.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from adapters import BOTS, MODES, Bot, Mode, SubmitKind

__all__ = [
    "BOTS",
    "MODES",
    "TASKS",
    "Bot",
    "FailureCode",
    "MAX_CREDITS",
    "JobState",
    "Mode",
    "ResultShape",
    "TaskKind",
    "TaskSpec",
]

# The most credits any one amount may be: a price, a quota, a top-up or an adjustment, a balance kept.
MAX_CREDITS = 10**12


class JobState(StrEnum):
    """PENDING -> SUBMITTED -> IN_PROGRESS -> SUCCEEDED | FAILED; MODAL parks a follow-up until it is confirmed."""

    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    IN_PROGRESS = "IN_PROGRESS"
    MODAL = "MODAL"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


ACTIVE_STATES = (JobState.PENDING, JobState.SUBMITTED, JobState.IN_PROGRESS, JobState.MODAL)
RUNNING_STATES = (JobState.SUBMITTED, JobState.IN_PROGRESS, JobState.MODAL)


class FailureCode(StrEnum):
    """Why a job did not succeed. Core ends jobs with one of these; each surface renders it in its own terms."""

    FAILED = "failed"  # the upstream ran the job and reported a failure
    BANNED = "banned"  # Midjourney's moderation refused the prompt
    REJECTED = "rejected"  # the upstream refused the request itself (a bad parameter, an unknown button)
    UNAVAILABLE = "unavailable"  # no provider could take the job
    UNCONFIRMED = "unconfirmed"  # the submit may have reached the upstream without an answer: not sent elsewhere
    MODAL = "modal"  # the upstream asked for a confirmation that this request cannot give
    TIMEOUT = "timeout"  # the job passed its deadline (a MODAL job: nobody confirmed it in time)
    LOST = "lost"  # the upstream no longer knows the job
    DOWNLOAD = "download"  # the finished image could not be fetched or kept
    INTERRUPTED = "interrupted"  # the relay stopped before the job was submitted
    INTERNAL = "internal"  # the relay failed to finish the job


class ResultShape(StrEnum):
    GRID = "grid"  # a 2x2 grid (`grid.png`), split into tiles on demand
    IMAGE = "image"  # one image (`image.png`)
    TEXT = "text"  # text only (describe's prompts, shorten's analysis)


class TaskKind(StrEnum):
    IMAGINE = "imagine"
    UPSCALE = "upscale"
    VARIATION = "variation"
    REROLL = "reroll"
    ZOOM = "zoom"
    PAN = "pan"
    VARY_REGION = "vary_region"
    BLEND = "blend"
    DESCRIBE = "describe"
    SHORTEN = "shorten"
    SWAP_FACE = "swap_face"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    kind: TaskKind
    action: str  # the task's `action` in the Midjourney-proxy task shape
    shape: ResultShape
    direct: SubmitKind | None  # the upstream call that makes it on its own; None: only from a parent's button

    @property
    def price_key(self) -> str:
        return self.kind.value

    @property
    def follow_up(self) -> bool:
        """Made only from a parent's button: the kind of task an upstream may park in MODAL for `submit/modal`."""
        return self.direct is None


TASKS: dict[TaskKind, TaskSpec] = {
    spec.kind: spec
    for spec in (
        TaskSpec(TaskKind.IMAGINE, "IMAGINE", ResultShape.GRID, "imagine"),
        TaskSpec(TaskKind.UPSCALE, "UPSCALE", ResultShape.IMAGE, None),
        TaskSpec(TaskKind.VARIATION, "VARIATION", ResultShape.GRID, None),
        TaskSpec(TaskKind.REROLL, "REROLL", ResultShape.GRID, None),
        TaskSpec(TaskKind.ZOOM, "ZOOM", ResultShape.GRID, None),
        TaskSpec(TaskKind.PAN, "PAN", ResultShape.GRID, None),
        TaskSpec(TaskKind.VARY_REGION, "INPAINT", ResultShape.GRID, None),
        TaskSpec(TaskKind.BLEND, "BLEND", ResultShape.GRID, "blend"),
        TaskSpec(TaskKind.DESCRIBE, "DESCRIBE", ResultShape.TEXT, "describe"),
        TaskSpec(TaskKind.SHORTEN, "SHORTEN", ResultShape.TEXT, "shorten"),
        TaskSpec(TaskKind.SWAP_FACE, "SWAP_FACE", ResultShape.IMAGE, "swap_face"),
    )
}
