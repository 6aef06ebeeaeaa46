"""A relay stopped (SIGTERM) while an upstream is slower to answer a submit than the stop waits for submits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from relay.config import Config
from relay.core.submit import STOP_WAIT_S
from tests.helpers import create_key, free_port, serve, sql, wait_for
from tests.processes.helpers import SIM_SECRET, RelayProcess, relay_processes, write_config
from tests.processes.test_processes import PRICE, balance, relay_settings

LATE_S = STOP_WAIT_S + 4  # within the provider's `timeout_s` (30 s), past the stop's wait for submits


@contextmanager
def stopping_relay(tmp_path: Path) -> Iterator[tuple[SimEngine, Config, str, RelayProcess]]:
    """A relay alone on SQLite whose graceful shutdown lasts 1 s, before a simulator that takes each task at once and
    answers its submit `LATE_S` later; with a key of 10 credits."""
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, None, late_answer_s=LATE_S)) as up:
        port = free_port()
        settings = relay_settings(tmp_path / "data", None, up, f"http://127.0.0.1:{port}")
        settings["server"]["graceful_shutdown_s"] = 1
        config = Config.model_validate(settings)
        file = write_config(tmp_path / "relay.yaml", settings)
        key = create_key(config, quota=10)
        with relay_processes([(file, port)], tmp_path) as (relay,):
            yield engine, config, key, relay


def test_a_submit_answered_after_the_stop_stopped_waiting_is_followed_not_refunded(tmp_path: Path) -> None:
    """A relay alone on SQLite is stopped while its submit of a job is with an upstream that took the task and
    answers `LATE_S` later: after the hand-over, within the provider's own timeout. The process closed its HTTP
    clients under the submit, which ended the job FAILED (`unconfirmed`), its hold released, while the upstream ran
    the task: an image nobody paid for. The submit must get its answer, the job be written down, and the next start
    follow it to its end, charged once."""
    with stopping_relay(tmp_path) as (engine, config, key, relay):
        body = {"prompt": "a lighthouse sim:late-answer"}
        caller = threading.Thread(
            target=lambda: httpx.post(
                relay.base + "/mj/submit/imagine", json=body, headers={"mj-api-secret": key}, timeout=60
            )
        )
        caller.start()
        wait_for(lambda: engine.submits == 1)
        relay.terminate()
        relay.stop()
        caller.join(30)
        assert sql(config, "SELECT state FROM jobs") == [("SUBMITTED",)]
        relay.start()  # follows the job it handed over
        wait_for(lambda: sql(config, "SELECT state FROM jobs")[0][0] in ("SUCCEEDED", "FAILED"), timeout=15)
    assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")]
    assert engine.submits == 1
    assert balance(config) == (10 - PRICE, 0)
