"""`Metrics.of`: a labelled child found once and kept, counting into the same series `labels` names."""

from __future__ import annotations

import pytest

from relay import metrics as metrics_module
from relay.metrics import Metrics


def _sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_kept_child_counts_into_the_series_labels_names() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.of(metrics.requests, "/v1/models", "GET", "2xx").inc()
    metrics.requests.labels("/v1/models", "GET", "2xx").inc()
    metrics.of(metrics.request_seconds, "/v1/models").observe(0.02)
    labels = {"route": "/v1/models", "method": "GET", "status": "2xx"}
    assert _sample(metrics, "mj_relay_http_requests_total", labels) == 4
    assert _sample(metrics, "mj_relay_http_request_seconds_count", {"route": "/v1/models"}) == 1
    assert metrics.of(metrics.requests, "/v1/models", "GET", "2xx") is metrics.of(
        metrics.requests, "/v1/models", "GET", "2xx"
    )


def test_the_same_values_of_two_metrics_are_two_children() -> None:
    metrics = Metrics()
    metrics.of(metrics.credits_captured, "mj-fast", "imagine").inc(5)
    metrics.of(metrics.credits_released, "mj-fast", "imagine").inc(2)
    labels = {"model": "mj-fast", "kind": "imagine"}
    assert _sample(metrics, "mj_relay_credits_captured_total", labels) == 5
    assert _sample(metrics, "mj_relay_credits_released_total", labels) == 2


def test_combinations_past_the_bound_are_counted_but_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    monkeypatch.setattr(metrics_module, "_MAX_KEPT", 2)
    for outcome in ("applied", "late", "unknown", "unknown"):
        metrics.of(metrics.upstream_hooks, "sim", outcome).inc()
    assert len(metrics._children) == 2
    assert _sample(metrics, "mj_relay_upstream_hooks_total", {"provider": "sim", "outcome": "unknown"}) == 2
