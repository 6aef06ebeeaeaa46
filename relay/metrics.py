"""Prometheus metrics, one registry per app. Labels are route templates, methods, status classes, models,
provider names, operations and outcomes: never ids, prompts or keys."""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

_LabelledT = TypeVar("_LabelledT", bound=MetricWrapperBase)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_JOB_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# The most label combinations `Metrics.of` keeps found (far more than the relay's bounded labels make): past it, a
# combination is looked up each time, as without the cache.
_MAX_KEPT = 10_000


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        self.requests = Counter(
            "mj_relay_http_requests",
            "HTTP requests answered, by route template, method and status class.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "mj_relay_http_request_seconds",
            "Time to answer an HTTP request (for streams: until the stream ends).",
            ["route"],
            buckets=_LATENCY_BUCKETS + (60, 120, 300, 600),
            registry=self.registry,
        )
        self.database_unavailable = Counter(
            "mj_relay_database_unavailable",
            "Requests answered 503 because the database could not serve them (down, unreachable, too slow, locked).",
            registry=self.registry,
        )
        self.jobs = Counter(
            "mj_relay_jobs",
            "Jobs that reached an end, by model, kind of task, provider and outcome.",
            ["model", "kind", "provider", "outcome"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "mj_relay_job_seconds",
            "Time from a job's creation to its end, by model and outcome.",
            ["model", "outcome"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mj_relay_jobs_in_flight",
            "Jobs submitted to a provider and not yet ended.",
            ["provider"],
            registry=self.registry,
        )
        self.in_flight_elsewhere = Gauge(
            "mj_relay_jobs_in_flight_elsewhere",
            "Jobs other relay processes on the same database run on a provider (counted by max_in_flight).",
            ["provider"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "mj_relay_upstream_request_seconds",
            "Latency of calls to upstream providers, by provider, operation and outcome.",
            ["provider", "operation", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.provider_health = Gauge(
            "mj_relay_provider_health",
            "1 for the health state each provider is in (healthy, cooling, half-open, down), 0 for the others.",
            ["provider", "state"],
            registry=self.registry,
        )
        self.provider_transitions = Counter(
            "mj_relay_provider_health_transitions",
            "Changes of a provider's health, by provider and the state entered.",
            ["provider", "state"],
            registry=self.registry,
        )

        self.upstream_hooks = Counter(
            "mj_relay_upstream_hooks",
            "Upstream hook calls taken, by provider and outcome "
            "(applied, adopted, forwarded, late, unknown, unreadable, failed).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.maybe_sent = Counter(
            "mj_relay_maybe_sent_jobs",
            "Jobs a relay process left PENDING while submitting them, looked up in their provider's task list: "
            "adopted (their task found), ended (never taken), unknown (the list cannot tell: left for the sweep).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.client_hooks = Counter(
            "mj_relay_client_hooks",
            "Client hook deliveries: delivered, retried (a try failed, another follows), failed (given up).",
            ["outcome"],
            registry=self.registry,
        )

        # Money, by model and kind of task only (never keys): what jobs paid, and what went back to their keys.
        self.credits_captured = Counter(
            "mj_relay_credits_captured",
            "Credits captured (jobs that succeeded and paid their hold), by model and kind of task.",
            ["model", "kind"],
            registry=self.registry,
        )
        self.credits_released = Counter(
            "mj_relay_credits_released",
            "Credits released (holds of jobs that ended without success, given back), by model and kind of task.",
            ["model", "kind"],
            registry=self.registry,
        )
        self.holds_open = Gauge(
            "mj_relay_holds_open",
            "Jobs holding credits now (read from the database at each scrape: the same figure on every process).",
            registry=self.registry,
        )
        self.credits_held = Gauge(
            "mj_relay_credits_held",
            "Credits held by running jobs now (read from the database at each scrape).",
            registry=self.registry,
        )

        self.gc_pause_seconds = Histogram(
            "mj_relay_gc_pause_seconds",
            "Collections of Python's garbage collector, by generation (0 youngest, 2 oldest): each holds the event "
            "loop while it runs.",
            ["generation"],
            buckets=_PAUSE_BUCKETS,
            registry=self.registry,
        )
        # Made here, not in the collector's callback: a collection can start inside `labels`, which holds its lock.
        self._gc_pauses = [self.gc_pause_seconds.labels(str(generation)) for generation in range(3)]

    def gc_paused(self, generation: int, seconds: float) -> None:
        """Count one collection of the garbage collector (`relay.collector.Pauses`)."""
        if 0 <= generation < len(self._gc_pauses):
            self._gc_pauses[generation].observe(seconds)

    def of(self, metric: _LabelledT, *values: str) -> _LabelledT:
        """`metric.labels(*values)`, each combination found once: `labels` checks and copies its values on every
        call, which every request, hook call and ending would pay (the relay never removes a labelled child)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*values)
            if len(self._children) < _MAX_KEPT:
                self._children[key] = child
        return child  # type: ignore[return-value]

    def settled(self, model: str, kind: str, captured: bool, amount: int) -> None:
        """Count one job's capture or release."""
        self.of(self.credits_captured if captured else self.credits_released, model, kind).inc(amount)

    def render(self) -> bytes:
        return generate_latest(self.registry)
