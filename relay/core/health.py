"""Provider health: one pure state machine per provider. No I/O; the time is always passed in.

    healthy    ──(one unusable answer; `errors_to_cool` submits, or reads, failed in a row; an error rate of
                 `error_rate` or more over `rate_window_s`, once the window holds `rate_min_calls` calls)──▶ cooling
    cooling    ──(the cool-down is over)──▶ half-open
    half-open  ──(the trial submit worked)──▶ healthy
    half-open  ──(the trial submit failed)──▶ cooling, for `backoff` times as long (at most `max_cooldown_s`)
    any        ──(`probes_to_down` failed probes in a row)──▶ down
    down       ──(a probe answered)──▶ half-open

Routing skips `cooling` and `down` providers; a `half-open` one takes one job at a time (the trial) until a trial
decides. Passive signals (`Signal`) are what the provider's answers to real calls say: a submit taken or refused
for its own content (`OK`), a submit not taken or a status read or download that failed (`ERROR`), an answer that
says the provider cannot serve anything now (`UNUSABLE`). They move a healthy provider only; once it is set aside,
only a trial (a submit in half-open) and probes move it, so a provider that answers status reads but takes no job
(no balance) cannot talk its way back. Probes move every state: they are the only way out of `down`.

A cool-down lasts `cooldown_s * backoff ** strikes`, capped; `strikes` counts the cool-downs since the provider
was last healthy for `backoff_reset_s`, so a provider that keeps failing soon after each recovery is set aside for
longer each time rather than flapping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum, StrEnum

from adapters import Accepted, ClientError, NeedsModal, ProviderUnusable, Retryable, SubmitOutcome
from relay.config import HealthConfig
from relay.logs import quoted

__all__ = ["STATES", "Health", "HealthConfig", "Signal", "State", "Transition", "submit_signal"]

# The error-rate window is kept as this many buckets of counts, so its memory is fixed however busy the provider.
WINDOW_BUCKETS = 12


class State(StrEnum):
    HEALTHY = "healthy"
    COOLING = "cooling"
    HALF_OPEN = "half-open"
    DOWN = "down"


STATES: tuple[State, ...] = tuple(State)


class Signal(Enum):
    OK = "ok"
    ERROR = "error"
    UNUSABLE = "unusable"


def submit_signal(outcome: SubmitOutcome) -> tuple[Signal, str]:
    """What a submit's answer says about the provider, and in the adapter's words why."""
    if isinstance(outcome, ProviderUnusable):
        return Signal.UNUSABLE, outcome.reason
    if isinstance(outcome, Retryable) and outcome.image:
        # The request's own images could not be uploaded: the provider answered, as it does a request refused for
        # its content. Counted as an error, one client's image sent a few times would set every provider aside.
        return Signal.OK, ""
    if isinstance(outcome, Retryable):
        # Not taken (refused connection, 429/5xx before it was taken, queue full, no account) or maybe taken
        # without an answer (a timeout, a broken answer): either way the provider did not do its job.
        return Signal.ERROR, outcome.reason
    assert isinstance(outcome, Accepted | NeedsModal | ClientError)
    return Signal.OK, ""


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    at: float
    reason: str
    until: float | None = None  # a cool-down's end


class Health:
    """The health of one provider."""

    def __init__(self, policy: HealthConfig, now: float) -> None:
        self.policy = policy
        self.state = State.HEALTHY
        self.since = now
        self.reason = ""
        self.until: float | None = None
        self.trial = False  # a half-open provider's trial submit is under way
        self.strikes = 0  # cool-downs since the provider was last stable
        self.recovered_at: float | None = None
        # Errors in a row, of submits (True) and of reads (False: status reads, downloads, probes) apart: a provider
        # that takes no job (its account stuck, every submit timing out) while its old jobs' images still download
        # is not cleared by those downloads.
        self.errors_in_row: dict[bool, int] = {True: 0, False: 0}
        self.probe_failures = 0
        self.last_probe: float | None = None
        self._bucket_s = policy.rate_window_s / WINDOW_BUCKETS
        self._window: deque[list[int]] = deque()  # [bucket number, calls, errors], oldest first

    # -- what routing asks ---------------------------------------------------------------------------------------

    def routable(self) -> bool:
        """Whether a new job may be routed here (call `advance` first, so a cool-down that is over counts)."""
        return self.state is State.HEALTHY or (self.state is State.HALF_OPEN and not self.trial)

    def begin_submit(self) -> bool:
        """A submit is about to be sent (or a job routed here is being readied for one): in half-open, it is the
        trial, and no other job is routed here meanwhile. Whether this call took the trial (False when one was
        under way already, or the provider is not half-open)."""
        if self.state is State.HALF_OPEN and not self.trial:
            self.trial = True
            return True
        return False

    def abandon_submit(self) -> None:
        """The submit ended without an answer that says anything about the provider (a bug in the relay)."""
        self.trial = False

    # -- signals -------------------------------------------------------------------------------------------------

    def advance(self, now: float) -> list[Transition]:
        """What time alone changes: a cool-down that is over lets a trial through."""
        if self.state is State.COOLING and self.until is not None and now >= self.until:
            return [self._go(State.HALF_OPEN, now, "the cool-down is over")]
        return []

    def observe(self, signal: Signal, now: float, reason: str = "", *, submit: bool = False) -> list[Transition]:
        """A passive signal: what the answer to one real call (a submit when `submit`, else a read) says."""
        moved = self.advance(now)
        if self.state is State.HEALTHY:
            return moved + self._healthy(signal, now, reason, submit=submit)
        if self.state is State.HALF_OPEN and submit:
            self.trial = False
            if signal is Signal.OK:
                self.recovered_at = now
                return [*moved, self._go(State.HEALTHY, now, "a trial submit was taken")]
            return [*moved, self._cool(now, f"the trial failed: {reason}" if reason else "the trial failed")]
        return moved  # set aside: only a trial or a probe moves it

    def probed(self, ok: bool, now: float) -> list[Transition]:
        """An active probe's result."""
        self.last_probe = now
        moved = self.advance(now)
        if ok:
            self.probe_failures = 0
            if self.state is State.DOWN:
                return [*moved, self._go(State.HALF_OPEN, now, "a probe answered")]
            if self.state is State.HEALTHY:
                # A heartbeat is a read: one that answered ends a run of failed reads (failed heartbeats among them)
                # and counts in the error rate, as a failed one does.
                return moved + self._healthy(Signal.OK, now, "", submit=False)
            return moved
        self.probe_failures += 1
        failures = self.probe_failures
        if self.state is not State.DOWN and failures >= self.policy.probes_to_down:
            self._settle(now)
            return [*moved, self._go(State.DOWN, now, f"{failures} probes in a row failed")]
        if self.state is State.HEALTHY:
            return moved + self._healthy(Signal.ERROR, now, "a probe failed", submit=False)
        return moved

    def restore(self, state: State, since: float, reason: str, until: float | None) -> None:
        """Take up a state another run recorded (it set the provider aside, and may be right still)."""
        if state is State.HEALTHY:
            return
        self.state, self.since, self.reason = state, since, quoted(reason)
        self.until = until if state is State.COOLING else None
        if self.state is State.COOLING and self.until is None:
            self.state = State.HALF_OPEN
        self.strikes = max(self.strikes, 1)

    # -- probes --------------------------------------------------------------------------------------------------

    def probe_at(self) -> float | None:
        """When the next probe is due: every `probe_interval_s` while set aside, every `heartbeat_s` (if any) while
        healthy; None for none."""
        every = self.policy.heartbeat_s if self.state is State.HEALTHY else self.policy.probe_interval_s
        if every is None:
            return None
        last = self.last_probe if self.last_probe is not None else -float("inf")
        if self.state is State.DOWN and self.last_probe is None:
            return self.since  # taken up from another run: probe at once
        return max(last, self.since) + every

    def wake_at(self) -> float | None:
        """The next moment time alone matters: a probe due, or a cool-down's end."""
        times = [t for t in (self.probe_at(), self.until if self.state is State.COOLING else None) if t is not None]
        return min(times) if times else None

    # -- the moves -----------------------------------------------------------------------------------------------

    def _healthy(self, signal: Signal, now: float, reason: str, *, submit: bool) -> list[Transition]:
        if signal is Signal.UNUSABLE:
            return [self._cool(now, reason or "the provider said it cannot serve")]
        calls, errors = self._count(now, signal is Signal.ERROR)
        if signal is Signal.OK:
            self.errors_in_row[submit] = 0
            return []
        self.errors_in_row[submit] += 1
        policy = self.policy
        if (in_row := self.errors_in_row[submit]) >= policy.errors_to_cool:
            kind = "submit" if submit else "read"
            return [self._cool(now, f"{in_row} {kind} errors in a row, the last: {reason}")]
        if calls >= policy.rate_min_calls and errors >= policy.error_rate * calls:
            return [self._cool(now, f"{errors} of {calls} calls failed, the last: {reason}")]
        return []

    def _count(self, now: float, error: bool) -> tuple[int, int]:
        """Record one call in the window; the calls and errors it now holds."""
        bucket = int(now // self._bucket_s)
        while self._window and self._window[0][0] <= bucket - WINDOW_BUCKETS:
            self._window.popleft()
        if not self._window or self._window[-1][0] != bucket:
            self._window.append([bucket, 0, 0])
        self._window[-1][1] += 1
        self._window[-1][2] += int(error)
        return sum(b[1] for b in self._window), sum(b[2] for b in self._window)

    def _cool(self, now: float, reason: str) -> Transition:
        policy = self.policy
        self._settle(now)
        cooldown = min(policy.max_cooldown_s, policy.cooldown_s * policy.backoff**self.strikes)
        self.strikes += 1
        return self._go(State.COOLING, now, reason, until=now + cooldown)

    def _settle(self, now: float) -> None:
        """Before a provider is set aside (cooled, or taken down by its probes): one that stayed healthy
        `backoff_reset_s` since it last recovered starts its backoff over, whichever way it leaves `healthy` (one
        its heartbeats take down then cools for the first cool-down again if its next trial fails)."""
        if self.state is State.HEALTHY and (
            self.recovered_at is None or now - self.recovered_at >= self.policy.backoff_reset_s
        ):
            self.strikes = 0  # stable long enough: the backoff starts over

    def _go(self, state: State, now: float, reason: str, until: float | None = None) -> Transition:
        moved = Transition(self.state, state, now, quoted(reason), until)
        self.state, self.since, self.reason, self.until = state, now, moved.reason, until
        self.trial = False
        if state is State.HEALTHY:
            self.probe_failures = 0  # failed probes of an earlier episode do not count towards the next one
        else:
            self.errors_in_row = {True: 0, False: 0}
            self._window.clear()
        return moved
