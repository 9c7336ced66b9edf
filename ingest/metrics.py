"""Prometheus metrics of one collector app, in that app's own registry.

A per-app ``CollectorRegistry`` (not the global one) lets several apps live in one
process (tests) without "Duplicated timeseries" errors.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "CollectorMetrics"]

# Acks normally take a few ms (linger + one round trip); the tail shows trouble.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "collector_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.accepted = Counter(
            "collector_events_accepted", "events acknowledged by Kafka", ["source"], registry=r
        )
        self.rejected = Counter(
            "collector_events_rejected",
            "events not accepted, by reason (validation codes, or why publishing failed)",
            ["reason"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "collector_publish_latency_seconds",
            "time from handing a request's events to the producer until Kafka acknowledged all of them",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "collector_inflight_bytes", "budgeted bytes of events awaiting a Kafka ack", registry=r
        )
        self.inflight_events = Gauge("collector_inflight_events", "events awaiting a Kafka ack", registry=r)
        self.producer_started = Gauge(
            "collector_producer_started", "1 when the Kafka producer is connected and started", registry=r
        )
        # Label lookups take a lock and build tuples; cache the children on the hot path.
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._accepted_children: dict[str, Counter] = {}
        self._rejected_children: dict[str, Counter] = {}

    def bind_state(
        self, inflight_bytes: Callable[[], float], inflight_events: Callable[[], float], started: Callable[[], float]
    ) -> None:
        # Read at scrape time: no gauge updates per event.
        self.inflight_bytes.set_function(inflight_bytes)
        self.inflight_events.set_function(inflight_events)
        self.producer_started.set_function(started)

    def request(self, route: str, status: int) -> None:
        child = self._request_children.get((route, status))
        if child is None:
            child = self._request_children[(route, status)] = self.requests.labels(route, str(status))
        child.inc()

    def accept(self, source: str, n: int) -> None:
        child = self._accepted_children.get(source)
        if child is None:
            child = self._accepted_children[source] = self.accepted.labels(source)
        child.inc(n)

    def reject(self, reason: str, n: int = 1) -> None:
        child = self._rejected_children.get(reason)
        if child is None:
            child = self._rejected_children[reason] = self.rejected.labels(reason)
        child.inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
