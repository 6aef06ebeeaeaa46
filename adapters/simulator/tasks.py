"""One simulator task and what it looks like at a moment: its state is computed from the clock when it is read.

Its life: MODAL (waiting for `submit/modal`, never advancing on its own) until confirmed; then SUBMITTED "0%" while
queued (the first tenth of its duration; NOT_START for one taken with code 22), IN_PROGRESS with progress in jumps
(0, 15, 31, 46, 62, 78, 93), then SUCCESS "100%" with its result and buttons, or FAILURE with progress "" and a
`failReason`. The timeline starts at the submit, or for a task that waited in MODAL at its confirmation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.base import Mode
from adapters.simulator.buttons import Shape, describe_buttons, grid_buttons, shorten_buttons, upscale_buttons
from adapters.simulator.texts import numbered

PROGRESS_STEPS = (0, 15, 31, 46, 62, 78, 93)
QUEUED_SHARE = 0.1
FAIL_REASON = "[Invalid parameter] the simulator failed this job"


@dataclass(slots=True)
class SimTask:
    id: str
    action: str  # IMAGINE, UPSCALE, VARIATION, REROLL, ZOOM, PAN, INPAINT, BLEND, DESCRIBE, SHORTEN, SWAP_FACE
    shape: Shape
    prompt: str
    mode: Mode
    bot: str
    state: str | None
    submitted: float
    duration: float
    aspect: tuple[int, int]
    hash: str  # the Discord message hash of its buttons: random, never derived from the id
    variant: int = 0
    parent_id: str | None = None
    started: float | None = 0.0  # when its timeline starts; None while it waits in MODAL
    modal: str | None = None  # the upstream action that made it wait (INPAINT needs a mask)
    fail: bool = False
    lose: bool = False
    never: bool = False
    fail_followups: bool = False
    never_followups: bool = False
    waits: bool = False  # taken with code 22: NOT_START, not SUBMITTED, while queued
    texts: tuple[str, ...] = ()  # describe's four prompts, shorten's five
    source: str | None = None  # the file extension of the image a describe was given (kept in `Media`, by task id)
    notify_hook: str | None = None  # where its changes are POSTed (see adapters.simulator.hooks)

    def status(self, now: float) -> tuple[str, int]:
        if self.started is None:
            return "MODAL", 0
        elapsed = now - self.started
        queued = self.duration * QUEUED_SHARE
        if elapsed < queued:
            return ("NOT_START" if self.waits else "SUBMITTED"), 0
        if self.fail and elapsed >= self.duration / 2:
            return "FAILURE", 0
        if elapsed >= self.duration and not self.never:
            return "SUCCESS", 100
        share = min(0.999, (elapsed - queued) / max(1e-9, self.duration - queued))
        return "IN_PROGRESS", max(step for step in PROGRESS_STEPS if step <= share * 100)

    def changes(self, progress: bool = True) -> list[float]:
        """The moments its view changes, from the start of its timeline on: running, (each progress step,) the end.
        Empty while it waits in MODAL; a task that never ends has no end."""
        if self.started is None:
            return []
        queued = self.duration * QUEUED_SHARE
        span = max(1e-9, self.duration - queued)
        steps = PROGRESS_STEPS if progress else PROGRESS_STEPS[:1]
        # A hair after each moment, so the view read then shows the change.
        moments = [self.started + queued + span * step / 100 + 1e-3 for step in steps]
        if self.fail:
            end = self.started + self.duration / 2 + 1e-3
            return [m for m in moments if m < end] + [end]
        return moments if self.never else [*moments, self.started + self.duration + 1e-3]

    def open(self, now: float) -> bool:
        """Whether it takes a place in the upstream's queue (queued or running)."""
        return self.status(now)[0] in ("NOT_START", "SUBMITTED", "IN_PROGRESS")

    def lost(self, now: float) -> bool:
        return self.lose and self.started is not None and now - self.started >= self.duration * QUEUED_SHARE

    @property
    def has_seed(self) -> bool:
        """Whether Midjourney made its image (a grid or an upscale): only those have a seed."""
        return self.shape == "grid" or self.action == "UPSCALE"

    def image_file(self) -> str | None:
        """The file name of its result image under the image base; None for a result without one (shorten)."""
        if self.shape != "text":
            return f"{self.id}.png"
        return f"{self.id}.{self.source}" if self.source else None

    def buttons(self) -> list[dict[str, Any]]:
        if self.shape == "grid":
            return grid_buttons(self.hash)
        if self.action == "UPSCALE":
            return upscale_buttons(self.hash)
        if self.action == "DESCRIBE":
            return describe_buttons()
        if self.action == "SHORTEN":
            return shorten_buttons()
        return []

    def view(self, now: float, image_base: str) -> dict[str, Any]:
        """The task JSON (trueai's camelCase shape, string enums) at `now`."""
        status, progress = self.status(now)
        ms = int(self.submitted * 1000)
        start = int(self.started * 1000) if self.started is not None else ms
        done = status == "SUCCESS"
        text = numbered(self.texts) if done and self.texts else ""
        prompt = text if self.action == "DESCRIBE" else self.prompt
        final = text or (self.prompt if self.shape != "text" else "")
        properties: dict[str, Any] = {"discordInstanceId": "sim"}
        if final:
            properties["finalPrompt"] = final
        view: dict[str, Any] = {
            "id": self.id,
            "action": self.action,
            "status": status,
            "prompt": prompt,
            "promptEn": final,
            "description": f"/{self.action.lower()} {self.prompt}".strip(),
            "state": self.state,
            "mode": self.mode.upper(),
            "botType": self.bot,
            "parentId": self.parent_id,
            "submitTime": ms,
            "startTime": start + int(self.duration * QUEUED_SHARE * 1000)
            if status not in ("MODAL", "NOT_START", "SUBMITTED")
            else None,
            "finishTime": None,
            "imageUrl": None,
            "progress": f"{progress}%",
            "failReason": None,
            "properties": properties,
            "buttons": [],
        }
        if status == "FAILURE":
            view.update(progress="", failReason=FAIL_REASON, finishTime=start + int(self.duration * 500))
        elif done:
            file = self.image_file()
            properties["messageHash"] = self.hash
            view.update(
                imageUrl=f"{image_base.rstrip('/')}/{file}" if file else None,
                finishTime=start + int(self.duration * 1000),
                buttons=self.buttons(),
            )
        return view
