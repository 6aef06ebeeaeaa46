"""The `mj-relay` command as an operator runs it: real processes, a fresh working directory."""

from __future__ import annotations

import json
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import openai
import pytest

from tests.helpers import free_port, relay_config, running_relay, stop_process

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_ENV = {"ACCT_A_SECRET": "a-secret", "RESELLER_KEY": "r-key", "V1_KEY": "v-key"}


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextmanager
def process(cwd: Path, *args: str, ready_url: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(ready_url, timeout=0.5).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.05)
        yield proc
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def serving(
    cwd: Path, *args: str, env: dict[str, str] | None = None, descriptors: tuple[int, int | None] | None = None
) -> Iterator[tuple[list[str], str]]:
    """`mj-relay serve` in its own process; once its "listening" line is out, yields what it printed before that
    line (stdout and stderr) and the URL the line names. The process is stopped after. `descriptors`: the soft and
    hard limits on its open descriptors (no hard one: this process's own)."""

    def limited() -> None:
        if descriptors is not None:
            soft, hard = descriptors
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard or resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limited if descriptors is not None else None,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for text in stream:
            lines.put(text)
        lines.put("")  # the end

    reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        before: list[str] = []
        while not (line := lines.get(timeout=30)).startswith("mj-relay listening on "):
            assert line, "serve ended without listening:\n" + "".join(before)
            before.append(line)
        yield before, line.split()[3]
    finally:
        stop_process(proc)
        reader.join(15)
        proc.stdout.close()


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = cli(tmp_path, "--help")
    assert result.returncode == 0
    for command in ("serve", "simulate", "check-config", "providers", "keys"):
        assert command in result.stdout
    assert (Path(sys.executable).parent / "mj-relay").exists()


def test_keys_are_created_listed_and_revoked(tmp_path: Path) -> None:
    created = cli(tmp_path, "keys", "create", "--name", "team-a", "--quota", "500")
    assert created.returncode == 0, created.stderr
    secret = re.search(r"\bsk-mjr-[A-Za-z0-9_-]{40,}", created.stdout)
    assert secret is not None
    listed = cli(tmp_path, "keys", "list")
    assert "team-a" in listed.stdout and "500" in listed.stdout and secret.group(0) not in listed.stdout
    assert cli(tmp_path, "keys", "revoke", "team-a").returncode == 0
    assert "revoked" in cli(tmp_path, "keys", "list").stdout
    missing = cli(tmp_path, "keys", "revoke", "team-a")
    assert missing.returncode == 1 and "No active key" in missing.stderr
    assert (tmp_path / "data" / "mj-relay.db").exists()


def test_config_is_taken_before_or_after_the_verb_or_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(f"data_dir: {tmp_path / 'elsewhere'}\n")
    assert cli(tmp_path, "--config", "c.yaml", "keys", "create", "--name", "a", "--quota", "1").returncode == 0
    assert cli(tmp_path, "keys", "create", "--name", "b", "--quota", "1", "--config", "c.yaml").returncode == 0
    listed = cli(tmp_path, "keys", "list", env={"MJ_RELAY_CONFIG": "c.yaml"})
    assert " a " in listed.stdout and " b " in listed.stdout
    assert not (tmp_path / "data").exists()


def test_check_config_accepts_the_example_and_names_errors(tmp_path: Path) -> None:
    good = cli(tmp_path, "check-config", str(ROOT / "config.example.yaml"), env=EXAMPLE_ENV)
    assert good.returncode == 0 and "ok" in good.stdout and "acct-a (midjourney-proxy)" in good.stdout
    assert "a-secret" not in good.stdout
    (tmp_path / "bad.yaml").write_text("providers:\n  - {name: x, dialect: new-api, colour: red, weight: 0}\n")
    bad = cli(tmp_path, "check-config", "bad.yaml")
    assert bad.returncode == 2
    assert "providers[0].colour: unknown key" in bad.stderr
    assert "providers[0].weight: Input should be greater than or equal to 1" in bad.stderr
    serve = cli(tmp_path, "serve", "--config", "bad.yaml")
    assert serve.returncode == 2 and "providers[0].colour: unknown key" in serve.stderr


def test_serve_with_no_config_runs_the_defaults_end_to_end(tmp_path: Path) -> None:
    created = cli(tmp_path, "keys", "create", "--name", "n", "--quota", "10")
    key = re.search(r"sk-mjr-\S+", created.stdout).group(0)  # type: ignore[union-attr]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process(tmp_path, "serve", "--port", str(port), ready_url=base + "/readyz") as proc:
        with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30) as client:
            result = client.images.generate(model="mj-turbo", prompt="a comet", size="1024x1024")
        assert result.data[0].url and result.data[0].url.startswith(base)
        assert httpx.get(result.data[0].url).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        output = proc.stdout.read() if proc.stdout else ""
    assert "Application shutdown complete" in output
    assert f"mj-relay listening on http://127.0.0.1:{port}" in output
    assert key not in output and "a comet" not in output
    assert (tmp_path / "data" / "signing.key").exists()


@pytest.mark.parametrize("dialect", ["midjourney-proxy", "new-api", "mj-v1"])
def test_the_relay_works_against_mj_relay_simulate(tmp_path: Path, dialect: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ("simulate", "--port", str(port), "--dialect", dialect, "--secret", "sim-secret", "--fast-s", "0.3")
    with process(tmp_path, *args, ready_url=base + "/cdn/0.png"):
        providers = [{"name": "up", "dialect": dialect, "base_url": base, "secret": "sim-secret"}]
        with running_relay(relay_config(tmp_path, providers=providers)) as relay:
            result = relay.openai().images.generate(model="mj-fast", prompt="a comet", response_format="b64_json")
            assert result.data[0].b64_json
            assert relay.jobs() == [("SUCCEEDED", None, "captured", "up")]


def test_simulate_refuses_a_port_no_socket_has(tmp_path: Path) -> None:
    # 99999 was taken: the simulator said it listened there, then waited without a socket, saying nothing more.
    for port in ("65536", "99999", "-1"):
        result = subprocess.run(
            [sys.executable, "-m", "relay", "simulate", "--port", port],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert result.returncode == 2, (port, result)
        assert "listening" not in result.stdout and "--port" in result.stderr, result.stderr


def test_simulate_refuses_durations_the_configuration_refuses(tmp_path: Path) -> None:
    """A negative duration made every task succeed at once with a finishTime before its submitTime; an endless one
    never ended. As `simulator.fast_s` and the others in a configuration: between 0 and a day."""
    for option, value in (("--fast-s", "-1"), ("--relax-s", "inf"), ("--turbo-s", "86401")):
        result = subprocess.run(
            [sys.executable, "-m", "relay", "simulate", "--port", "0", option, value],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert result.returncode == 2, (option, result)
        assert "listening" not in result.stdout and option in result.stderr, result.stderr


def test_simulate_seeds_the_hook_faults_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--seed` made the failure draws repeatable but not the hook calls' drops, duplicates and reordering: two runs
    of a benchmark with `--hook-drop` lost different calls."""
    from click.testing import CliRunner

    import adapters.simulator
    from relay.cli import main

    seen: list[object] = []
    options: list[dict[str, object]] = []

    def build(engine: object, dialect: str, secret: str, hooks: object, **more: object) -> object:
        seen.append(hooks)
        options.append(more)
        raise SystemExit(0)

    monkeypatch.setattr(adapters.simulator, "build_sim_app", build)
    result = CliRunner().invoke(main, ["simulate", "--seed", "7", "--hook-drop", "0.2"])
    assert result.exit_code == 0, result.output
    assert getattr(seen[0], "seed", None) == 7 and getattr(seen[0], "drop", None) == 0.2
    # and its task list holds the newest 100 tasks (trueai), or with --list-at-most 0 every one (novicezk)
    assert CliRunner().invoke(main, ["simulate", "--list-at-most", "0"]).exit_code == 0
    assert options == [{"list_at_most": 100}, {"list_at_most": None}]


def test_simulate_names_the_port_it_listens_on_and_says_so_only_when_it_does(tmp_path: Path) -> None:
    """`--port 0` (any free port) was shown as port 0, so nothing could reach the simulator; a taken port was said
    to be listened on, then failed. As `serve`: the port taken is shown, a port that cannot be taken is one line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "simulate", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.fullmatch(r"simulator \(midjourney-proxy\) listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert found is not None and found.group(2) != "0", line
        assert httpx.get(found.group(1) + "/sim/stats", timeout=5).status_code == 200
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = cli(tmp_path, "simulate", "--port", str(port))
    assert result.returncode == 3 and "listening" not in result.stdout, result
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith(f"mj-relay: cannot listen on 127.0.0.1:{port}: ") and "in use" in error


def test_serve_says_it_listens_only_once_it_answers(tmp_path: Path) -> None:
    with serving(tmp_path, "--port", "0") as (before, url):
        assert re.fullmatch(r"http://127\.0\.0\.1:[1-9][0-9]*", url)  # the port it took, not the 0 it was given
        assert httpx.get(url + "/readyz", timeout=5).status_code == 200  # at once, no retry
    assert any("Application startup complete" in line for line in before)


def _health_beside_idle_connections(url: str, idle: int) -> int:
    """The status `/healthz` gets while `idle` other connections are open and silent."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    held = [socket.create_connection((host, int(port))) for _ in range(idle)]
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code
    finally:
        for sock in held:
            sock.close()


def test_serve_raises_its_descriptor_limit_for_its_connections(tmp_path: Path) -> None:
    """Under a soft limit of 128 descriptors, 150 idle connections (max_connections is 4096) left the relay unable to
    take another connection, even to refuse it: a client waited in the backlog until the idle ones timed out."""
    with serving(tmp_path, "--port", "0", descriptors=(128, None)) as (_, url):
        assert _health_beside_idle_connections(url, 150) == 200


def test_serve_under_a_hard_limit_too_low_for_its_connections_says_so(tmp_path: Path) -> None:
    with serving(tmp_path, "--port", "0", descriptors=(300, 300)) as (before, _):
        pass
    warning = json.loads(next(line for line in before if "too few descriptors" in line))
    assert (warning["max_connections"], warning["descriptors"]) == (4096, 300)


def test_a_taken_port_is_one_clear_error_and_no_listening_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = cli(tmp_path, "serve", "--port", str(port))
    assert result.returncode != 0
    assert "listening" not in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"mj-relay: cannot listen on 127.0.0.1:{port}: ") and "in use" in line
    assert not (tmp_path / "data").exists()  # nothing was started


def test_a_database_serve_cannot_use_is_one_clear_error_and_no_listening_line(tmp_path: Path) -> None:
    """PostgreSQL not up yet (a compose file's relay started before its database), or a database a newer mj-relay
    upgraded: one line naming the database and why, exit 3, as the other commands on it say it; it was uvicorn's
    traceback of the failed start, as one JSON log line."""
    (tmp_path / "down.yaml").write_text("database: {url: 'postgresql+asyncpg://relay:pw@127.0.0.1:1/relay'}\n")
    result = cli(tmp_path, "serve", "--config", "down.yaml", "--port", "0")
    assert result.returncode == 3, result
    assert "listening" not in result.stdout and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mj-relay: the database postgresql+asyncpg://relay:***@127.0.0.1:1/relay cannot be used: ")
    assert "did not answer" in line


def test_serve_takes_host_port_and_data_dir_from_the_environment_over_the_file(tmp_path: Path) -> None:
    # As the Docker image runs it: the file says where to listen and keep data, the environment wins.
    (tmp_path / "c.yaml").write_text("data_dir: elsewhere\nserver: {host: 192.0.2.1, port: 9}\n")
    env = {"MJ_RELAY_HOST": "127.0.0.1", "MJ_RELAY_PORT": "0", "MJ_RELAY_DATA_DIR": str(tmp_path / "volume")}
    with serving(tmp_path, "--config", "c.yaml", env=env) as (_, url):
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/readyz", timeout=5).status_code == 200
    assert (tmp_path / "volume" / "mj-relay.db").exists() and (tmp_path / "volume" / "signing.key").exists()
    assert not (tmp_path / "elsewhere").exists()
    with serving(tmp_path, "--config", "c.yaml", "--data-dir", "flag", env=env):  # a flag beats the environment
        pass
    assert (tmp_path / "flag" / "mj-relay.db").exists()


def test_every_command_keeps_to_the_data_dir_serve_takes_from_the_environment(tmp_path: Path) -> None:
    # The Docker image sets MJ_RELAY_DATA_DIR=/data for `serve`: a key made beside it with `docker exec ... mj-relay
    # keys create` went into the file's (or the default) folder, and the relay answered it "Incorrect API key".
    (tmp_path / "c.yaml").write_text("data_dir: elsewhere\n")
    env = {"MJ_RELAY_CONFIG": "c.yaml", "MJ_RELAY_DATA_DIR": str(tmp_path / "volume")}
    created = cli(tmp_path, "keys", "create", "--name", "a", "--quota", "5", env=env)
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "volume" / "mj-relay.db").exists()
    assert " a " in cli(tmp_path, "keys", "list", env=env).stdout
    assert cli(tmp_path, "ledger", "check", env=env).stdout.startswith("ledger ok: 1 keys")
    assert cli(tmp_path, "providers", env=env).returncode == 0
    checked = cli(tmp_path, "check-config", "c.yaml", env=env)
    assert f"database: sqlite+aiosqlite:///{tmp_path / 'volume' / 'mj-relay.db'}" in checked.stdout
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "data").exists()
    key = re.search(r"sk-mjr-\S+", created.stdout).group(0)  # type: ignore[union-attr]
    with serving(tmp_path, "--port", "0", env=env) as (_, url):
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert models.status_code == 200


def test_check_config_lists_unset_variables_and_every_other_problem_at_once(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "server: {port: '${MJR_TEST_PORT}', colour: red}\n"
        "providers:\n  - {name: a, dialect: new-api, base_url: '${MJR_TEST_BASE}', weight: 0}\n"
    )
    result = cli(tmp_path, "check-config", "c.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "c.yaml: invalid, 4 problems:",
        "  server.port: the environment variable MJR_TEST_PORT is not set",
        "  providers[0].base_url: the environment variable MJR_TEST_BASE is not set",
        "  server.colour: unknown key",
        "  providers[0].weight: Input should be greater than or equal to 1",
    ]


FOLDER_SETTINGS_THAT_NAME_A_FILE = [
    ("data_dir", "data_dir: taken"),
    ("data_dir", "data_dir: taken/below"),
    ("images.dir", "images: {dir: taken}"),
    ("database.url", "database: {url: 'sqlite+aiosqlite:///taken/relay.db'}"),
]


@pytest.mark.parametrize(("setting", "yaml"), FOLDER_SETTINGS_THAT_NAME_A_FILE)
def test_a_folder_setting_that_names_a_file_is_one_clear_error_at_start(
    tmp_path: Path, setting: str, yaml: str
) -> None:
    (tmp_path / "taken").write_text("not a folder\n")
    (tmp_path / "c.yaml").write_text(yaml + "\nserver: {port: 0}\n")
    # The commands on the database alone make its folder only.
    database = (["keys", "list"], ["ledger", "check"], ["providers"])
    for command in (["serve"], *database) if setting != "images.dir" else (["serve"],):
        result = cli(tmp_path, *command, "--config", "c.yaml")
        assert result.returncode == 2, result
        assert "listening" not in result.stdout
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"mj-relay: {setting}: cannot make the folder "), line


def test_a_signing_key_too_short_is_one_clear_error_at_start_and_is_kept(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "signing.key").write_text("letmein\n")
    (tmp_path / "c.yaml").write_text("data_dir: data\nserver: {port: 0}\n")
    result = cli(tmp_path, "serve", "--config", "c.yaml")
    assert result.returncode == 2, result
    assert "listening" not in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mj-relay: ") and "signing.key holds a signing secret of 7 characters" in line, line
    assert (tmp_path / "data" / "signing.key").read_text() == "letmein\n"


@pytest.mark.parametrize(("setting", "yaml"), FOLDER_SETTINGS_THAT_NAME_A_FILE)
def test_check_config_refuses_a_folder_setting_that_names_a_file(tmp_path: Path, setting: str, yaml: str) -> None:
    # check-config said ok to what serve then refused.
    (tmp_path / "taken").write_text("not a folder\n")
    (tmp_path / "c.yaml").write_text(yaml + "\n")
    result = cli(tmp_path, "check-config", "c.yaml")
    assert result.returncode == 2, result
    assert result.stderr.splitlines()[0] == "c.yaml: invalid, 1 problem:", result.stderr
    assert result.stderr.splitlines()[1].startswith(f"  {setting}: cannot make the folder "), result.stderr
    assert "a file is in the way: taken" in result.stderr
    # Checking makes nothing: a good configuration's folders are left for serve to make.
    (tmp_path / "good.yaml").write_text("data_dir: new/data\nimages: {dir: new/images}\n")
    good = cli(tmp_path, "check-config", "good.yaml")
    assert good.returncode == 0, good.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        # libpq's word for TLS, in many a provider's URL; asyncpg takes `ssl`.
        ("postgresql+asyncpg://relay@127.0.0.1:5432/relay?sslmode=require", "'sslmode'"),
        ("postgresql+asyncpg://relay@127.0.0.1:5432/relay?colour=red", "'colour'"),
        ("postgresql+asyncpg://relay@127.0.0.1:54x2/relay", "port"),
    ],
)
def test_a_database_url_the_driver_cannot_take_is_refused_by_check_config_as_by_serve(
    tmp_path: Path, url: str, problem: str
) -> None:
    # check-config said ok, then serve and every command on the database ended in a traceback.
    (tmp_path / "c.yaml").write_text(f"database: {{url: '{url}'}}\nserver: {{port: 0}}\n")
    checked = cli(tmp_path, "check-config", "c.yaml")
    assert checked.returncode == 2, checked
    assert checked.stderr.splitlines()[1].startswith("  database.url: "), checked.stderr
    assert problem in checked.stderr.splitlines()[1]
    for command in (["serve"], ["keys", "list"], ["ledger", "check"]):
        result = cli(tmp_path, *command, "--config", "c.yaml")
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr and "database.url: " in result.stderr, result.stderr
        assert "listening" not in result.stdout
    # What asyncpg takes stays accepted: TLS as `ssl`, a socket folder as `host`.
    for good in ("?ssl=require", "?host=/var/run/postgresql&command_timeout=5"):
        (tmp_path / "good.yaml").write_text(f"database: {{url: '{url.split('?')[0]}{good}'}}\n")
        if "54x2" not in url:
            assert cli(tmp_path, "check-config", "good.yaml").returncode == 0


def test_check_config_never_shows_a_database_password_given_in_the_query(tmp_path: Path) -> None:
    # asyncpg takes the password as a query parameter as well as before the host; only the latter was hidden.
    url = "postgresql+asyncpg://relay@127.0.0.1:5432/relay?password=hunter2-hunter2&ssl=disable"
    (tmp_path / "c.yaml").write_text(f"database: {{url: '{url}'}}\n")
    checked = cli(tmp_path, "check-config", "c.yaml")
    assert checked.returncode == 0, checked.stderr
    assert "hunter2" not in checked.stdout + checked.stderr
    assert "database: postgresql+asyncpg://relay@127.0.0.1:5432/relay?password=***&ssl=disable" in checked.stdout


@pytest.mark.parametrize(
    ("setting", "yaml"),
    [
        ("data_dir", 'data_dir: "data\\0"'),
        ("images.dir", 'images: {dir: "images\\0"}'),
        ("database.url", 'database: {url: "sqlite+aiosqlite:///db\\0/relay.db"}'),
    ],
)
def test_a_path_with_a_nul_character_is_refused_by_check_config_as_by_serve(
    tmp_path: Path, setting: str, yaml: str
) -> None:
    # YAML's "\0" is a NUL character, which no path may hold: check-config said ok, serve ended in a traceback.
    (tmp_path / "c.yaml").write_text(yaml + "\nserver: {port: 0}\n")
    checked = cli(tmp_path, "check-config", "c.yaml")
    assert checked.returncode == 2, checked
    assert checked.stderr.splitlines()[1].startswith(f"  {setting}: "), checked.stderr
    served = cli(tmp_path, "serve", "--config", "c.yaml")
    assert served.returncode == 2, served
    assert "Traceback" not in served.stderr and f"  {setting}: " in served.stderr, served.stderr
