"""deploy/grafana/mj-relay.json is built only on what the relay exports: every metric a query or variable names is
a series of a family in /metrics (after a job ran), in the form its type gives (a counter's `_total`, a histogram's
`_bucket`/`_sum`/`_count`), and every label it groups or filters by is one that family has."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import RunningRelay

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "mj-relay.json"
METRIC = re.compile(r"\bmj_relay_[a-z_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
# Labels PromQL or Prometheus itself adds: not the relay's to export.
BUILT_IN = {"le", "instance", "job", "__name__"}


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _exported(text: str) -> dict[str, set[str]]:
    """Each series name /metrics can carry -> the labels of its family (empty while it has no samples)."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = {label for sample in family.samples for label in sample.labels}
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = labels
    return names


def _queries(dashboard: dict[str, Any]) -> list[str]:
    found = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", []) if "expr" in target]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    return found


def test_the_dashboard_uses_only_metrics_the_relay_exports(relay: RunningRelay) -> None:
    relay.openai().images.generate(model="mj-fast", prompt="a lighthouse")
    exported = _exported(httpx.get(relay.base + "/metrics").text)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))

    queries = _queries(dashboard)
    assert len(queries) >= 20
    used: set[str] = set()
    for query in queries:
        names = set(METRIC.findall(query))
        assert names, query
        unknown = names - set(exported)
        assert not unknown, f"{query}: {unknown} is not in the relay's /metrics"
        used |= names
        known_labels = set().union(*(exported[name] for name in names))
        if all(exported[name] for name in names):  # every family has samples: its labels are known
            grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", query) for label in group.split(",")}
            matched = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", query))
            assert grouped | matched <= known_labels | BUILT_IN, f"{query}: labels beyond {known_labels}"
    # the money metrics are on it
    assert {"mj_relay_credits_captured_total", "mj_relay_credits_released_total", "mj_relay_holds_open"} <= used


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "mj-relay" and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        for target in panel["targets"]:
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable.startswith("__") or variable in variables, (panel["title"], variable)
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
