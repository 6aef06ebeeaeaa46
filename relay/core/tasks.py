"""Native Midjourney tasks: every kind a Midjourney-proxy client asks for, each one job, answered as soon as the
upstream took it (the client then reads the task, or gets it at its `notifyHook`).

    submit   a kind with a direct call (imagine, blend, describe, shorten, swap_face)
    act      a parent's button (`submit/action`): a follow-up, on the parent's provider, priced by its own kind
    confirm  `submit/modal` for a follow-up waiting in MODAL: the same job runs on, nothing more is held
    get / find / recent / seed   the caller's own tasks only: another key's task is "not found", like a made-up one
    (uploads are kept by the relay itself: `core.uploads`)

Every job is held at its kind's price before any upstream call (`core.submit`), and captured or released exactly
once when it ends, as on the OpenAI surface.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

from adapters import (
    Accepted,
    Bot,
    ClientError,
    Dimensions,
    NeedsModal,
    Retryable,
    SubmitRequest,
    UpstreamUnavailable,
)
from relay.clock import Clock
from relay.config import Config
from relay.core.buttons import kind_of
from relay.core.failures import code_of, job_failed
from relay.core.jobs import ID_TRIES, check_prompt, new_job_id
from relay.core.lifecycle import Lifecycle
from relay.core.modes import DEFAULT_MODE, ModeHints, UnknownModel, choose_mode, price_model
from relay.core.notify import Notifier
from relay.core.prompt import PromptParts, build_prompt
from relay.core.providers import ProviderPool
from relay.core.router import WITHOUT_PROMPT
from relay.core.submit import JobIdTaken, Outcome, Planned, Submitter
from relay.core.uploads import Uploads
from relay.domain import TASKS, FailureCode, JobState, Mode, TaskKind
from relay.errors import InvalidRequest, NotFound, ServiceUnavailable, UpstreamFailed
from relay.logs import event
from relay.store.jobs import JobRow, JobStore, NewJob
from relay.store.keys import KeyRecord

log = logging.getLogger("relay.tasks")

# Beyond the upstream call's own time limits, how long a confirmation counts as under way (`JobStore.extend_modal`).
CONFIRM_MARGIN_S = 5.0
# A seed read goes on the few connections that also carry a provider's status reads (`adapters.http`), and may
# take seconds upstream (midjourney-proxy asks Discord for it): at most this many are under way per provider, and
# one per key, so no key's seed reads hold up the reads that follow every key's jobs. More are refused at once.
SEED_READS_PER_PROVIDER = 2
SEED_RETRY_S = 2
# The most characters one of the relay's own image links may take in a native imagine prompt (they are taken out
# before its length is checked against `api.max_prompt_chars`); the links the relay makes are a few hundred long.
MAX_LINK_CHARS = 2048
# How many task ids one read of the store names (`find`): a list may name thousands.
IDS_PER_READ = 500


@dataclass(frozen=True, slots=True)
class TaskOrder:
    """A new task as a route parsed it: its kind (one with a direct call), what decides its mode, its inputs."""

    kind: TaskKind
    hints: ModeHints
    bot: Bot | None = None
    prompt: str = ""
    images: tuple[str, ...] = ()  # data URLs, already checked to be images
    dimensions: Dimensions | None = None
    client_state: str | None = None
    notify_hook: str | None = None


@dataclass(frozen=True, slots=True)
class ActionOrder:
    """A button pressed on one of the caller's tasks."""

    task_id: str
    custom_id: str
    hints: ModeHints
    client_state: str | None = None
    notify_hook: str | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """A task the upstream took: SUBMITTED (`queued` when it said so) or waiting in MODAL."""

    job_id: str
    state: JobState
    queued: bool = False


def _task_not_found(param: str = "taskId") -> NotFound:
    return NotFound("No such task.", what="task", param=param)


class TaskService:
    def __init__(
        self,
        *,
        config: Config,
        store: JobStore,
        pool: ProviderPool,
        submitter: Submitter,
        lifecycle: Lifecycle,
        notifier: Notifier,
        uploads: Uploads,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.submitter = submitter
        self.lifecycle = lifecycle
        self.notifier = notifier
        self.uploads = uploads
        self.clock = clock
        self._confirming: set[str] = set()
        self._seed_reads: Counter[str] = Counter()  # by provider
        self._seeding_keys: set[str] = set()

    # -- new tasks -----------------------------------------------------------------------------------------------

    def _mode_and_model(
        self, hints: ModeHints, bot: Bot | None, inherited: Mode | None = None
    ) -> tuple[Mode, Bot, str]:
        models = self.config.models
        try:
            mode = choose_mode(hints, models, inherited)
        except UnknownModel:
            names = dict.fromkeys([*models, "mj-fast", "mj-relax", "mj-turbo"])  # each once: mj-fast may be configured
            raise InvalidRequest(
                f"The model {hints.model!r} is unknown: use one of {', '.join(names)}.", param="model"
            ) from None
        named = hints.model if hints.model in models else None
        chosen_bot: Bot = bot or (models[named].bot if named else "MID_JOURNEY")
        model = price_model(models, mode, chosen_bot, named)
        if model is None:
            raise InvalidRequest(f"No model of this relay runs in {mode} mode.", param="model")
        return mode, chosen_bot, model

    async def submit(self, key: KeyRecord, order: TaskOrder, base_url: str) -> Submission:
        spec = TASKS[order.kind]
        assert spec.direct is not None, f"{order.kind} is made from a button only"
        limit = self.config.api.references.max_count
        if order.kind in (TaskKind.IMAGINE, TaskKind.SHORTEN):
            # Refused before it is read for mode flags and the relay's own links when even those taken out could
            # not bring it within the limit: reading a prompt of megabytes held the event loop for seconds.
            room = limit * MAX_LINK_CHARS if order.kind is TaskKind.IMAGINE else 0
            if len(order.prompt.strip()) > self.config.api.max_prompt_chars + room:
                check_prompt(order.prompt, self.config.api.max_prompt_chars)
        mode, bot, model = self._mode_and_model(order.hints, order.bot)
        # No provider could ever take it: a refusal, not a job held and failed as "try again shortly" (503), which a
        # client retries for ever.
        if not self.pool.runs(mode, bot):  # a model of its mode prices it, run by providers of another bot
            raise InvalidRequest(f"No provider of this relay runs {bot} in {mode} mode.", param="botType")
        if spec.direct in WITHOUT_PROMPT and not self.pool.runs(mode, bot, prompt_less=True):
            # no prompt carries its mode, and the providers that serve the mode read it from nowhere else: they would
            # run it in their default mode, at another price than the one held
            raise InvalidRequest(
                f"A {order.kind.value} sends no prompt to name its mode, and no provider of this relay that runs "
                f"{mode} mode reads it any other way: ask for {DEFAULT_MODE} mode or for no mode.",
                param="model",
            )
        prompt, images = "", order.images
        if order.kind is TaskKind.IMAGINE:
            order_prompt, images = await self.uploads.inline(order.prompt, order.images, limit)
        else:
            order_prompt = order.prompt
        if order.kind in (TaskKind.IMAGINE, TaskKind.SHORTEN):
            text = check_prompt(order_prompt, self.config.api.max_prompt_chars)
            # A shorten's prompts keep its parameters, and the imagine of one (`PromptAnalyzer::N`) is held at the
            # shorten's mode: its flag replaces any the client wrote, as an imagine's does.
            prompt = build_prompt(PromptParts(text=text, mode=mode))
        hook = await self.notifier.check(order.notify_hook, key.id)
        job = self._new_job(order.kind, model, mode, bot, prompt, order.client_state, hook)
        request = SubmitRequest(
            kind=spec.direct, prompt=prompt, mode=mode, bot=bot, images=images, dimensions=order.dimensions
        )
        return await self._run(key, Planned(job, request, spec.shape), base_url)

    async def act(self, key: KeyRecord, order: ActionOrder, base_url: str) -> Submission:
        """A follow-up on one of the caller's tasks; refused without a hold when the task is not theirs."""
        parent = await self._owned(key, order.task_id)
        kind = kind_of(order.custom_id)
        if kind is None:
            raise InvalidRequest("This button is not one the relay runs.", param="customId")
        if parent.state is not JobState.SUCCEEDED or parent.provider is None or parent.upstream_id is None:
            raise InvalidRequest("The task has not succeeded; its buttons cannot be used yet.", param="taskId")
        if order.custom_id not in {button.get("customId") for button in parent.buttons}:
            raise InvalidRequest("The task has no such button.", param="customId")
        mode, bot, model = self._mode_and_model(order.hints, cast(Bot, parent.bot), inherited=cast(Mode, parent.mode))
        provider = self.pool.settings.get(parent.provider)
        if provider is None:
            # follow-ups run on the parent's provider and no other: taken out of the configuration, no retry brings
            # it back (only a configuration that has it again), so this is no "try again shortly" (and no job held
            # and failed for it)
            raise InvalidRequest(
                "The provider that ran the task is no longer configured; its buttons cannot be used.", param="taskId"
            )
        if mode not in provider.modes:
            # it would run there in a mode the provider does not serve (its account's own, at another price)
            raise InvalidRequest(
                f"The provider that ran the task does not run {mode} mode; its follow-ups cannot either.", param="model"
            )
        if mode != parent.mode and not self.pool.carries_mode(parent.provider):
            # a button sends no prompt, so nothing there names the mode: the upstream runs it in its parent's, which
            # the price must be
            raise InvalidRequest(
                f"The provider that ran the task runs its follow-ups in the task's own mode ({parent.mode}), not in "
                f"{mode} mode: ask for {parent.mode} or for no mode.",
                param="model",
            )
        hook = await self.notifier.check(order.notify_hook, key.id)
        job = self._new_job(kind, model, mode, bot, "", order.client_state, hook, parent, order.custom_id)
        request = SubmitRequest(
            kind="action", mode=mode, bot=bot, task_id=parent.upstream_id, custom_id=order.custom_id
        )
        planned = Planned(job, request, TASKS[kind].shape, provider=parent.provider, modal_ok=True)
        return await self._run(key, planned, base_url)

    def _new_job(
        self,
        kind: TaskKind,
        model: str,
        mode: Mode,
        bot: Bot,
        prompt: str,
        client_state: str | None,
        hook: str | None,
        parent: JobRow | None = None,
        custom_id: str | None = None,
    ) -> NewJob:
        job_id = new_job_id()
        return NewJob(
            id=job_id,
            request_id=job_id,
            model=model,
            mode=mode,
            bot=bot,
            action=kind.value,
            prompt=prompt,
            price=self.config.price(model, TASKS[kind].price_key),
            deadline_at=self.clock.now() + self.config.jobs.deadline_s.of(mode),
            parent_id=parent.id if parent else None,
            custom_id=custom_id,
            client_state=client_state,
            notify_hook=hook,
        )

    async def _run(self, key: KeyRecord, planned: Planned, base_url: str) -> Submission:
        # Held, then submitted even if the client goes away meanwhile: a held job is always submitted or ended.
        held: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        work = asyncio.ensure_future(self._admit_and_submit(key, planned, base_url, held))
        try:
            job_id, outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            answer = await self._stopped_waiting(work, held)
            if answer is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # answered: the request ends as it would have
            return answer
        if outcome.row is not None:
            raise job_failed(outcome.row)
        return Submission(job_id, outcome.state, outcome.queued)

    async def _stopped_waiting(
        self, work: asyncio.Future[tuple[str, Outcome]], held: asyncio.Future[str | None]
    ) -> Submission | None:
        """The answer to a submit the server stopped waiting for (its graceful shutdown over) while its job was
        being held or submitted. A job held whose submit is under way may be running upstream, and goes on after
        the stop (`Submitter.drain`, then whoever takes it over): its client is told it is queued (22) with its id,
        to read it by, since a client that retried a 503 (midjourney-proxy's, New API) started and paid for a
        second job, the native surface keeping no retry record. None for one that nothing was held for, or whose
        hold was released unsent: it keeps the server's answer (`middleware.STOPPING`, 503), and a retry of it
        starts it once."""
        job_id = await asyncio.shield(held)  # written in a moment: the stop waits for holds under way
        if job_id is None:
            return None
        if self.submitter.submitting(job_id):
            event(log, "submit answered as queued as the relay stops", job=job_id)
            return Submission(job_id, JobState.SUBMITTED, queued=True)
        _, outcome = await asyncio.shield(work)  # answered already, or being ended unsent as the process stops
        if outcome.row is None:
            return Submission(job_id, outcome.state, outcome.queued)
        if code_of(outcome.row) is FailureCode.INTERRUPTED:
            return None
        raise job_failed(outcome.row)

    async def _admit_and_submit(
        self, key: KeyRecord, planned: Planned, base_url: str, held: asyncio.Future[str | None]
    ) -> tuple[str, Outcome]:
        """The job's id (a fresh one if the one drawn was taken) and how its submit went; `held` is set to the id
        once the job is held, just before its submit starts (to None when nothing was held)."""
        try:
            return await self._held_and_submitted(key, planned, base_url, held)
        finally:
            if not held.done():
                held.set_result(None)

    async def _held_and_submitted(
        self, key: KeyRecord, planned: Planned, base_url: str, held: asyncio.Future[str | None]
    ) -> tuple[str, Outcome]:
        hook = planned.job.notify_hook
        if hook:  # its place is taken before the hold (this work runs to its end: the place is never lost)
            self.notifier.reserve(key.id)
        try:
            for tries_left in reversed(range(ID_TRIES)):
                try:
                    await self.submitter.admit(key, [planned.job])
                    break
                except JobIdTaken:
                    if not tries_left:
                        raise
                    fresh = new_job_id()
                    planned = replace(planned, job=replace(planned.job, id=fresh, request_id=fresh))
        except BaseException:
            if hook:
                self.notifier.release(key.id)
            raise
        if hook:
            self.notifier.watch(planned.job.id, hook, key.hook_secret, base_url, key.id, reserved=True)
        held.set_result(planned.job.id)  # its waiter runs once the submit below started (or ended it unsent)
        return planned.job.id, await self.submitter.submit(planned)

    # -- modal ---------------------------------------------------------------------------------------------------

    async def confirm(self, key: KeyRecord, task_id: str, prompt: str, mask: str | None, base_url: str) -> Submission:
        """Confirm a follow-up waiting in MODAL (`submit/modal`), on the provider that parked it. A refusal leaves
        it waiting, so the client can try again with a better prompt or mask until `jobs.modal_timeout_s`. The
        confirmation may reach any process: the one that writes it follows the job from then on."""
        row = await self._owned(key, task_id)
        if row.state is not JobState.MODAL or row.provider is None or row.upstream_id is None:
            raise InvalidRequest("The task is not waiting for a confirmation (submit/modal).", param="taskId")
        if row.provider not in self.pool.settings:  # only the provider that parked it can run it
            raise InvalidRequest(
                "The provider that parked the task is no longer configured; it cannot be confirmed.", param="taskId"
            )
        if prompt:
            check_prompt(prompt, self.config.api.max_prompt_chars)
            # The job's mode, which priced it, is the one that runs: its flag replaces any the client wrote, and is
            # written when it wrote none, since a remix prompt replaces the whole prompt upstream and a confirmation
            # carries no accountFilter (without a flag it would run in whatever mode the account is set to).
            prompt = build_prompt(PromptParts(text=prompt, mode=cast(Mode, row.mode)))
        if row.id in self._confirming:
            raise InvalidRequest("A confirmation of this task is already under way.", param="taskId")
        self._confirming.add(row.id)
        now = self.clock.now()
        deadline = now + self.config.jobs.deadline_s.of(cast(Mode, row.mode))
        waited_until = self.lifecycle.confirming(row.id, deadline)
        refused, extended = True, False  # refused until the upstream is called
        try:
            # The job's new deadline is written before the upstream hears of the confirmation, so that no timeout
            # of its modal window is written meanwhile, by this process or another (a timeout's write holds only
            # while the stored deadline has passed); with it, that a confirmation is under way, for as long as
            # the upstream call may take: another one, in any process, is refused meanwhile.
            settings = self.pool.settings[row.provider]
            until = now + settings.connect_timeout_s + settings.timeout_s + CONFIRM_MARGIN_S
            extended = await self.store.extend_modal(row.id, deadline, now, until)
            if not extended:
                raise InvalidRequest(
                    "The task is not waiting for a confirmation (submit/modal), or one is already under way.",
                    param="taskId",
                )
            request = SubmitRequest(
                kind="modal",
                prompt=prompt,
                mode=cast(Mode, row.mode),
                bot=cast(Bot, row.bot),
                task_id=row.upstream_id,
                mask=mask,
                state=row.id,
            )
            refused = False
            try:
                outcome = await self.pool.submit(row.provider, request)
            except Exception:
                log.exception("confirming failed", extra={"fields": {"job": row.id, "provider": row.provider}})
                raise ServiceUnavailable("The provider could not take the confirmation now; try again.") from None
            if not isinstance(outcome, Accepted):
                # Refused for sure, unless the call may have reached the upstream: then the job keeps the deadline
                # of a running job, as it may run.
                refused = not isinstance(outcome, Retryable) or not outcome.sent
                if isinstance(outcome, NeedsModal):
                    return Submission(row.id, JobState.MODAL)
                event(log, "modal not accepted", job=row.id, provider=row.provider, outcome=type(outcome).__name__)
                if isinstance(outcome, ClientError):
                    raise InvalidRequest(f"The upstream refused the confirmation: {outcome.description}")
                raise ServiceUnavailable("The provider could not take the confirmation now; try again shortly.")
            try:
                confirmed = await self.store.confirm_modal(row.id, outcome.upstream_id, deadline, now, prompt or None)
            except Exception:
                # The upstream runs it: an error would invite a second confirmation, run and charged again. It is
                # followed here as confirmed all the same, ended and settled like any other (its deadline is
                # already written), and the client is answered that it runs.
                log.exception("recording a confirmation failed", extra={"fields": {"job": row.id}})
                confirmed = replace(
                    row,
                    state=JobState.SUBMITTED,
                    progress=0,
                    upstream_id=outcome.upstream_id,
                    prompt=prompt or row.prompt,
                    updated_at=now,
                    deadline_at=deadline,
                    confirming_until=None,
                    confirmed_at=now,
                )
            if confirmed is None:  # it ended meanwhile (the upstream failed it): the client reads that end
                event(log, "confirmed job had ended", job=row.id, provider=row.provider)
            else:
                if confirmed.notify_hook:  # this process holds the job now: its client hook comes from here
                    self.notifier.watch(row.id, confirmed.notify_hook, key.hook_secret, base_url, key.id)
                self.lifecycle.confirmed(confirmed)  # after: the hook hears of the confirmation
            return Submission(row.id, JobState.SUBMITTED, outcome.queued)
        finally:
            try:
                if refused:
                    # the job waits to the end of its window again, here (also if this process took it up meanwhile)
                    self.lifecycle.unconfirmed(row.id, row.deadline_at if waited_until is None else waited_until)
                    if extended:
                        await self.store.restore_modal(row.id, deadline, row.deadline_at)
            except Exception:  # it then waits to the longer deadline: held longer, never lost
                log.exception("restoring a modal deadline failed", extra={"fields": {"job": row.id}})
            finally:
                self._confirming.discard(row.id)

    # -- reads ---------------------------------------------------------------------------------------------------

    async def _owned(self, key: KeyRecord, task_id: str) -> JobRow:
        found = await self.store.owned([task_id], key.id)
        if not found:
            raise _task_not_found()
        return found[0]

    async def get(self, key: KeyRecord, task_id: str) -> JobRow:
        return await self._owned(key, task_id)

    async def find(self, key: KeyRecord, task_ids: Sequence[str]) -> list[JobRow]:
        """The caller's tasks among `task_ids`, newest first, each once: read `IDS_PER_READ` ids at a time."""
        ids = list(dict.fromkeys(task_ids))
        rows: list[JobRow] = []
        for start in range(0, len(ids), IDS_PER_READ):
            rows += await self.store.owned(ids[start : start + IDS_PER_READ], key.id)
        if len(ids) > IDS_PER_READ:
            rows.sort(key=lambda row: (-row.created_at, row.id))  # as one read orders them
        return rows

    async def recent(self, key: KeyRecord, limit: int) -> list[JobRow]:
        return await self.store.recent(key.id, limit)

    async def seed(self, key: KeyRecord, task_id: str) -> str:
        row = await self._owned(key, task_id)
        if row.state is not JobState.SUCCEEDED or row.provider is None or row.upstream_id is None:
            raise InvalidRequest("The task has no seed until it succeeds.", param="taskId")
        if row.provider not in self.pool.settings:
            raise UpstreamFailed("The provider that ran the task is no longer configured.")
        if key.id in self._seeding_keys or self._seed_reads[row.provider] >= SEED_READS_PER_PROVIDER:
            raise ServiceUnavailable("Too many seeds are being read now; try again shortly.", retry_after=SEED_RETRY_S)
        self._seeding_keys.add(key.id)
        self._seed_reads[row.provider] += 1
        try:
            seed = await self.pool.seed(row.provider, row.upstream_id)
        except UpstreamUnavailable:
            raise UpstreamFailed("The provider could not answer for the seed; try again shortly.") from None
        finally:
            self._seeding_keys.discard(key.id)
            self._seed_reads[row.provider] -= 1
        if seed is None:
            raise InvalidRequest("The upstream has no seed for this task.", param="taskId")
        return seed
