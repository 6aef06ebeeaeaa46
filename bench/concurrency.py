"""Many concurrent image requests through one relay process against the simulator; prints figures, asserts nothing.

    .venv/bin/python bench/concurrency.py                      # 1000 requests, 2 s jobs, in-process simulator
    .venv/bin/python bench/concurrency.py --upstream http      # the simulator as its own process, over HTTP
    .venv/bin/python bench/concurrency.py --upstream http --hooks                  # ... calling the relay's hooks
    .venv/bin/python bench/concurrency.py --upstream http --hooks --hook-drop 0.2  # ... losing a fifth of them

Two lateness figures are printed. `after upstream` is how long after its upstream task finished (the HTTP
simulator's own `finishTime`) each answer was read: what polling or hooks, the download, keeping the grid, ending
the job and answering add; the targets (100 ms with hooks, a poll interval + 100 ms with some of them lost) are
about that figure. `lateness` is a request's response time minus the job's duration, which adds the time the relay
took to take the request in and submit it: with the whole burst sent at once, up to the time to take in all of it.
`CPU s` is the CPU time each process used during the burst (the relay's, the simulator's, the client's); `hook
calls` how long the simulator's calls waited for one of its senders (32, each waiting for the relay's answer, as
midjourney-proxy's threads do) and how long the relay took to answer them; `hooks` counts the relay's upstream hook
calls by outcome; `relay gc` its garbage collections (`mj_relay_gc_pause_seconds`).
The relay's peak RSS is its VmHWM from /proc. The client (bare HTTP/1.1 on asyncio, on uvloop where it is
installed, as the relay's own event loop is; one new connection per request) runs in this process, the relay and
the HTTP simulator in their own. A request's time runs from just before its connection is opened until its whole
answer has been read. A few warm-up requests run to their end before the measured burst.

The relay writes one file per finished grid, so the burst also measures the data folder's file system: the `disk`
line is the time to create 1000 empty files there, taken just before the burst. On ext4 that figure is about 25 ms,
but for a minute or so after many files were deleted (as the end of every run deletes its folder) creating a file
can cost 0.5-0.8 ms of CPU, and a run started right after another one measures that. Leave a minute between runs,
or point `--data-dir` elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

RELAY = [sys.executable, "-m", "relay"]

try:  # the client's own loop must not be what is measured: a stock asyncio loop needs about twice as long as
    # uvloop just to open a thousand connections and send their requests
    import uvloop

    run = uvloop.run
except ImportError:  # pragma: no cover - platforms without uvloop
    run = asyncio.run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} not ready")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


# Above this, creating 1000 files in the data folder is far from ext4's usual 25-120 ms: the burst pays for it.
SLOW_DISK_MS = 200


def file_creation_ms(folder: Path, count: int = 1000) -> float:
    """How long creating `count` empty files in `folder` takes (they are left for the run's cleanup: deleting
    them now would slow the burst's own file creation)."""
    folder.mkdir(parents=True)
    started = time.perf_counter()
    for i in range(count):
        os.close(os.open(folder / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - started) * 1000


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


async def post(port: int, path: str, key: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on its own connection: a bare client, so the figures are the relay's, not a client pool's."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        payload = await (reader.readexactly(length) if length is not None else reader.read())
        return int(status_line.split()[1]), payload
    finally:
        writer.close()


async def fire(port: int, key: str, count: int, response_format: str, ramp_s: float) -> list[tuple[int, float, float]]:
    """Each request's status, response time and when its answer was read; request i's prompt is `bench i`."""

    async def one(i: int) -> tuple[int, float, float]:
        await asyncio.sleep(ramp_s * i / count)
        body = json.dumps(
            {"model": "mj-fast", "prompt": f"bench {i}", "size": "1024x1024", "response_format": response_format}
        ).encode()
        started = time.perf_counter()
        try:
            status, _ = await post(port, "/v1/images/generations", key, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            status = 0
        return status, time.perf_counter() - started, time.time()

    return await asyncio.gather(*(one(i) for i in range(count)))


def after_upstream_ms(
    db_path: Path, results: list[tuple[int, float, float]], sim_port: int, job_seconds: float
) -> list[float]:
    """For each answered request, how long after its upstream task finished the answer was read: the finish as the
    HTTP simulator reports it (`finishTime`), or, in process, the relay's submit stamp plus the job's duration."""
    with sqlite3.connect(db_path) as db:
        jobs = db.execute("SELECT prompt, upstream_id, submitted_at FROM jobs WHERE state = 'SUCCEEDED'").fetchall()
    by_prompt = {prompt.split(" --", 1)[0]: (upstream_id, submitted) for prompt, upstream_id, submitted in jobs}
    finished: dict[str, float] = {}
    if sim_port:
        ids = [upstream_id for upstream_id, _ in by_prompt.values()]
        for start in range(0, len(ids), 200):
            tasks = httpx.post(
                f"http://127.0.0.1:{sim_port}/mj/task/list-by-condition", json={"ids": ids[start : start + 200]}
            ).json()
            finished.update({task["id"]: task["finishTime"] / 1000 for task in tasks if task.get("finishTime")})
    out = []
    for i, (status, _, answered) in enumerate(results):
        found = by_prompt.get(f"bench {i}")
        if status != 200 or found is None:
            continue
        upstream_id, submitted = found
        done = finished.get(upstream_id, submitted + job_seconds)
        out.append((answered - done) * 1000)
    return out


def hooks_taken(base: str) -> dict[str, float]:
    """The relay's count of upstream hook calls by outcome (applied, unknown, ...), from its /metrics."""
    counts: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        match = re.match(r'mj_relay_upstream_hooks_total\{.*outcome="([^"]+)".*\} ([0-9.e+]+)', line)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + float(match.group(2))
    return counts


def gc_pauses(base: str) -> dict[str, dict[float, float]]:
    """The relay's garbage collections so far, from its /metrics: by generation, how many took at most each bucket's
    bound (in seconds; `inf` counts them all), and their seconds in all under the key -1."""
    found: dict[str, dict[float, float]] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        match = re.match(r"mj_relay_gc_pause_seconds_(sum|bucket)\{(.*)\} ([0-9.e+-]+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            bound = float(labels["le"]) if match.group(1) == "bucket" else -1.0
            found.setdefault(labels["generation"], {})[bound] = float(match.group(3))
    return found


def gc_line(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]) -> str:
    """What the collector held the relay for between two readings of `gc_pauses`: by generation, how many
    collections and their time in all; and the bucket bound the longest of them stayed under."""
    parts, longest = [], 0.0
    for generation, now in sorted(after.items()):
        then = before.get(generation, {})
        made = {bound: count - then.get(bound, 0.0) for bound, count in now.items()}
        total = made.get(math.inf, 0.0)
        parts.append(f"gen{generation} {total:.0f} ({made.get(-1.0, 0.0) * 1000:.0f} ms)")
        if total:
            longest = max(longest, min(bound for bound, count in made.items() if bound > 0 and count >= total))
    under = f"; each under {longest * 1000:g} ms" if longest else ""
    return ", ".join(parts) + under


def sim_stats(port: int, since: float | None = None) -> dict[str, Any]:
    """What the HTTP simulator has counted: submits, status reads, hook calls; with `since`, also how the hook calls
    due since then waited for its senders."""
    params = {"since": since} if since is not None else None
    return dict(httpx.get(f"http://127.0.0.1:{port}/sim/stats", params=params, timeout=10).json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--upstream", choices=["inproc", "http"], default="inproc")
    parser.add_argument(
        "--warmup",
        type=int,
        default=64,
        help="requests run to their end before the measured burst, as a relay that has been running has done "
        "(the simulator draws its grid variants, the relay's code paths run once); 0 to measure a cold start",
    )
    parser.add_argument(
        "--hooks",
        action="store_true",
        help="with --upstream http: the simulator calls the relay's upstream hooks on each change of a task",
    )
    parser.add_argument("--hook-drop", type=float, default=0.0, help="share of hook calls the simulator loses")
    parser.add_argument(
        "--no-hook-progress", action="store_true", help="the simulator calls hooks only when a task starts and ends"
    )
    parser.add_argument("--response-format", choices=["url", "b64_json"], default="url")
    parser.add_argument(
        "--ramp-seconds", type=float, default=0.0, help="send the requests evenly over this long (default: all at once)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the run's folder (the relay's database and images) is made (default: the system temp folder)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mj-relay-bench-", dir=args.data_dir))
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    sim_port = 0
    try:
        if args.upstream == "http":
            sim_port = free_port()
            sim = subprocess.Popen(
                [
                    *RELAY,
                    "simulate",
                    "--port",
                    str(sim_port),
                    "--fast-s",
                    str(args.job_seconds),
                    "--tile-px",
                    str(args.tile_px),
                    "--hooks" if args.hooks else "--no-hooks",
                    "--hook-drop",
                    str(args.hook_drop),
                    *(["--no-hook-progress"] if args.no_hook_progress else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(sim)
            wait_ready(f"http://127.0.0.1:{sim_port}/cdn/0.png", sim)
            provider = (
                f"{{name: sim, dialect: midjourney-proxy, base_url: 'http://127.0.0.1:{sim_port}', batch_size: 200, "
                f"hooks: {'true' if args.hooks else 'false'}}}"
            )
        else:
            provider = (
                f"{{name: sim, dialect: simulator, simulator: {{fast_s: {args.job_seconds}, tile_px: {args.tile_px}}}}}"
            )
        config = work / "config.yaml"
        config.write_text(
            f"data_dir: {work / 'data'}\n"
            f"server: {{log_level: warning, public_url: 'http://127.0.0.1:{port}'}}\n"
            f"providers: [{provider}]\n"
            f"jobs: {{poll_interval_s: {args.poll_seconds}}}\n"
        )
        created = subprocess.run(
            [*RELAY, "keys", "create", "--name", "bench", "--quota", "100000000", "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
        )
        key = re.search(r"sk-mjr-\S+", created.stdout).group(0)  # type: ignore[union-attr]
        relay = subprocess.Popen(
            [*RELAY, "serve", "--config", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(relay)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/readyz", relay)
        baseline = peak_rss_mb(relay.pid)

        if args.warmup:
            warm = run(fire(port, key, args.warmup, args.response_format, 0.0))
            if any(status != 200 for status, _, _ in warm):
                raise SystemExit("the warm-up requests failed")
        disk_ms = file_creation_ms(work / "disk-check")
        collections_before = gc_pauses(base)
        stats_before = sim_stats(sim_port) if args.upstream == "http" else None
        cpu_before = {proc.pid: cpu_seconds(proc.pid) for proc in procs}
        client_before = time.process_time()
        started_at, started = time.time(), time.perf_counter()
        results = run(fire(port, key, args.requests, args.response_format, args.ramp_seconds))
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
        cpu = {proc.pid: cpu_seconds(proc.pid) - cpu_before[proc.pid] for proc in procs}
        stats_after = sim_stats(sim_port, since=started_at) if args.upstream == "http" else None
        peak = peak_rss_mb(relay.pid)
        hook_outcomes = hooks_taken(base)
        collections = gc_line(collections_before, gc_pauses(base))

        ok = [seconds for status, seconds, _ in results if status == 200]
        late_ms = [(seconds - args.job_seconds) * 1000 for seconds in ok]
        failures: dict[int, int] = {}
        for status, _, _ in results:
            if status != 200:
                failures[status] = failures.get(status, 0) + 1
        print(
            f"requests      {args.requests} concurrent, {args.job_seconds:g} s jobs, poll every "
            f"{args.poll_seconds:g} s, upstream {args.upstream}, response_format {args.response_format}, "
            f"sent over {args.ramp_seconds:g} s, after {args.warmup} warm-up requests"
        )
        print(f"succeeded     {len(ok)} / {args.requests}" + (f"   failures by status: {failures}" if failures else ""))
        # With every hook call made, a job ends the moment the upstream says so; with some lost, within a poll.
        target = 100 if args.hooks and args.hook_drop == 0 else args.poll_seconds * 1000 + 100
        if late_ms:
            print(
                f"lateness ms   p50 {statistics.median(late_ms):.0f}   p99 {percentile(late_ms, 0.99):.0f}   "
                f"max {max(late_ms):.0f}   (response time − the job's duration: intake included)"
            )
        after = after_upstream_ms(work / "data" / "mj-relay.db", results, sim_port, args.job_seconds)
        if after:  # the figure the upstream-hook target is about
            source = "the simulator's finishTime" if sim_port else "the relay's submit stamp + the job's duration"
            print(
                f"after upstream p50 {statistics.median(after):.0f}   p99 {percentile(after, 0.99):.0f}   "
                f"max {max(after):.0f} ms   (answered − the upstream's finish, by {source}; target p99 < {target:.0f})"
            )
        with sqlite3.connect(work / "data" / "mj-relay.db") as db:
            rows = db.execute(
                "SELECT created_at, submitted_at, submitted_at + ?, finished_at FROM jobs "
                "WHERE state = 'SUCCEEDED' AND created_at >= ?",
                (args.job_seconds, started_at),
            ).fetchall()
        if rows:
            print("timeline      ms after the first request was sent: first / p50 / p99 / last")
            # Each phase is stamped by the relay when its group-committed write happened; "upstream done" is the
            # submit stamp plus the job's duration (the simulator starts a job just before that stamp).
            phases = ["held", "submitted", "upstream done", "job ended"]
            columns = [*zip(*rows, strict=True), [answered for status, _, answered in results if status == 200]]
            for name, column in zip([*phases, "answered"], columns, strict=True):
                offsets = [(at - started_at) * 1000 for at in column]
                marks = (min(offsets), percentile(offsets, 0.5), percentile(offsets, 0.99), max(offsets))
                figures = " / ".join(f"{v:.0f}" for v in marks)
                print(f"  {name:<13} {figures}")
        if stats_before is not None and stats_after is not None:
            calls = {name: stats_after[name] - stats_before[name] for name in ("submits", "reads", "hooks")}
            print(
                f"upstream      {(calls['submits'] + calls['reads']) / args.requests:.3f} API requests per job "
                f"({calls['submits']} submits, {calls['reads']} status reads; downloads apart), "
                f"{calls['hooks']} hook calls made"
            )
            timed = stats_after.get("hook_calls_since") or {}
            if timed.get("calls"):
                # The simulator makes its calls from a few senders, as midjourney-proxy does, each waiting for the
                # answer: calls that come faster than the relay answers them queue for a sender.
                wait, answer, ending = (
                    " / ".join(f"{v:.0f}" for v in timed[name]) or "-"
                    for name in ("wait_ms", "answer_ms", "ending_wait_ms")
                )
                print(
                    f"hook calls    waited for a sender p50 / p99 {wait} ms (the calls that end a task: {ending} ms); "
                    f"answered by the relay in p50 / p99 {answer} ms"
                )
            taken = ", ".join(f"{name} {count:.0f}" for name, count in sorted(hook_outcomes.items()))
            print(f"hooks         by outcome at the relay (warm-up included): {taken or 'none'}")
        print(f"relay RSS MB  peak {peak:.0f}   at start {baseline:.0f}   (target < 250)")
        print(f"relay gc      collections during the burst, by generation: {collections}")
        slow = "   (slow: many files were deleted there lately; see --help)" if disk_ms > SLOW_DISK_MS else ""
        print(f"disk          creating 1000 files in the data folder took {disk_ms:.0f} ms just before{slow}")
        print(f"wall time     {wall:.1f} s")
        used = f"relay {cpu[relay.pid]:.2f}"
        if args.upstream == "http":
            used += f", simulator {cpu[procs[0].pid]:.2f}"
        print(f"CPU s         {used}, client {client_cpu:.2f}   (during the burst; the machine has {os.cpu_count()})")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if not os.environ.get("BENCH_KEEP"):
            subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
