"""What the README and config.example.yaml tell an operator stays what the code does: the example file gives every
field of the fixed sections at its default (its comments say "with its default"), and the README's metrics table
names every metric the relay exports, with its labels."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from relay.config import Config, ProviderConfig, S3Config, SimulatorConfig, default_config, parse_config
from relay.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"
README = ROOT / "README.md"
ENV = {"ACCT_A_SECRET": "a", "RESELLER_KEY": "b", "V1_KEY": "c"}
# The sections the example writes as examples rather than defaults (its own models, prices and providers).
EXAMPLES = {"models", "prices", "providers"}


def _differences(given: Any, default: Any, where: str) -> list[str]:
    if isinstance(given, BaseModel):
        found = []
        for name in type(given).model_fields:
            found += _differences(getattr(given, name), getattr(default, name), f"{where}.{name}")
        return found
    return [] if given == default else [f"{where}: {given!r}, the default is {default!r}"]


def _missing(model: type[BaseModel], raw: Any, where: str) -> list[str]:
    found = []
    for name, field in model.model_fields.items():
        if not isinstance(raw, dict) or name not in raw:
            found.append(f"{where}.{name}".lstrip("."))
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _missing(field.annotation, raw[name], f"{where}.{name}")
    return found


def test_the_example_file_gives_every_setting_at_its_default() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    example, default = parse_config(text, str(EXAMPLE), ENV), default_config()
    drift = []
    for section in set(Config.model_fields) - EXAMPLES:
        drift += _differences(getattr(example, section), getattr(default, section), section)
    simulator = next(p.simulator for p in example.providers if p.simulator is not None)
    drift += _differences(simulator, SimulatorConfig(), "providers[].simulator")
    assert not drift


def test_the_example_file_names_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    missing = [m for m in _missing(Config, raw, "") if m != "images.s3"]
    first = raw["providers"][0]
    missing += [f"providers[0].{m}" for m in _missing(ProviderConfig, first, "") if m != "simulator"]
    simulator = next(p["simulator"] for p in raw["providers"] if "simulator" in p)
    missing += [f"simulator.{m}" for m in _missing(SimulatorConfig, simulator, "")]
    # images.s3 is commented out (a bucket is no default): each of its settings is still there, as a comment.
    missing += [f"images.s3.{name}" for name in S3Config.model_fields if not re.search(rf"^\s*#\s+{name}:", text, re.M)]
    assert not missing


def test_the_readme_lists_every_metric_with_its_labels() -> None:
    table = README.read_text(encoding="utf-8").split("| metric | labels |", 1)[1].split("\n\n", 1)[0]
    documented: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        names_cell, labels_cell = row.strip("|").split("|", 1)
        while re.search(r"\([^()]*\)", labels_cell):  # what a label's values are, or what the metric means
            labels_cell = re.sub(r"\([^()]*\)", "", labels_cell)
        for name in re.findall(r"`(mj_relay_[a-z_]+)`", names_cell):
            documented[name] = set(re.findall(r"`([a-z_]+)`", labels_cell))

    exported = {
        metric._name + ("_total" if metric._type == "counter" else ""): set(metric._labelnames)
        for metric in vars(Metrics()).values()
        if isinstance(metric, MetricWrapperBase)
    }
    assert documented == exported


# A setting the README names with its default: `hooks.timeout_s` (5 s), `images.url_ttl_s` (24 h), `error_rate` (50%)
# (the health table names its settings without their section).
STATED = re.compile(
    r"`((?:server|database|images|api|jobs|hooks|health|billing|cors)\.[a-z_.]+|[a-z_]+)`"
    r" \((\d[\d,.]*)(?: ?(s|h|minutes|%|×))?[),;:]"
)
UNITS = {None: 1, "s": 1, "h": 3600, "minutes": 60, "%": 0.01, "×": 1}


def test_the_defaults_the_readme_states_are_the_code_s() -> None:
    config = default_config()
    checked, wrong = 0, []
    for match in STATED.finditer(README.read_text(encoding="utf-8")):
        path, number, unit = match.groups()
        if "." not in path:
            if path not in type(config.health).model_fields:
                continue
            path = f"health.{path}"
        value: Any = config
        for part in path.split("."):
            value = getattr(value, part)
        checked += 1
        if float(number.replace(",", "")) * UNITS[unit] != value:
            wrong.append(f"{match.group(0)}: the default is {value}")
    assert checked >= 27
    assert not wrong
