"""`mj-relay serve --port 0` takes any free port: what the relay says of its own address (the links in the client
hooks of the tasks it adopts, when no `server.public_url` is set) names the port it took, not 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from relay.config import Config
from tests.helpers import Receiver, create_key, serve, sql, stop_process, wait_for
from tests.processes.helpers import SIGNING, SIM_SECRET, wait_ready, write_config

LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


def start_on_any_port(config_file: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MJ_RELAY_")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config_file), "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while not (found := LISTENING.findall(log.read_bytes())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = int(found[0])
        wait_ready(proc, f"http://127.0.0.1:{port}/readyz", log)
    except BaseException:  # a process that did not come up is not left running
        stop_process(proc)
        raise
    return proc, port


def test_the_hooks_of_an_adopted_task_link_to_the_port_the_relay_took(tmp_path: Path) -> None:
    engine = SimEngine(SimSettings(fast_s=3.0, tile_px=16))
    receiver = Receiver()
    with serve(build_sim_app(engine, "midjourney-proxy", SIM_SECRET, None)) as up, serve(receiver.app()) as hooks:
        settings = {
            "data_dir": str(tmp_path / "data"),
            "server": {"log_level": "info"},
            "images": {"signing_secret": SIGNING},
            "api": {"references": {"allow_private": True}},
            "providers": [{"name": "up", "dialect": "midjourney-proxy", "base_url": up, "secret": SIM_SECRET}],
            "jobs": {"poll_interval_s": 0.5},
        }
        config = Config.model_validate(settings)
        file = write_config(tmp_path / "relay.yaml", settings)
        key = create_key(config, quota=10)
        first, port = start_on_any_port(file, tmp_path / "first.log")
        try:
            reply = httpx.post(
                f"http://127.0.0.1:{port}/mj/submit/imagine",
                headers={"mj-api-secret": key},
                json={"prompt": "a lighthouse", "notifyHook": hooks + "/ok"},
                timeout=10,
            ).json()
            task_id = reply["result"]
            wait_for(lambda: sql(config, "SELECT state FROM jobs") == [("SUBMITTED",)])
            first.kill()
            first.wait(10)
            second, port = start_on_any_port(file, tmp_path / "second.log")
            try:
                wait_for(lambda: any(t["status"] == "SUCCESS" for t in receiver.tasks(task_id)), timeout=30)
                ended = next(t for t in receiver.tasks(task_id) if t["status"] == "SUCCESS")
                assert ended["imageUrl"].startswith(f"http://127.0.0.1:{port}/files/{task_id}/grid.png?")
                assert httpx.get(ended["imageUrl"], timeout=10).status_code == 200
            finally:
                stop_process(second)
        finally:
            stop_process(first)
