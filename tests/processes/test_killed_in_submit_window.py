"""A relay alone on SQLite SIGKILLed while its submit of a job waits for the upstream's answer: the task is found
again by the hook call that named it, or with no hook by the provider's task list."""

from __future__ import annotations

import time
from pathlib import Path

import openai

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from adapters.simulator.hooks import HookSettings
from tests.helpers import serve, sql, wait_for
from tests.processes.helpers import SIM_SECRET, generating
from tests.processes.test_processes import PRICE, balance, relay_alone


def test_a_task_named_by_a_hook_during_its_submit_is_followed_after_a_sigkill(tmp_path: Path) -> None:
    """The upstream takes the task at once, calls the relay's hook about it, and answers the submit 4 s late; the
    relay is SIGKILLed before that answer, and the task ends upstream while it is down, so no later call names it.
    The call that came during the submit named the task: the restarted relay must follow the job to its end, and the
    SDK's retry get its image, one task upstream, charged once. The job was left PENDING, for the pending sweep to
    end ten minutes on as never sent (nothing charged) while the upstream ran it, the client waiting meanwhile."""
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, HookSettings(), late_answer_s=4)) as up:
        with relay_alone(tmp_path, up) as (config, key, relay):
            client = openai.OpenAI(base_url=relay.base + "/v1", api_key=key, max_retries=6, timeout=30)
            caller, result = generating(client, "a lighthouse sim:late-answer")
            wait_for(lambda: engine.submits == 1)
            # a call about the task came and was written down (a kill before that write leaves nothing to follow)
            wait_for(lambda: sql(config, "SELECT state, upstream_id IS NOT NULL FROM jobs") == [("PENDING", 1)])
            relay.kill()
            wait_for(lambda: not engine.all_tasks()[0].open(time.time()))  # it ends while the relay is down
            relay.start()
            caller.join(30)
            client.close()
        assert len(result) == 1 and result[0].data[0].url
        assert engine.submits == 1
        assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")]
        assert balance(config) == (10 - PRICE, 0)


def test_a_task_named_by_a_hook_during_a_submit_that_times_out_is_followed(tmp_path: Path) -> None:
    """The upstream takes the task at once and calls the relay's hook about it, but answers the submit after the
    provider's timeout_s: the submit is unanswered (it may have run), yet the provider itself named the task. The
    job must be followed to its end under that task, the image given and charged once, not ended as unconfirmed
    (refunded, the client told it may have run) while the upstream ran it."""
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, HookSettings(), late_answer_s=5)) as up:
        with relay_alone(tmp_path, up, timeout_s=2) as (config, key, relay):
            client = openai.OpenAI(base_url=relay.base + "/v1", api_key=key, max_retries=0, timeout=30)
            result = client.images.generate(model="mj-fast", prompt="a lighthouse sim:late-answer", n=1)
            client.close()
        assert result.data[0].url
        assert engine.submits == 1
        assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")]
        assert balance(config) == (10 - PRICE, 0)


def test_a_task_no_hook_named_is_found_by_its_state_after_a_sigkill(tmp_path: Path) -> None:
    """As above, but no hook call comes (the provider makes none): the job is left PENDING, marked as sent, with no
    task named. The restarted relay must look it up in the provider's list of tasks by the state its submit carried,
    once that submit is surely over, and follow it: the SDK's retry gets its image, one task upstream, charged once,
    instead of the pending sweep ending it ten minutes on as never sent while the upstream ran it."""
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, None, late_answer_s=2)) as up:
        with relay_alone(tmp_path, up, hooks=False, timeout_s=2.5, connect_timeout_s=0.5) as (config, key, relay):
            client = openai.OpenAI(base_url=relay.base + "/v1", api_key=key, max_retries=8, timeout=30)
            caller, result = generating(client, "a lighthouse sim:late-answer")
            wait_for(lambda: engine.submits == 1)
            relay.kill()
            assert sql(config, "SELECT state, provider, upstream_id FROM jobs") == [("PENDING", "up", None)]
            relay.start()
            caller.join(40)
            client.close()
        assert len(result) == 1 and result[0].data[0].url
        assert engine.submits == 1
        assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")]
        assert balance(config) == (10 - PRICE, 0)
