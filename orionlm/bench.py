"""`orionlm bench`: serving speed of the continuous-batching engine, in the shape of the Orion-MoE model
card's inference table (tokens/s by concurrency and by input length).

For every (input length, concurrency) pair, `concurrency` clients each send `requests_per_client`
requests one after another (a client sends its next request when the previous one ends), so the engine
always holds `concurrency` sequences, joining and leaving as in serving. Prompts are random token ids of
the input length; every request generates exactly `output_tokens` tokens (stop tokens ignored), greedy.
The engine runs in this process (no HTTP: what is measured is the engine, the server's cost is small).

Reported per pair: aggregate output tokens/s (all clients' tokens over the wall time), tokens/s per
client (each request's tokens after its first over its decode time, the median), time to first token and
inter-token latency (median and p90). A warm-up request runs first.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .generation.engine import Engine, Request
from .generation.sampling import GenerationConfig
from .model import OrionLM


@dataclass
class BenchRow:
    input_len: int
    concurrency: int
    aggregate: float  # output tokens/s of all clients together
    per_client: float  # median decode tokens/s of one request
    ttft: tuple[float, float]  # seconds, median and p90
    itl: tuple[float, float]  # seconds, median and p90

    def as_json(self) -> dict[str, Any]:
        """The row with its units in the names (`orionlm bench --json`)."""
        return {
            "input_tokens": self.input_len,
            "concurrency": self.concurrency,
            "aggregate_tokens_per_s": self.aggregate,
            "tokens_per_s_per_client": self.per_client,
            "ttft_s": {"median": self.ttft[0], "p90": self.ttft[1]},
            "itl_s": {"median": self.itl[0], "p90": self.itl[1]},
        }


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def run_pair(engine: Engine, input_len: int, concurrency: int, output_tokens: int, requests_per_client: int,
             seed: int = 0) -> BenchRow:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    config = GenerationConfig(max_new_tokens=output_tokens, do_sample=False)

    def new_request() -> Request:
        return Request(torch.randint(0, vocab, (input_len,), generator=generator).tolist(), config)

    sent: dict[int, float] = {}
    stamps: dict[int, list[float]] = {}
    left = [requests_per_client - 1] * concurrency
    client_of: dict[int, int] = {}

    def send(client: int) -> None:
        request = new_request()
        engine.submit(request)
        sent[request.id], stamps[request.id], client_of[request.id] = time.perf_counter(), [], client

    start = time.perf_counter()
    for client in range(concurrency):
        send(client)
    while engine.has_work:
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            stamps[event.request.id].append(now)
            client = client_of[event.request.id]
            if event.finish_reason is not None and left[client]:
                left[client] -= 1
                send(client)
    wall = time.perf_counter() - start
    ttft = [stamps[i][0] - sent[i] for i in sent]
    itl = [b - a for times in stamps.values() for a, b in zip(times, times[1:], strict=False)]
    per_client = [(len(t) - 1) / (t[-1] - t[0]) for t in stamps.values() if len(t) > 1 and t[-1] > t[0]]
    total = sum(len(t) for t in stamps.values())
    return BenchRow(input_len, concurrency, total / wall, statistics.median(per_client) if per_client else 0.0,
                    _percentiles(ttft), _percentiles(itl))  # fmt: skip


def bench(model: OrionLM, concurrencies: list[int], input_lengths: list[int], output_tokens: int,
          requests_per_client: int = 2, prefill_chunk: int = 512) -> list[BenchRow]:  # fmt: skip
    engine = Engine(model, max_batch=max(concurrencies), prefill_chunk=prefill_chunk)
    run_pair(engine, min(input_lengths), 1, min(8, output_tokens), 1)  # warm-up
    return [
        run_pair(engine, length, concurrency, output_tokens, requests_per_client)
        for length in input_lengths
        for concurrency in concurrencies
    ]


def format_table(rows: list[BenchRow]) -> str:
    single = {r.input_len: r.aggregate for r in rows if r.concurrency == 1}
    lines = [
        "| input tokens | concurrency | aggregate tok/s | vs 1 client | tok/s per client | TTFT median / p90 (ms) "
        "| ITL median / p90 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r.aggregate / single[r.input_len]:.2f}x" if r.input_len in single else "-"
        lines.append(
            f"| {r.input_len} | {r.concurrency} | {r.aggregate:,.1f} | {ratio} | {r.per_client:,.1f} | "
            f"{r.ttft[0] * 1e3:,.0f} / {r.ttft[1] * 1e3:,.0f} | {r.itl[0] * 1e3:,.1f} / {r.itl[1] * 1e3:,.1f} |"
        )
    return "\n".join(lines)
