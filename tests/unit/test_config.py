from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError, default_config, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml", env or {})
    return caught.value.problems


def test_the_embedded_defaults_run_the_simulator_on_sqlite() -> None:
    config = default_config()
    assert config.database_url() == "sqlite+aiosqlite:///data/mj-relay.db"
    assert [p.dialect for p in config.providers] == ["simulator"]
    assert list(config.models) == ["mj-fast", "mj-relax", "mj-turbo"]
    assert config.price("mj-fast", "imagine") == 2


def test_an_empty_file_means_the_defaults() -> None:
    assert parse_config("", env={}) == default_config()


def test_the_example_file_is_valid() -> None:
    env = {"ACCT_A_SECRET": "a", "RESELLER_KEY": "b", "V1_KEY": "c"}
    config = parse_config(EXAMPLE.read_text(), str(EXAMPLE), env)
    assert {p.dialect for p in config.providers} == {"midjourney-proxy", "new-api", "mj-v1", "simulator"}


def test_environment_variables_are_interpolated() -> None:
    text = """
providers:
  - {name: a, dialect: new-api, base_url: "${BASE:-http://fallback:1}", secret: "${KEY}"}
images: {signing_secret: "$${literal}-then-enough-characters-to-sign-with"}
"""
    config = parse_config(text, env={"KEY": "k-123"})
    assert config.providers[0].base_url == "http://fallback:1"
    assert config.providers[0].secret == "k-123"
    assert config.images.signing_secret == "${literal}-then-enough-characters-to-sign-with"
    assert parse_config(text, env={"KEY": "k", "BASE": "http://set:2"}).providers[0].base_url == "http://set:2"


def test_unset_variables_and_validation_problems_are_reported_together() -> None:
    text = """
server: {port: "${PORT}", max_header_bytes: 10}
api: {default_model: "${MODEL}"}
providers:
  - {name: a, dialect: new-api, base_url: "http://${HOST}:1/x", secret: "${KEY:-}", colour: red}
"""
    assert problems(text) == [
        "server.port: the environment variable PORT is not set",
        "api.default_model: the environment variable MODEL is not set",
        "providers[0].base_url: the environment variable HOST is not set",
        "server.max_header_bytes: Input should be greater than or equal to 1024",
        "providers[0].colour: unknown key",
    ]  # and nothing about the empty port, model or host the unset variables left


def test_the_http_limits_have_defaults_and_bounds() -> None:
    server = default_config().server
    assert (server.max_header_bytes, server.header_timeout_s, server.body_timeout_s) == (32_768, 10, 30)
    assert (server.keepalive_timeout_s, server.max_connections) == (5, 4096)
    text = "server: {header_timeout_s: 0, body_timeout_s: -1, keepalive_timeout_s: 0, max_connections: 0}"
    assert [p.split(":")[0] for p in problems(text)] == [
        "server.header_timeout_s",
        "server.body_timeout_s",
        "server.keepalive_timeout_s",
        "server.max_connections",
    ]


def test_a_missing_variable_names_its_path() -> None:
    assert problems("providers: [{name: b, dialect: mj-v1, base_url: 'http://x', secret: '${NOPE}'}]") == [
        "providers[0].secret: the environment variable NOPE is not set"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server: {port: 99999}", "server.port: Input should be less than or equal to 65535"),
        ("server: {bogus: 1}", "server.bogus: unknown key"),
        ("bogus: 1", "bogus: unknown key"),
        ("providers: [{name: a, dialect: new-api}]", "providers[0].base_url: required for the new-api dialect"),
        ("providers: [{name: a}]", "providers[0].dialect: required"),
        ("providers: [{name: a, dialect: smoke}]", "providers[0].dialect: Input should be"),
        (
            "providers: [{name: a, dialect: simulator, mode_prefix: true}]",
            "providers[0].mode_prefix: only the midjourney-proxy dialect takes it",
        ),
        ("providers: [{name: a, dialect: new-api, base_url: ftp://x}]", "providers[0].base_url: base_url must be"),
        (
            "providers: [{name: a, dialect: simulator}, {name: a, dialect: simulator}]",
            "providers: the name 'a' is used twice",
        ),
        ("models: {x: {mode: fast}}\napi: {default_model: x}", "prices.x: the model has no price"),
        ("prices: {mj-fast: {default: -1}}", "prices.mj-fast.default: a price is a whole number of credits, 0 to"),
        ("prices: {ghost: {default: 1}}", "prices.ghost: not one of models"),
        ("prices: {ghost: {default: 1}}", "prices.mj-fast: the model has no price"),
        (
            "providers: [{name: a, dialect: simulator, modes: [fast]}]",
            "models.mj-relax: no provider serves mode relax",
        ),
        ("database: {url: 'mysql://x'}", "database.url: use sqlite+aiosqlite"),
        ("a: [1", "line 1, column 6: not valid YAML"),
        ("- 1", "the top level must be a mapping"),
    ],
)
def test_errors_name_their_yaml_path(text: str, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(text)), problems(text)


def test_load_config_reads_files_and_reports_unreadable_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("jobs: {poll_interval_s: 1.5}\n")
    assert load_config(path).jobs.poll_interval_s == 1.5
    assert load_config(None) == default_config()
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read the file" in caught.value.problems[0]


def test_per_provider_poll_interval_overrides_the_default() -> None:
    config = parse_config(
        "providers: [{name: a, dialect: simulator, poll_interval_s: 0.5}, {name: b, dialect: simulator}]", env={}
    )
    assert [config.poll_interval(p) for p in config.providers] == [0.5, 3.0]


NEW_SECRET, OLD_SECRET = "n" * 32, "an-older-signing-secret-kept-to-verify-its-links"


def test_signing_secrets_may_be_one_or_many() -> None:
    assert parse_config(f"images: {{signing_secret: {NEW_SECRET}}}", env={}).images.secrets() == [NEW_SECRET]
    many = parse_config(f"images: {{signing_secret: [{NEW_SECRET}, {OLD_SECRET}]}}", env={})
    assert many.images.secrets() == [NEW_SECRET, OLD_SECRET]
    assert default_config().images.secrets() == []


@pytest.mark.parametrize(
    "text", ["images: {signing_secret: s3cr3t}", f"images: {{signing_secret: [{NEW_SECRET}, s3cr3t]}}"]
)
def test_a_signing_secret_short_enough_to_be_found_from_a_link_is_refused_without_being_shown(text: str) -> None:
    # Anyone with one of its links (any client) could try keys offline until one signs it, then forge a link to
    # any image and the upstream hook URLs; an older secret kept for rotation verifies links as the newest does.
    (problem,) = problems(text)
    assert problem.startswith("images.signing_secret: "), problem
    assert "32 characters" in problem and "s3cr3t" not in problem


def test_a_yaml_alias_inside_itself_is_one_clear_problem() -> None:
    assert problems("api: {references: {allow_hosts: &a [*a]}}") == [
        "api.references.allow_hosts[0]: a YAML alias refers to a value it is inside"
    ]


def test_yaml_aliases_repeating_each_other_are_refused_before_they_are_expanded() -> None:
    # Each level repeats the one before ten times: 10^6 values from a few hundred bytes (10^9 with three more
    # levels, which would take the loader hours to walk).
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 6):
        levels.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    found = problems("\n".join(levels))
    assert len(found) == 1 and "more than 100000 values" in found[0], found


def test_a_file_that_is_not_utf8_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"server: {host: \xff\xfe}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == ["cannot read the file (not UTF-8 text: byte 0xff at offset 15)"]


def test_a_price_no_key_could_pay_is_refused_at_start() -> None:
    # A price past what a database integer holds made every request for the model an internal error.
    prices = "prices: {{mj-fast: {{default: {}}}, mj-relax: {{default: 1}}, mj-turbo: {{default: 1}}}}"
    assert parse_config(prices.format(10**12), env={}).price("mj-fast", "imagine") == 10**12
    assert problems(prices.format(10**23)) == [
        "prices.mj-fast.default: a price is a whole number of credits, 0 to 1000000000000"
    ]


def test_a_key_given_twice_is_refused_not_silently_overridden() -> None:
    # The second `providers:` would have replaced the first, leaving acct-a out without a word.
    text = "providers:\n  - {name: acct-a, dialect: simulator}\nserver: {port: 1, port: 2}\nproviders: []\n"
    assert problems(text) == [
        "line 3, column 19: the key 'port' is given twice (first at line 3, column 10)",
        "line 4, column 1: the key 'providers' is given twice (first at line 1, column 1)",
    ]
    # A merge key's values may be overridden: that is what it is for.
    merged = "providers: [{<<: {timeout_s: 5, weight: 2}, name: a, dialect: simulator, weight: 3}]"
    assert parse_config(merged, env={}).providers[0].weight == 3


def test_a_boolean_is_not_taken_as_a_number() -> None:
    # YAML reads true (and yes, on) as a boolean, which pydantic took as 1: `port: true` listened on port 1.
    text = """
server: {port: true}
providers: [{name: a, dialect: simulator, timeout_s: yes, simulator: {seed: off}}]
prices: {mj-fast: {default: true}, mj-relax: {default: 1}, mj-turbo: {default: 1}}
"""
    problem = "Input should be a number, not true or false (nor yes/no, on/off)"
    assert sorted(problems(text)) == [
        f"prices.mj-fast.default: {problem}",
        f"providers[0].simulator.seed: {problem}",
        f"providers[0].timeout_s: {problem}",
        f"server.port: {problem}",
    ]
    # A number that arrives as text from the environment is still a number, and a boolean field takes booleans.
    text = "server: {port: '${PORT}'}\njobs: {lease_s: '${LEASE}'}\napi: {references: {allow_private: '${OPEN}'}}"
    config = parse_config(text, env={"PORT": "9000", "LEASE": "12.5", "OPEN": "true"})
    assert (config.server.port, config.jobs.lease_s, config.api.references.allow_private) == (9000, 12.5, True)
    assert problems(text, {"PORT": "true", "LEASE": "1", "OPEN": "true"}) == [
        "server.port: Input should be a valid integer, unable to parse string as an integer"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A deadline of inf was stored in the database and never reached.
        ("jobs: {deadline_s: {fast: .inf}}", "jobs.deadline_s.fast: Input should be a finite number"),
        ("jobs: {deadline_s: {relax: .nan}}", "jobs.deadline_s.relax: Input should be a finite number"),
        ("jobs: {deadline_s: {turbo: 1.0e+308}}", "jobs.deadline_s.turbo: Input should be less than or equal to 86400"),
        # A poll interval of inf: a job was never asked about again.
        ("jobs: {poll_interval_s: .inf}", "jobs.poll_interval_s: Input should be a finite number"),
        ("jobs: {lost_after_s: 1.0e+308}", "jobs.lost_after_s: Input should be less than or equal to 86400"),
        ("jobs: {modal_timeout_s: .inf}", "jobs.modal_timeout_s: Input should be a finite number"),
        # A link lifetime past what an `exp` holds: every image link was refused as expired.
        ("images: {url_ttl_s: 1000000000000000000000}", "images.url_ttl_s: Input should be less than or equal to"),
        ("images: {max_download_bytes: 10000000000000}", "images.max_download_bytes: Input should be less than"),
        # A cool-down of inf: GET /admin/api/providers answered 500 (JSON has no Infinity) and `mj-relay providers`
        # crashed on the date.
        ("health: {cooldown_s: .inf, max_cooldown_s: .inf}", "health.cooldown_s: Input should be a finite number"),
        ("health: {max_cooldown_s: 1.0e+12}", "health.max_cooldown_s: Input should be less than or equal to 604800"),
        (
            "providers: [{name: a, dialect: simulator, timeout_s: .inf}]",
            "providers[0].timeout_s: Input should be a finite number",
        ),
        (
            "providers: [{name: a, dialect: simulator, poll_interval_s: 1.0e+308}]",
            "providers[0].poll_interval_s: Input should be less than or equal to 600",
        ),
        ("server: {max_body_bytes: 1000000000000000}", "server.max_body_bytes: Input should be less than or equal to"),
        ("api: {references: {timeout_s: .inf}}", "api.references.timeout_s: Input should be a finite number"),
    ],
)
def test_infinite_nan_and_enormous_numbers_are_refused(text: str, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(text)), problems(text)
    if ": .inf" in text:  # and as text from the environment too
        setting = expected.split(": ")[0]
        assert any(p.startswith(f"{setting}: ") for p in problems(text.replace(".inf", "'${X}'"), {"X": "inf"}))


def test_every_number_setting_has_an_upper_bound() -> None:
    from typing import get_args

    from pydantic import BaseModel

    from relay.config import Config

    unbounded = []

    def walk(model: type[BaseModel], where: str) -> None:
        for name, field in model.model_fields.items():
            kinds = get_args(field.annotation) or (field.annotation,)
            for kind in kinds:
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    walk(kind, f"{where}{name}.")
            if {int, float} & set(kinds) and not any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata):
                unbounded.append(where + name)

    walk(Config, "")
    assert unbounded == []


@pytest.mark.parametrize("secret", ["ключ-0123456789", "key\u2013dash", "line\nbreak", "nul\x00", "del\x7f"])
def test_a_provider_secret_no_header_can_carry_is_refused_without_being_shown(secret: str) -> None:
    # It was taken, and every submit to the provider then failed in the HTTP client (a UnicodeEncodeError for a
    # character beyond Latin-1): each job a 502, its provider blamed.
    text = 'providers:\n  - {name: a, dialect: midjourney-proxy, base_url: "http://up:1", secret: "${SECRET}"}\n'
    (problem,) = problems(text, {"SECRET": secret})
    assert problem.startswith("providers[0].secret: "), problem
    assert secret not in problem
    # Latin-1 is what a header carries: such a secret is sent as it is.
    assert parse_config(text, env={"SECRET": "caf\u00e9-key"}).providers[0].secret == "caf\u00e9-key"
