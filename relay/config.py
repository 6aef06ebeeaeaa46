"""The relay's configuration: YAML, `${VAR}` / `${VAR:-default}` taken from the environment, validated by typed
models that refuse unknown keys. Every error names its YAML path (`providers[1].base_url: ...`).

With no file at all, `default_config()` gives the embedded defaults: a SQLite file and an image directory under
`./data`, one in-process `simulator` provider, and the models `mj-fast`, `mj-relax` and `mj-turbo`.
`config.example.yaml` documents every field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from adapters import BOTS, DIALECTS, MODES, Bot, Dialect, Mode
from adapters.h1 import sendable_in_header
from relay.core import housekeeping
from relay.domain import MAX_CREDITS, TaskKind

__all__ = ["Config", "ConfigError", "default_config", "load_config", "parse_config"]

HTTP_DIALECTS = tuple(d for d in DIALECTS if d != "simulator")
# The price keys: one per kind of task.
PRICE_KEYS = tuple(kind.value for kind in TaskKind)
# Upper bounds shared by many settings: a day (durations), a gigabyte (sizes).
DAY_S = 86_400
MAX_BYTES = 1_000_000_000


class ConfigError(Exception):
    """One or more problems in a configuration, each `path: message`."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


def _boolean_in_number(annotation: Any, value: Any) -> str | None:
    """Where `value` holds a boolean that `annotation` wants as a number (pydantic would take `true` as 1): "" for
    the value itself, `.key` for one inside a mapping, `[i]` inside a list; None when it holds none."""
    origin = get_origin(annotation)
    if origin is Union or origin is UnionType:
        options = [a for a in get_args(annotation) if a is not NoneType]
    else:
        options = [annotation]
    if isinstance(value, bool):
        wanted = {get_origin(a) or a for a in options}
        return "" if bool not in wanted and wanted & {int, float} else None
    for option in options:
        args = get_args(option)
        if get_origin(option) is dict and isinstance(value, dict):
            for key, item in value.items():
                inner = _boolean_in_number(args[1], item)
                if inner is not None:
                    return f".{key}{inner}"
        elif get_origin(option) is list and isinstance(value, list):
            for i, item in enumerate(value):
                inner = _boolean_in_number(args[0], item)
                if inner is not None:
                    return f"[{i}]{inner}"
    return None


class _Section(BaseModel):
    # `.inf` and `.nan` are refused everywhere: a duration of inf never ends, and once added to the clock it is stored
    # and rendered (JSON has no Infinity); every number setting has a finite upper bound too.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads true/false, yes/no and on/off as booleans, and pydantic would take them as 1 and 0: `port: true`
        # would listen on port 1. A number written as text (`port: ${PORT}`) is still read as a number.
        where = _boolean_in_number(cls.model_fields[info.field_name or ""].annotation, value)
        if where is not None:
            problem = "Input should be a number, not true or false (nor yes/no, on/off)"
            raise ValueError(f"{where.lstrip('.')}: {problem}" if where else problem)
        return value


def _http_url(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an http(s) URL")
    return value.rstrip("/")


def _no_nul(value: str | None) -> str | None:
    """A file system path (or a URL holding one): YAML's "\\0" is a NUL character, which no path may hold, and the
    folder would be made, or the file opened, only for that to fail with a traceback."""
    if value is not None and "\x00" in value:
        raise ValueError("a path cannot hold a NUL character")
    return value


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None
    max_body_bytes: int = Field(20_000_000, ge=1024, le=MAX_BYTES)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    graceful_shutdown_s: int = Field(10, ge=0, le=3600)
    # HTTP-layer limits (relay/server.py): request line and headers, the time to send them, the time the body may
    # stall while the app waits for it, idle keep-alive, and open connections.
    max_header_bytes: int = Field(32_768, ge=1024, le=1_048_576)
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    keepalive_timeout_s: float = Field(5.0, gt=0, le=300)
    max_connections: int = Field(4096, ge=1, le=1_000_000)
    # The admin API and web UI (`/admin/`) answer only to `Authorization: Bearer <admin_token>`; none (or empty)
    # turns both off (404). Never logged.
    admin_token: str | None = Field(None, repr=False)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return _http_url(value, "public_url")

    @field_validator("admin_token")
    @classmethod
    def _admin_token(cls, value: str | None) -> str | None:
        if not value:
            return None
        if len(value) < 16 or len(value) > 512 or not re.fullmatch(r"[\x21-\x7e]+", value):
            raise ValueError("an admin token is 16 to 512 printable ASCII characters without spaces")
        return value


class DatabaseConfig(_Section):
    url: str | None = None
    pool_size: int = Field(10, ge=1, le=200)
    # PostgreSQL: how long the relay waits for a statement's answer before it fails (a connection a firewall went
    # silent on answers nothing, and would hold its request or loop until TCP gives up, many minutes on).
    statement_timeout_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _driver(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB")
        if value is not None and value.startswith("postgresql+asyncpg://"):
            _check_postgresql_url(value)
        return _no_nul(value)


# What a PostgreSQL URL's query may name: the arguments of asyncpg's `connect`, to which SQLAlchemy hands each
# parameter as it is, and SQLAlchemy's own statement cache size. Not those that are no text (`server_settings` is a
# mapping) nor those only a program can give.
_NOT_FROM_A_URL = frozenset({"dsn", "loop", "connection_class", "record_class", "server_settings"})


def _check_postgresql_url(url: str) -> None:
    """Refuse a PostgreSQL URL the driver would fail on at its first connection, which is at start, in `serve` as in
    every command on the database, with a traceback: a port that is no number, or a query parameter asyncpg does not
    take (`sslmode`, libpq's word for TLS in many a provider's URL, is `ssl` to asyncpg: `ssl=require`). Nothing of
    the URL is repeated in the message, which may be printed: it may hold the password."""
    import inspect

    import asyncpg
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ValueError:
        raise ValueError("the port must be a number (postgresql+asyncpg://USER@HOST:PORT/DB)") from None
    except ArgumentError:
        raise ValueError("not a URL the driver can read (postgresql+asyncpg://USER@HOST/DB)") from None
    taken = {*inspect.signature(asyncpg.connect).parameters, "prepared_statement_cache_size"} - _NOT_FROM_A_URL
    for name in parsed.query:
        if name not in taken:
            hint = " (for TLS write ssl=require, or ssl=disable, verify-full, ...)" if name == "sslmode" else ""
            raise ValueError(f"the query parameter {name!r} is not one the PostgreSQL driver (asyncpg) takes{hint}")


class S3Config(_Section):
    """`images.s3`: an S3-compatible bucket that keeps the images instead of `images.dir`, so every relay process
    that shares it (and `images.signing_secret`) serves every image link."""

    endpoint_url: str | None = None  # None: AWS S3 itself
    bucket: str
    region: str = "us-east-1"
    # Both or neither; neither: botocore's usual sources (AWS_* variables, a profile, an instance role).
    access_key_id: str | None = Field(None, repr=False)
    secret_access_key: str | None = Field(None, repr=False)
    prefix: str = Field("", max_length=512)
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    timeout_s: float = Field(30.0, gt=0, le=600)
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    max_connections: int = Field(32, ge=1, le=1000)
    max_attempts: int = Field(3, ge=1, le=10)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _http_url(value or None, "endpoint_url")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
            raise ValueError("a bucket name is 3 to 63 lowercase letters, digits, dots and hyphens")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", value):
            raise ValueError("a region is lowercase letters, digits and hyphens (for example us-east-1, auto)")
        return value

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.lstrip("/")
        if value and not value.endswith("/"):
            value += "/"
        parts = value.split("/")[:-1]
        if not re.fullmatch(r"[A-Za-z0-9._/-]*", value) or any(p in ("", ".", "..") for p in parts):
            raise ValueError("a key prefix is folders of letters, digits and ._- (for example mj-relay/)")
        return value

    @model_validator(mode="after")
    def _both_keys(self) -> S3Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            missing = "secret_access_key" if self.secret_access_key is None else "access_key_id"
            raise ValueError(f"{missing}: give access_key_id and secret_access_key together, or neither")
        return self


# The fewest characters a signing secret may have (one the relay makes has 43): a shorter one could be found from any
# of its links by trying keys offline, and then every image link and upstream hook URL forged.
MIN_SECRET_CHARS = 32


class ImagesConfig(_Section):
    dir: str | None = None
    s3: S3Config | None = None  # set: images live in this bucket, and `dir` is not used
    url_ttl_s: int = Field(86_400, ge=60, le=366 * DAY_S)
    signing_secret: str | list[str] = ""
    max_download_bytes: int = Field(50_000_000, ge=1024, le=MAX_BYTES)
    download_attempts: int = Field(3, ge=1, le=10)
    # Hosts (names, or CIDR blocks of addresses) a finished job's image may be downloaded from although they are
    # private or local; the provider's own host always may.
    download_hosts: list[str] = Field(default_factory=list)

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: str | None) -> str | None:
        return _no_nul(value)

    @field_validator("signing_secret")
    @classmethod
    def _signing_secret(cls, value: str | list[str]) -> str | list[str]:
        # Each one: an older secret kept for rotation verifies links as the newest does. The secret is not repeated.
        for secret in [value] if isinstance(value, str) else value:
            if secret and len(secret) < MIN_SECRET_CHARS:
                raise ValueError(
                    f"a signing secret needs at least {MIN_SECRET_CHARS} characters (one has {len(secret)}); "
                    "`openssl rand -base64 32` makes one"
                )
        return value

    def secrets(self) -> list[str]:
        """Signing secrets, newest first; empty when the relay should keep its own."""
        raw = [self.signing_secret] if isinstance(self.signing_secret, str) else list(self.signing_secret)
        return [s for s in raw if s]


class ReferencesConfig(_Section):
    max_bytes: int = Field(10_000_000, ge=1024, le=MAX_BYTES)
    max_count: int = Field(5, ge=0, le=10)
    timeout_s: float = Field(10.0, gt=0, le=600)
    allow_private: bool = False
    allow_hosts: list[str] = Field(default_factory=list)


class HousekeepingConfig(_Section):
    """`api.housekeeping`: chat requests that are a front end's own housekeeping (titles, tags, summaries) get
    `answer` without a job or a charge (`relay.core.housekeeping` lists the prompts it knows). `patterns` adds
    regular expressions (case-insensitive, searched in the first 2000 characters of the messages read)."""

    enabled: bool = True
    answer: str = Field("Midjourney image", min_length=1, max_length=200)
    patterns: list[str] = Field(default_factory=list, max_length=housekeeping.MAX_PATTERNS)

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        problems = []
        for i, expression in enumerate(value):
            try:
                housekeeping.compile_pattern(expression)
            except ValueError as exc:
                problems.append(f"[{i}]: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return value


class UploadsConfig(_Section):
    """`api.uploads`: images a key may keep with `submit/upload-discord-images` (free, and kept by the relay) in
    each window of `window_s` seconds; null: no bound."""

    max_images: int | None = Field(100, ge=5, le=1_000_000)
    window_s: int = Field(3600, ge=60, le=31 * 86_400)


class ApiConfig(_Section):
    default_model: str = "mj-fast"
    max_prompt_chars: int = Field(4000, ge=1, le=32_000)
    max_n: int = Field(10, ge=1, le=40)
    keepalive_s: float = Field(10.0, gt=0, le=60)
    references: ReferencesConfig = ReferencesConfig()
    housekeeping: HousekeepingConfig = HousekeepingConfig()
    uploads: UploadsConfig = UploadsConfig()


class ModelConfig(_Section):
    mode: Mode
    bot: Bot = "MID_JOURNEY"


class SimulatorConfig(_Section):
    fast_s: float = Field(2.0, ge=0, le=DAY_S)
    relax_s: float = Field(6.0, ge=0, le=DAY_S)
    turbo_s: float = Field(1.0, ge=0, le=DAY_S)
    fail_rate: float = Field(0.0, ge=0, le=1)
    error_rate: float = Field(0.0, ge=0, le=1)
    banned_words: list[str] = Field(default_factory=lambda: ["forbidden"])
    tile_px: int = Field(256, ge=16, le=2048)
    capacity: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    remix: bool = False


class HealthConfig(_Section):
    """Provider health (`relay.core.health`): when a provider is set aside, for how long, and how it is probed.
    The top-level `health` section sets it for every provider; `providers[].health` overrides fields of it."""

    errors_to_cool: int = Field(5, ge=1, le=1000)  # submits (or reads) failed in a row that cool a healthy provider
    error_rate: float = Field(0.5, gt=0, le=1)  # or this share of its calls failing over the window ...
    rate_window_s: float = Field(60.0, gt=0, le=86_400)  # ... of this long
    rate_min_calls: int = Field(10, ge=1, le=1_000_000)  # ... once the window holds this many calls
    cooldown_s: float = Field(30.0, gt=0, le=7 * DAY_S)  # the first cool-down
    backoff: float = Field(2.0, ge=1, le=100)  # each failed trial multiplies the cool-down by this ...
    max_cooldown_s: float = Field(600.0, gt=0, le=7 * DAY_S)  # ... up to this
    backoff_reset_s: float = Field(
        600.0, ge=0, le=7 * DAY_S
    )  # healthy this long after a recovery: the backoff starts over
    probe_interval_s: float = Field(15.0, gt=0, le=DAY_S)  # probes of a provider that is not healthy
    heartbeat_s: float | None = Field(None, gt=0, le=DAY_S)  # probes of a healthy provider (null: none)
    probes_to_down: int = Field(3, ge=1, le=1000)  # failed probes in a row that take a provider down


class ProviderConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    dialect: Dialect
    base_url: str | None = None
    secret: str = Field("", repr=False)
    modes: list[Mode] = Field(default_factory=lambda: list(MODES), min_length=1)
    bots: list[Bot] = Field(default_factory=lambda: list(BOTS), min_length=1)
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)
    weight: int = Field(1, ge=1, le=1000)
    max_in_flight: int | None = Field(None, ge=1, le=1_000_000)
    timeout_s: float = Field(30.0, gt=0, le=3600)
    connect_timeout_s: float = Field(5.0, gt=0, le=600)
    max_connections: int = Field(16, ge=1, le=1000)
    poll_interval_s: float | None = Field(None, gt=0, le=600)
    batch_size: int = Field(50, ge=1, le=1000)
    mode_prefix: bool = False
    account_filter: bool = True
    hooks: bool = True
    health: HealthConfig | None = None  # overrides of the top-level `health`
    simulator: SimulatorConfig | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return _http_url(value, "base_url")

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        # It goes in a header (mj-api-secret, or after Bearer), whose bytes are Latin-1: the HTTP client cannot
        # send a character beyond it, nor a control character (a line break would end the header), and every submit
        # to the provider would fail. The secret itself is not repeated.
        if not sendable_in_header(value):
            raise ValueError(
                "a secret is sent in a header: letters, digits and punctuation of Latin-1 only (no control characters)"
            )
        return value

    @model_validator(mode="after")
    def _dialect_fields(self) -> ProviderConfig:
        if self.dialect in HTTP_DIALECTS and not self.base_url:
            raise ValueError(f"base_url: required for the {self.dialect} dialect")
        if self.dialect == "simulator" and self.base_url:
            raise ValueError("base_url: the simulator dialect runs in process and takes no base_url")
        if self.dialect != "midjourney-proxy":
            for key in ("mode_prefix", "account_filter"):
                if key in self.model_fields_set:
                    raise ValueError(f"{key}: only the midjourney-proxy dialect takes it")
        if self.dialect != "simulator" and self.simulator is not None:
            raise ValueError("simulator: only the simulator dialect takes it")
        return self


class DeadlinesConfig(_Section):
    fast: float = Field(600.0, gt=0, le=DAY_S)
    relax: float = Field(1800.0, gt=0, le=DAY_S)
    turbo: float = Field(300.0, gt=0, le=DAY_S)

    def of(self, mode: Mode) -> float:
        return float(getattr(self, mode))


class JobsConfig(_Section):
    poll_interval_s: float = Field(3.0, gt=0, le=600)
    deadline_s: DeadlinesConfig = DeadlinesConfig()
    lost_after_s: float = Field(120.0, gt=0, le=DAY_S)
    modal_timeout_s: float = Field(900.0, gt=0, le=DAY_S)
    lease_s: float = Field(30.0, ge=1, le=3600)


class HooksConfig(_Section):
    """Client hooks (a task's `notifyHook`). Their URLs obey `api.references.allow_private` / `allow_hosts`."""

    attempts: int = Field(3, ge=1, le=10)
    backoff_s: float = Field(1.0, ge=0, le=300)
    timeout_s: float = Field(5.0, gt=0, le=60)
    max_concurrent: int = Field(64, ge=1, le=1000)
    max_concurrent_per_key: int = Field(8, ge=1, le=1000)
    max_watched_per_key: int = Field(1000, ge=1, le=1_000_000)


class BillingConfig(_Section):
    """`billing`: how the billing endpoints chat front ends read (`/dashboard/billing/...`) show credits in dollars."""

    usd_per_credit: float = Field(0.01, ge=0, le=1_000_000)


class CorsConfig(_Section):
    """`cors`: the browser origins allowed to call the relay (`https://chat.example.com`, or `*` for any); none by
    default, which sends no CORS headers at all."""

    origins: list[str] = Field(default_factory=list, max_length=100)
    max_age_s: int = Field(600, ge=0, le=86_400)

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        cleaned = []
        for i, origin in enumerate(value):
            if origin == "*":
                cleaned.append(origin)
                continue
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
                or parts.username is not None
                or not re.fullmatch(r"[A-Za-z0-9.:\[\]/-]+", origin)
            ):
                raise ValueError(f"[{i}]: an origin is scheme://host[:port], like https://chat.example.com, or *")
            origin = origin.rstrip("/").lower()
            if (parts.scheme, parts.port) in (("http", 80), ("https", 443)):  # browsers leave a default port out
                origin = origin.rsplit(":", 1)[0]
            cleaned.append(origin)
        return cleaned


def _default_models() -> dict[str, ModelConfig]:
    return {f"mj-{mode}": ModelConfig(mode=mode) for mode in MODES}


# Credits per job when no `prices` are configured: a grid (imagine, variation, reroll, zoom, pan, vary region,
# blend) and a face swap cost `default`; an upscale, a describe and a shorten cost half of it on fast and turbo.
def _default_prices() -> dict[str, dict[str, int]]:
    light = {"upscale": 1, "describe": 1, "shorten": 1}
    return {
        "mj-fast": {"default": 2, **light},
        "mj-relax": {"default": 1},
        "mj-turbo": {"default": 4, **{kind: 2 for kind in light}},
    }


def _default_providers() -> list[ProviderConfig]:
    return [ProviderConfig(name="simulator", dialect="simulator", poll_interval_s=0.25)]


class Config(_Section):
    data_dir: str = "data"
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    images: ImagesConfig = ImagesConfig()
    api: ApiConfig = ApiConfig()
    models: dict[str, ModelConfig] = Field(default_factory=_default_models, min_length=1)
    prices: dict[str, dict[str, int]] = Field(default_factory=_default_prices)
    providers: list[ProviderConfig] = Field(default_factory=_default_providers, min_length=1)
    jobs: JobsConfig = JobsConfig()
    hooks: HooksConfig = HooksConfig()
    health: HealthConfig = HealthConfig()
    billing: BillingConfig = BillingConfig()
    cors: CorsConfig = CorsConfig()

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: str) -> str:
        return _no_nul(value) or ""

    @model_validator(mode="after")
    def _health_caps(self) -> Config:
        problems = []
        for where, policy in [("health", self.health)] + [
            (f"providers[{i}].health", self.health_of(p))
            for i, p in enumerate(self.providers)
            if p.health and {"cooldown_s", "max_cooldown_s"} & p.health.model_fields_set
        ]:
            if policy.max_cooldown_s < policy.cooldown_s:
                problems.append(
                    f"{where}.max_cooldown_s: {policy.max_cooldown_s:g} is shorter than cooldown_s "
                    f"({policy.cooldown_s:g})"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", name):
                raise ValueError(f"{name}: a model name is letters, digits and _.:- (at most 64)")
        return value

    @field_validator("prices")
    @classmethod
    def _price_values(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for model, table in value.items():
            for action, price in table.items():
                if action != "default" and action not in PRICE_KEYS:
                    raise ValueError(
                        f"{model}.{action}: not a kind of task (use default or one of {', '.join(PRICE_KEYS)})"
                    )
                if not 0 <= price <= MAX_CREDITS:
                    raise ValueError(f"{model}.{action}: a price is a whole number of credits, 0 to {MAX_CREDITS}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = []
        names = [p.name for p in self.providers]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"providers: the name {name!r} is used twice")
        if self.api.default_model not in self.models:
            problems.append(f"api.default_model: {self.api.default_model!r} is not one of models")
        for name, model in self.models.items():
            if not any(model.mode in p.modes and model.bot in p.bots for p in self.providers):
                problems.append(f"models.{name}: no provider serves mode {model.mode} with bot {model.bot}")
            table = self.prices.get(name, {})
            if "imagine" not in table and "default" not in table:
                problems.append(f"prices.{name}: the model has no price (give imagine or default)")
        for name in self.prices:
            if name not in self.models:
                problems.append(f"prices.{name}: not one of models")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- derived -------------------------------------------------------------------------------------------------

    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{Path(self.data_dir) / 'mj-relay.db'}"

    def images_dir(self) -> Path:
        return Path(self.images.dir) if self.images.dir else Path(self.data_dir) / "images"

    def price(self, model: str, action: str) -> int:
        table = self.prices[model]
        return table.get(action, table.get("default", table.get("imagine", 0)))

    def poll_interval(self, provider: ProviderConfig) -> float:
        return provider.poll_interval_s or self.jobs.poll_interval_s

    def health_of(self, provider: ProviderConfig) -> HealthConfig:
        """The health settings of one provider: the top-level section with the provider's overrides."""
        if provider.health is None:
            return self.health
        return self.health.model_copy(update={k: getattr(provider.health, k) for k in provider.health.model_fields_set})


# -- loading -------------------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# The most values (mappings, lists, scalars) a configuration may hold once its YAML aliases are expanded. A real one
# holds a few hundred; aliases that repeat each other level by level reach billions from a few lines.
MAX_VALUES = 100_000


class _Unexpandable(Exception):
    def __init__(self, problem: str) -> None:
        self.problem = problem


def _interpolate(
    node: Any,
    env: Mapping[str, str],
    loc: tuple[int | str, ...],
    unset: dict[str, list[str]],
    seen: list[int] | None = None,
    inside: frozenset[int] = frozenset(),
) -> Any:
    """`node` with `${VAR}` replaced; an unset variable becomes the empty string, and is recorded in `unset` (the
    YAML path of the value -> the variables it misses). Raises `_Unexpandable` for a value that holds itself (an
    alias inside its own anchor) or past `MAX_VALUES` values."""
    seen = [0] if seen is None else seen
    seen[0] += 1
    if seen[0] > MAX_VALUES:
        raise _Unexpandable(
            f"{_path(loc) or '(root)'}: the configuration holds more than {MAX_VALUES} values "
            "(YAML aliases that repeat each other?)"
        )
    if isinstance(node, dict | list):
        if id(node) in inside:
            raise _Unexpandable(f"{_path(loc)}: a YAML alias refers to a value it is inside")
        within = inside | {id(node)}
        if isinstance(node, dict):
            return {key: _interpolate(value, env, (*loc, str(key)), unset, seen, within) for key, value in node.items()}
        return [_interpolate(value, env, (*loc, i), unset, seen, within) for i, value in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] or default is None):
            return env[name]
        if default is not None:
            return default
        unset.setdefault(_path(loc) or "(root)", []).append(name)
        return ""

    return _VAR.sub(replace, node)


_SUBPATH = re.compile(r"^([A-Za-z_][A-Za-z0-9_.:\-]*): (.+)$", re.DOTALL)


def _pydantic_problems(error: ValidationError) -> list[tuple[str, str]]:
    """Each problem as (YAML path, message)."""
    problems = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if isinstance(p, int | str))
        text = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            text = "unknown key"
        elif item["type"] == "missing":
            text = "required"
        for message in text.split("\n"):
            where = _path(loc)
            sub = _SUBPATH.match(message) if item["type"] == "value_error" else None
            if sub:  # a model validator names the key it is about: fold it into the path
                where = f"{where}.{sub.group(1)}" if where else sub.group(1)
                message = sub.group(2)
            problems.append((where, message))
    return problems


def _within(where: str, paths: Mapping[str, object]) -> bool:
    """Whether a YAML path is one of `paths` or inside one of them."""
    return any(where == path or where.startswith((f"{path}.", f"{path}[")) for path in paths)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, noting every key a mapping gives twice (YAML would keep the last without a word, so a
    second `providers:` would replace the first). A merge key's (`<<: *base`) values may still be overridden."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, int, str]] = []  # (line, column, problem)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: YAML's own construction refuses it
                continue
            if seen is not key_node:
                mark = key_node.start_mark
                problem = f"the key {key!r} is given twice (first at {_where(seen.start_mark).removesuffix(': ')})"
                self.duplicates.append((mark.line, mark.column, _where(mark) + problem))
        return super().construct_mapping(node, deep=deep)


def _where(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def parse_config(text: str, source: str = "config", env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate a configuration. Every problem is reported at once: the unset variables first, then what
    validation finds, leaving out what it says about a value whose variable is unset (it saw an empty string)."""
    loader = _Loader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        where = _where(getattr(exc, "problem_mark", None))
        raise ConfigError([f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"], source) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([problem for _, _, problem in sorted(loader.duplicates)], source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections"], source)
    unset: dict[str, list[str]] = {}
    try:
        data = _interpolate(raw, os.environ if env is None else env, (), unset)
    except _Unexpandable as exc:
        raise ConfigError([exc.problem], source) from None
    problems = [
        f"{where}: the environment variable {name} is not set" for where, names in unset.items() for name in names
    ]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for where, message in _pydantic_problems(exc):
            if not _within(where, unset):
                problems.append(f"{where}: {message}" if where else message)
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | os.PathLike[str] | None) -> Config:
    if path is None:
        return default_config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file ({exc.strerror})"], str(path)) from None
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        raise ConfigError([f"cannot read the file ({problem})"], str(path)) from None
    return parse_config(text, str(path))


def default_config() -> Config:
    return Config()
