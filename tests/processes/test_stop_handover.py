"""What a relay stopped with SIGTERM hands over to the other: a job whose submit is still with the upstream, and a
job parked in MODAL."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers import sql, wait_for
from tests.processes.test_processes import (
    PRICE,
    balance,
    native,
    park_a_variation,
    ran_once_to_its_end_at_the_second,
    two_relays,
)


@pytest.mark.postgres
def test_sigterm_during_a_submit_hands_the_job_over_instead_of_losing_it(tmp_path: Path) -> None:
    """The first relay is stopped (SIGTERM) while its submit of a job is with the upstream, which took the task but
    answers late (`sim:late-answer`, 3 s; the relay waits 1 s for requests under way). The upstream runs the task:
    the job must be written down and handed over, so the second relay follows it to its end (SUCCEEDED, charged
    once), not left PENDING or ended as failed while the upstream ran it."""
    server = {"public_url": "http://127.0.0.1:1", "log_level": "info", "graceful_shutdown_s": 1}
    with two_relays(tmp_path, "--fast-s", "1", lease_s=30, sections={"server": server}) as pair:
        native = {"mj-api-secret": pair.key}
        answers: list[httpx.Response | Exception] = []

        def submit() -> None:
            try:
                answers.append(
                    httpx.post(
                        pair.first.base + "/mj/submit/imagine",
                        json={"prompt": "a lighthouse sim:late-answer"},
                        headers=native,
                        timeout=30,
                    )
                )
            except Exception as exc:  # the relay went away before answering
                answers.append(exc)

        caller = threading.Thread(target=submit)
        caller.start()
        wait_for(lambda: httpx.get(pair.upstream + "/sim/stats").json()["submits"] == 1, timeout=10)
        pair.first.stop()  # SIGTERM, while the submit waits for its answer
        caller.join(30)
        # written down as taken before the leases were handed over (not left PENDING, nor failed as never sent)
        assert sql(pair.config, "SELECT state FROM jobs") == [("SUBMITTED",)]
        wait_for(lambda: sql(pair.config, "SELECT state FROM jobs")[0][0] in ("SUCCEEDED", "FAILED"), timeout=15)
        rows = sql(pair.config, "SELECT state, error_code, fail_reason, owner IS NOT NULL FROM jobs")
        assert rows[0][0] == "SUCCEEDED", rows
        assert httpx.get(pair.upstream + "/sim/stats").json()["submits"] == 1
        assert balance(pair.config) == (100 - PRICE, 0)


@pytest.mark.postgres
def test_a_modal_job_handed_over_at_sigterm_is_confirmed_elsewhere_and_runs_once(tmp_path: Path) -> None:
    with two_relays(tmp_path, "--fast-s", "0.5", "--remix", lease_s=60, modal_timeout_s=60) as pair:
        task, parker = park_a_variation(pair)
        pair.first.stop()  # SIGTERM: the parked job's lease is handed over
        wait_for(lambda: sql(pair.config, "SELECT owner FROM jobs WHERE id = ?", task)[0][0] != parker, timeout=5)
        assert native(pair.second, pair.key, "/submit/modal", {"taskId": task, "prompt": "a red boat"})["code"] == 1
        ran_once_to_its_end_at_the_second(pair, task, parker)
