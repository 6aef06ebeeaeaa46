"""A relay SIGKILLed after it kept a finished job's grid but before the job's ending was written: the process that
adopts the job ends it with the grid already kept, not downloaded a second time; a grid the kill left half-written
is downloaded again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from relay.config import Config
from relay.images.local import LocalBackend
from relay.images.names import key
from tests.helpers import create_key, free_port, serve, sql, wait_for
from tests.processes.helpers import SIM_SECRET, relay_processes, write_config
from tests.processes.test_processes import PRICE, balance, relay_settings


def keep_grid(config: Config, job_id: str, data: bytes, whole: bool) -> None:
    """Write a job's grid where the relay keeps it, as the killed process had: all of it, or (killed while it
    wrote the file, in place) its first half."""

    async def run() -> None:
        backend = LocalBackend(config.images_dir())
        await backend.open()
        try:
            await backend.put({key(job_id, "grid.png"): data if whole else data[: len(data) // 2]})
        finally:
            await backend.close()

    asyncio.run(run())


@pytest.mark.parametrize("whole", [True, False])
def test_an_adopted_job_whose_grid_was_kept_is_not_downloaded_again(tmp_path: Path, whole: bool) -> None:
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, None)) as up:
        port = free_port()
        settings = relay_settings(tmp_path / "data", None, up, f"http://127.0.0.1:{port}")
        settings["providers"][0]["hooks"] = False
        settings["jobs"]["poll_interval_s"] = 30.0  # the killed process never reads the task finished
        config = Config.model_validate(settings)
        file = write_config(tmp_path / "relay.yaml", settings)
        secret = create_key(config, quota=10)
        native = {"mj-api-secret": secret}
        with relay_processes([(file, port)], tmp_path) as (relay,):
            task_id = httpx.post(relay.base + "/mj/submit/imagine", json={"prompt": "a lighthouse"}, headers=native)
            job_id = task_id.json()["result"]
            ((upstream_id,),) = sql(config, "SELECT upstream_id FROM jobs WHERE id = ?", job_id)
            relay.kill()
            wait_for(lambda: not engine.all_tasks()[0].open(time.time()))
            grid = engine.image(upstream_id)
            assert grid is not None
            keep_grid(config, job_id, grid, whole)
            relay.start()
            fetch = f"{relay.base}/mj/task/{job_id}/fetch"
            wait_for(lambda: httpx.get(fetch, headers=native).json()["status"] == "SUCCESS", timeout=20)
            served = httpx.get(httpx.get(fetch, headers=native).json()["imageUrl"])
            assert served.status_code == 200 and served.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert sum(engine.downloads.values()) == (0 if whole else 1)
        assert sql(config, "SELECT state, hold_state FROM jobs") == [("SUCCEEDED", "captured")]
        assert balance(config) == (10 - PRICE, 0)
