"""The Prometheus text format of serve/metrics.py, exactly, and read back by the tests' parser."""

import pytest

pytest.importorskip("fastapi")

from live_server import metric, parse_metrics  # noqa: E402

from orionlm.serve.metrics import Counter, Gauge, Histogram, decades  # noqa: E402


def test_counters_gauges_and_histograms_in_text_format():
    """Label values and help escaped; a counter without variable labels shows 0 before its first count, one with
    them a sample per combination; each histogram bucket counts the observations <= its bound (the bound itself
    included), cumulatively, +Inf all of them."""
    tokens = Counter("tokens_total", "Tokens", {"model_name": 'say "hi"\\\n'})
    hits = Counter("hits_total", "Hits, by\nendpoint", {}, ("endpoint",))
    hits.inc("/x")
    hits.inc("/y", amount=2)
    hits.inc("/x")
    queue = Gauge("queue", "Waiting", {}, lambda: 3)
    latency = Histogram("latency_seconds", "Latency", {"model_name": "m"}, (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        latency.observe(value)
    text = "\n".join(line for m in (tokens, hits, queue, latency) for line in m.exposition())
    expected = r"""# HELP tokens_total Tokens
# TYPE tokens_total counter
tokens_total{model_name="say \"hi\"\\\n"} 0.0
# HELP hits_total Hits, by\nendpoint
# TYPE hits_total counter
hits_total{endpoint="/x"} 2.0
hits_total{endpoint="/y"} 2.0
# HELP queue Waiting
# TYPE queue gauge
queue 3.0
# HELP latency_seconds Latency
# TYPE latency_seconds histogram
latency_seconds_bucket{model_name="m",le="0.1"} 2
latency_seconds_bucket{model_name="m",le="1.0"} 3
latency_seconds_bucket{model_name="m",le="+Inf"} 4
latency_seconds_sum{model_name="m"} 3.65
latency_seconds_count{model_name="m"} 4"""
    assert text == expected
    samples = parse_metrics(text)
    assert metric(samples, "tokens_total", model_name='say "hi"\\\n') == 0
    assert metric(samples, "latency_seconds_bucket", model_name="m", le="+Inf") == 4
    assert metric(samples, "hits_total", endpoint="/x") == 2


def test_decades():
    assert decades(-3, 0) == (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
