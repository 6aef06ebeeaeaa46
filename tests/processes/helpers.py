"""Relay processes as an operator runs them (`mj-relay serve`, one OS process each, killed with SIGKILL when a test
says so) in front of simulators served over HTTP from the test process, so that a relay's death loses nothing the
upstream holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from adapters.simulator import SimEngine
from tests.helpers import free_port, stop_process

SIM_SECRET = "a-secret-the-simulators-want"
SIGNING = "one-signing-secret-for-every-relay-process"


@dataclass
class RelayProcess:
    """One `mj-relay serve` process on a port of its own; it can be killed and started again on the same port."""

    config_file: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process, not waiting for it to answer (`wait_ready`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MJ_RELAY_")}  # the file says it all
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config_file), "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_ready(self.proc, self.base + "/readyz", self.log)

    def kill(self) -> None:
        """SIGKILL: nothing is handed over, nothing flushed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, wait_s=20)

    def terminate(self) -> None:
        """SIGTERM, not waiting for the process to end (`stop` then does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 30) -> None:
    """Until `url` answers 200; the process's output when it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in time:\n" + log.read_text()
        time.sleep(0.05)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@contextmanager
def relay_processes(configs: list[tuple[Path, int]], log_dir: Path) -> Iterator[list[RelayProcess]]:
    """The relay processes of `configs`, started side by side (each one's start-up is mostly its interpreter
    importing the relay), ready when yielded; at the end, each still running is sent SIGTERM at once, and then
    waited for (SIGKILLed if it will not go)."""
    processes = [RelayProcess(file, port, log_dir / f"relay-{i}.log") for i, (file, port) in enumerate(configs)]
    try:
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.stop()


def runs_per_job(engines: list[SimEngine]) -> dict[str, int]:
    """How many upstream tasks each relay job started, over every simulator."""
    counts: dict[str, int] = {}
    for engine in engines:
        for task in engine.all_tasks():
            if task.state is not None:
                counts[task.state] = counts.get(task.state, 0) + 1
    return counts


@contextmanager
def simulator_process(log: Path, *options: str) -> Iterator[str]:
    """`mj-relay simulate` (midjourney-proxy dialect) in its own process, so that a burst of hook calls and image
    downloads does not share a CPU-bound interpreter with the clients a test times; yields its URL."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "simulate", "--port", str(port), "--secret", SIM_SECRET, *options],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base + "/sim/stats", log)
        yield base
    finally:
        stop_process(proc, wait_s=10)


def upstream_tasks(base: str, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The simulator's tasks by id, in one read (a client each, 400 reads took 20 s of a loaded test's minute)."""
    reply = httpx.post(
        f"{base}/mj/task/list-by-condition", json={"ids": task_ids}, headers={"mj-api-secret": SIM_SECRET}, timeout=10
    )
    return {task["id"]: task for task in reply.json()}


def generating(client: openai.OpenAI, prompt: str) -> tuple[threading.Thread, list[Any]]:
    """The SDK's `images.generate` (mj-fast, one image) on a thread of its own, started; its result lands in the
    list (nothing when it raised)."""
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.append(client.images.generate(model="mj-fast", prompt=prompt, n=1)))
    caller.start()
    return caller, result
