"""Provider health, the pure state machine: every transition, with time moved by hand."""

from __future__ import annotations

import json

import pytest

from adapters import Accepted, ClientError, NeedsModal, ProviderUnusable, Retryable
from adapters.replies import classify_submit
from relay.config import ConfigError, parse_config
from relay.core.health import Health, HealthConfig, Signal, State, Transition, submit_signal
from tests.helpers import FakeClock

POLICY = HealthConfig(
    errors_to_cool=3,
    error_rate=0.5,
    rate_window_s=60,
    rate_min_calls=10,
    cooldown_s=30,
    backoff=2,
    max_cooldown_s=200,
    backoff_reset_s=600,
    probe_interval_s=15,
    probes_to_down=3,
)


def machine(**changes: object) -> tuple[Health, FakeClock]:
    clock = FakeClock()
    return Health(POLICY.model_copy(update=changes), clock.now()), clock


def moves(transitions: list[Transition]) -> list[tuple[str, str]]:
    return [(t.old.value, t.new.value) for t in transitions]


def cool_now(health: Health, clock: FakeClock) -> None:
    health.observe(Signal.UNUSABLE, clock.now(), "HTTP 401", submit=True)
    assert health.state is State.COOLING


def to_half_open(health: Health, clock: FakeClock) -> None:
    assert health.until is not None
    clock.advance(health.until - clock.now())
    assert moves(health.advance(clock.now())) == [("cooling", "half-open")]


@pytest.mark.parametrize(
    ("outcome", "signal", "reason"),
    [
        (Accepted("1"), Signal.OK, ""),
        (NeedsModal("1"), Signal.OK, ""),
        (ClientError("banned", banned=True), Signal.OK, ""),
        (Retryable("cannot connect: ConnectError"), Signal.ERROR, "cannot connect: ConnectError"),
        (Retryable("no answer in time: ReadTimeout", sent=True), Signal.ERROR, "no answer in time: ReadTimeout"),
        (ProviderUnusable("upstream refused the credentials (HTTP 401)"), Signal.UNUSABLE, "HTTP 401"),
    ],
)
def test_what_each_submit_outcome_says(outcome: object, signal: Signal, reason: str) -> None:
    got, why = submit_signal(outcome)  # type: ignore[arg-type]
    assert got is signal and reason in why


def test_a_new_provider_is_healthy_and_routable() -> None:
    health, _ = machine()
    assert health.state is State.HEALTHY and health.routable()


def test_one_unusable_answer_cools_at_once_for_the_cooldown() -> None:
    health, clock = machine()
    (moved,) = health.observe(Signal.UNUSABLE, clock.now(), "upstream refused the credentials (HTTP 401)", submit=True)
    assert (moved.old, moved.new, moved.at) == (State.HEALTHY, State.COOLING, clock.now())
    assert moved.until == clock.now() + 30 and moved.reason == "upstream refused the credentials (HTTP 401)"
    assert not health.routable() and health.reason == moved.reason and health.since == clock.now()


def test_errors_in_a_row_cool_and_a_success_between_them_resets_the_count() -> None:
    health, clock = machine()
    for signal in (Signal.ERROR, Signal.ERROR, Signal.OK, Signal.ERROR, Signal.ERROR):
        assert health.observe(signal, clock.now(), "HTTP 502") == []
    (moved,) = health.observe(Signal.ERROR, clock.now(), "cannot connect: ConnectError")
    assert (
        moved.new is State.COOLING and moved.reason == "3 read errors in a row, the last: cannot connect: ConnectError"
    )


def test_submits_failing_in_a_row_cool_though_reads_between_them_work() -> None:
    """A provider whose account takes no job (every submit times out) while its old jobs' images still download:
    the downloads say nothing of the submits, so they do not clear the run of failed submits."""
    health, clock = machine(errors_to_cool=3, rate_min_calls=1000)
    for _ in range(2):
        assert health.observe(Signal.ERROR, clock.now(), "no answer in time", submit=True) == []
        for _ in range(3):
            assert health.observe(Signal.OK, clock.now()) == []  # downloads and status reads of older jobs
    (moved,) = health.observe(Signal.ERROR, clock.now(), "no answer in time", submit=True)
    assert moved.new is State.COOLING and moved.reason == "3 submit errors in a row, the last: no answer in time"


def test_a_taken_submit_clears_the_run_of_failed_submits_and_reads_keep_their_own() -> None:
    health, clock = machine(errors_to_cool=3, rate_min_calls=1000)
    for signal, submit in [(Signal.ERROR, True)] * 2 + [(Signal.OK, True)] + [(Signal.ERROR, True)] * 2:
        assert health.observe(signal, clock.now(), "HTTP 502", submit=submit) == []
    for _ in range(2):  # two failed reads: a run of their own
        assert health.observe(Signal.ERROR, clock.now(), "HTTP 502") == []
    assert health.state is State.HEALTHY


def test_an_error_rate_over_the_window_cools_once_the_window_holds_enough_calls() -> None:
    health, clock = machine(errors_to_cool=100)
    for _ in range(4):  # 8 calls, half of them failed: too few to judge
        assert health.observe(Signal.ERROR, clock.now(), "HTTP 500") == []
        assert health.observe(Signal.OK, clock.now()) == []
        clock.advance(1)
    assert health.observe(Signal.OK, clock.now()) == []  # 9 calls, 4 errors
    (moved,) = health.observe(Signal.ERROR, clock.now(), "HTTP 500")  # 10 calls, 5 errors
    assert moved.new is State.COOLING and moved.reason.startswith("5 of 10 calls failed")


def test_errors_older_than_the_window_no_longer_count() -> None:
    health, clock = machine(errors_to_cool=100)
    for _ in range(4):
        health.observe(Signal.ERROR, clock.now(), "HTTP 500")
        health.observe(Signal.OK, clock.now())
    clock.advance(61)
    # Counted with the 8 calls before, these would make 6 errors in 10 calls.
    assert health.observe(Signal.ERROR, clock.now(), "HTTP 500") == []
    assert health.observe(Signal.ERROR, clock.now(), "HTTP 500") == []
    assert health.state is State.HEALTHY


def test_cooling_is_not_routable_and_reads_or_errors_neither_end_nor_extend_it() -> None:
    health, clock = machine()
    cool_now(health, clock)
    until = health.until
    clock.advance(10)
    for signal in (Signal.OK, Signal.ERROR, Signal.UNUSABLE):
        assert health.observe(signal, clock.now(), "x") == []
        assert health.observe(signal, clock.now(), "x", submit=True) == []  # a follow-up pinned here
    assert health.probed(True, clock.now()) == []  # answering a probe is not taking jobs
    assert health.state is State.COOLING and health.until == until and not health.routable()
    clock.advance(19.9)
    assert health.advance(clock.now()) == [] and not health.routable()


def test_after_the_cooldown_one_trial_is_let_through_and_its_success_makes_it_healthy() -> None:
    health, clock = machine()
    cool_now(health, clock)
    to_half_open(health, clock)
    assert health.state is State.HALF_OPEN and health.routable()
    health.begin_submit()
    assert not health.routable()  # one trial at a time
    assert health.observe(Signal.OK, clock.now()) == []  # a status read decides nothing
    assert not health.routable()
    assert moves(health.observe(Signal.OK, clock.now(), submit=True)) == [("half-open", "healthy")]
    assert health.routable() and health.reason == "a trial submit was taken"


def test_an_abandoned_trial_lets_the_next_one_through() -> None:
    health, clock = machine()
    cool_now(health, clock)
    to_half_open(health, clock)
    health.begin_submit()
    health.abandon_submit()
    assert health.state is State.HALF_OPEN and health.routable()


def test_a_failed_trial_cools_again_for_longer_up_to_the_cap() -> None:
    health, clock = machine()
    cool_now(health, clock)
    cooldowns = []
    for _ in range(5):
        to_half_open(health, clock)
        health.begin_submit()
        (moved,) = health.observe(Signal.UNUSABLE, clock.now(), "no balance", submit=True)
        assert (moved.old, moved.new) == (State.HALF_OPEN, State.COOLING)
        assert moved.reason == "the trial failed: no balance"
        assert moved.until is not None
        cooldowns.append(moved.until - clock.now())
    assert cooldowns == [60, 120, 200, 200, 200]


def test_a_cooldown_that_passed_counts_when_the_next_signal_comes() -> None:
    health, clock = machine()
    cool_now(health, clock)
    clock.advance(30)
    # No one asked in between: the signal itself finds the cool-down over, then the trial's answer decides.
    assert moves(health.observe(Signal.OK, clock.now(), submit=True)) == [
        ("cooling", "half-open"),
        ("half-open", "healthy"),
    ]


def test_no_flapping_a_provider_that_fails_soon_after_each_recovery_is_set_aside_longer() -> None:
    health, clock = machine()
    spans = []
    for _ in range(4):
        (moved,) = health.observe(Signal.UNUSABLE, clock.now(), "quota_not_enough", submit=True)
        assert moved.until is not None
        spans.append(moved.until - clock.now())
        to_half_open(health, clock)
        health.observe(Signal.OK, clock.now(), submit=True)  # one job works, then it fails again
        clock.advance(5)
    assert spans == [30, 60, 120, 200]
    clock.advance(600)  # stable long enough: the backoff starts over
    (moved,) = health.observe(Signal.UNUSABLE, clock.now(), "quota_not_enough", submit=True)
    assert moved.until == clock.now() + 30


def test_failed_probes_in_a_row_take_a_provider_down_and_a_success_between_resets_them() -> None:
    health, clock = machine(cooldown_s=1000, max_cooldown_s=1000)
    cool_now(health, clock)
    assert health.probe_at() == clock.now() + 15
    for ok in (False, False, True, False, False):
        clock.advance(15)
        assert health.probed(ok, clock.now()) == []
    clock.advance(15)
    (moved,) = health.probed(False, clock.now())
    assert (moved.old, moved.new, moved.reason) == (State.COOLING, State.DOWN, "3 probes in a row failed")
    assert not health.routable() and health.until is None


def test_only_the_call_that_took_the_trial_gives_it_back() -> None:
    health, clock = machine()
    cool_now(health, clock)
    to_half_open(health, clock)
    assert health.begin_submit()  # the trial (a follow-up pinned here, say)
    assert not health.begin_submit()  # a job routed here meanwhile does not take it, so cannot give it back
    assert not health.routable()


def test_failed_probes_before_a_recovery_do_not_count_towards_down_after_it() -> None:
    health, clock = machine(cooldown_s=40)
    cool_now(health, clock)
    for _ in range(2):  # two probes fail while it cools
        clock.advance(15)
        health.probed(False, clock.now())
    to_half_open(health, clock)
    health.begin_submit()
    health.observe(Signal.OK, clock.now(), submit=True)  # the trial is taken: healthy again
    assert health.state is State.HEALTHY
    clock.advance(3 * 86_400)  # days of good service, with no probes (no heartbeat)
    cool_now(health, clock)
    clock.advance(15)
    assert health.probed(False, clock.now()) == []  # the first failed probe of this episode
    assert health.state is State.COOLING


def test_down_ignores_passive_signals_and_time_and_a_probe_brings_it_to_half_open() -> None:
    health, clock = machine()
    for _ in range(3):
        health.probed(False, clock.now())
    assert health.state is State.DOWN
    clock.advance(10_000)
    assert health.advance(clock.now()) == []
    for signal in (Signal.OK, Signal.ERROR):
        assert health.observe(signal, clock.now(), submit=True) == []
    assert health.probed(False, clock.now()) == [] and health.state is State.DOWN
    assert health.probe_at() == clock.now() + 15
    assert moves(health.probed(True, clock.now())) == [("down", "half-open")]
    assert health.routable()
    health.begin_submit()
    assert moves(health.observe(Signal.OK, clock.now(), submit=True)) == [("half-open", "healthy")]


def test_a_healthy_provider_is_probed_only_with_a_heartbeat() -> None:
    health, clock = machine()
    assert health.probe_at() is None and health.wake_at() is None
    health, clock = machine(heartbeat_s=60.0, errors_to_cool=5)
    assert health.probe_at() == clock.now() + 60
    clock.advance(60)
    assert health.probed(True, clock.now()) == [] and health.probe_at() == clock.now() + 60
    for _ in range(2):
        clock.advance(60)
        assert health.probed(False, clock.now()) == []
    clock.advance(60)
    assert moves(health.probed(False, clock.now())) == [("healthy", "down")]


def test_failed_heartbeats_count_as_errors_too() -> None:
    health, clock = machine(heartbeat_s=60.0, errors_to_cool=2)
    health.probed(False, clock.now())
    assert moves(health.probed(False, clock.now())) == [("healthy", "cooling")]
    assert health.reason.endswith("a probe failed")


def test_the_loop_wakes_for_a_probe_or_the_end_of_a_cooldown() -> None:
    health, clock = machine(probe_interval_s=100.0)
    cool_now(health, clock)
    assert health.wake_at() == clock.now() + 30  # the cool-down ends before the first probe
    to_half_open(health, clock)
    assert health.wake_at() == clock.now() + 100  # probes of a half-open provider: from when it became so


def test_a_recorded_state_is_taken_up() -> None:
    health, clock = machine()
    health.restore(State.DOWN, clock.now() - 500, "3 probes in a row failed", None)
    assert health.state is State.DOWN and health.probe_at() == clock.now() - 500  # probed at once
    health, clock = machine()
    health.restore(State.COOLING, clock.now() - 50, "HTTP 401", clock.now() - 20)
    assert moves(health.advance(clock.now())) == [("cooling", "half-open")]
    health, clock = machine()
    health.restore(State.HEALTHY, clock.now() - 50, "", None)
    assert health.state is State.HEALTHY and health.since == clock.now()


def test_long_reasons_are_cut() -> None:
    health, clock = machine()
    (moved,) = health.observe(Signal.UNUSABLE, clock.now(), "x" * 1000, submit=True)
    assert len(moved.reason) == 300 and moved.reason.endswith("…")


def test_the_health_section_has_per_provider_overrides_and_errors_name_their_path() -> None:
    config = parse_config(
        """
health: {cooldown_s: 10, probe_interval_s: 5}
providers:
  - {name: a, dialect: simulator, health: {cooldown_s: 40, heartbeat_s: 60}}
  - {name: b, dialect: simulator}
""",
        env={},
    )
    a, b = (config.health_of(p) for p in config.providers)
    assert (a.cooldown_s, a.heartbeat_s, a.probe_interval_s, a.errors_to_cool) == (40, 60, 5, 5)
    assert (b.cooldown_s, b.heartbeat_s) == (10, None)
    with pytest.raises(ConfigError) as caught:
        parse_config(
            """
health: {cooldown_s: 100, max_cooldown_s: 50, probes_to_down: 0}
providers:
  - {name: a, dialect: simulator, health: {cooldown: 3}}
""",
            env={},
        )
    assert sorted(caught.value.problems) == [
        "health.probes_to_down: Input should be greater than or equal to 1",
        "providers[0].health.cooldown: unknown key",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(
            """
health: {cooldown_s: 100, max_cooldown_s: 50}
providers:
  - {name: a, dialect: simulator, health: {cooldown_s: 700}}
  - {name: b, dialect: simulator, health: {heartbeat_s: 9}}
""",
            env={},
        )
    assert caught.value.problems == [
        "health.max_cooldown_s: 50 is shorter than cooldown_s (100)",
        "providers[0].health.max_cooldown_s: 50 is shorter than cooldown_s (700)",
    ]


def test_a_heartbeat_that_answers_ends_a_run_of_failed_reads() -> None:
    """A probe is a read: one that answered breaks the run of failed ones, as a status read that works does, so a
    provider whose heartbeat fails now and then, with answers between, is not set aside for errors "in a row"."""
    health, clock = machine(heartbeat_s=60.0, errors_to_cool=2)
    for ok in (False, True, False, True, False):
        clock.advance(60)
        assert health.probed(ok, clock.now()) == []
    assert health.state is State.HEALTHY
    clock.advance(60)
    assert moves(health.probed(False, clock.now())) == [("healthy", "cooling")]
    assert health.reason == "2 read errors in a row, the last: a probe failed"


def test_the_backoff_starts_over_after_a_stable_spell_that_ends_in_down() -> None:
    """A provider healthy for longer than `backoff_reset_s` since it last recovered starts its backoff over, whether
    it is then set aside by its answers (cooling) or by its heartbeats (down): a failed trial after that down spell
    cools it for `cooldown_s`, not for the backoff of cool-downs days before."""
    health, clock = machine(heartbeat_s=60.0, errors_to_cool=5)
    for _ in range(3):  # a bad spell: each recovery followed by a failure, the cool-downs longer each time
        cool_now(health, clock)
        to_half_open(health, clock)
        health.begin_submit()
        health.observe(Signal.OK, clock.now(), submit=True)
    assert health.state is State.HEALTHY
    clock.advance(3 * 86_400)  # then days of good service
    for _ in range(3):
        clock.advance(60)
        health.probed(False, clock.now())
    assert health.state is State.DOWN
    clock.advance(15)
    assert moves(health.probed(True, clock.now())) == [("down", "half-open")]
    health.begin_submit()
    (moved,) = health.observe(Signal.ERROR, clock.now(), "no answer in time", submit=True)
    assert (moved.new, moved.until) == (State.COOLING, clock.now() + 30)


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        # trueai up to 11.9.1, novicezk's upload (TaskService wraps the upload's answer as code 9, FAILURE)
        (200, {"code": 9, "description": "上传图片到discord失败", "result": None}),
        # trueai from 11.9.2: the images go to its own storage first
        (200, {"code": 9, "description": "上传图片到云存储异常", "result": None}),
        (200, {"code": 9, "description": "发送图片消息到discord失败", "result": None}),
        (200, {"code": 9, "description": "上传失败，未返回有效链接", "result": None}),
    ],
)
def test_a_submit_refused_because_its_images_could_not_be_uploaded_never_sets_the_provider_aside(
    status: int, answer: dict[str, object]
) -> None:
    """One client sending an image Discord refuses, again and again, must not cool a provider for everyone else."""
    outcome = classify_submit(status, json.dumps(answer, ensure_ascii=False).encode())
    health, clock = machine()
    for _ in range(3 * POLICY.errors_to_cool + POLICY.rate_min_calls):
        clock.advance(1)
        signal, reason = submit_signal(outcome)
        assert health.observe(signal, clock.now(), reason, submit=True) == []
    assert health.state is State.HEALTHY
    # A half-open provider whose trial is refused so has answered: it is working.
    cool_now(health, clock)
    to_half_open(health, clock)
    health.begin_submit()
    signal, reason = submit_signal(outcome)
    assert moves(health.observe(signal, clock.now(), reason, submit=True)) == [("half-open", "healthy")]


def test_queue_full_as_code_9_still_counts_against_the_provider() -> None:
    """trueai's code 9 also means its queue is full (told apart by its words): that is the provider's own state."""
    outcome = classify_submit(200, json.dumps({"code": 9, "description": "提交失败，队列已满，请稍后重试"}).encode())
    assert submit_signal(outcome)[0] is Signal.ERROR
