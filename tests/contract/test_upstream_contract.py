"""One contract, every dialect: the in-process simulator, and the three HTTP adapters against the simulator served
over loopback in their dialect. Time is the simulator's injected clock, moved by hand."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from adapters import (
    Accepted,
    ClientError,
    ProviderUnusable,
    Retryable,
    TaskStatus,
    UpstreamUnavailable,
)
from adapters.simulator import SimEngine, SimSettings, build_sim_app
from adapters.simulator.engine import PROGRESS_STEPS
from relay.core.maybe_sent import LIST_CUT_AT
from tests.contract.worlds import HTTP_DIALECTS, SECRET, Env, http_upstream, imagine, world
from tests.helpers import FakeClock, bound_socket, serve

pytestmark = pytest.mark.anyio


async def accepted(env: Env, prompt: str, mode: str = "fast") -> str:
    outcome = await env.upstream.submit(imagine(prompt, mode))
    assert isinstance(outcome, Accepted), outcome
    return outcome.upstream_id


async def test_a_task_goes_from_submitted_through_progress_to_success(env: Env) -> None:
    task_id = await accepted(env, "a cat --ar 3:2 --fast")
    view = await env.upstream.fetch(task_id)
    assert view is not None
    assert (view.status, view.progress, view.state) == (TaskStatus.SUBMITTED, 0, "job_contract")

    env.clock.advance(5)
    view = await env.upstream.fetch(task_id)
    assert view is not None and view.status is TaskStatus.IN_PROGRESS and 0 < view.progress < 100

    env.clock.advance(5)
    view = await env.upstream.fetch(task_id)
    assert view is not None
    assert (view.status, view.progress) == (TaskStatus.SUCCESS, 100)
    assert view.image_url and view.finish_time
    assert [b.label for b in view.buttons[:4]] == ["U1", "U2", "U3", "U4"]

    grid = Image.open(io.BytesIO(await env.upstream.download(view.image_url)))
    assert grid.format == "PNG"
    assert grid.size == (64, 42)  # two 32x21 tiles a side: 3:2


async def test_progress_moves_in_jumps_and_never_back(env: Env) -> None:
    task_id = await accepted(env, "a dog --fast")
    seen = []
    for _ in range(20):
        env.clock.advance(0.45)
        view = await env.upstream.fetch(task_id)
        assert view is not None
        if view.status is TaskStatus.IN_PROGRESS:
            seen.append(view.progress)
    assert seen == sorted(seen)
    assert set(seen) <= set(PROGRESS_STEPS) and len(set(seen)) >= 4


async def test_the_prompt_flag_sets_the_mode_everywhere(env: Env) -> None:
    task_id = await accepted(env, "a slow river --relax", mode="relax")
    env.clock.advance(15)
    view = await env.upstream.fetch(task_id)
    assert view is not None and view.status is TaskStatus.IN_PROGRESS  # a fast job would be done by now
    env.clock.advance(15)
    view = await env.upstream.fetch(task_id)
    assert view is not None and view.status is TaskStatus.SUCCESS


@pytest.mark.parametrize("dialect", ["midjourney-proxy", "mj-v1"])
async def test_dialects_with_their_own_mode_field_carry_the_mode_without_a_flag(dialect: str) -> None:
    clock = FakeClock()
    engine = SimEngine(SimSettings(fast_s=10, relax_s=30), now=clock.now)
    with serve(build_sim_app(engine, dialect, SECRET)) as base:  # type: ignore[arg-type]
        upstream = http_upstream(dialect, base)
        outcome = await upstream.submit(imagine("no flag here", mode="relax"))
        assert isinstance(outcome, Accepted)
        clock.advance(15)
        view = await upstream.fetch(outcome.upstream_id)
        assert view is not None and view.status is TaskStatus.IN_PROGRESS
        await upstream.aclose()


async def test_an_unknown_id_is_none_on_fetch_and_left_out_of_batches(env: Env) -> None:
    known = await accepted(env, "a fish")
    assert await env.upstream.fetch("1234567890") is None
    views = await env.upstream.fetch_many([known, "1234567890"])
    assert [v.upstream_id for v in views] == [known]


async def test_a_failed_task_reports_its_reason(env: Env) -> None:
    task_id = await accepted(env, "a bridge sim:fail")
    env.clock.advance(6)
    view = await env.upstream.fetch(task_id)
    assert view is not None
    assert view.status is TaskStatus.FAILURE and view.fail_reason and not view.banned


async def test_a_task_the_upstream_forgets_disappears(env: Env) -> None:
    task_id = await accepted(env, "a ghost sim:lose")
    env.clock.advance(2)
    assert await env.upstream.fetch(task_id) is None
    assert await env.upstream.fetch_many([task_id]) == []


async def test_a_banned_prompt_is_a_client_error(env: Env) -> None:
    outcome = await env.upstream.submit(imagine("something forbidden"))
    assert isinstance(outcome, ClientError) and outcome.banned


async def test_a_task_taken_into_the_queue_is_accepted_and_waits_in_not_start(env: Env) -> None:
    outcome = await env.upstream.submit(imagine("a tree sim:queued"))
    assert isinstance(outcome, Accepted)
    assert outcome.queued is (env.dialect != "new-api")  # new-api answers its 22s as 1
    view = await env.upstream.fetch(outcome.upstream_id)
    assert view is not None and view.status is TaskStatus.NOT_START
    env.clock.advance(10)
    view = await env.upstream.fetch(outcome.upstream_id)
    assert view is not None and view.status is TaskStatus.SUCCESS


@pytest.mark.parametrize("trigger", ["sim:queue-full", "sim:no-account"])
async def test_a_full_or_accountless_upstream_is_retryable_and_nothing_was_started(env: Env, trigger: str) -> None:
    outcome = await env.upstream.submit(imagine(f"a tree {trigger}"))
    assert isinstance(outcome, Retryable) and not outcome.sent


async def test_an_upstream_fault_is_retryable(env: Env) -> None:
    outcome = await env.upstream.submit(imagine("a tree sim:error"))
    assert isinstance(outcome, Retryable)


async def test_probe_answers(env: Env) -> None:
    assert await env.upstream.probe() is True


@pytest.mark.parametrize("dialect", HTTP_DIALECTS)
async def test_wrong_credentials_make_the_provider_unusable(dialect: str) -> None:
    engine = SimEngine()
    with serve(build_sim_app(engine, dialect, SECRET)) as base:  # type: ignore[arg-type]
        upstream = http_upstream(dialect, base, secret="wrong-secret")
        assert isinstance(await upstream.submit(imagine("a cat")), ProviderUnusable)
        assert await upstream.probe() is False
        with pytest.raises(UpstreamUnavailable):
            await upstream.fetch_many(["1"])
        await upstream.aclose()
    assert engine.submits == 0


@pytest.mark.parametrize("dialect", HTTP_DIALECTS)
async def test_an_unreachable_provider_is_retryable_before_sending(dialect: str) -> None:
    sock = bound_socket()  # bound, never listening: connections are refused
    upstream = http_upstream(dialect, f"http://127.0.0.1:{sock.getsockname()[1]}")
    try:
        outcome = await upstream.submit(imagine("a cat"))
        assert isinstance(outcome, Retryable) and not outcome.sent
        assert await upstream.probe() is False
        with pytest.raises(UpstreamUnavailable):
            await upstream.fetch("1")
        with pytest.raises(UpstreamUnavailable):
            await upstream.download("/cdn/1.png")
    finally:
        await upstream.aclose()
        sock.close()


async def test_batches_respect_the_dialect_cap() -> None:
    clock = FakeClock()
    engine = SimEngine(SimSettings(fast_s=10), now=clock.now)
    with serve(build_sim_app(engine, "mj-v1", SECRET)) as base:
        upstream = http_upstream("mj-v1", base, batch_size=1000)  # the dialect caps batches at 100
        ids = [await accepted(Env("mj-v1", upstream, engine, clock), f"cat {i}") for i in range(150)]
        views = await upstream.fetch_many(ids)
        assert sorted(v.upstream_id for v in views) == sorted(ids)
        await upstream.aclose()


async def test_download_of_a_foreign_url_fails_cleanly(env: Env) -> None:
    url = "sim://elsewhere/1.png" if env.dialect == "simulator" else env.base + "/cdn/404.png"
    with pytest.raises(UpstreamUnavailable):
        await env.upstream.download(url)


async def test_the_dialects_that_list_their_tasks_list_each_with_its_state(env: Env) -> None:
    """midjourney-proxy lists its tasks (`GET task/list`, newest first, each with the state its submit carried), so
    a submit never answered is found again by its state. new-api and /v1/mj look tasks up by their ids only: no list
    (and nothing is asked of them)."""
    first = await env.upstream.submit(imagine("a lantern", state="job_first"))
    env.clock.advance(3)
    second = await env.upstream.submit(imagine("a lamp", state="job_second"))
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    reads = env.engine.reads
    listed = await env.upstream.list_tasks()
    if env.dialect in ("new-api", "mj-v1"):
        assert listed is None and env.engine.reads == reads
        return
    assert listed is not None and listed.count == 2 and listed.unreadable == frozenset()
    assert [(view.upstream_id, view.state) for view in listed.views] == [
        (second.upstream_id, "job_second"),
        (first.upstream_id, "job_first"),
    ]
    assert [view.status for view in listed.views] == [TaskStatus.SUBMITTED, TaskStatus.IN_PROGRESS]
    assert listed.views[1].submit_time == int((env.clock.now() - 3) * 1000)


async def test_a_trueai_like_task_list_holds_the_newest_100_tasks() -> None:
    async with world("midjourney-proxy") as env:
        for i in range(101):
            env.clock.advance(1)
            assert isinstance(await env.upstream.submit(imagine(f"a star {i}", state=f"job_{i}")), Accepted)
        listed = await env.upstream.list_tasks()
        assert listed is not None and listed.count == LIST_CUT_AT
        assert [view.state for view in listed.views] == [f"job_{i}" for i in range(100, 0, -1)]


async def test_a_midjourney_proxy_server_without_a_task_list_is_not_asked_as_one() -> None:
    """A server of the dialect that answers 404 there (an older build, a gateway) has no list."""
    async with world("new-api") as env:  # serves no task/list; read through the midjourney-proxy adapter
        upstream = http_upstream("midjourney-proxy", env.base)
        try:
            assert await upstream.list_tasks() is None
        finally:
            await upstream.aclose()
