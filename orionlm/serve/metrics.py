"""The server's Prometheus metrics (GET /metrics), in Prometheus' text exposition format 0.0.4.

Written here rather than with prometheus_client: the format is a few lines per metric (`# HELP`, `# TYPE`, then
`name{label="value"} number`; a histogram as cumulative `_bucket{le="..."}` counts, `_sum` and `_count`), and
a handful of counters, gauges and histograms needs no dependency.

The token, queue and latency metrics have vLLM's names with `orionlm:` for `vllm:`, so a vLLM dashboard reads
them after that rename. Every value changes on the event loop's thread (the request handlers and the HTTP
middleware) and is read there by /metrics: no locks.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from .protocol import Health

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))


def decades(first: int, last: int) -> tuple[float, ...]:
    """Histogram bounds 1, 2.5, 5 x 10^first ... 10^last (written from text, so 0.0025 is not 0.0025000000000000005)."""
    return (*(float(f"{m}e{e}") for e in range(first, last) for m in (1, 2.5, 5)), float(f"1e{last}"))


class Metric:
    """A named metric with labels that every sample carries; subclasses say their kind and samples."""

    kind = ""

    def __init__(self, name: str, doc: str, labels: dict[str, str]) -> None:
        self.name, self.doc, self.labels = name, doc, labels

    def samples(self) -> Iterator[str]:
        raise NotImplementedError

    def exposition(self) -> list[str]:
        doc = self.doc.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {doc}", f"# TYPE {self.name} {self.kind}", *self.samples()]


class Counter(Metric):
    """A count that only grows: one per combination of values of `label_names` (without any: one, from 0)."""

    kind = "counter"

    def __init__(self, name: str, doc: str, labels: dict[str, str], label_names: tuple[str, ...] = ()) -> None:
        super().__init__(name, doc, labels)
        self.label_names = label_names
        self.values: dict[tuple[str, ...], float] = {} if label_names else {(): 0.0}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def samples(self) -> Iterator[str]:
        for values, count in self.values.items():
            labels = self.labels | dict(zip(self.label_names, values, strict=True))
            yield f"{self.name}{_labels(labels)} {_number(count)}"


class Gauge(Metric):
    """A value read when scraped."""

    kind = "gauge"

    def __init__(self, name: str, doc: str, labels: dict[str, str], read: Callable[[], float]) -> None:
        super().__init__(name, doc, labels)
        self.read = read

    def samples(self) -> Iterator[str]:
        yield f"{self.name}{_labels(self.labels)} {_number(self.read())}"


class Histogram(Metric):
    """Observations counted in buckets (each counts those <= its bound `le`, +Inf all), with their sum."""

    kind = "histogram"

    def __init__(self, name: str, doc: str, labels: dict[str, str], bounds: tuple[float, ...]) -> None:
        super().__init__(name, doc, labels)
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket alone, not cumulative; the last is above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self) -> Iterator[str]:
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            yield f"{self.name}_bucket{_labels(self.labels | {'le': _number(bound)})} {total}"
        yield f"{self.name}_sum{_labels(self.labels)} {_number(self.sum)}"
        yield f"{self.name}_count{_labels(self.labels)} {total}"


class ServerMetrics:
    """What /metrics tells about one server: HTTP requests by endpoint and status, tokens, the engine's queues, and
    per generated sequence (each of a request's n choices) its time to first token, the time between its tokens
    and its whole latency, timed from when it was handed to the engine to when its handler received the token.

    `load()` gives the engine's running and waiting requests (Server.health)."""

    def __init__(self, model_name: str, load: Callable[[], Health]) -> None:
        model = {"model_name": model_name}
        by = ("endpoint", "status")
        self.http_requests = Counter("orionlm:http_requests_total", "HTTP requests answered", {}, by)
        self.prompt_tokens = Counter("orionlm:prompt_tokens_total", "Prompt tokens handed to the engine", model)
        self.generation_tokens = Counter("orionlm:generation_tokens_total", "Tokens generated into responses", model)
        self.time_to_first_token = Histogram(
            "orionlm:time_to_first_token_seconds",
            "Seconds from a sequence's start to its first token",
            model,
            decades(-3, 2),
        )
        self.inter_token_latency = Histogram(
            "orionlm:inter_token_latency_seconds", "Seconds between two tokens of a sequence", model, decades(-3, 1)
        )
        self.e2e_latency = Histogram(
            "orionlm:e2e_request_latency_seconds", "Seconds from a sequence's start to its end", model, decades(-2, 3)
        )
        running = Gauge("orionlm:num_requests_running", "Sequences in the running batch", model,
                        lambda: load().running)  # fmt: skip
        waiting = Gauge("orionlm:num_requests_waiting", "Sequences waiting for a row or prefilling", model,
                        lambda: load().waiting)  # fmt: skip
        self.metrics: list[Metric] = [self.http_requests, running, waiting, self.prompt_tokens, self.generation_tokens,
                                      self.time_to_first_token, self.inter_token_latency, self.e2e_latency]  # fmt: skip

    def token(self, started: float, previous: float | None, finished: bool) -> float:
        """Record a token received now for a sequence that started at `started` (perf_counter seconds), its previous
        token at `previous` (None: this is its first), and its end if `finished`; returns now."""
        now = time.perf_counter()
        self.generation_tokens.inc()
        if previous is None:
            self.time_to_first_token.observe(now - started)
        else:
            self.inter_token_latency.observe(now - previous)
        if finished:
            self.e2e_latency.observe(now - started)
        return now

    def exposition(self) -> str:
        return "\n".join(line for metric in self.metrics for line in metric.exposition()) + "\n"


class CountRequests:
    """ASGI middleware that counts every HTTP request in `counter` by endpoint (its path when a route has it, else
    'other': a scanner's paths do not each become a series) and the status answered."""

    def __init__(self, app: Any, counter: Counter, paths: set[str]) -> None:
        self.app, self.counter, self.paths = app, counter, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception that no handler answered: Starlette's outermost layer answers it with a 500

        async def noted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            self.counter.inc(scope["path"] if scope["path"] in self.paths else "other", str(status))
