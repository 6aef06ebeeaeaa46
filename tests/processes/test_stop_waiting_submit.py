"""A submit whose client is still waiting for it when the relay's graceful shutdown (`server.graceful_shutdown_s`)
ends: the job is held and with its upstream, and goes on after the stop (`Submitter.drain`), so its client must be
told where to find it, not to start it again."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from tests.helpers import sql, wait_for
from tests.processes.test_processes import PRICE, balance
from tests.processes.test_stop_slow_submit import stopping_relay

PROMPT = "a lighthouse sim:late-answer"
OPENAI_REQUESTS = {
    "/v1/images/generations": {"model": "mj-fast", "prompt": PROMPT, "n": 1},
    "/v1/chat/completions": {"model": "mj-fast", "messages": [{"role": "user", "content": PROMPT}]},
}


def test_submits_still_with_their_upstream_at_the_stop_are_answered_so_that_none_runs_twice(tmp_path: Path) -> None:
    """The graceful shutdown (1 s) ends while the upstream has three tasks and answers each `LATE_S` later (one
    stop for the three surfaces: each stop waits out the relay's wait for submits).

    A native submit was answered 503 `Retry-After: 1`, and a midjourney-proxy client (New API) that retries it
    started and paid for a second job, as the native surface keeps no retry record. It is told the task is queued
    (22) with its id instead, and reads it to its end from the next start. An image and a chat request are told 503
    (`Retry-After: 1`), and their SDK's retry (`x-stainless-retry-count: 1`, the same body) to the next start
    follows the job the first attempt started, which the stop handed over, rather than starting a second one. One
    upstream task and one charge each."""
    with stopping_relay(tmp_path) as (engine, config, key, relay):
        native_headers = {"mj-api-secret": key}
        answers: dict[str, httpx.Response] = {}

        def ask(relay_base: str, path: str, retry: int) -> httpx.Response:
            headers = {"authorization": f"Bearer {key}", "x-stainless-retry-count": str(retry)}
            return httpx.post(relay_base + path, json=OPENAI_REQUESTS[path], headers=headers, timeout=60)

        native = relay.base + "/mj/submit/imagine"
        callers = [
            threading.Thread(
                target=lambda: answers.setdefault(
                    "native", httpx.post(native, json={"prompt": PROMPT}, headers=native_headers, timeout=60)
                )
            ),
            *(
                threading.Thread(target=lambda path=path: answers.setdefault(path, ask(relay.base, path, 0)))
                for path in OPENAI_REQUESTS
            ),
        ]
        for caller in callers:
            caller.start()
        wait_for(lambda: engine.submits == 3)
        relay.terminate()
        for caller in callers:
            caller.join(30)
        relay.stop()
        assert answers["native"].status_code == 200, answers["native"].text
        assert answers["native"].json()["code"] == 22
        job_id = answers["native"].json()["result"]
        assert (job_id,) in sql(config, "SELECT id FROM jobs")
        for path in OPENAI_REQUESTS:
            assert answers[path].status_code == 503, answers[path].text
            assert answers[path].headers["retry-after"] == "1"
        relay.start()  # follows the jobs it handed over
        fetch = relay.base + f"/mj/task/{job_id}/fetch"
        for path in OPENAI_REQUESTS:
            retried = ask(relay.base, path, 1)
            assert retried.status_code == 200, retried.text
            assert retried.json()["data" if "images" in path else "choices"]
        wait_for(
            lambda: httpx.get(fetch, headers=native_headers).json()["status"] in ("SUCCESS", "FAILURE"), timeout=15
        )
        assert httpx.get(fetch, headers=native_headers).json()["status"] == "SUCCESS"
    assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")] * 3
    assert engine.submits == 3
    assert balance(config) == (10 - 3 * PRICE, 0)
