"""Upstream hooks: the `notifyHook` calls providers make when a task changes, taken in at
`/hooks/{provider}/{token}`.

Every submit to a provider with `hooks: true` names the relay's hook URL for it, when the relay knows an address
upstreams can reach (`server.public_url`). The token is an HMAC of the provider's name with the relay's signing
secret: unguessable, the same in every process that shares the secret, and rotated with it. A call is taken only
with a valid token, parsed by the provider's adapter, and applied through the lifecycle exactly as a status read
would be (`Lifecycle.hook`), so a view that does not move the job forward (a duplicate, one that arrived late)
changes nothing. midjourney-proxy makes each call once, unsigned, without retry: polling stays as the safety net,
and reads a job hooks keep current only when they have been silent for a whole interval.

A task is found by its upstream id among the jobs followed here, else by `state` (the relay's job id, which every
submit sends): a job still PENDING there — the relay stopped between the upstream taking a task and writing it
down — is adopted (written SUBMITTED with the task's id, and followed), instead of ending "interrupted" at the
pending sweep while the upstream ran it; unless its row names another provider (the one whose slot it holds while
it is sent there: a provider that refused it before knows its id too). Only midjourney-proxy lists its tasks with
their `state` (`core.maybe_sent` reads that list once the submit is surely over, minutes on); new-api and the
`/v1/mj` resellers look tasks up by their own ids only, so there hooks are the one way such a task is found again.
So a call about a job whose submit this process is still waiting on writes the task down on the job's row
(`JobStore.note_task`): should the process die before the answer, and the task's later calls all come while no
process can hear them (a short task, a slow restart), the job is claimed as a running one with its lease
(`Leases.claim_expired`) and followed to its end.

With several relay processes on one database, a call may reach a process that does not follow its job. That
process looks the job up by `state`: one followed by another live process is forwarded to it (`core.broadcast`);
one whose process is gone (its lease ran out) is claimed and followed here at once, ahead of the next adoption
round. A call about a job another process holds still PENDING (it was submitting the job) writes the task down on
the job's row and asks for an adoption round at once: if that process is gone (`store.presence`: it died in its
submit window), the round claims the job as a running one and follows it. It is also looked at again once that
process's lease runs out (a process known only by its lease), since its task's later calls may all have come
before (a short task) and nothing else knows which task it is. A process alone on its
database (SQLite) adopts such a job at once: the process holding it is its own previous run, which died.

A call is answered (204) as soon as its token is checked, and applied right after (`take`): midjourney-proxy makes
its calls from a small pool of threads (ten by default), each waiting for the answer, so a relay that answered only
after writing what a call said would hold back every later call behind its own group commits. The calls taken in
one turn of the loop are applied together, as one status read of their jobs is (a job spoken of twice: its most
advanced view); a call that reports a task still running waits while finished jobs are being delivered, at most
`PROGRESS_WAIT_MAX_S`, so that endings go first (`take`). Up to `MAX_APPLYING` calls are taken at once this way
(the server's lane asks for room when a call's headers arrive, so the calls whose bodies are still coming then are
taken beyond it: each within the body limit, held as any request's body is); beyond that a call is applied before
it is answered, which slows a provider that calls faster than the relay can apply. Nothing is lost by
answering first: the provider never retries a call, whatever the answer, and polling remains the safety net.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from adapters import TaskStatus, TaskView
from relay.clock import Clock
from relay.config import Config
from relay.core.background import cancel_all
from relay.core.lifecycle import Lifecycle, Tracked, ahead
from relay.core.providers import ProviderPool
from relay.domain import JobState
from relay.logs import event
from relay.metrics import Metrics
from relay.store.jobs import JobRow, JobStore
from relay.store.leases import Leases

log = logging.getLogger("relay.hooks")

Outcome = Literal["applied", "adopted", "forwarded", "late", "unknown", "unreadable", "failed"]
# Calls taken to be applied after their answer, at most, and the most their bodies may hold together (a call is a few
# kilobytes; one up to the body limit is applied before its answer once these are taken).
MAX_APPLYING = 1000
MAX_APPLYING_BYTES = 64_000_000
# How long after the lease of a PENDING job's process a call about the job is looked at again (`held_elsewhere`
# counts a lease as held up to its last instant).
AFTER_LEASE_S = 0.5
# A call that reports a task still running waits while finished jobs are being delivered here, at most this long,
# and is then applied with the others that waited (`take`); how often the wait checks whether the deliveries are done.
PROGRESS_WAIT_MAX_S = 0.5
PROGRESS_WAIT_CHECK_S = 0.05
# How a call says its task is running (the status as midjourney-proxy's Jackson writes it, and as Python's json does),
# and the statuses that end or park a task.
_RUNNING = (b'"status":"IN_PROGRESS"', b'"status": "IN_PROGRESS"')
_NOT_RUNNING = tuple(status.value.encode() for status in TaskStatus if status.terminal or status is TaskStatus.MODAL)


def reports_running(body: bytes) -> bool:
    """Whether a call's body says its task is running and names no status that ends or parks it, in any case and
    anywhere (a call whose prompt names one is applied as any other)."""
    if b'"IN_PROGRESS"' not in body or not (_RUNNING[0] in body or _RUNNING[1] in body):
        return False  # (an ending, the call most often taken while jobs are delivered, costs one scan)
    upper = body.upper()
    return not any(status in upper for status in _NOT_RUNNING)


# (the process that follows the job, provider, upstream id, the call's body)
Forward = Callable[[str, str, str, bytes], Awaitable[None]]


def hook_token(secret: str, provider: str) -> str:
    return hmac.new(secret.encode(), b"mj-relay upstream hook " + provider.encode(), hashlib.sha256).hexdigest()[:40]


class _Turn:
    """The calls about one task being routed, one at a time."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class UpstreamHooks:
    def __init__(
        self,
        *,
        config: Config,
        secrets: Sequence[str],
        pool: ProviderPool,
        lifecycle: Lifecycle,
        store: JobStore,
        clock: Clock,
        metrics: Metrics,
        submitting: Callable[[str], bool],
        leases: Leases | None = None,
        follow: Callable[[list[JobRow]], Awaitable[object]] | None = None,
        watch: Callable[[list[JobRow]], Awaitable[None]] | None = None,
        alone: bool = False,
        submitting_to: Callable[[str], str | None] = lambda job_id: None,
    ) -> None:
        self.config = config
        self.secrets = list(secrets)
        self.pool = pool
        self.lifecycle = lifecycle
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self._submitting = submitting  # whether this process is submitting a job right now
        self._submitting_to = submitting_to  # the provider it is sending the job to, waiting for its answer
        self.leases = leases
        self._follow = follow  # follow jobs just claimed, as adoption does (`Coordinator.follow_claimed`)
        self._watch = watch  # the client hooks of a job adopted here go on here (as adoption's do)
        self.alone = alone  # no other process on the database: a lease not this process's is a previous run's
        # Calls about PENDING jobs another process holds, looked at again when its lease runs out (by job id: the
        # provider, the most advanced view heard, its body); and the tasks that wait for that.
        self._held: dict[str, tuple[str, TaskView, bytes]] = {}
        self._after_lease: set[asyncio.Task[None]] = set()
        self.forward: Forward | None = None  # hand a call to the process that follows its job
        # Ask for an adoption round now (`Coordinator.adopt_soon`): a call named the task of a PENDING job another
        # process holds, and that process may be gone.
        self.held_elsewhere: Callable[[], None] | None = None
        # Each provider's valid tokens (one per signing secret), made once: checking a call costs no HMAC.
        # Only a provider whose hooks are on is heard: its token does not change, and an upstream that kept its hook
        # URL from before (an operator turned its hooks off for views it got wrong) would go on being applied.
        self._tokens = {
            name: [hook_token(s, name).encode() for s in self.secrets]
            for name, settings in pool.settings.items()
            if settings.hooks
        }
        self._taken: list[tuple[str, bytes]] = []  # taken this turn of the loop: its task applies them next turn
        self._waiting: list[tuple[str, bytes]] = []  # progress taken while jobs were being delivered (`take`)
        self._applying: set[asyncio.Task[None]] = set()
        self._count = 0  # calls taken and not yet applied, and their bytes
        self._closing = False  # the process is shutting down: calls forwarded to it are left to the adopter
        self._bytes = 0
        self._routing: dict[tuple[str, str], _Turn] = {}  # the tasks whose calls are being routed (`_route`)

    def url(self, provider: str) -> str | None:
        """The hook URL a submit to `provider` names; None when it gets none."""
        public = self.config.server.public_url
        settings = self.pool.settings.get(provider)
        if not public or settings is None or not settings.hooks or settings.dialect == "simulator":
            return None
        return f"{public}/hooks/{provider}/{self._tokens[provider][0].decode()}"

    def tokens(self) -> list[str]:
        """Every token a hook call is accepted with: secrets, kept out of the logs (an upstream may repeat the hook
        URL it was given in an answer the relay logs, and a token lets its holder tell the relay how jobs went)."""
        return [token.decode() for tokens in self._tokens.values() for token in tokens]

    def accepts(self, provider: str, token: str) -> bool:
        tokens = self._tokens.get(provider)
        if tokens is None:
            return False
        given = token.encode()
        return any(hmac.compare_digest(given, valid) for valid in tokens)

    def room(self, size: int) -> bool:
        """Whether a call of `size` bytes may be applied after it is answered (`take`); when not, it is applied
        first (`apply`)."""
        return self._count < MAX_APPLYING and self._bytes + size <= MAX_APPLYING_BYTES

    def take(self, provider: str, body: bytes) -> None:
        """Apply a call (its token checked, `room` asked) after it is answered. The calls taken within one turn of
        the loop are applied together, as one read of their jobs would be.

        Endings go first: a call that says its task is still running, taken while finished jobs are being delivered
        here, waits until none is (those that began after it count too; checked every `PROGRESS_WAIT_CHECK_S`), at
        most `PROGRESS_WAIT_MAX_S`, and is applied then with the others that waited (of a job spoken of more than once,
        its most advanced view; of one that ended meanwhile, nothing). When a thousand jobs finish together, those
        still running report progress all through their endings: applying each report at once would make every
        ending wait behind the reports' parsing and writes. Only what a progress bar shows comes later; a call
        that may end or park a job is never held back."""
        waits = self.lifecycle.delivering() and reports_running(body)
        queue = self._waiting if waits else self._taken
        queue.append((provider, body))
        self._count += 1
        self._bytes += len(body)
        if len(queue) == 1:  # the task starts at the next turn, with whatever this one took
            calls = queue
            work = self._apply_waiting(calls) if waits else self._apply_taken(calls)
            task = asyncio.create_task(work, name="hooks")
            self._applying.add(task)
            task.add_done_callback(lambda done: self._applied(done, calls))

    async def _apply_taken(self, calls: list[tuple[str, bytes]]) -> None:
        self._detach(calls)
        await self.apply_many(calls)

    async def _apply_waiting(self, calls: list[tuple[str, bytes]]) -> None:
        until = self.clock.now() + PROGRESS_WAIT_MAX_S
        while self.lifecycle.delivering() and not self._closing and self.clock.now() < until:
            await self.clock.sleep(min(PROGRESS_WAIT_CHECK_S, until - self.clock.now()))
        self._detach(calls)
        await self.apply_many(calls)

    def _detach(self, calls: list[tuple[str, bytes]]) -> None:
        """Calls taken from now on go to a list, and a task, of their own, not to these being applied."""
        if self._taken is calls:
            self._taken = []
        if self._waiting is calls:
            self._waiting = []

    def _applied(self, task: asyncio.Task[None], calls: list[tuple[str, bytes]]) -> None:
        """The calls' task is done (or was cancelled, even before it started): they no longer count."""
        self._applying.discard(task)
        self._detach(calls)
        self._count -= len(calls)
        self._bytes -= sum(len(body) for _, body in calls)

    async def apply(self, provider: str, body: bytes) -> Outcome:
        """Apply one call and count its outcome; a failure is logged and counted, never raised (the call was
        answered already, or its answer says nothing)."""
        return (await self.apply_many([(provider, body)]))[0]

    async def apply_many(self, calls: list[tuple[str, bytes]]) -> list[Outcome]:
        """Apply calls (provider, body) and count their outcomes. Those about jobs followed here are applied
        together, a provider's at once; the others (and all of a group that failed together) one by one. One
        call's failure is its own: logged and counted, never raised."""
        outcomes: list[Outcome] = ["failed"] * len(calls)
        known: dict[str, list[tuple[int, Tracked, TaskView]]] = {}
        alone: list[tuple[int, TaskView]] = []
        for i, (provider, body) in enumerate(calls):
            try:
                view = self.pool.upstreams[provider].parse_hook(body)
            except Exception:
                log.exception("reading an upstream hook failed", extra={"fields": {"provider": provider}})
                continue
            if view is None:
                outcomes[i] = "unreadable"
                continue
            tracked = self.lifecycle.find(provider, view.upstream_id)
            if tracked is None:
                alone.append((i, view))
            else:
                known.setdefault(provider, []).append((i, tracked, view))
        for provider, found in known.items():
            try:
                await self.lifecycle.hooks(provider, [(tracked, view) for _, tracked, view in found])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("applying upstream hooks failed", extra={"fields": {"provider": provider}})
                alone += [(i, view) for i, _, view in found]  # each on its own: only the one at fault fails
                continue
            for i, _, _ in found:
                outcomes[i] = "applied"
        if alone:  # each may read the store (a job followed elsewhere, or adopted): at once, not in turn
            routed = await asyncio.gather(*(self._alone(*calls[i], view) for i, view in alone))
            for (i, _), outcome in zip(alone, routed, strict=True):
                outcomes[i] = outcome
        for (provider, _), outcome in zip(calls, outcomes, strict=True):
            self.metrics.of(self.metrics.upstream_hooks, provider, outcome).inc()
        return outcomes

    async def _alone(self, provider: str, body: bytes, view: TaskView) -> Outcome:
        try:
            return await self._route(provider, view, body)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("applying an upstream hook failed", extra={"fields": {"provider": provider}})
            return "failed"

    async def close(self) -> None:
        """Let the calls taken be applied (they end in the lifecycle's own writes); calls forwarded from now on are
        not applied: this process hands its jobs over, and the one that adopts one reads it at once."""
        self._closing = True
        while self._applying:  # calls taken are in the hands of a task made when the first of them was
            await asyncio.gather(*self._applying, return_exceptions=True)
        await cancel_all(list(self._after_lease))  # the pending sweep of the processes left ends such a job

    async def _route(self, provider: str, view: TaskView, body: bytes) -> Outcome:
        """Apply what a call said of a task: to the job followed here, or found by its `state`. The calls about one
        task are routed in turn: a short task's calls come together, and while the first adopts (or claims) its job,
        the others, had they read the job meanwhile, would find it neither followed here nor theirs to take, and
        its end among them would be left for a read a poll interval on."""
        key = (provider, view.upstream_id)
        turn = self._routing.get(key)
        if turn is None:
            turn = self._routing[key] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                return await self._route_now(provider, view, body)
        finally:
            turn.users -= 1
            if not turn.users:
                del self._routing[key]

    async def _route_now(self, provider: str, view: TaskView, body: bytes) -> Outcome:
        tracked = self.lifecycle.find(provider, view.upstream_id)
        if tracked is not None:
            await self.lifecycle.hook(tracked, view)
            return "applied"
        if self.lifecycle.ended_here(provider, view.upstream_id):
            return "late"  # its job ended here already (a read saw the end first): nothing to apply
        if view.state and self._submitting(view.state):
            # A submit here is under way: it follows the job itself once answered. The task is written down
            # meanwhile, so that a process that claims the job after this one died before the answer follows it;
            # only when the call comes from the provider the submit waits on: another (one that refused the job
            # before knows its state) names a task that is not the job's.
            if self._submitting_to(view.state) == provider:
                await self.store.note_task(view.state, provider, view.upstream_id, self.clock.now())
            return "unknown"
        if not view.state or self.lifecycle.following(view.state):
            return "unknown"  # followed here: polling reads it
        row = await self.store.get(view.state)
        if row is None or row.state.terminal:
            return "unknown"
        if row.provider not in (None, provider):
            return "unknown"  # another provider's job (or one a slot of another holds while it is sent there)
        if row.state is not JobState.PENDING and row.upstream_id != view.upstream_id:
            return "unknown"
        now = self.clock.now()
        if row.held_elsewhere(self.store.owner, now) and not (self.alone and row.state is JobState.PENDING):
            if self.forward is None or row.owner is None:
                return "unknown"
            if row.state is JobState.PENDING:
                # Its process may have died waiting for its submit's answer: the task is written down, so that the
                # next adoption round claims the job as a running one if that process is gone (`store.presence`),
                # rather than when its lease runs out. One held by a process known only by its lease (of a release
                # before presence) is looked at again then.
                noted = await self.store.note_task(row.id, provider, view.upstream_id, now)
                if noted and self.held_elsewhere is not None:
                    self.held_elsewhere()
                self._again_after_lease(row, provider, view, body)
            await self.forward(row.owner, provider, view.upstream_id, body)  # a live process follows it
            return "forwarded"
        if row.state is JobState.PENDING:
            tracked = await self._adopt(provider, view.upstream_id, row)
            if tracked is None:
                return "unknown"
            await self.lifecycle.hook(tracked, view)
            return "adopted"
        if self.leases is None or self._follow is None:
            return "unknown"
        claimed = await self.leases.claim([row.id], now)
        if not claimed:
            return "unknown"
        await self._follow(claimed)
        tracked = self.lifecycle.find(provider, view.upstream_id)
        if tracked is None:
            return "unknown"
        await self.lifecycle.hook(tracked, view)
        event(log, "job adopted", job=row.id, provider=provider)
        return "adopted"

    def _again_after_lease(self, row: JobRow, provider: str, view: TaskView, body: bytes) -> None:
        """Look at a call about a PENDING job another process holds again once that process's lease runs out."""
        kept = self._held.get(row.id)
        if kept is None or ahead(view, kept[1]):
            self._held[row.id] = (provider, view, body)
        if kept is not None or self._closing:
            return  # already waited for (or this process hands its jobs over: the others' sweep ends it)
        task = asyncio.create_task(self._when_lease_ends(row.id, row.lease_until or 0.0), name="hooks:pending")
        self._after_lease.add(task)
        task.add_done_callback(self._after_lease.discard)

    async def _when_lease_ends(self, job_id: str, until: float) -> None:
        """Adopt a PENDING job with the task the calls about it named, once the process that held it is gone; while
        that process lives (it renews its lease), it writes the job down itself, and the job leaves PENDING."""
        try:
            while True:
                await self.clock.sleep(max(0.0, until - self.clock.now()) + AFTER_LEASE_S)
                row = await self.store.get(job_id)
                if row is None or row.state is not JobState.PENDING:
                    return
                if row.held_elsewhere(self.store.owner, self.clock.now()):
                    until = row.lease_until or until
                    continue
                provider, view, body = self._held[job_id]
                outcome = await self._route(provider, view, body)
                event(log, "pending job looked at again", job=job_id, provider=provider, outcome=outcome)
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("adopting a pending job after its lease failed", extra={"fields": {"job": job_id}})
        finally:
            self._held.pop(job_id, None)

    async def forwarded(self, provider: str, body: bytes | None, upstream_id: str) -> None:
        """A call another process received for a job this one follows: applied, or (too large to forward) the task
        is read at the next tracker round."""
        tracked = self.lifecycle.find(provider, upstream_id)
        upstream = self.pool.upstreams.get(provider)
        if tracked is None or upstream is None or self._closing:
            return  # (closing: a delivery started now would renew a lease handed over, keeping the adopter away)
        view = upstream.parse_hook(body) if body is not None else None
        if view is None or view.upstream_id != upstream_id:
            tracked.due_at = self.clock.now()
            self.lifecycle.on_follow(provider, tracked.due_at)
            return
        await self.lifecycle.hook(tracked, view)

    async def _adopt(self, provider: str, upstream_id: str, row: JobRow) -> Tracked | None:
        """A job that never got past PENDING although `provider` has its task: written SUBMITTED and followed."""
        job_id = row.id
        if await self.store.adopt(job_id, provider, upstream_id, self.clock.now()) is None:
            return None
        if self._watch is not None:  # this process holds the job now: its client hook comes from here
            try:
                await self._watch([row])
            except Exception:  # the job is this process's now: followed all the same
                log.exception("carrying on an adopted job's client hook failed", extra={"fields": {"job": job_id}})
        self.pool.acquire(provider)
        tracked = Tracked(
            job_id,
            row.model,
            provider,
            upstream_id,
            row.deadline_at,
            JobState.SUBMITTED,
            shape=row.spec.shape,
            may_wait=row.spec.follow_up,
            mode=row.mode,
        )
        self.lifecycle.started(tracked)
        event(log, "job adopted", job=job_id, provider=provider)
        return tracked
