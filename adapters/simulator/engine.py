"""A fake Midjourney-proxy upstream that behaves like the real thing, driven by an injected clock.

A task's state is computed from the clock when it is read, so nothing runs in the background and tests move time by
hand. Its life: SUBMITTED "0%" while queued (the first tenth of its duration), IN_PROGRESS with progress in jumps
(0, 15, 31, 46, 62, 78, 93), then SUCCESS "100%" with an image URL and U/V/reroll buttons, or FAILURE with progress
"" and a `failReason`. Durations depend on the mode.

Words in a prompt steer one task, for tests and demos:
  sim:fail          the task fails halfway              sim:lose        the upstream forgets the task once queued
  sim:never         the task never finishes             sim:slow        the task takes five times as long
  sim:queue-full    submit answers code 23              sim:no-account  submit answers code 3
  sim:error         submit answers HTTP 500             a banned word   submit answers code 24 (BANNED_PROMPT)
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapters.base import Mode
from adapters.simulator.grid import aspect_of, render_grid

PROGRESS_STEPS = (0, 15, 31, 46, 62, 78, 93)
QUEUED_SHARE = 0.1
# Grids are drawn in this many variants per aspect ratio and reused, so a thousand finished tasks cost a few
# renders; tasks submitted one after another always get different grids.
GRID_VARIANTS = 32


@dataclass(frozen=True, slots=True)
class SimSettings:
    fast_s: float = 2.0
    relax_s: float = 6.0
    turbo_s: float = 1.0
    fail_rate: float = 0.0
    error_rate: float = 0.0
    banned_words: tuple[str, ...] = ("forbidden",)
    tile_px: int = 256
    capacity: int | None = None
    seed: int | None = None
    keep_tasks: int = 100_000

    def duration(self, mode: Mode) -> float:
        return {"fast": self.fast_s, "relax": self.relax_s, "turbo": self.turbo_s}[mode]


@dataclass(slots=True)
class _Task:
    id: str
    prompt: str
    mode: Mode
    bot: str
    state: str | None
    submitted: float
    duration: float
    fail: bool = False
    lose: bool = False
    never: bool = False
    variant: int = 0


@dataclass(frozen=True, slots=True)
class SubmitReply:
    """What the upstream answered: an HTTP status and a SubmitResultVO-shaped body."""

    http_status: int
    body: dict[str, Any]


def mode_from_prompt(prompt: str) -> Mode | None:
    words = prompt.lower().split()
    for flag, mode in (("--fast", "fast"), ("--relax", "relax"), ("--turbo", "turbo")):
        if flag in words:
            return mode  # type: ignore[return-value]
    return None


class SimEngine:
    def __init__(self, settings: SimSettings | None = None, *, now: Callable[[], float] = time.time) -> None:
        self.settings = settings or SimSettings()
        self.now = now
        self._rng = random.Random(self.settings.seed)
        self._tasks: OrderedDict[str, _Task] = OrderedDict()
        self._grids: OrderedDict[tuple[int, tuple[int, int]], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._counter = 0
        self.submits = 0

    # -- submit --------------------------------------------------------------------------------------------------

    def submit_imagine(self, body: Mapping[str, Any], mode: Mode) -> SubmitReply:
        self.submits += 1
        prompt = str(body.get("prompt") or "").strip()
        if not prompt:
            return SubmitReply(200, {"code": 4, "description": "prompt不能为空", "properties": {}, "result": None})
        lowered = prompt.lower()
        if "sim:error" in lowered or self._rng.random() < self.settings.error_rate:
            return SubmitReply(500, {"success": False, "code": -1, "message": "simulated upstream fault"})
        if "sim:no-account" in lowered:
            return SubmitReply(200, {"code": 3, "description": "无可用的账号实例", "properties": {}, "result": None})
        if "sim:queue-full" in lowered or self._full():
            return SubmitReply(
                200, {"code": 23, "description": "队列已满，请稍后尝试", "properties": {}, "result": None}
            )
        for word in self.settings.banned_words:
            if word and word.lower() in lowered:
                return SubmitReply(
                    200,
                    {
                        "code": 24,
                        "description": "可能包含敏感词",
                        "properties": {"promptEn": prompt, "bannedWord": word},
                        "result": None,
                    },
                )
        now = self.now()
        duration = self.settings.duration(mode) * (5 if "sim:slow" in lowered else 1)
        task = _Task(
            id=self._new_id(now),
            prompt=prompt,
            mode=mode,
            bot=str(body.get("botType") or "MID_JOURNEY"),
            state=str(body["state"]) if body.get("state") not in (None, "") else None,
            submitted=now,
            duration=duration,
            fail="sim:fail" in lowered or self._rng.random() < self.settings.fail_rate,
            lose="sim:lose" in lowered,
            never="sim:never" in lowered,
            variant=self._counter % GRID_VARIANTS,
        )
        with self._lock:
            self._tasks[task.id] = task
            while len(self._tasks) > self.settings.keep_tasks:
                self._tasks.popitem(last=False)
        return SubmitReply(200, {"code": 1, "description": "提交成功", "properties": {}, "result": task.id})

    def _new_id(self, now: float) -> str:
        self._counter += 1
        return f"{int(now * 1000)}{self._counter % 10000:04d}{self._rng.randrange(100):02d}"

    def _full(self) -> bool:
        capacity = self.settings.capacity
        if capacity is None:
            return False
        now = self.now()
        with self._lock:
            open_tasks = sum(1 for t in self._tasks.values() if not self._finished(t, now))
        return open_tasks >= capacity

    # -- reads ---------------------------------------------------------------------------------------------------

    def task(self, task_id: str, image_base: str) -> dict[str, Any] | None:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            return None
        now = self.now()
        if task.lose and now - task.submitted >= task.duration * QUEUED_SHARE:
            return None
        return self._view(task, now, image_base)

    def tasks(self, task_ids: Iterable[str], image_base: str) -> list[dict[str, Any]]:
        views = (self.task(task_id, image_base) for task_id in task_ids)
        return [view for view in views if view is not None]

    def _finished_grid(self, task_id: str) -> tuple[tuple[int, tuple[int, int]], bytes | None] | None:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or self._status(task, self.now())[0] != "SUCCESS":
            return None
        key = (task.variant, aspect_of(task.prompt))
        with self._lock:
            return key, self._grids.get(key)

    def cached_image(self, task_id: str) -> bytes | None:
        """The finished grid when it is already drawn (cheap); None otherwise."""
        found = self._finished_grid(task_id)
        return found[1] if found else None

    def image(self, task_id: str) -> bytes | None:
        """The finished grid as PNG bytes; None for an unknown or unfinished task."""
        found = self._finished_grid(task_id)
        if found is None:
            return None
        key, cached = found
        if cached is not None:
            return cached
        data = render_grid(f"variant {key[0]}", key[1], self.settings.tile_px)
        with self._lock:
            self._grids[key] = data
            while len(self._grids) > 4 * GRID_VARIANTS:
                self._grids.popitem(last=False)
        return data

    # -- the state of a task at a moment -------------------------------------------------------------------------

    def _finished(self, task: _Task, now: float) -> bool:
        return self._status(task, now)[0] in ("SUCCESS", "FAILURE")

    def _status(self, task: _Task, now: float) -> tuple[str, int]:
        elapsed = now - task.submitted
        queued = task.duration * QUEUED_SHARE
        if elapsed < queued:
            return "SUBMITTED", 0
        if task.fail and elapsed >= task.duration / 2:
            return "FAILURE", 0
        if elapsed >= task.duration and not task.never:
            return "SUCCESS", 100
        share = min(0.999, (elapsed - queued) / max(1e-9, task.duration - queued))
        progress = max(step for step in PROGRESS_STEPS if step <= share * 100)
        return "IN_PROGRESS", progress

    def _view(self, task: _Task, now: float, image_base: str) -> dict[str, Any]:
        status, progress = self._status(task, now)
        ms = int(task.submitted * 1000)
        started = ms + int(task.duration * QUEUED_SHARE * 1000)
        view: dict[str, Any] = {
            "id": task.id,
            "action": "IMAGINE",
            "status": status,
            "prompt": task.prompt,
            "promptEn": task.prompt,
            "description": f"/imagine {task.prompt}",
            "state": task.state,
            "mode": task.mode.upper(),
            "botType": task.bot,
            "submitTime": ms,
            "startTime": started if status != "SUBMITTED" else None,
            "finishTime": None,
            "imageUrl": None,
            "progress": f"{progress}%",
            "failReason": None,
            "properties": {"finalPrompt": task.prompt, "discordInstanceId": "sim"},
            "buttons": [],
        }
        if status == "FAILURE":
            view.update(
                progress="",
                failReason="[Invalid parameter] the simulator failed this job",
                finishTime=ms + int(task.duration * 500),
            )
        elif status == "SUCCESS":
            view.update(
                imageUrl=f"{image_base.rstrip('/')}/{task.id}.png",
                finishTime=ms + int(task.duration * 1000),
                buttons=_buttons(task.id),
            )
        return view


def _buttons(task_id: str) -> list[dict[str, Any]]:
    hash_ = task_id[-8:]
    out: list[dict[str, Any]] = []
    for i in range(1, 5):
        out.append(
            {"customId": f"MJ::JOB::upsample::{i}::{hash_}", "emoji": "", "label": f"U{i}", "type": 2, "style": 2}
        )
    out.append({"customId": f"MJ::JOB::reroll::0::{hash_}::SOLO", "emoji": "🔄", "label": "", "type": 2, "style": 2})
    for i in range(1, 5):
        out.append(
            {"customId": f"MJ::JOB::variation::{i}::{hash_}", "emoji": "", "label": f"V{i}", "type": 2, "style": 2}
        )
    return out
