"""The collector's per-request metrics: plain counters rendered at scrape time."""

from __future__ import annotations

from ingest.metrics import CollectorMetrics
from collector_support import metric_samples


def test_counters_and_histogram_render_as_prometheus_series():
    m = CollectorMetrics()
    for _ in range(3):
        m.request("pixel", 200)
    m.request("beacon", 503)
    m.accept("beacon", 7)
    m.reject("invalid")
    m.reject("invalid", 2)
    for seconds in (0.0005, 0.001, 0.0011, 0.004, 30.0):
        m.publish_latency(seconds)

    s = metric_samples(m.render().decode())

    assert s[("collector_requests_total", (("route", "pixel"), ("status", "200")))] == 3
    assert s[("collector_requests_total", (("route", "beacon"), ("status", "503")))] == 1
    assert s[("collector_events_accepted_total", (("source", "beacon"),))] == 7
    assert s[("collector_events_rejected_total", (("reason", "invalid"),))] == 3
    bucket = lambda le: s[("collector_publish_latency_seconds_bucket", (("le", le),))]  # noqa: E731
    # A value equal to a bound counts in that bucket (le: less or equal); buckets are cumulative.
    assert bucket("0.001") == 2
    assert bucket("0.0025") == 3
    assert bucket("0.005") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert s[("collector_publish_latency_seconds_count", ())] == 5
    assert abs(s[("collector_publish_latency_seconds_sum", ())] - 30.0066) < 1e-9


def test_series_appear_only_once_counted():
    s = metric_samples(CollectorMetrics().render().decode())
    assert not [k for k in s if k[0] in ("collector_requests_total", "collector_events_accepted_total")]
    assert s[("collector_publish_latency_seconds_count", ())] == 0
