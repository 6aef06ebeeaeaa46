"""Holding and submitting jobs: the path every job takes to an upstream, whichever surface asked for it.

`admit` holds the price of a request's jobs and inserts them in one step (group-committed). `submit` sends one
job to the first provider that takes it: a new task to the best provider that serves its mode and bot, moving on
when one answers "retryable" (queue full, no account, 429/5xx before the request was taken) or "unusable"; a
follow-up only to the provider that ran its parent. A refusal of the request itself (validation, a banned prompt,
an unknown button) is never retried; one refused because the upstream could not upload its images goes to one more
provider (`IMAGE_TRIES`), then ends as the client's. A submit that may have reached an upstream without an answer is
never sent elsewhere, so a job never runs twice. A follow-up the upstream parks for a confirmation waits in MODAL.

Every answer that is not an acceptance is logged with the provider that gave it (never the request's text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from adapters import Accepted, ClientError, NeedsModal, ProviderUnusable, Retryable, SubmitOutcome, SubmitRequest
from relay.clock import Clock
from relay.config import Config
from relay.core.batch import Batcher
from relay.core.finish import Finisher
from relay.core.health import State
from relay.core.lifecycle import Lifecycle, Tracked
from relay.core.providers import ProviderPool
from relay.core.router import WITHOUT_PROMPT, rank
from relay.domain import FailureCode, JobState, ResultShape
from relay.errors import (
    AuthenticationFailed,
    InsufficientQuota,
    InternalError,
    ModelNotAllowed,
    RateLimited,
    RelayError,
    ServiceUnavailable,
)
from relay.logs import event, quoted
from relay.store.db import transient
from relay.store.jobs import Admission, JobRow, JobStore, NewJob, Sending, Submitted
from relay.store.keys import KeyRecord, KeyStore
from relay.store.slots import Slots

log = logging.getLogger("relay.jobs")
# How long a stopping process lets the holds and submits under way be answered (one takes a fraction of a second;
# one that is not answered by then is left PENDING, for an upstream hook to adopt or the pending sweep to end).
STOP_WAIT_S = 10.0
STOPPED_REASON = "the relay stopped before submitting it"
TAKEN_REASON = "another relay process ended it as never sent while this one looked gone"
# How many providers may answer that they could not upload a job's reference images before the job ends as the
# client's: a second one covers a passing fault of one account; more would send an image Discord refuses (too large,
# a format it does not take) to every provider in turn.
IMAGE_TRIES = 2


def model_not_allowed(model: str) -> ModelNotAllowed:
    """The error for a model the key may not use (its `models` policy): one text wherever the relay refuses it."""
    return ModelNotAllowed(f"This API key may not use the model {model!r}.")


class JobIdTaken(InternalError):
    """A job's id, drawn at random, is already another job's: the request is held under fresh ids instead."""


@dataclass(frozen=True, slots=True)
class Planned:
    """One job to run: the row to insert, and the upstream call that makes it (`state` is set to the job's id)."""

    job: NewJob
    request: SubmitRequest
    shape: ResultShape
    provider: str | None = None  # a follow-up: the provider that ran its parent, and no other
    modal_ok: bool = False  # a follow-up the upstream may park in MODAL until the client confirms it


@dataclass(frozen=True, slots=True)
class Outcome:
    """How submitting one job went: SUBMITTED (maybe queued upstream), MODAL, or FAILED with the ended row."""

    state: JobState
    queued: bool = False
    row: JobRow | None = None


def _ending(outcome: SubmitOutcome | None) -> tuple[FailureCode, str]:
    """The job's failure code and reason when no provider took it."""
    if isinstance(outcome, ClientError):
        return (FailureCode.BANNED if outcome.banned else FailureCode.REJECTED), outcome.description
    if isinstance(outcome, Retryable) and outcome.image:
        reason = f"its reference image could not be uploaded to Midjourney ({outcome.reason})"
        return FailureCode.REJECTED, f"{reason}; it may be too large or in a form Discord does not take"
    if isinstance(outcome, NeedsModal):
        return FailureCode.MODAL, "the upstream asked for a modal confirmation"
    if isinstance(outcome, Retryable) and outcome.sent:
        return FailureCode.UNCONFIRMED, outcome.reason
    if outcome is None:
        return FailureCode.UNAVAILABLE, "every provider that serves this mode is at capacity or set aside by its health"
    return FailureCode.UNAVAILABLE, outcome.reason if isinstance(outcome, Retryable | ProviderUnusable) else ""


def key_refused(key: KeyRecord, now: float) -> AuthenticationFailed | None:
    """Why a key may not be used at all (revoked, expired), or None."""
    if key.revoked:
        return AuthenticationFailed("This API key has been revoked.", reason="revoked")
    if key.expired(now):
        return AuthenticationFailed("This API key has expired.", reason="expired")
    return None


class _Mark:
    """A job's mark that it may have been sent (`JobStore.mark_sending_many`), written as its submit leaves: `send`
    is the request's `sending`. `refused`: the job is no longer this process's to send."""

    def __init__(self, marks: Batcher[Sending, bool], job_id: str, provider: str) -> None:
        self._marks = marks
        self._sending = Sending(job_id, provider)
        self.refused = False

    async def send(self) -> bool:
        try:
            marked = await self._marks(self._sending)
        except Exception:
            log.exception(
                "marking a job as being sent failed",
                extra={"fields": {"job": self._sending.job_id, "provider": self._sending.provider}},
            )
            return False
        self.refused = not marked
        return marked


class Submitter:
    def __init__(
        self,
        *,
        config: Config,
        store: JobStore,
        keys: KeyStore,
        pool: ProviderPool,
        lifecycle: Lifecycle,
        finisher: Finisher,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.keys = keys
        self.pool = pool
        self.lifecycle = lifecycle
        self.finisher = finisher
        self.clock = clock
        self.rng = rng or random.Random()
        self._admit: Batcher[Admission, bool] = Batcher(lambda batch: store.open_many(batch, clock.now()), "admit")
        self._mark: Batcher[Submitted, None] = Batcher(
            lambda batch: store.mark_submitted_many(batch, clock.now()), "mark-submitted"
        )
        # The jobs being submitted, each with the provider its submit is with now (None between two).
        self._submitting: dict[str, str | None] = {}
        # Holds being written, and jobs held whose submit has not started: a stopping process waits for them as for
        # the submits under way, since their submits follow at once.
        self._admitting = 0
        self._admitted: set[str] = set()
        self._idle = asyncio.Event()  # set while nothing of the above is under way (`close` waits for it)
        self._idle.set()
        self._closed = False  # stopped waiting: a held job not yet submitted is ended instead
        self._stopping_at: float | None = None  # when `close` began (the loop's time)
        # The upstream hook URL a submit to a provider names (set by the relay: core.upstream_hooks).
        self.hook_url: Callable[[str], str | None] = lambda provider: None
        # With other relay processes on the database: `max_in_flight` counted across them (`store.slots`).
        self.slots: Slots | None = None
        # Each job is marked before its submit leaves (the provider on its row), so that one whose process dies unsent
        # is told from one that may run (`JobStore.mark_sending_many`). Written while the job holds a connection to its
        # provider: never kept waiting for company.
        self._sending: Batcher[Sending, bool] = Batcher(
            lambda batch: store.mark_sending_many(batch, clock.now()), "mark-sending", patient=False
        )

    def submitting(self, job_id: str) -> bool:
        """Whether this process is submitting the job right now."""
        return job_id in self._submitting

    def submitting_to(self, job_id: str) -> str | None:
        """The provider this process is sending the job to right now, waiting for its answer; None when none is."""
        return self._submitting.get(job_id)

    async def admit(self, key: KeyRecord, jobs: list[NewJob]) -> None:
        """Hold the price of every job and insert them, or raise having held nothing: a model the key may not use
        (403), over the key's requests per minute (429 with Retry-After; counted in the database, so across relay
        processes), quota short (429), key revoked or expired (401), the process stopping (503); `JobIdTaken`
        when a job's id is another job's (its caller holds it again under fresh ids)."""
        if self._closed:
            raise ServiceUnavailable("The relay is stopping; try again.", retry_after=1)
        self._admitting += 1  # from here a stopping process waits for it (and for the submits that follow)
        self._idle.clear()
        try:
            await self._hold(key, jobs)
            self._admitted.update(job.id for job in jobs)
        finally:
            self._admitting -= 1
            self._settle_idle()

    async def _hold(self, key: KeyRecord, jobs: list[NewJob]) -> None:
        for job in jobs:
            if not key.allows(job.model):
                raise model_not_allowed(job.model)
        if key.rpm is not None:
            wait = await self.keys.take_rate(key.id, self.clock.now())
            if wait is not None:
                raise RateLimited(
                    f"Rate limit reached: this API key may make {key.rpm} requests a minute. "
                    f"Try again in {int(wait)} s.",
                    retry_after=int(wait),
                )
        try:
            held = await self._admit(Admission(key.id, tuple(jobs)))
        except Exception as exc:
            if transient(exc):  # rolled back: nothing of it was written anywhere, its ids are not the matter
                raise
            taken = await self._ids_taken(key, jobs)
            if taken:  # nothing of this request was written: the ids are another's
                raise JobIdTaken("Two jobs drew the same id.") from None
            if taken is not None:  # not known: a job of those ids may be another request's, left to the sweep
                # The admission may have landed all the same (its commit made as the connection was cut, before it
                # was answered): its jobs are withdrawn now, rather than holding credits until the pending sweep.
                await self.withdraw(jobs, "its admission was not confirmed")
            raise
        if not held:
            raise await self.refusal(key, sum(job.price for job in jobs))

    async def withdraw(self, jobs: list[NewJob], reason: str) -> None:
        """Jobs held (or that may be) that are never to be submitted: ended as interrupted (only while still
        PENDING), their holds released, nothing charged. Those whose ending cannot be written are left PENDING, for
        the pending sweep to end."""
        for job in jobs:
            self._admitted.discard(job.id)
        self._settle_idle()
        endings = [Finisher.ending(job.id, False, FailureCode.INTERRUPTED, reason) for job in jobs]
        unwritten = [o for o in await self.finisher.end_many(endings) if isinstance(o, Exception)]
        if unwritten:
            log.warning(
                "jobs never to be submitted are left to the pending sweep",
                exc_info=unwritten[0],
                extra={"fields": {"jobs": len(unwritten), "reason": reason}},
            )

    async def _ids_taken(self, key: KeyRecord, jobs: list[NewJob]) -> bool | None:
        """Whether a hold that could not be written failed because a job's id is another job's; None when that
        cannot be read (the hold's own failure is raised, and no job of those ids is ended: one may be another
        request's, running)."""
        try:
            return await self.store.ids_taken(key.id, jobs)
        except Exception:  # the database is failing
            return None

    async def refusal(self, key: KeyRecord, needed: int) -> RelayError:
        current = await self.keys.get(key.id)
        if current is None:
            return AuthenticationFailed("This API key has been revoked.", reason="revoked")
        refused = key_refused(current, self.clock.now())
        if refused is not None:
            return refused
        return InsufficientQuota(
            f"You exceeded your current quota: this request needs {needed} credits "
            f"and the key has {max(0, current.available)} available."
        )

    async def submit(self, planned: Planned) -> Outcome:
        """Submit one admitted job; it is then followed to its end, parked in MODAL, or ended when none took it."""
        job_id = planned.job.id
        self._admitted.discard(job_id)
        if self._closed:  # the process stopped waiting for submits: this one is never sent
            return await self._never_sent(job_id)
        self._submitting[job_id] = None
        self._idle.clear()
        try:
            return await self._submit(planned)
        finally:
            self._submitting.pop(job_id, None)
            self._settle_idle()

    def _settle_idle(self) -> None:
        if not self._submitting and not self._admitted and not self._admitting:
            self._idle.set()

    async def _never_sent(self, job_id: str, reason: str = STOPPED_REASON) -> Outcome:
        row = await self.finisher.end(job_id, succeeded=False, error_code=FailureCode.INTERRUPTED, fail_reason=reason)
        row = row or await self.store.get(job_id)
        if row is None:
            raise InternalError("The job vanished.")
        return Outcome(row.state, row=row)

    async def _submit(self, planned: Planned) -> Outcome:
        job = planned.job
        request = replace(planned.request, state=job.id)
        tried: list[str] = []
        outcome: SubmitOutcome | None = None
        image_refusals = 0
        while self.clock.now() < job.deadline_at:
            if planned.provider is not None:
                names = [planned.provider] if not tried and planned.provider in self.pool.settings else []
            else:
                names = rank(
                    self.pool.candidates(),
                    mode=job.mode,
                    bot=job.bot,
                    exclude=tried,
                    rng=self.rng,
                    prompt_less=request.kind in WITHOUT_PROMPT,
                )
            if not names:
                break
            name = names[0]
            tried.append(name)
            limit = self.pool.settings[name].max_in_flight
            reserved = self.slots is not None and planned.provider is None and limit is not None
            trial = False  # the provider's half-open trial, taken with its slot
            if reserved:
                held, trial = await self._reserved(job.id, name, limit)
                if held is None:  # another process took it for never sent, and ends it: not sent anywhere
                    return await self._never_sent(job.id, TAKEN_REASON)
                if not held:
                    continue  # every slot is held, counting other processes' jobs: the next provider
                if not self._still_routable(name, trial):
                    # Set aside while the slot was written (it answered another job "unusable", say): this job was
                    # routed before that, and goes to the next provider instead, sending nothing here.
                    await self._give_back(job.id)
                    continue
            # The reservation marked it already; else it is marked as it leaves.
            mark = None if reserved else _Mark(self._sending, job.id, name)
            self.pool.acquire(name)
            self._submitting[job.id] = name
            try:
                outcome = await self.pool.submit(
                    name,
                    replace(
                        request,
                        notify_hook=self.hook_url(name),
                        sending=mark.send if mark is not None else None,
                    ),
                    trial=trial,
                )
            except Exception:
                # A bug, not an answer: the request may have gone out, so it is not sent elsewhere.
                log.exception("submitting failed", extra={"fields": {"job": job.id, "provider": name}})
                outcome = Retryable("the relay failed while submitting", sent=True)
            finally:
                self._submitting[job.id] = None
            if isinstance(outcome, Retryable) and outcome.withheld:
                self.pool.release(name)
                if mark is not None and mark.refused:  # another process ends it as never sent
                    return await self._never_sent(job.id, TAKEN_REASON)
                # The mark could not be written: not sent, as a process dying now would leave it ended unsent.
                outcome = Retryable("the relay could not write down the submit before sending it")
                break
            if isinstance(outcome, Retryable) and outcome.sent:
                noted = await self._noted(job.id, name)
                if noted is not None:  # unanswered, but the provider's own hook named its task: it took the job
                    event(log, "unanswered submit followed by the task its hook named", job=job.id, provider=name)
                    outcome = Accepted(noted)
            if isinstance(outcome, Accepted):
                await self._accepted(planned, name, outcome)
                return Outcome(JobState.SUBMITTED, queued=outcome.queued)
            if isinstance(outcome, NeedsModal) and planned.modal_ok:
                if await self._parked(planned, name, outcome):
                    return Outcome(JobState.MODAL)
                break
            self.pool.release(name)
            if reserved and not (isinstance(outcome, Retryable) and outcome.sent):
                await self._give_back(job.id)
            event(
                log,
                "submit not accepted",
                job=job.id,
                provider=name,
                outcome=type(outcome).__name__,
                # The adapter's own words (an HTTP status, an upstream code and description, its start only), never
                # the request.
                reason=quoted(getattr(outcome, "reason", None)),
            )
            if isinstance(outcome, ClientError | NeedsModal) or (isinstance(outcome, Retryable) and outcome.sent):
                break
            if isinstance(outcome, Retryable) and outcome.image:
                image_refusals += 1
                if image_refusals >= IMAGE_TRIES:
                    break
        code, reason = _ending(outcome)
        if self.clock.now() >= job.deadline_at:
            code, reason = FailureCode.TIMEOUT, "the job passed its deadline before a provider took it"
        row = await self.finisher.end(job.id, succeeded=False, error_code=code, fail_reason=reason)
        row = row or await self.store.get(job.id)  # already ended (a sweep, a repeated write): report it as it is
        if row is None:
            raise InternalError("The job vanished.")
        return Outcome(row.state, row=row)

    async def _noted(self, job_id: str, provider: str) -> str | None:
        """The task `provider`'s hook named for the job while its submit there waited for the answer
        (`JobStore.note_task`); None when none did (or it cannot be read)."""
        try:
            row = await self.store.get(job_id)
        except Exception:
            log.exception("reading a job's noted task failed", extra={"fields": {"job": job_id}})
            return None
        if row is None or row.state is not JobState.PENDING or row.provider != provider:
            return None
        return row.upstream_id

    async def _reserved(self, job_id: str, provider: str, limit: int | None) -> tuple[bool | None, bool]:
        """A slot of the provider reserved for the job (as `Slots.take` answers: None when the job is another
        process's now; False when none could be reserved), and whether the job holds the provider's half-open trial.
        The trial is taken first: other jobs are routed while the reservation is written, and must not take it too."""
        assert self.slots is not None and limit is not None
        health = self.pool.health[provider]
        trial = health.begin_submit()
        held: bool | None = False
        try:
            held = await self.slots.take(job_id, provider, limit, self.clock.now())
        except Exception:
            log.exception("reserving a provider slot failed", extra={"fields": {"job": job_id, "provider": provider}})
        finally:
            if trial and not held:
                health.abandon_submit()
        return held, trial

    def _still_routable(self, provider: str, trial: bool) -> bool:
        """Whether a provider whose slot a job just reserved may still be sent the job: its health lets a new job
        through, or the job holds its half-open trial (taken with the slot, and not ended since)."""
        health = self.pool.health[provider]
        self.pool.advance(provider, self.clock.now())
        return health.routable() or (trial and health.state is State.HALF_OPEN and health.trial)

    async def _give_back(self, job_id: str) -> None:
        assert self.slots is not None
        try:
            await self.slots.give_back(job_id)
        except Exception:  # the reservation lapses with the job's end or its process's lease
            log.exception("freeing a provider slot failed", extra={"fields": {"job": job_id}})

    async def _accepted(self, planned: Planned, provider: str, outcome: Accepted) -> None:
        job = planned.job
        # Read one poll interval after the upstream took it (not after that was written down): the job's time runs
        # from here.
        due_at = self.clock.now() + self.pool.poll_interval(provider)
        tracked = Tracked(
            job.id,
            job.model,
            provider,
            outcome.upstream_id,
            job.deadline_at,
            shape=planned.shape,
            due_at=due_at,
            may_wait=planned.modal_ok,
            mode=job.mode,
        )
        try:
            await self._mark(Submitted(job.id, provider, outcome.upstream_id))
        except Exception:
            # The upstream has the task: follow it anyway, so it is ended (and settled) like any other.
            log.exception("recording a submitted job failed", extra={"fields": {"job": job.id}})
        self.lifecycle.started(tracked)

    async def _parked(self, planned: Planned, provider: str, outcome: NeedsModal) -> bool:
        """Park a follow-up in MODAL: it waits for the client's `submit/modal` until `jobs.modal_timeout_s`, and
        holds no provider slot meanwhile (it runs nothing until confirmed)."""
        job = planned.job
        deadline = self.clock.now() + self.config.jobs.modal_timeout_s
        self.pool.release(provider)
        try:
            parked = await self.store.park_modal(job.id, provider, outcome.upstream_id, deadline, self.clock.now())
        except Exception:
            log.exception("recording a parked job failed", extra={"fields": {"job": job.id}})
            parked = False
        if not parked:
            return False
        tracked = Tracked(
            job.id,
            job.model,
            provider,
            outcome.upstream_id,
            deadline,
            state=JobState.MODAL,
            shape=planned.shape,
            slot=False,
            may_wait=True,
            mode=job.mode,
        )
        self.lifecycle.started(tracked)
        return True

    async def close(self) -> None:
        # A submit under way may have reached the upstream: it is let finish, so that the job is written down and
        # followed, and handed over with the other leases, rather than left PENDING (or ended as failed when the
        # HTTP clients close) while the upstream runs it. So are the holds under way and the submits of the jobs
        # held, which follow them at once. For a while: the other leases wait for this. A job held whose submit has
        # not started by then is ended (its hold released) and never sent: the process is going away.
        self._stopping_at = asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WAIT_S):
                await self._idle.wait()
        self._closed = True
        for job_id in sorted(self._admitted):
            try:
                await self._never_sent(job_id)
            except Exception:  # left PENDING: the pending sweep ends it
                log.exception("ending a job never submitted failed", extra={"fields": {"job": job_id}})
        self._admitted.clear()
        self._settle_idle()
        await self._admit.close()
        await self._sending.close()
        await self._mark.close()

    async def drain(self) -> None:
        """Wait for the submits still under way after `close` (each may have reached its upstream), up to the
        longest provider `timeout_s` from the start of `close`, by when each has its answer or its own timeout.
        The process's HTTP clients close after this: one closed under a submit the upstream took and answers late
        ended the job as failed (`unconfirmed`), its hold released, while the upstream ran the task. Answered, the
        job is written down and handed over as it is (see `Lifecycle.started`)."""
        if not self._submitting or self._stopping_at is None:
            return
        bound = max((p.timeout_s for p in self.config.providers), default=0.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._stopping_at + max(bound, STOP_WAIT_S)):
                await self._idle.wait()
        if self._submitting:
            log.warning("submits still under way as the relay stops", extra={"fields": {"jobs": len(self._submitting)}})
        await self._mark.close()
