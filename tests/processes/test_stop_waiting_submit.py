"""A submit whose client is still waiting for it when the relay's graceful shutdown (`server.graceful_shutdown_s`)
ends: the job is held and with its upstream, and goes on after the stop (`Submitter.drain`), so its client must be
told where to find it, not to start it again."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from relay.config import Config
from tests.helpers import create_key, free_port, serve, sql, wait_for
from tests.processes.helpers import SIM_SECRET, relay_processes, write_config
from tests.processes.test_processes import PRICE, balance, relay_settings
from tests.processes.test_stop_slow_submit import LATE_S


def test_a_native_submit_still_with_its_upstream_at_the_stop_is_answered_its_task_id(tmp_path: Path) -> None:
    """The graceful shutdown (1 s) ends while the upstream has the task and answers `LATE_S` later. The client was
    answered 503 `Retry-After: 1`, and a midjourney-proxy client (New API) that retries it started and paid for a
    second job, as the native surface keeps no retry record. It is told the task is queued (22) with its id
    instead, and reads it to its end from the next start: one upstream task, one charge."""
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, None, late_answer_s=LATE_S)) as up:
        port = free_port()
        settings = relay_settings(tmp_path / "data", None, up, f"http://127.0.0.1:{port}")
        settings["server"]["graceful_shutdown_s"] = 1
        config = Config.model_validate(settings)
        file = write_config(tmp_path / "relay.yaml", settings)
        key = create_key(config, quota=10)
        headers = {"mj-api-secret": key}
        answers: list[httpx.Response] = []
        with relay_processes([(file, port)], tmp_path) as (relay,):
            body = {"prompt": "a lighthouse sim:late-answer"}
            caller = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(relay.base + "/mj/submit/imagine", json=body, headers=headers, timeout=60)
                )
            )
            caller.start()
            wait_for(lambda: engine.submits == 1)
            relay.terminate()
            caller.join(30)
            relay.stop()
            (answer,) = answers
            ((job_id,),) = sql(config, "SELECT id FROM jobs")
            assert answer.status_code == 200, answer.text
            assert answer.json()["code"] == 22
            assert answer.json()["result"] == job_id
            relay.start()  # follows the job it handed over
            fetch = relay.base + f"/mj/task/{job_id}/fetch"
            wait_for(lambda: httpx.get(fetch, headers=headers).json()["status"] in ("SUCCESS", "FAILURE"), timeout=15)
            assert httpx.get(fetch, headers=headers).json()["status"] == "SUCCESS"
        assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")]
        assert engine.submits == 1
        assert balance(config) == (10 - PRICE, 0)


PROMPT = "a lighthouse sim:late-answer"
OPENAI_REQUESTS = {
    "/v1/images/generations": {"model": "mj-fast", "prompt": PROMPT, "n": 1},
    "/v1/chat/completions": {"model": "mj-fast", "messages": [{"role": "user", "content": PROMPT}]},
}


@pytest.mark.parametrize("path", list(OPENAI_REQUESTS))
def test_an_openai_request_still_with_its_upstream_at_the_stop_is_followed_by_its_retry(
    tmp_path: Path, path: str
) -> None:
    """The same stop on the OpenAI surface: the client is told 503 (`Retry-After: 1`), and its SDK's retry
    (`x-stainless-retry-count: 1`, the same body) to the next start follows the job the first attempt started,
    which the stop handed over, rather than starting and charging a second one."""
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, None, late_answer_s=LATE_S)) as up:
        port = free_port()
        settings = relay_settings(tmp_path / "data", None, up, f"http://127.0.0.1:{port}")
        settings["server"]["graceful_shutdown_s"] = 1
        config = Config.model_validate(settings)
        file = write_config(tmp_path / "relay.yaml", settings)
        key = create_key(config, quota=10)
        body = OPENAI_REQUESTS[path]
        answers: list[httpx.Response] = []

        def ask(relay_base: str, retry: int) -> httpx.Response:
            headers = {"authorization": f"Bearer {key}", "x-stainless-retry-count": str(retry)}
            return httpx.post(relay_base + path, json=body, headers=headers, timeout=60)

        with relay_processes([(file, port)], tmp_path) as (relay,):
            caller = threading.Thread(target=lambda: answers.append(ask(relay.base, 0)))
            caller.start()
            wait_for(lambda: engine.submits == 1)
            relay.terminate()
            caller.join(30)
            relay.stop()
            (answer,) = answers
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "1"
            relay.start()
            retried = ask(relay.base, 1)
            assert retried.status_code == 200, retried.text
            assert retried.json()["data" if "images" in path else "choices"]
        assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")]
        assert engine.submits == 1
        assert balance(config) == (10 - PRICE, 0)
