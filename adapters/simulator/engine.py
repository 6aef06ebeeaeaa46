"""A fake Midjourney-proxy upstream that behaves like the real thing (trueai's shapes), driven by an injected clock.

Nothing runs in the background: a task's state is computed from the clock when it is read (see `tasks`), so tests
move time by hand. Replies are dialect-neutral (`SubmitReply`); the HTTP server renders them in its dialect.

    submit(kind, body, mode)   imagine, blend (2-5 images, dimensions), describe (an image), shorten (a prompt),
                               action (a button of a finished task), modal (confirms a task waiting in MODAL),
                               swap_face (a source and a target image); images are data URLs, anything else is code 4
    upload(body, image_base)   upload-discord-images: links to the images, served without credentials
    seed(task_id)              image-seed of a finished task
    task / tasks               the task JSON (unknown or forgotten ids: None / left out)
    image(key)                 the bytes behind an image link: a grid, one image, a described image, an upload

An action on a task the simulator does not know is code 3 (HTTP 404, `unknown_task`); on a task that has not
succeeded, or with a customId that is not among its buttons, code 4. Vary Region (Inpaint) and Custom Zoom answer
code 21 "Waiting for window confirm" and park the new task in MODAL until `submit/modal` (with a mask for Vary
Region) confirms it; with `SimSettings.remix` variation, reroll and pan do too. The confirmed task keeps its id and
its timeline starts at the confirmation.

Words in a prompt steer one task, for tests and demos:
  sim:fail            the task fails halfway            sim:lose            the upstream forgets the task once queued
  sim:never           the task never finishes           sim:slow            the task takes five times as long
  sim:queue-full      submit answers code 23            sim:no-account      submit answers code 3
  sim:queued          submit answers code 22 (taken, in the account's queue): NOT_START until it is submitted
  sim:error           submit answers HTTP 500 (its own error envelope: the task is not taken)
  sim:crash           the task is taken, but the answer is a gateway's HTTP 502 page (it may have run, for the caller)
  sim:upload-failed   a submit carrying images answers code 9 "上传图片到discord失败" (trueai: the upload of its
                      reference images failed)
  a banned word       submit answers code 24 (BANNED_PROMPT)
  sim:fail-followups  every follow-up of the task (an action on it, on its follow-ups, ...) fails halfway
  sim:never-followups every follow-up of the task never finishes
  sim:late-answer     the HTTP server answers the submit `LATE_ANSWER_S` late (the task is taken at once)
They are read from the prompt of an imagine or a shorten, and `sim:fail`, `sim:never`, `sim:slow` and
`sim:late-answer` also from the prompt a modal confirms with.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from adapters.base import Mode, SubmitKind
from adapters.simulator import texts
from adapters.simulator.answers import (
    SubmitReply,
    banned,
    fault,
    invalid,
    lost_answer,
    needs_modal,
    reply,
    unknown_task,
)
from adapters.simulator.buttons import FollowUp, Shape, follow_up
from adapters.simulator.grid import aspect_of
from adapters.simulator.media import VARIANTS, Media, Render
from adapters.simulator.pictures import Picture, picture, pictures
from adapters.simulator.tasks import PROGRESS_STEPS, QUEUED_SHARE, SimTask

__all__ = [
    "PROGRESS_STEPS",
    "QUEUED_SHARE",
    "SimEngine",
    "SimSettings",
    "SubmitReply",
    "mode_from_prompt",
    "steering",
]

DIMENSIONS = {"PORTRAIT": (2, 3), "SQUARE": (1, 1), "LANDSCAPE": (3, 2)}
_WORDS = re.compile(r"sim:[a-z-]+")
UPLOAD_FAILED = "上传图片到discord失败"  # trueai's words (and novicezk's) for an image it could not upload to Discord
_ZOOM = re.compile(r"(?<!\S)--zoom\s+(\S+)")


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
    remix: bool = False  # variation, reroll and pan wait in MODAL for `submit/modal`, as with remix mode on

    def duration(self, mode: Mode) -> float:
        return {"fast": self.fast_s, "relax": self.relax_s, "turbo": self.turbo_s}[mode]


def steering(text: str) -> frozenset[str]:
    """The steering words of a prompt (whole words: `sim:fail` is not `sim:fail-followups`)."""
    return frozenset(_WORDS.findall(text.lower()))


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
        self._tasks: OrderedDict[str, SimTask] = OrderedDict()
        self._open: dict[str, SimTask] = {}  # tasks that may still be unfinished: what a capacity is told from
        self.media = Media(self.settings.tile_px)
        self._lock = threading.Lock()
        self._counter = 0
        self.submits = 0
        self.reads = 0  # status reads answered (each fetch, each list-by-condition)
        self.downloads: Counter[str] = Counter()  # images served, by image
        self.first_downloaded: dict[str, float] = {}  # when each image was first served
        # Told of every task whose timeline starts (made, or confirmed out of MODAL): the hook sender.
        self.watchers: list[Callable[[SimTask], None]] = []

    # -- submits -------------------------------------------------------------------------------------------------

    def submit(self, kind: SubmitKind, body: Mapping[str, Any], mode: Mode | None = None) -> SubmitReply:
        """One submit call. `mode` is what the dialect's own mechanism said (path, accountFilter, model); without
        it a prompt flag decides, then the parent's mode for a follow-up, then fast."""
        self.submits += 1
        if kind == "imagine":
            return self._imagine(body, mode)
        if kind == "blend":
            return self._blend(body, mode)
        if kind == "describe":
            found = picture(body.get("base64"))
            if found is None:
                return invalid("base64 must be an image data URL")
            described = texts.describe(found.data, found.aspect)
            return self._create(body, "DESCRIBE", "text", "", mode, found.aspect, prompts=described, source=found)
        if kind == "shorten":
            return self._shorten(body, mode)
        if kind == "swap_face":
            source, target = picture(body.get("sourceBase64")), picture(body.get("targetBase64"))
            if source is None or target is None:
                return invalid("sourceBase64 and targetBase64 must be image data URLs")
            return self._create(body, "SWAP_FACE", "image", "", mode, target.aspect)
        if kind == "action":
            return self._action(body, mode)
        return self._modal(body)

    def submit_imagine(self, body: Mapping[str, Any], mode: Mode | None = None) -> SubmitReply:
        return self.submit("imagine", body, mode)

    def _imagine(self, body: Mapping[str, Any], mode: Mode | None) -> SubmitReply:
        prompt = str(body.get("prompt") or "").strip()
        if not prompt:
            return invalid("prompt不能为空")
        if pictures(body.get("base64Array") or []) is None:
            return invalid("base64Array must hold image data URLs")
        return self._create(body, "IMAGINE", "grid", prompt, mode, aspect_of(prompt))

    def _blend(self, body: Mapping[str, Any], mode: Mode | None) -> SubmitReply:
        images = pictures(body.get("base64Array"))
        if images is None or not 2 <= len(images) <= 5:
            return invalid("base64Array must hold 2 to 5 image data URLs")
        dimensions = str(body.get("dimensions") or "SQUARE").upper()
        if dimensions not in DIMENSIONS:
            return invalid("dimensions must be PORTRAIT, SQUARE or LANDSCAPE")
        return self._create(body, "BLEND", "grid", "", mode, DIMENSIONS[dimensions])

    def _shorten(self, body: Mapping[str, Any], mode: Mode | None) -> SubmitReply:
        prompt = str(body.get("prompt") or "").strip()
        if not prompt:
            return invalid("prompt不能为空")
        shortened = texts.shorten(prompt)
        return self._create(body, "SHORTEN", "text", prompt, mode, aspect_of(prompt), prompts=shortened)

    def _action(self, body: Mapping[str, Any], mode: Mode | None) -> SubmitReply:
        task_id, custom_id = body.get("taskId"), body.get("customId")
        if not isinstance(task_id, str) or not isinstance(custom_id, str):
            return invalid("taskId and customId must be strings")
        parent = self._get(task_id)
        if parent is None:
            return unknown_task()
        if parent.status(self.now())[0] != "SUCCESS":
            return invalid("the task has not succeeded")
        made = follow_up(custom_id)
        if made is None or custom_id not in {b["customId"] for b in parent.buttons()}:
            return invalid(f"the task has no button {custom_id}")
        if made.pick is not None and not 1 <= made.pick <= len(parent.texts):
            return invalid(f"the task has no prompt {made.pick}")
        if made.every:  # as trueai's midjourney-proxy answers "Imagine all": every task's id, joined by commas
            made_ids: list[str] = []
            for pick in range(1, len(parent.texts) + 1):
                answer = self._follow(body, parent, replace(made, pick=pick, every=False), mode)
                if answer.body.get("code") != 1:  # refused on the way: refused whole, nothing taken
                    with self._lock:
                        for made_id in made_ids:
                            self._tasks.pop(made_id, None)
                    return answer
                made_ids.append(str(answer.body["result"]))
            return reply(1, "Submit success", ",".join(made_ids))
        return self._follow(body, parent, made, mode)

    def _follow(self, body: Mapping[str, Any], parent: SimTask, made: FollowUp, mode: Mode | None) -> SubmitReply:
        prompt, aspect, source = parent.prompt, parent.aspect, None
        described: tuple[str, ...] = ()
        if made.pick is not None:
            prompt = parent.texts[made.pick - 1]
            aspect = aspect_of(prompt)
        elif made.action == "DESCRIBE" and parent.source is not None:
            source = self.media.described(parent.id)
            if source is None:
                return invalid("the image of the task is no longer kept")
            described = texts.describe(source.data, source.aspect, salt=str(self._counter))
        modal = made.modal == "always" or (made.modal == "remix" and self.settings.remix)
        return self._create(
            body,
            made.action,
            made.shape,
            prompt,
            mode or parent.mode,
            aspect,
            parent=parent,
            prompts=described,
            source=source,
            modal=made.upstream_action if modal else None,
        )

    def _modal(self, body: Mapping[str, Any]) -> SubmitReply:
        task_id = body.get("taskId")
        if not isinstance(task_id, str):
            return invalid("taskId must be a string")
        task = self._get(task_id)
        if task is None:
            return unknown_task()
        if task.started is not None:
            return invalid("the task is not waiting for a confirmation")
        if task.modal == "INPAINT" and picture(body.get("maskBase64")) is None:
            return invalid("maskBase64 must be an image data URL")
        prompt = str(body.get("prompt") or "").strip()
        zoom = _ZOOM.search(prompt)
        if task.modal == "CUSTOM_ZOOM" and zoom and not _zoom_ok(zoom.group(1)):
            return invalid("--zoom must be between 1 and 2")
        refused = self._banned(prompt)
        if refused is not None:
            return refused
        steer = steering(prompt)
        with self._lock:
            if prompt:
                task.prompt = prompt
                task.aspect = aspect_of(prompt) if "--ar" in prompt or "--aspect" in prompt else task.aspect
            task.fail = task.fail or "sim:fail" in steer
            task.never = task.never or "sim:never" in steer
            task.duration *= 5 if "sim:slow" in steer else 1
            task.started = self.now()
        self._started(task)
        return reply(1, "Submit success", task.id)

    # -- making a task -------------------------------------------------------------------------------------------

    def _create(
        self,
        body: Mapping[str, Any],
        action: str,
        shape: Shape,
        prompt: str,
        mode: Mode | None,
        aspect: tuple[int, int],
        *,
        parent: SimTask | None = None,
        prompts: tuple[str, ...] = (),
        source: Picture | None = None,
        modal: str | None = None,
    ) -> SubmitReply:
        steer = steering(prompt) if parent is None else frozenset()
        refused = self._admit(steer) or self._upload_failed(body, steer) or self._banned(prompt)
        if refused is not None:
            return refused
        now = self.now()
        chosen = mode or mode_from_prompt(prompt) or "fast"
        self._counter += 1
        task = SimTask(
            id=self._new_id(now),
            action=action,
            shape=shape,
            prompt=prompt,
            mode=chosen,
            bot=str(body.get("botType") or (parent.bot if parent else "MID_JOURNEY")),
            state=str(body["state"]) if body.get("state") not in (None, "") else None,
            submitted=now,
            duration=self.settings.duration(chosen) * (5 if "sim:slow" in steer else 1),
            aspect=aspect,
            hash=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            variant=self._counter % VARIANTS,
            parent_id=parent.id if parent else None,
            started=None if modal else now,
            modal=modal,
            fail="sim:fail" in steer or (parent is not None and parent.fail_followups),
            lose="sim:lose" in steer,
            never="sim:never" in steer or (parent is not None and parent.never_followups),
            fail_followups="sim:fail-followups" in steer or (parent is not None and parent.fail_followups),
            never_followups="sim:never-followups" in steer or (parent is not None and parent.never_followups),
            waits="sim:queued" in steer,
            texts=prompts,
            source=source.ext if source else None,
            notify_hook=str(body["notifyHook"]) if body.get("notifyHook") else None,
        )
        task.fail = task.fail or self._rng.random() < self.settings.fail_rate
        if source is not None:  # up to a limit, as uploads are: a task is kept far longer, and an image is large
            self.media.keep(task.id, source, described=True)
        with self._lock:
            self._tasks[task.id] = task
            while len(self._tasks) > self.settings.keep_tasks:
                self._tasks.popitem(last=False)
        if modal:
            return needs_modal(task.id, prompt, modal)
        self._started(task)
        if "sim:crash" in steer:
            return lost_answer()  # taken, but the answer never reaches the caller
        if task.waits:  # as midjourney-proxy answers a task beyond the account's running slots
            return reply(22, "排队中，前面还有1个任务", task.id, action=action, queues=1)
        return reply(1, "提交成功", task.id, action=action)

    def _started(self, task: SimTask) -> None:
        if self.settings.capacity is not None:
            with self._lock:
                self._open[task.id] = task
        for watcher in self.watchers:
            watcher(task)

    def _admit(self, steer: frozenset[str]) -> SubmitReply | None:
        """Whether the upstream takes a new task at all: faults, no account, a full queue."""
        if "sim:error" in steer or self._rng.random() < self.settings.error_rate:
            return fault()
        if "sim:no-account" in steer:
            return reply(3, "无可用的账号实例")
        if "sim:queue-full" in steer or self._full():
            return reply(23, "队列已满，请稍后尝试")
        return None

    def _upload_failed(self, body: Mapping[str, Any], steer: frozenset[str]) -> SubmitReply | None:
        """trueai uploads a submit's images before it takes the task, and answers a failed upload with code 9."""
        if "sim:upload-failed" in steer and (body.get("base64Array") or body.get("base64")):
            return reply(9, UPLOAD_FAILED)
        return None

    def _banned(self, prompt: str) -> SubmitReply | None:
        lowered = prompt.lower()
        word = next((w for w in self.settings.banned_words if w and w.lower() in lowered), None)
        return banned(prompt, word) if word is not None else None

    def _new_id(self, now: float) -> str:
        return f"{int(now * 1000)}{self._counter % 10000:04d}{self._rng.randrange(100):02d}"

    def _full(self) -> bool:
        capacity = self.settings.capacity
        if capacity is None:
            return False
        now = self.now()
        with self._lock:  # a finished (or forgotten) task never runs again: it is looked at no more
            for task_id in [i for i, task in self._open.items() if i not in self._tasks or not task.open(now)]:
                del self._open[task_id]
            running = len(self._open)
        return running >= capacity

    # -- uploads and seeds ---------------------------------------------------------------------------------------

    def upload(self, body: Mapping[str, Any], image_base: str) -> SubmitReply:
        """upload-discord-images: each image kept and linked under `image_base`, as Discord attachments are."""
        images = pictures(body.get("base64Array"))
        if not images:
            return invalid("base64Array must hold image data URLs")
        links = []
        for image in images:
            key = f"upload-{self._rng.getrandbits(64):016x}"
            self.media.keep(key, image)
            links.append(f"{image_base.rstrip('/')}/{key}.{image.ext}")
        return reply(1, "上传成功", links)

    def seed(self, task_id: str) -> SubmitReply:
        task = self._get(task_id)
        if task is None:
            return unknown_task()
        if task.status(self.now())[0] != "SUCCESS":
            return reply(4, "the task has no seed until it succeeds", status=400)
        if not task.has_seed:
            return reply(4, "the task has no image hash, so no seed", status=400)
        return reply(1, "成功", str(int(hashlib.sha256(task.hash.encode()).hexdigest()[:8], 16)))

    # -- reads ---------------------------------------------------------------------------------------------------

    def all_tasks(self) -> list[SimTask]:
        """Every task kept, oldest first (for tests: which jobs ran, and when each finished)."""
        with self._lock:
            return list(self._tasks.values())

    def _get(self, task_id: str) -> SimTask | None:
        with self._lock:
            task = self._tasks.get(task_id)
        return None if task is None or task.lost(self.now()) else task

    def task(self, task_id: str, image_base: str) -> dict[str, Any] | None:
        task = self._get(task_id)
        return task.view(self.now(), image_base) if task else None

    def tasks(self, task_ids: Iterable[str], image_base: str) -> list[dict[str, Any]]:
        views = (self.task(task_id, image_base) for task_id in task_ids)
        return [view for view in views if view is not None]

    def listing(self, image_base: str, at_most: int | None = None) -> list[dict[str, Any]]:
        """The tasks kept, newest first, as midjourney-proxy's `GET task/list` answers (novicezk: every one; trueai:
        its newest 100)."""
        now = self.now()
        with self._lock:
            tasks = list(self._tasks.values())
        kept = [task for task in reversed(tasks) if not task.lost(now)]
        return [task.view(now, image_base) for task in kept[:at_most]]

    def _image_source(self, key: str) -> tuple[Render | None, bytes | None]:
        """The render of a finished grid or image (and its bytes when drawn already), or the bytes of a kept image
        (an upload, a described image); (None, None) when there is none."""
        upload = self.media.upload(key)
        if upload is not None:
            return None, upload
        task = self._get(key)
        if task is None or task.status(self.now())[0] != "SUCCESS":
            return None, None
        if task.shape == "text":
            kept = self.media.described(task.id)
            return None, kept.data if kept else None
        render: Render = (task.shape, task.variant, task.aspect)
        return render, self.media.cached(render)

    def cached_image(self, key: str) -> bytes | None:
        """The image behind a link when it needs no drawing (cheap); None otherwise."""
        return self._image_source(key)[1]

    def image(self, key: str) -> bytes | None:
        """The image behind a link (a task id or an upload key): None when unknown or not finished."""
        render, data = self._image_source(key)
        if data is None and render is not None:
            data = self.media.draw(render)
        return data


def _zoom_ok(value: str) -> bool:
    try:
        return 1.0 <= float(value) <= 2.0
    except ValueError:
        return False
