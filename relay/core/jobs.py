"""Image generations for the OpenAI surface: plan -> hold quota -> submit -> wait -> deliver.

A request for `n` images plans ceil(n / 4) imagine jobs (each gives a 2x2 grid, split into four tiles), holds the
price of all of them in one step, and submits each (`core.submit`). Waiting is on in-process events published as
jobs change; a waiter that outlives a job's deadline ends it itself. A client's retry of a request follows the jobs
its first attempt started instead of starting new ones; a retry that gave up waiting for them and started afresh
runs instead of that attempt, never besides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from cachetools import TTLCache

from adapters import Bot, Mode, SubmitRequest
from relay.clock import Clock
from relay.config import Config
from relay.core.batch import Batcher
from relay.core.events import JobEvents, Subscription
from relay.core.failures import request_failed
from relay.core.lifecycle import Lifecycle
from relay.core.prompt import (
    PromptError,
    PromptParts,
    build_prompt,
    parse_size,
    prompt_text,
    quality_flag,
    runs_several_jobs,
    style_flag,
)
from relay.core.submit import JobIdTaken, Outcome, Planned, Submitter
from relay.core.text import unstorable
from relay.domain import FailureCode, JobState, ResultShape, TaskKind
from relay.errors import (
    IdempotencyKeyReused,
    InternalError,
    InvalidRequest,
    JobFailed,
    NotFound,
    ServiceUnavailable,
)
from relay.images import TILE_NAMES
from relay.store.attempts import AttemptStore, Made
from relay.store.jobs import JobRow, JobStore, NewJob
from relay.store.keys import KeyRecord

log = logging.getLogger("relay.jobs")

TILES_PER_JOB = 4
# How long a request's jobs can be found again by a retry of it, at least (see `retry_window_s`).
RETRY_WINDOW_S = 3600.0
# What that window leaves past the longest deadline: the grace, the wait for a delivery and the SDKs' retries.
RETRY_MARGIN_S = 1800.0
# How long a retry waits for its first attempt's submission, under way in another process, and how often it looks.
ATTEMPT_WAIT_S = 10.0
ATTEMPT_POLL_S = 0.1
# An attempt whose jobs are held this long after it began (half the wait above: a margin for the two processes'
# timers) asks the database whether a retry took its body over meanwhile before it sends them, and sends nothing
# if one did. One held sooner needs not: a retry takes a body over only from an attempt without jobs held, and only
# after waiting ATTEMPT_WAIT_S since that attempt's row was written, by when these jobs were written; or, finding
# no row, before that row was written: then the row, landing late, leaves the body to the retry (`begin_many`), and
# the attempt sends nothing either.
ATTEMPT_CHECK_S = ATTEMPT_WAIT_S / 2
# How often a retry looks again for the attempt to follow when another one took its body as it was starting
# afresh. Each such try follows that one to its submission; only when it started nothing does the next try come:
# one for each copy of a request sent at once, all refused (a key without credits).
CLAIM_TRIES = 20
# How long a waiter waits without news before it reads the endings of jobs other processes follow.
QUIET_S = 5.0
# How long past its deadline a waiter gives the tracker before ending a job itself.
DEADLINE_GRACE_S = 5.0
# How long past that a waiter still waits for a job whose grid is being delivered (downloads are time-limited).
DELIVERY_WAIT_S = 300.0
# How soon a waiter past its deadline tries again to end a job when that failed (the database briefly away).
EXPIRE_RETRY_S = 1.0
# How many times the jobs of a request are read for its answer when the read fails (the database briefly away), and
# the wait before the second read, doubled for each one after it (0.5 + 1 + 2 + 4 s in all).
RESULTS_READS = 5
RESULTS_BACKOFF_S = 0.5


def retry_window_s(config: Config) -> float:
    """How long a request's jobs can be found again by a retry of it: longer than any deadline plus the SDKs'
    retries (the longest deadline plus `RETRY_MARGIN_S`), never under `RETRY_WINDOW_S`."""
    longest = max(float(seconds) for seconds in config.jobs.deadline_s.model_dump().values())
    return max(RETRY_WINDOW_S, longest + RETRY_MARGIN_S)


def unknown_model(name: str) -> NotFound:
    """The error for a model the relay does not offer; the name is shown cut to 64 characters."""
    return NotFound(
        f"The model {name[:64]!r} does not exist; GET /v1/models lists the available ones.", what="model", param="model"
    )


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
    closed: bool = False  # nobody waits for the jobs here any more (the client went away, or was answered)

    @property
    def done(self) -> bool:
        return len(self.ended) == len(self.job_ids)

    @property
    def percent(self) -> int:
        return sum(self.progress.get(job_id, 0) for job_id in self.job_ids) // len(self.job_ids)

    def close(self) -> None:
        self.closed = True
        self.subscription.close()


@dataclass(frozen=True, slots=True)
class Attempt:
    """What recognises a client's retry of a request: a fingerprint of the key, the route and the body (or of
    the `Idempotency-Key` it named, with a digest of the body in `body`: a request that names the key of another
    body is refused), and whether this attempt says it is a retry."""

    fingerprint: str
    retry: bool
    body: str | None = None


@dataclass(frozen=True, slots=True)
class _Started:
    request_id: str
    spec: ImageSpec
    job_ids: tuple[str, ...]
    deadline_at: float


# The attempt a retry makes, the request id it takes the body over from (None: none), since when attempts count
_Claim = tuple[Made, str | None, float]


class _Done(NamedTuple):
    """An attempt of this process that is done (or under way, once it is): when it took the body, its request id,
    its body's digest, and how it went (None: it started nothing)."""

    at: float
    request_id: str
    body: str | None
    started: _Started | None


class TakenOver(InternalError):
    """An attempt's jobs were held only after a retry of its request, elsewhere, gave up waiting for them and took
    its body over: they are ended unsent, and its client follows the attempt that owns the body now."""


class _Owner(NamedTuple):
    """An attempt while its jobs are held: its fingerprint, request id, when it began, and its request's jobs."""

    fingerprint: str
    request_id: str
    began: float
    generation: Generation


class _Begun(NamedTuple):
    fingerprint: str
    request_id: str
    job_ids: tuple[str, ...]
    spec: dict[str, Any]
    body: str | None
    deadline_at: float
    at: float  # when the attempt began


@dataclass(frozen=True, slots=True)
class Tile:
    job_id: str
    name: str


def _spec_record(spec: ImageSpec) -> dict[str, Any]:
    """What the attempts table keeps of a request for a retry to follow it (reference images are not kept)."""
    return {"model": spec.model, "mode": spec.mode, "bot": spec.bot, "prompt": spec.prompt, "n": spec.n}


def new_job_id() -> str:
    """A job's id: 16 random digits below 2**53, the shape midjourney-proxy task ids have (`1320098173412546`):
    some clients keep them as numbers, JavaScript's exactly only up to 2**53. Two alike (about one chance in
    16,000 over a million jobs) make the second one's hold fail whole, holding nothing: it is made again under
    fresh ids (up to ID_TRIES times)."""
    return str(10**15 + secrets.randbelow(_JS_SAFE - 10**15))


_JS_SAFE = 2**53  # 9,007,199,254,740,992: every integer below is a distinct JavaScript number
# How many times a request is held under freshly drawn job ids when one drawn is another job's.
ID_TRIES = 3


class JobService:
    def __init__(
        self,
        *,
        config: Config,
        store: JobStore,
        submitter: Submitter,
        lifecycle: Lifecycle,
        events: JobEvents,
        attempts: AttemptStore,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.submitter = submitter
        self.lifecycle = lifecycle
        self.events = events
        self.clock = clock
        self.attempts = attempts
        self.retry_window_s = retry_window_s(config)
        # Attempts this process is starting, while under way: a retry here waits on one without asking the database
        # (its row may not be written yet). Once one is done, the attempts table says which attempt owns its
        # fingerprint: a later one may have been made on another process.
        # (its request id, when it took the body, its body's digest, how it went)
        self._local: dict[str, tuple[str, float, str | None, asyncio.Future[_Started | None]]] = {}
        # Attempts made here whose row could not be written (the database failed meanwhile): for the retry window,
        # what a retry here follows rather than an older row.
        self._unwritten: TTLCache[str, _Done] = TTLCache(maxsize=10_000, ttl=self.retry_window_s, timer=clock.now)
        self._abandoned: set[asyncio.Task[None]] = set()
        now = clock.now
        self._begin: Batcher[_Begun, bool] = Batcher(lambda items: attempts.begin_many(list(items)), "attempts")
        self._settle: Batcher[tuple[str, str, bool], None] = Batcher(
            lambda items: attempts.settle_many(items, now()), "attempt-settle"
        )
        # Claims are group-committed too: every first request with an Idempotency-Key makes one.
        self._claim: Batcher[_Claim, bool] = Batcher(lambda items: self.attempts.claim_many(items), "attempt-claims")
        # Told when a retry follows a running job another process holds: that process may have just died (its
        # client retried here because it did), so its jobs are looked for now, not at the next adoption round.
        self.held_elsewhere: Callable[[], None] | None = None

    # -- planning (no I/O) ---------------------------------------------------------------------------------------

    def plan(
        self,
        *,
        model: str | None,
        prompt: str,
        n: int | None = None,
        size: str | None = None,
        quality: str | None = None,
        style: str | None = None,
        references: tuple[str, ...] = (),
        prompt_param: str = "prompt",
    ) -> ImageSpec:
        """The request in Midjourney terms; `prompt_param` names where the prompt came from, for errors. `n` is the
        number of images a client asked for (the images route's `n`, 1 to `api.max_n`); None asks for one job's
        grid, as a chat does: it asks for no `n`, so the bound, which is the images route's, is not its to meet."""
        name = self.config.api.default_model if model is None else model
        settings = self.config.models.get(name)
        if settings is None:
            raise unknown_model(name)
        text = check_prompt(prompt, self.config.api.max_prompt_chars, prompt_param)
        if n is None:
            n = TILES_PER_JOB
        elif not 1 <= n <= self.config.api.max_n:
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

    async def start(
        self,
        key: KeyRecord,
        spec: ImageSpec,
        attempt: Attempt | None = None,
        references: Callable[[], Awaitable[tuple[str, ...]]] | None = None,
    ) -> Generation:
        """Hold the quota and submit every job; raises when no job could be submitted at all. `references` loads the
        request's reference images, only when it starts jobs: a retry that follows its first attempt's needs none
        (the link to one may be gone by then, while that attempt's job runs and is charged).

        A client's retry of a request (the OpenAI SDKs retry timeouts and 5xx twice, without an idempotency key)
        follows the jobs its first attempt started — waiting for that attempt's submission if it is still under
        way — instead of starting and charging new ones, unless the first attempt started nothing or its jobs all
        ended without success. An attempt that is not a retry always starts afresh and becomes the one later
        retries of that body follow. Attempts are kept in the database, so a retry finds its first attempt after a
        restart and on another relay process."""
        if attempt is not None and attempt.retry:
            return await self._retry(key, spec, attempt, references)
        # It began when it came, not once its references came: a retry that started afresh while they downloaded
        # (its client gave up waiting) keeps the body, and this attempt follows it (`begin_many`).
        began = self.clock.now()
        if references is not None:
            spec = replace(spec, references=await references())
        for tries_left in reversed(range(ID_TRIES)):
            request_id = secrets.token_hex(12)
            planned, following = self._plan_jobs(spec, request_id)
            launched = self._launch(key, spec, planned, following, attempt, claimed=False, at=began)
            try:
                return await self._started(launched)
            except JobIdTaken:  # held nothing, and the attempt says it started nothing: again, under fresh ids
                if not tries_left:
                    raise
            except TakenOver:  # sent nothing: the client gets what the attempt that took the body over gets
                assert attempt is not None
                return await self._retry(key, spec, attempt, None)
        raise AssertionError("unreachable")

    async def _retry(
        self,
        key: KeyRecord,
        spec: ImageSpec,
        attempt: Attempt,
        references: Callable[[], Awaitable[tuple[str, ...]]] | None,
    ) -> Generation:
        """A retry follows the attempt that owns its fingerprint; one that finds none to follow starts afresh, and
        owns the fingerprint from then on, only if no other attempt took it meanwhile (the same `Idempotency-Key`
        sent to two processes at once): otherwise it follows that one. One that names the `Idempotency-Key` of an
        attempt with another body is refused (`IdempotencyKeyReused`), starting nothing."""
        fingerprint = attempt.fingerprint
        for _ in range(CLAIM_TRIES):
            attached, earlier = await self._follow_earlier(fingerprint, attempt.body)
            if attached is not None:
                return attached
            if references is not None:  # loaded once, only for a start afresh
                spec, references = replace(spec, references=await references()), None
            request_id = secrets.token_hex(12)
            planned, following = self._plan_jobs(spec, request_id)
            spec_record = _spec_record(following.spec)
            now = self.clock.now()
            made = (fingerprint, request_id, following.job_ids, spec_record, attempt.body, following.deadline_at, now)
            claiming = asyncio.ensure_future(self._claim((made, earlier, now - self.retry_window_s)))
            try:
                claimed = await asyncio.shield(claiming)
            except asyncio.CancelledError:
                self._abandon(claiming, fingerprint, request_id, attempt.body, now)
                raise
            if claimed:  # it took the body when the claim was written, not when it learnt so
                launched = self._launch(key, spec, planned, following, attempt, claimed=True, at=now)
                try:
                    return await self._started(launched)
                except (JobIdTaken, TakenOver):  # it started nothing: the next try starts afresh from it, or
                    continue  # follows the attempt that took the body over from it
        raise ServiceUnavailable("This request is being started by another attempt; retry shortly.", retry_after=1)

    def _abandon(
        self, claiming: asyncio.Future[bool], fingerprint: str, request_id: str, body: str | None, at: float
    ) -> None:
        """A retry that went away as it claimed its body: a claim that was written is settled as having started
        nothing, so that the next retry starts afresh at once instead of waiting for jobs that never come (here,
        it waits on that settling as on an attempt under way)."""
        gone: asyncio.Future[_Started | None] = asyncio.get_running_loop().create_future()
        if fingerprint not in self._local:  # else another attempt here is under way, newer: retries wait on it
            self._under_way(fingerprint, request_id, body, at, gone)

        async def settle() -> None:
            try:
                if await claiming:
                    await self._settle((fingerprint, request_id, False))
            except Exception:  # the row lapses with the retry window, or a retry waits for it a while
                log.exception("settling an abandoned attempt failed")
            finally:
                gone.set_result(None)

        task = asyncio.ensure_future(settle())
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    def _under_way(
        self,
        fingerprint: str,
        request_id: str,
        body: str | None,
        at: float,
        outcome: asyncio.Future[_Started | None],
    ) -> None:
        """An attempt of this process is under way until `outcome` is set: a retry here waits on it (a claimed or
        abandoned retry's attempt only when no other attempt is under way here: that one came after its claim)."""
        entry = (request_id, at, body, outcome)
        self._local[fingerprint] = entry
        outcome.add_done_callback(
            lambda _: self._local.pop(fingerprint) if self._local.get(fingerprint) is entry else None
        )

    async def _follow_earlier(self, fingerprint: str, body: str | None) -> tuple[Generation | None, str | None]:
        """The attempt that owns `fingerprint` followed; or None, with the request id of the attempt found that
        cannot be followed (it started nothing, its jobs all failed, it never held them), which a fresh start
        takes the fingerprint over from (None: no attempt within the window). Raises `IdempotencyKeyReused` when
        that attempt named the same `Idempotency-Key` with another body (`body`), whatever became of it."""
        # An attempt of this process (under way: waited for; or one whose row does not say how it went) is the one
        # to follow, unless the row names a newer attempt, made elsewhere.
        mine: _Done | None = None
        local = self._local.get(fingerprint)
        if local is not None:
            request_id, at, made_of, under_way = local
            mine = _Done(at, request_id, made_of, await asyncio.shield(under_way))  # its row is written once done
        since = self.clock.now() - self.retry_window_s
        row = await self.attempts.get(fingerprint, since)
        kept = self._unwritten.get(fingerprint)
        if kept is not None and (mine is None or kept.at >= mine.at):  # the newer of this process's two
            mine = kept
        if mine is not None and (row is None or row.request_id == mine.request_id or row.created_at <= mine.at):
            _same_body(body, mine.body, self.retry_window_s)
            started = mine.started
            attached = await self._attach(started) if started is not None else None
            return attached, None if attached is not None else (row.request_id if row is not None else None)
        if row is not None:  # refused at once, not once that attempt's jobs are held
            _same_body(body, row.body, self.retry_window_s)
        waited = 0.0
        # Under way in another process (or one that stopped): followed once its jobs are held, which is at once
        # unless that process stopped or stalled before; then, after a while, a retry starts afresh (`claim_many`
        # refuses it if they are held by then; one held later is not sent, see ATTEMPT_CHECK_S). The while is each
        # attempt's own: one that took the body over meanwhile is waited for from then on.
        while row is not None and row.state == "starting" and waited < ATTEMPT_WAIT_S:
            if await self.store.by_request(row.request_id):
                break
            await self.clock.sleep(ATTEMPT_POLL_S)
            waited += ATTEMPT_POLL_S
            waited_for = row.request_id
            row = await self.attempts.get(fingerprint, since)
            if row is not None and row.request_id != waited_for:
                waited = 0.0
        if row is None:
            return None, None
        _same_body(body, row.body, self.retry_window_s)  # the attempt that owns the fingerprint by now
        if row.state == "nothing":
            return None, row.request_id
        spec = ImageSpec(**row.spec)
        return await self._attach(_Started(row.request_id, spec, row.job_ids, row.deadline_at)), row.request_id

    async def _attach(self, started: _Started) -> Generation | None:
        subscription = self.events.subscribe(started.job_ids)
        generation = Generation(started.request_id, started.spec, started.job_ids, started.deadline_at, subscription)
        try:
            rows = await self.store.by_request(started.request_id)
        except BaseException:
            generation.close()
            raise
        if len(rows) < len(started.job_ids):  # never admitted (its process stopped first): nothing to follow
            generation.close()
            return None
        for row in rows:
            if row.state.terminal:
                generation.ended.add(row.id)
                generation.rows[row.id] = row
        if self.held_elsewhere is not None and any(
            not row.state.terminal and row.owner != self.store.owner for row in rows
        ):
            self.held_elsewhere()
        if generation.done and not any(row.state is JobState.SUCCEEDED for row in rows):
            generation.close()
            return None
        return generation

    def _plan_jobs(self, spec: ImageSpec, request_id: str) -> tuple[list[Planned], _Started]:
        """The request's jobs, and what a retry needs to follow them."""
        now = self.clock.now()
        deadline = now + self.config.jobs.deadline_s.of(spec.mode)
        price = self.config.price(spec.model, TaskKind.IMAGINE.value)
        request = SubmitRequest(
            kind="imagine", prompt=spec.prompt, mode=spec.mode, bot=spec.bot, images=spec.references
        )
        planned = [
            Planned(
                NewJob(
                    id=new_job_id(),
                    request_id=request_id,
                    model=spec.model,
                    mode=spec.mode,
                    bot=spec.bot,
                    action=TaskKind.IMAGINE.value,
                    prompt=spec.prompt,
                    price=price,
                    deadline_at=deadline,
                ),
                request,
                ResultShape.GRID,
            )
            for _ in range(math.ceil(spec.n / TILES_PER_JOB))
        ]
        job_ids = tuple(p.job.id for p in planned)
        # What a retry needs to follow this attempt; reference images are not kept for it.
        return planned, _Started(request_id, replace(spec, references=()), job_ids, deadline)

    def _launch(
        self,
        key: KeyRecord,
        spec: ImageSpec,
        planned: list[Planned],
        following: _Started,
        attempt: Attempt | None,
        *,
        claimed: bool,
        at: float,
    ) -> tuple[Generation, asyncio.Future[list[JobRow]]]:
        """Start holding and submitting the jobs of an attempt that took its body `at` (`claimed`: the attempt's
        row is written already)."""
        recorded: asyncio.Future[_Started | None] | None = None
        if attempt is not None:
            recorded = asyncio.get_running_loop().create_future()
            if not claimed or attempt.fingerprint not in self._local:  # see `_under_way`
                self._under_way(attempt.fingerprint, following.request_id, attempt.body, at, recorded)
        # Holding and submitting go on even if the caller goes away meanwhile: a held job is always submitted
        # (and tracked to its end) or ended, never left holding credits. Retries learn how it went from the
        # attempt, which is settled when that work is done, however the caller fares.
        subscription = self.events.subscribe(following.job_ids)
        generation = Generation(following.request_id, spec, following.job_ids, following.deadline_at, subscription)
        work = asyncio.ensure_future(self._attempt(key, planned, attempt, following, recorded, claimed, at, generation))
        return generation, work

    async def _started(self, launched: tuple[Generation, asyncio.Future[list[JobRow]]]) -> Generation:
        generation, work = launched
        planned = len(generation.job_ids)
        try:
            refused = await asyncio.shield(work)
            for row in refused:
                generation.ended.add(row.id)
                generation.rows[row.id] = row
            if len(refused) == planned:
                raise request_failed(refused)
        except BaseException:
            generation.close()
            raise
        return generation

    async def _attempt(
        self,
        key: KeyRecord,
        planned: list[Planned],
        attempt: Attempt | None,
        following: _Started,
        recorded: asyncio.Future[_Started | None] | None,
        claimed: bool,
        started_at: float,
        generation: Generation,
    ) -> list[JobRow]:
        """Record the attempt (unless `claimed` wrote it), hold and submit its jobs, and settle the attempt with how
        that went."""
        took = False
        # Written while the jobs are held (not before: that would add a commit to every request's way in), and
        # before any is sent upstream: a retry in this process waits on the attempt in `_local` meanwhile, one
        # elsewhere (the first attempt's connection was cut) finds it written once a job can have run.
        begun: asyncio.Future[bool] | None = None
        if attempt is not None and not claimed:
            begun = asyncio.ensure_future(
                self._begin(
                    _Begun(
                        attempt.fingerprint,
                        following.request_id,
                        following.job_ids,
                        _spec_record(following.spec),
                        attempt.body,
                        following.deadline_at,
                        started_at,
                    )
                )
            )
        try:
            owner = None
            if attempt is not None:
                owner = _Owner(attempt.fingerprint, following.request_id, started_at, generation)
            outcomes = await self._admit_and_submit(key, planned, begun, owner)
            # A job the upstream took runs and is charged even when a neighbour's submit failed (its ending could not
            # be written): the attempt took, and a retry follows it rather than starting the request again.
            took = any(isinstance(outcome, Outcome) and outcome.row is None for outcome in outcomes)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            return [outcome.row for outcome in outcomes if isinstance(outcome, Outcome) and outcome.row is not None]
        finally:
            written = claimed
            try:
                if begun is not None:
                    with contextlib.suppress(Exception):  # at worst a retry starts afresh
                        await begun  # False: a retry's row says how the request went
                        written = True
            finally:
                # Only now: a retry here that finds the attempt done reads the attempts table, which has it.
                if recorded is not None and not recorded.done():
                    recorded.set_result(following if took else None)
            if attempt is not None:
                done = _Done(started_at, following.request_id, attempt.body, following if took else None)
                await self._record(attempt.fingerprint, done, written)

    async def _record(self, fingerprint: str, done: _Done, written: bool) -> None:
        """Settle a finished attempt in its row, if `written`.
        While the row cannot say how it went (not written, or not settled) this process keeps it instead, unless it
        keeps a newer one."""
        kept = self._unwritten.get(fingerprint)
        newer = kept is None or kept.at <= done.at
        if written:
            if kept is not None and newer:  # written since: the row says it; an unwritten newer one stays
                del self._unwritten[fingerprint]
            try:
                await self._settle((fingerprint, done.request_id, done.started is not None))
                return
            except Exception:  # the row still says `starting`
                pass
        if newer:
            self._unwritten[fingerprint] = done

    async def _admit_and_submit(
        self,
        key: KeyRecord,
        planned: list[Planned],
        begun: asyncio.Future[bool] | None,
        owner: _Owner | None = None,
    ) -> list[Outcome | BaseException]:
        """Hold and submit the jobs (raising when they cannot be held), submitting once the attempt's row is
        written (`begun`; one that could not be written: at worst a retry starts afresh); returns how submitting
        each went, or why it failed, once every submit is done. The jobs of an attempt (`owner`) held late are
        submitted only if no retry took its fingerprint over from it (`_still_owned`), and those of one whose row
        was not taken (a retry that started afresh meanwhile kept the fingerprint) are not; else they are ended
        unsent and `TakenOver` is raised."""
        jobs = [p.job for p in planned]
        await self.submitter.admit(key, jobs)
        if begun is not None:
            taken = True
            with contextlib.suppress(Exception):
                taken = await begun
            if not taken:
                await self._taken_over(jobs)
        if owner is not None and self.clock.now() - owner.began >= ATTEMPT_CHECK_S:
            await self._still_owned(owner, jobs)
        return list(await asyncio.gather(*(self.submitter.submit(p) for p in planned), return_exceptions=True))

    async def _still_owned(self, owner: _Owner, jobs: list[NewJob]) -> None:
        """Raises `TakenOver`, having ended the jobs unsent, when a retry took the attempt's fingerprint over from
        it, or when it lost the fingerprint to a newer request of the same body and its client went away (a retry of
        it follows that newer one: nobody would get these jobs' images). A client that still waits has them sent:
        the newer request, not a retry, is one of its own. When that cannot be asked (the database failing), the
        jobs are ended unsent as well and the failure raised: a job sent then might run twice."""
        try:
            owns, taken = await self.attempts.standing(owner.fingerprint, owner.request_id)
        except Exception:
            await self.submitter.withdraw(jobs, "whether a retry of its request had started it could not be read")
            raise
        if taken or (not owns and owner.generation.closed):
            await self._taken_over(jobs, client_gone=not taken)

    async def _taken_over(self, jobs: list[NewJob], *, client_gone: bool = False) -> None:
        """Raises `TakenOver`, having ended the jobs unsent: a retry of their request started afresh before they
        were sent (or a newer request of their body came, and their client went away)."""
        request_id = jobs[0].request_id
        log.info(
            "a retry took over an attempt before its jobs were sent",
            extra={"fields": {"request": request_id, "client_gone": client_gone}},
        )
        await self.submitter.withdraw(jobs, "a retry of its request started it before it was sent")
        raise TakenOver("A retry of this request took it over.")

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
                failed = await self._expire(generation)
                if generation.done or now >= limit + DELIVERY_WAIT_S:
                    break
                # What is left is being delivered (it ends on its own), or could not be ended now: tried again soon.
                wait = min(idle_s, EXPIRE_RETRY_S) if failed else idle_s
            update = await generation.subscription.next(max(0.01, wait))
            if update is None:
                await self._look_up_endings(generation)
                if generation.done:
                    break
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

    async def _expire(self, generation: Generation) -> bool:
        """End the jobs of a waiter past its deadline (or learn they ended); whether reading or ending one failed (the
        database briefly away). Such a job runs on and is charged whatever this meets, so the waiter tries again
        shortly, until it gives up on deliveries, rather than failing the request."""
        failed = False
        for job_id in generation.job_ids:
            if job_id in generation.ended:
                continue
            try:
                if await self.lifecycle.expire(job_id):
                    generation.ended.add(job_id)
            except Exception:
                failed = True
                log.warning(
                    "ending a job past its deadline failed; tried again shortly",
                    exc_info=True,
                    extra={"fields": {"request": generation.request_id, "job": job_id}},
                )
        return failed

    async def _look_up_endings(self, generation: Generation) -> None:
        """After a quiet spell, the endings of jobs another process follows are read from the store: a wake-up
        that was lost (a dropped LISTEN connection) delays a waiter by one quiet spell, not to the deadline. A read
        that fails (the database is briefly away) is made again after the next quiet spell, until the deadline: the
        jobs run on and are charged whatever this read meets, so the request waits for them rather than failing."""
        elsewhere = [j for j in generation.job_ids if j not in generation.ended and not self.lifecycle.following(j)]
        if not elsewhere:
            return
        try:
            rows = await self.store.by_request(generation.request_id)
        except Exception:
            log.warning(
                "reading a request's jobs failed; read again after the next quiet spell",
                exc_info=True,
                extra={"fields": {"request": generation.request_id}},
            )
            return
        for row in rows:
            if row.id in elsewhere and row.state.terminal:
                generation.ended.add(row.id)
                generation.rows[row.id] = row

    async def close(self) -> None:
        if self._abandoned:
            await asyncio.gather(*self._abandoned, return_exceptions=True)
        await self._claim.close()
        await self._begin.close()
        await self._settle.close()

    async def wait(self, generation: Generation) -> list[JobRow]:
        """The request's jobs once all have ended (`results`); their progress meanwhile is not looked at."""
        generation.subscription.endings_only = True
        async for _ in self.follow(generation, idle_s=QUIET_S):
            pass
        return await self.results(generation)

    async def results(self, generation: Generation) -> list[JobRow]:
        """The request's jobs in plan order, as they ended (read back from the store only when an ending was not
        heard, e.g. one written by another process). A read that fails (the database briefly away) is made again a
        few times, shortly after: the jobs ended, and those that succeeded are charged and have their images."""
        rows = generation.rows
        if any(job_id not in rows for job_id in generation.job_ids):
            rows = {row.id: row for row in await self._read_request(generation.request_id)}
        return [rows[job_id] for job_id in generation.job_ids if job_id in rows]

    async def _read_request(self, request_id: str) -> list[JobRow]:
        for read in range(RESULTS_READS - 1):
            try:
                return await self.store.by_request(request_id)
            except Exception:
                log.warning(
                    "reading a request's ended jobs failed; read again shortly",
                    exc_info=True,
                    extra={"fields": {"request": request_id}},
                )
            await self.clock.sleep(RESULTS_BACKOFF_S * 2**read)
        return await self.store.by_request(request_id)

    @staticmethod
    def tiles(rows: list[JobRow], n: int) -> list[Tile]:
        """The first `n` tiles of the jobs that succeeded; raises a failure (`request_failed`) when none did."""
        tiles = [Tile(row.id, name) for row in rows if row.state is JobState.SUCCEEDED for name in TILE_NAMES]
        if not tiles:
            failed = [row for row in rows if row.state is JobState.FAILED]
            if failed:
                raise request_failed(failed)
            raise JobFailed(FailureCode.TIMEOUT, "The job did not finish before its deadline.")
        return tiles[:n]


def _same_body(asked: str | None, made: str | None, window_s: float) -> None:
    """Refuses a request that names the `Idempotency-Key` of an attempt made with another body (`asked` and `made`:
    their bodies' digests; None for an attempt without the key, or a row written before digests were kept)."""
    if asked is not None and made is not None and asked != made:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was sent with another request body in the last "
            f"{round(window_s / 60)} minutes. A retry must send the same body; use a new key for a new request."
        )


def check_prompt(prompt: str, limit: int, param: str = "prompt") -> str:
    """A prompt fit to send: storable, within the limit, and with some text besides its parameters."""
    reason = unstorable(prompt)
    if reason is not None:
        raise InvalidRequest(f"The {param} {reason}.", param=param)
    text = prompt.strip()
    if not text:
        raise InvalidRequest(f"The {param} is empty.", param=param)
    if len(text) > limit:
        raise InvalidRequest(f"The {param} is {len(text)} characters long; the limit is {limit}.", param=param)
    if not prompt_text(text):
        raise InvalidRequest(
            f"The {param} has only parameters (--...); Midjourney needs something to draw.", param=param
        )
    if runs_several_jobs(text):  # each would run upstream, and the request is priced as one
        raise InvalidRequest(
            f"The {param} asks Midjourney for several jobs (--repeat, or options in braces); a request runs one job: "
            "send one request for each.",
            param=param,
        )
    return text
