"""The job service: plan -> hold quota -> route -> submit -> wait -> deliver.

A request for `n` images plans ceil(n / 4) imagine jobs (each gives a 2x2 grid, split into four tiles), holds the
price of all of them in one step, and submits each to the best provider that will take it. A provider that answers
"retryable" (queue full, no account, 429/5xx before the request was taken) or "unusable" hands the job to the next
one; a refusal of the request itself (validation, banned prompt) does not. A submit that may have reached the
upstream without an answer is never sent elsewhere, so a job never runs twice.

Waiting is on in-process events published by the tracker; a waiter that outlives a job's deadline ends it itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from cachetools import TTLCache

from adapters import Accepted, Bot, ClientError, Mode, NeedsModal, Retryable, SubmitOutcome, SubmitRequest
from relay.clock import Clock
from relay.config import Config
from relay.core.batch import Batcher
from relay.core.events import JobEvents, Subscription
from relay.core.finish import Finisher
from relay.core.images import TILE_NAMES
from relay.core.prompt import PromptError, PromptParts, build_prompt, parse_size, quality_flag, style_flag
from relay.core.providers import ProviderPool
from relay.core.router import rank
from relay.core.tracker import Tracked, Tracker
from relay.errors import (
    AuthenticationFailed,
    ContentPolicy,
    DeadlineExceeded,
    InsufficientQuota,
    InternalError,
    InvalidRequest,
    NotFound,
    RelayError,
    ServiceUnavailable,
    UpstreamFailed,
)
from relay.store.jobs import Admission, JobRow, JobState, JobStore, NewJob, Submitted
from relay.store.keys import KeyRecord, KeyStore

log = logging.getLogger("relay.jobs")

TILES_PER_JOB = 4
# How long a request's jobs can be found again by a retry of it: longer than any deadline plus the SDKs' retries.
RETRY_WINDOW_S = 3600.0
# How long past its deadline a waiter gives the tracker before ending a job itself.
DEADLINE_GRACE_S = 5.0
# How long past that a waiter still waits for a job whose grid is being delivered (downloads are time-limited).
DELIVERY_WAIT_S = 300.0


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """What a request asks for, already mapped to Midjourney terms."""

    model: str
    mode: Mode
    bot: Bot
    prompt: str
    n: int
    references: tuple[str, ...] = ()


@dataclass(slots=True)
class Generation:
    """The jobs of one request while it waits for them."""

    request_id: str
    spec: ImageSpec
    job_ids: tuple[str, ...]
    deadline_at: float
    subscription: Subscription
    progress: dict[str, int] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    rows: dict[str, JobRow] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return len(self.ended) == len(self.job_ids)

    @property
    def percent(self) -> int:
        return sum(self.progress.get(job_id, 0) for job_id in self.job_ids) // len(self.job_ids)

    def close(self) -> None:
        self.subscription.close()


@dataclass(frozen=True, slots=True)
class Attempt:
    """What recognises a client's retry of a request: a fingerprint of the key, the route and the body (or of
    the `Idempotency-Key` it named), and whether this attempt says it is a retry."""

    fingerprint: str
    retry: bool


@dataclass(frozen=True, slots=True)
class _Started:
    request_id: str
    spec: ImageSpec
    job_ids: tuple[str, ...]
    deadline_at: float


@dataclass(frozen=True, slots=True)
class Tile:
    job_id: str
    name: str


def error_for(row: JobRow) -> RelayError:
    """What a client is told about a job that did not succeed."""
    reason = row.fail_reason or "no reason given"
    code = row.error_code
    if code == "banned":
        return ContentPolicy(f"Midjourney refused the prompt: {reason}", param="prompt")
    if code == "rejected":
        return InvalidRequest(f"The upstream refused the request: {reason}")
    if code == "unavailable":
        return ServiceUnavailable(
            "No upstream provider could take the job right now; try again shortly.", headers={"Retry-After": "10"}
        )
    if code == "unconfirmed":
        return UpstreamFailed(
            "The upstream did not confirm the job; it was not sent elsewhere, so it cannot run twice.", retry=False
        )
    if code == "modal":
        return UpstreamFailed("The upstream asked for a confirmation this request cannot give.")
    if code == "timeout":
        return DeadlineExceeded("The job did not finish before its deadline.")
    if code == "lost":
        return UpstreamFailed(f"The upstream lost the job: {reason}")
    if code == "download":
        return UpstreamFailed("The finished image could not be fetched from the upstream.")
    if code == "interrupted":
        return UpstreamFailed("The relay stopped before the job was submitted.")
    if code == "internal":
        return InternalError("The relay could not finish the job.")
    return UpstreamFailed(f"The Midjourney job failed: {reason}")


def _took_any(outcome: tuple[bool, list[JobRow]], planned: int) -> bool:
    admitted, refused = outcome
    return admitted and len(refused) < planned


def _end_code(outcome: SubmitOutcome | None) -> tuple[str, str]:
    """The job's error code and reason when no provider took it."""
    if isinstance(outcome, ClientError):
        return ("banned" if outcome.banned else "rejected"), outcome.description
    if isinstance(outcome, NeedsModal):
        return "modal", "the upstream asked for a modal confirmation"
    if isinstance(outcome, Retryable) and outcome.sent:
        return "unconfirmed", outcome.reason
    if outcome is None:
        return "unavailable", "every provider that serves this mode is at capacity"
    return "unavailable", getattr(outcome, "reason", "no provider took the job")


class JobService:
    def __init__(
        self,
        *,
        config: Config,
        store: JobStore,
        keys: KeyStore,
        pool: ProviderPool,
        tracker: Tracker,
        finisher: Finisher,
        events: JobEvents,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.keys = keys
        self.pool = pool
        self.tracker = tracker
        self.finisher = finisher
        self.events = events
        self.clock = clock
        self.rng = rng or random.Random()
        self._admit: Batcher[Admission, bool] = Batcher(lambda batch: store.open_many(batch, clock.now()), "admit")
        self._mark: Batcher[Submitted, None] = Batcher(
            lambda batch: store.mark_submitted_many(batch, clock.now()), "mark-submitted"
        )
        self._started: TTLCache[str, asyncio.Future[_Started | None]] = TTLCache(
            maxsize=100_000, ttl=RETRY_WINDOW_S, timer=clock.now
        )

    # -- planning (no I/O) ---------------------------------------------------------------------------------------

    def plan(
        self,
        *,
        model: str | None,
        prompt: str,
        n: int = 1,
        size: str | None = None,
        quality: str | None = None,
        style: str | None = None,
        references: tuple[str, ...] = (),
    ) -> ImageSpec:
        name = model or self.config.api.default_model
        settings = self.config.models.get(name)
        if settings is None:
            raise NotFound(
                f"The model {name!r} does not exist; GET /v1/models lists the available ones.",
                param="model",
                code="model_not_found",
            )
        text = prompt.strip()
        if not text:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        limit = self.config.api.max_prompt_chars
        if len(text) > limit:
            raise InvalidRequest(f"The prompt is {len(text)} characters long; the limit is {limit}.", param="prompt")
        if not 1 <= n <= self.config.api.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.config.api.max_n}.", param="n")
        try:
            parts = PromptParts(
                text=text,
                mode=settings.mode,
                aspect=parse_size(size),
                quality=quality_flag(quality),
                style=style_flag(style),
            )
        except PromptError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None
        return ImageSpec(
            model=name,
            mode=settings.mode,
            bot=settings.bot,
            prompt=build_prompt(parts),
            n=n,
            references=references,
        )

    # -- running -------------------------------------------------------------------------------------------------

    async def start(self, key: KeyRecord, spec: ImageSpec, attempt: Attempt | None = None) -> Generation:
        """Hold the quota and submit every job; raises when no job could be submitted at all.

        A client's retry of a request (the OpenAI SDKs retry timeouts and 5xx twice, without an idempotency key)
        follows the jobs its first attempt started — waiting for that attempt's submission if it is still under
        way — instead of starting and charging new ones, unless the first attempt started nothing or its jobs all
        ended without success. An attempt that is not a retry always starts afresh and becomes the one later
        retries of that body follow."""
        if attempt is not None and attempt.retry:
            earlier = self._started.get(attempt.fingerprint)
            if earlier is not None:
                started = await asyncio.shield(earlier)
                attached = await self._attach(started) if started is not None else None
                if attached is not None:
                    return attached
        recorded: asyncio.Future[_Started | None] | None = None
        if attempt is not None:
            recorded = asyncio.get_running_loop().create_future()
            self._started[attempt.fingerprint] = recorded
        return await self._start(key, spec, recorded)

    async def _attach(self, started: _Started) -> Generation | None:
        subscription = self.events.subscribe(started.job_ids)
        generation = Generation(started.request_id, started.spec, started.job_ids, started.deadline_at, subscription)
        try:
            rows = await self.store.by_request(started.request_id)
        except BaseException:
            generation.close()
            raise
        for row in rows:
            if row.state.terminal:
                generation.ended.add(row.id)
                generation.rows[row.id] = row
        if generation.done and not any(row.state is JobState.SUCCEEDED for row in rows):
            generation.close()
            return None
        return generation

    async def _start(
        self, key: KeyRecord, spec: ImageSpec, recorded: asyncio.Future[_Started | None] | None
    ) -> Generation:
        now = self.clock.now()
        request_id = secrets.token_hex(12)
        deadline = now + self.config.jobs.deadline_s.of(spec.mode)
        price = self.config.price(spec.model, "imagine")
        planned = [
            NewJob(
                id="job_" + secrets.token_hex(12),
                request_id=request_id,
                model=spec.model,
                mode=spec.mode,
                bot=spec.bot,
                action="imagine",
                prompt=spec.prompt,
                price=price,
                deadline_at=deadline,
            )
            for _ in range(math.ceil(spec.n / TILES_PER_JOB))
        ]
        job_ids = tuple(job.id for job in planned)
        # Holding and submitting go on even if the caller goes away meanwhile: a held job is always submitted
        # (and tracked to its end) or ended, never left holding credits. Retries learn how it went from `recorded`,
        # which is settled when that work is done, however the caller fares.
        work = asyncio.ensure_future(self._admit_and_submit(key, planned, spec))
        subscription = self.events.subscribe(job_ids)
        generation = Generation(request_id, spec, job_ids, deadline, subscription)
        if recorded is not None:
            # What a retry needs to follow this attempt; reference images are not kept for it.
            following = _Started(request_id, replace(spec, references=()), job_ids, deadline)

            def record(done: asyncio.Future[tuple[bool, list[JobRow]]]) -> None:
                took = not done.cancelled() and done.exception() is None and _took_any(done.result(), len(planned))
                if not recorded.done():
                    recorded.set_result(following if took else None)

            work.add_done_callback(record)
        try:
            admitted, refused = await asyncio.shield(work)
            if not admitted:
                raise await self._refusal(key, price * len(planned))
            for row in refused:
                generation.ended.add(row.id)
                generation.rows[row.id] = row
            if len(refused) == len(planned):
                raise error_for(refused[0])
        except BaseException:
            generation.close()
            raise
        return generation

    async def _admit_and_submit(
        self, key: KeyRecord, planned: list[NewJob], spec: ImageSpec
    ) -> tuple[bool, list[JobRow]]:
        """Whether the jobs were admitted, and those no provider took (already ended)."""
        if not await self._admit(Admission(key.id, tuple(planned))):
            return False, []
        return True, [row for row in await asyncio.gather(*(self._submit(job, spec) for job in planned)) if row]

    async def _refusal(self, key: KeyRecord, needed: int) -> RelayError:
        current = await self.keys.get(key.id)
        if current is None or current.revoked:
            return AuthenticationFailed("This API key has been revoked.", code="key_revoked")
        return InsufficientQuota(
            f"You exceeded your current quota: this request needs {needed} credits "
            f"and the key has {max(0, current.available)} available."
        )

    async def _submit(self, job: NewJob, spec: ImageSpec) -> JobRow | None:
        """Submit one job to the first provider that takes it; the ended job when none did."""
        request = SubmitRequest(
            kind="imagine",
            prompt=spec.prompt,
            mode=spec.mode,
            bot=spec.bot,
            images=spec.references,
            state=job.id,
        )
        tried: list[str] = []
        outcome: SubmitOutcome | None = None
        while self.clock.now() < job.deadline_at:
            names = rank(self.pool.candidates(), mode=spec.mode, bot=spec.bot, exclude=tried, rng=self.rng)
            if not names:
                break
            name = names[0]
            tried.append(name)
            self.pool.acquire(name)
            outcome = await self.pool.submit(name, request)
            if isinstance(outcome, Accepted):
                # Read one poll interval after the upstream took it (not after that was written down): the job's
                # time runs from here.
                due_at = self.clock.now() + self.pool.poll_interval(name)
                tracked = Tracked(
                    job.id, job.model, name, outcome.upstream_id, job.deadline_at, JobState.SUBMITTED, due_at=due_at
                )
                try:
                    await self._mark(Submitted(job.id, name, outcome.upstream_id))
                except Exception:
                    # The upstream has the task: follow it anyway, so it is ended (and settled) like any other.
                    log.exception("recording a submitted job failed", extra={"fields": {"job": job.id}})
                self.tracker.track(tracked)
                return None
            self.pool.release(name)
            if isinstance(outcome, ClientError | NeedsModal) or (isinstance(outcome, Retryable) and outcome.sent):
                break
        code, reason = _end_code(outcome)
        if self.clock.now() >= job.deadline_at:
            code, reason = "timeout", "the job passed its deadline before a provider took it"
        row = await self.finisher.end(job.id, succeeded=False, error_code=code, fail_reason=reason)
        row = row or await self.store.get(job.id)  # already ended (a sweep, a repeated write): report it as it is
        if row is None:
            raise InternalError("The job vanished.")
        return row

    async def follow(self, generation: Generation, idle_s: float) -> AsyncIterator[int | None]:
        """Overall progress (0-100) each time it changes, None after `idle_s` without news, until every job ended.
        A job still running past its deadline (plus a short grace for the tracker) is ended here, unless the
        upstream has finished it and its grid is being delivered: then it is waited for."""
        last = -1
        while not generation.done:
            now = self.clock.now()
            limit = generation.deadline_at + DEADLINE_GRACE_S
            wait = min(idle_s, limit - now)
            if now >= limit:
                for job_id in generation.job_ids:
                    if job_id not in generation.ended and await self.tracker.expire(job_id):
                        generation.ended.add(job_id)
                if generation.done or now >= limit + DELIVERY_WAIT_S:
                    break
                wait = idle_s  # what is left is being delivered: it ends on its own
            update = await generation.subscription.next(max(0.01, wait))
            if update is None:
                yield None
                continue
            generation.progress[update.job_id] = update.progress
            if update.state.terminal:
                generation.ended.add(update.job_id)
                if update.row is not None:
                    generation.rows[update.job_id] = update.row
            if generation.percent != last and not generation.done:
                last = generation.percent
                yield last

    async def close(self) -> None:
        await self._admit.close()
        await self._mark.close()

    async def wait(self, generation: Generation) -> list[JobRow]:
        async for _ in self.follow(generation, idle_s=60.0):
            pass
        return await self.results(generation)

    async def results(self, generation: Generation) -> list[JobRow]:
        """The request's jobs in plan order, as they ended (read back from the store only when an ending was not
        heard, e.g. one written by another process)."""
        rows = generation.rows
        if any(job_id not in rows for job_id in generation.job_ids):
            rows = {row.id: row for row in await self.store.by_request(generation.request_id)}
        return [rows[job_id] for job_id in generation.job_ids if job_id in rows]

    @staticmethod
    def tiles(rows: list[JobRow], n: int) -> list[Tile]:
        """The first `n` tiles of the jobs that succeeded; raises the first failure when none did."""
        tiles = [Tile(row.id, name) for row in rows if row.state is JobState.SUCCEEDED for name in TILE_NAMES]
        if not tiles:
            failed = [row for row in rows if row.state is JobState.FAILED]
            raise error_for(failed[0]) if failed else DeadlineExceeded("The job did not finish before its deadline.")
        return tiles[:n]
