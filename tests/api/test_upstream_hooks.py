"""Upstream hooks through the whole relay: the simulator, over HTTP, calls the relay's hook URL on each change of a
task, once, unsigned, without retry, as midjourney-proxy does; the relay applies what it says at once, falls back
on polling when calls are lost, stays correct when they come twice or out of order, and adopts a job whose submit it
never wrote down."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from adapters.simulator.hooks import HookSettings
from relay.core.upstream_hooks import hook_token
from tests.helpers import RunningRelay, bound_socket, relay_config, running_relay, serve, sql, wait_for

SECRET = "a-hooked-upstream-secret"
SIGNING = "a-signing-secret-shared-by-the-test-and-the-relay"


@dataclass
class World:
    relay: RunningRelay
    engine: SimEngine
    upstream: str
    client: httpx.Client

    def imagine(self, prompt: str, **extra: Any) -> str:
        reply = self.client.post("/mj/submit/imagine", json={"prompt": prompt, **extra})
        assert reply.json()["code"] == 1, reply.text
        return str(reply.json()["result"])

    def task(self, task_id: str) -> dict[str, Any]:
        return self.client.get(f"/mj/task/{task_id}/fetch").json()  # type: ignore[no-any-return]


@contextmanager
def hooked(
    tmp_path: Path,
    hooks: HookSettings | None,
    *,
    poll_s: float = 30,
    dialect: str = "midjourney-proxy",
    takes_hooks: bool = True,
    **sim: Any,
) -> Iterator[World]:
    """A relay in front of one simulator over HTTP that calls hooks; polls every `poll_s` (long: hooks must do it)."""
    engine = SimEngine(SimSettings(**{"fast_s": 0.6, "tile_px": 16, **sim}))
    sock = bound_socket()
    public = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with serve(build_sim_app(engine, dialect, SECRET, hooks)) as upstream:  # type: ignore[arg-type]
        provider = {"name": "up", "dialect": dialect, "base_url": upstream, "secret": SECRET, "hooks": takes_hooks}
        config = relay_config(
            tmp_path,
            server={"public_url": public},
            images={"signing_secret": SIGNING},
            providers=[provider],
            jobs={"poll_interval_s": poll_s},
        )
        with running_relay(config, sock=sock) as relay:
            with httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30) as client:
                yield World(relay, engine, upstream, client)


def test_a_job_ends_the_moment_its_upstream_says_so_with_no_status_read(tmp_path: Path) -> None:
    with hooked(tmp_path, HookSettings()) as world:
        started = time.monotonic()
        task_id = world.imagine("a hooked heron")
        wait_for(lambda: world.task(task_id)["status"] == "SUCCESS", timeout=10)
        assert time.monotonic() - started < 10  # the poll interval is 30 s: only the hooks can have done it
        assert world.engine.reads == 0
        image = world.relay.openai().images.generate(model="mj-fast", prompt="an OpenAI client's heron")
        assert image.data and image.data[0].url
        assert world.engine.reads == 0
        metrics = httpx.get(world.relay.base + "/metrics").text
        assert 'mj_relay_upstream_hooks_total{outcome="applied",provider="up"}' in metrics
        # the simulator times its calls, for the benchmark (each once answered): from the moment asked for
        wait_for(lambda: _hooks_timed(world, 0)["calls"] == _hooks_sent(world) >= 8)
        timed = _hooks_timed(world, 0)
        assert len(timed["answer_ms"]) == len(timed["wait_ms"]) == len(timed["ending_wait_ms"]) == 2
        assert _hooks_timed(world, time.time() + 60)["calls"] == 0


def test_lost_hooks_fall_back_on_polling(tmp_path: Path) -> None:
    with hooked(tmp_path, HookSettings(drop=1.0), poll_s=0.2) as world:
        task_id = world.imagine("a heron whose hooks are lost")
        wait_for(lambda: world.task(task_id)["status"] == "SUCCESS", timeout=10)
        assert world.engine.reads > 0


def test_duplicated_and_reordered_hooks_never_move_a_job_back_or_settle_it_twice(tmp_path: Path) -> None:
    settings = HookSettings(duplicate=1.0, reorder=0.5, reorder_s=0.3, seed=7)
    order = {"SUBMITTED": 0, "IN_PROGRESS": 1, "SUCCESS": 2}
    with hooked(tmp_path, settings) as world:
        task_ids = [world.imagine(f"a shuffled heron {i}") for i in range(4)]
        seen: dict[str, list[tuple[int, int]]] = {task_id: [] for task_id in task_ids}

        def done() -> bool:
            for task_id in task_ids:
                task = world.task(task_id)
                seen[task_id].append((order[task["status"]], int(task["progress"].rstrip("%") or 0)))
            return all(steps[-1][0] == order["SUCCESS"] for steps in seen.values())

        wait_for(done, timeout=15)
        for task_id, steps in seen.items():
            assert steps == sorted(steps), steps  # what was read of a task never went back
            rows = sql(world.relay.config, "SELECT state, hold_state FROM jobs WHERE id = ?", task_id)
            assert rows == [("SUCCEEDED", "captured")]

        # every change called sent twice, the late copies included, up to each task's end (whether a job was also
        # read, its calls late under load, is the subject of the tests above, not this one's); a follower woken late
        # calls only the change it sees then, so the changes are counted by the simulator
        def all_twice() -> bool:
            stats = httpx.get(world.upstream + "/sim/stats").json()
            return bool(stats["hook_endings"] == 4 and stats["hooks"] == 2 * stats["hook_changes"])

        wait_for(all_twice, timeout=10)
        assert httpx.get(world.upstream + "/sim/stats").json()["hook_changes"] >= 4 * 2  # a start and an end each
        assert world.relay.balance() == (1000 - 2 * 4, 0)
        assert all(world.task(task_id)["status"] == "SUCCESS" for task_id in task_ids)


def _hooks_sent(world: World) -> int:
    return int(httpx.get(world.upstream + "/sim/stats").json()["hooks"])


def _hooks_timed(world: World, since: float) -> dict[str, Any]:
    return dict(httpx.get(world.upstream + "/sim/stats", params={"since": since}).json()["hook_calls_since"])


def test_a_job_whose_submit_was_never_written_down_is_adopted_by_its_hook(tmp_path: Path) -> None:
    with hooked(tmp_path, HookSettings()) as world:
        config = world.relay.config
        key_id = sql(config, "SELECT id FROM keys WHERE name = 'test'")[0][0]
        job_id = "583920174650118322"
        now = time.time()
        sql(
            config,
            "INSERT INTO jobs (id, request_id, key_id, model, mode, bot, action, prompt, state, progress, price, "
            "hold_state, created_at, updated_at, deadline_at) VALUES (?, ?, ?, 'mj-fast', 'fast', 'MID_JOURNEY', "
            "'imagine', 'a heron --fast', 'PENDING', 0, 2, 'held', ?, ?, ?)",
            job_id,
            job_id,
            key_id,
            now,
            now,
            now + 600,
        )
        sql(config, "UPDATE keys SET held = held + 2 WHERE id = ?", key_id)
        sql(  # the hold's ledger row, written with it
            config,
            "INSERT INTO ledger (kind, key_id, job_id, amount, model, action, created_at) "
            "VALUES ('hold', ?, ?, 2, 'mj-fast', 'imagine', ?)",
            key_id,
            job_id,
            now,
        )
        # The relay "stopped" between the upstream taking the task and writing it down: the upstream has it.
        hook = f"{config.server.public_url}/hooks/up/{hook_token(SIGNING, 'up')}"
        taken = httpx.post(
            world.upstream + "/mj/submit/imagine",
            json={"prompt": "a heron --fast", "state": job_id, "notifyHook": hook},
            headers={"mj-api-secret": SECRET},
        )
        assert taken.json()["code"] == 1
        wait_for(lambda: world.task(job_id)["status"] == "SUCCESS", timeout=10)
        assert sql(config, "SELECT hold_state, provider FROM jobs WHERE id = ?", job_id) == [("captured", "up")]
        assert world.relay.balance() == (998, 0)


@pytest.mark.parametrize("token", ["", "x" * 40, hook_token("another-secret", "up")])
def test_a_hook_with_a_wrong_token_or_provider_is_a_404(tmp_path: Path, token: str) -> None:
    with hooked(tmp_path, HookSettings()) as world:
        for path in (f"/hooks/up/{token}", f"/hooks/nobody/{hook_token(SIGNING, 'nobody')}"):
            reply = httpx.post(world.relay.base + path, content=b"{}")
            assert reply.status_code in (404, 405) and reply.headers["content-type"] == "application/json"


def test_a_provider_whose_hooks_are_off_has_its_calls_refused(tmp_path: Path) -> None:
    # Its token does not change: an upstream that kept a hook URL from before (an operator turned its hooks off for
    # views it got wrong) would go on being applied.
    with hooked(tmp_path, None, takes_hooks=False) as world:
        task_id = world.imagine("a heron heard of by polling only")
        body = json.dumps({**world.task(task_id), "id": "1", "status": "SUCCESS", "state": task_id}).encode()
        reply = httpx.post(world.relay.base + f"/hooks/up/{hook_token(SIGNING, 'up')}", content=body)
        assert reply.status_code == 404 and reply.headers["content-type"] == "application/json"


def test_new_api_drops_the_hook_and_polling_does_the_work(tmp_path: Path) -> None:
    with hooked(tmp_path, HookSettings(), poll_s=0.2, dialect="new-api") as world:
        task_id = world.imagine("a new-api heron")
        wait_for(lambda: world.task(task_id)["status"] == "SUCCESS", timeout=10)
        assert world.engine.reads > 0


def test_a_call_is_taken_in_its_own_lane_or_the_ordinary_way_and_counted_as_a_request(tmp_path: Path) -> None:
    """A call with a length takes the hook lane (ahead of the middleware and the router); one sent in chunks, with
    no stated length, or one over the body limit, goes the ordinary way; both are applied, both are requests in the
    metrics and the log."""
    with hooked(tmp_path, None) as world:  # the simulator calls nothing: the test makes the calls
        hook = f"{world.relay.base}/hooks/up/{hook_token(SIGNING, 'up')}"
        first, second = world.imagine("a heron in its lane"), world.imagine("a heron in chunks")
        upstream_ids = {task_id: relay_task_upstream_id(world, task_id) for task_id in (first, second)}
        wait_for(lambda: all(finished(world, u) for u in upstream_ids.values()), timeout=10)
        cdn = world.upstream + "/cdn"  # where the simulator's images are, as its own calls name them
        bodies = {t: json.dumps(world.engine.task(u, cdn)).encode() for t, u in upstream_ids.items()}
        assert httpx.post(hook, content=bodies[first]).status_code == 204  # Content-Length: the lane

        def chunks() -> Iterator[bytes]:
            yield bodies[second][:10]
            yield bodies[second][10:]

        assert httpx.post(hook, content=chunks()).status_code == 204  # chunked: the route
        wait_for(lambda: world.task(first)["status"] == "SUCCESS", timeout=10)
        wait_for(lambda: world.task(second)["status"] == "SUCCESS", timeout=10)
        assert world.engine.reads == 0  # the calls did it (the poll interval is 30 s)
        huge = b'{"id": "' + b"x" * (world.relay.config.server.max_body_bytes + 1) + b'"}'
        assert httpx.post(hook, content=huge).status_code == 413
        metrics = httpx.get(world.relay.base + "/metrics").text
        counted = 'mj_relay_http_requests_total{method="POST",route="/hooks/{provider}/{token}",status="2xx"} 2.0'
        assert counted in metrics
        assert 'mj_relay_upstream_hooks_total{outcome="applied",provider="up"} 2.0' in metrics


def relay_task_upstream_id(world: World, task_id: str) -> str:
    return str(sql(world.relay.config, "SELECT upstream_id FROM jobs WHERE id = ?", task_id)[0][0])


def finished(world: World, upstream_id: str) -> bool:
    task = world.engine.task(upstream_id, world.upstream)
    return task is not None and task["status"] == "SUCCESS"


def test_a_call_whose_caller_hangs_up_mid_body_is_counted_as_499_in_its_lane_as_the_ordinary_way(
    tmp_path: Path,
) -> None:
    """A provider that goes away before its call's body is complete: through the route, the request is logged and
    counted with status 499, as any request whose client left; the lane, which answers calls with a stated length,
    must tell it the same way, not drop it unseen."""
    config = relay_config(tmp_path, images={"signing_secret": SIGNING})
    path = f"/hooks/sim/{hook_token(SIGNING, 'sim')}"
    route = 'mj_relay_http_requests_total{method="POST",route="/hooks/{provider}/{token}",status="4xx"}'

    def gone(framing: bytes, body: bytes) -> None:
        with socket.create_connection((host, port)) as sock:
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: relay\r\n" + framing + b"\r\n\r\n" + body)

    def counted() -> float:
        found = re.search(re.escape(route) + r" (\S+)", httpx.get(relay.base + "/metrics").text)
        return float(found.group(1)) if found else 0.0

    with running_relay(config) as relay:
        host, port = relay.base.removeprefix("http://").split(":")
        gone(b"Transfer-Encoding: chunked", b'5\r\n{"id"')  # chunked: the route
        wait_for(lambda: counted() == 1)
        gone(b"Content-Length: 50", b'{"id"')  # a stated length: the lane
        wait_for(lambda: counted() == 2)
