"""Batched decoding against its floor: one Engine decode step of B running requests (--batches, default 1, 4, 8
and 16) for generate_speed.py's dense Llama and 8-expert top-2 Mixtral shapes (float32, the engine's decode
layout), beside the two floors of such a step measured in the same run:

    bytes  the weights the step reads (every matrix but the embedding table, of which it reads B rows; for the
           MoE only the experts that some row of the step routes to, counted per layer) over the read bandwidth
           (the fastest sum over 1 GiB with the same threads)
    FLOPs  two per multiply-add of the weight products of B tokens (the MoE's routed experts only) over the
           rate of a large float32 matmul with the same threads

A step cannot beat the larger of the two; "x floor" is the median step time over it. Each request has a
32-token prompt; the steps are timed once every request runs (no prefill in them), --repeats rounds of --steps
steps, the batches taking turns, and the median step of all rounds is kept.

    .venv/bin/python benchmarks/batched_decode.py [--shapes dense moe] [--batches 1 4 8 16] [--steps 32]
        [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine_line, read_bandwidth
from generate_speed import DECODE_PROMPT_LEN, hf_model, to_orionlm

from orionlm.generation import Engine, GenerationConfig, Request
from orionlm.nn.moe import MoE

MATMUL = 2048  # the side of the square product that measures the FLOP rate


def matmul_rate(repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` float32 (MATMUL x MATMUL) products."""
    a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
    fastest = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * MATMUL**3 / fastest


class StepCounter:
    """Per MoE layer, the number of distinct experts each forward pass routed to (from MoE.forward's counts)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.used: list[int] = []
        for module in model.modules():
            if isinstance(module, MoE):
                module.register_forward_hook(lambda _m, _i, out: self.used.append(int((out[2] > 0).sum())))


def step_work(model: torch.nn.Module, batch: int, experts_used: float) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step of `batch` rows, experts_used: mean experts read per MoE layer."""
    config = model.config
    reads = flops = 0.0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if "embed_tokens" in name:
            reads += batch * p.shape[-1] * p.element_size()
        elif "experts" in name:  # (E, out, in) stacks
            reads += size * experts_used / config.num_experts
            flops += 2 * batch * p.numel() * config.experts_per_token / config.num_experts
        elif p.dim() >= 2:
            reads += size
            flops += 2 * batch * p.numel()
        else:
            reads += size
    return reads, flops


def running_engine(model: torch.nn.Module, batch: int, tokens: int) -> Engine:
    """An engine with `batch` requests running (their prefills done), each with room for `tokens` more."""
    engine = Engine(model, max_batch=batch, prefill_chunk=DECODE_PROMPT_LEN)
    generator = torch.Generator().manual_seed(batch)
    config = GenerationConfig(max_new_tokens=tokens + batch + 1, do_sample=False)
    for _ in range(batch):
        prompt = torch.randint(0, model.config.vocab_size, (DECODE_PROMPT_LEN,), generator=generator).tolist()
        engine.submit(Request(prompt, config))
    while engine.waiting or engine.prefilling:
        engine.step()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=("dense", "moe"), default=["dense", "moe"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (the batches take turns)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("# batched decode step against its floor (float32)")
    print(machine_line())
    data = torch.ones(2**28)
    bandwidth = max(read_bandwidth(data) for _ in range(3))
    rate = matmul_rate()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {rate / 1e9:.0f} GFLOP/s ({MATMUL}^3 float32)\n")
    print("| model | batch | step ms | tok/s | bytes floor ms | FLOPs floor ms | x floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        model = to_orionlm(hf_model(shape))
        counter = StepCounter(model)
        engines = {b: running_engine(model, b, (args.repeats + 1) * args.steps) for b in args.batches}
        times: dict[int, list[float]] = {b: [] for b in args.batches}
        used: dict[int, list[int]] = {b: [] for b in args.batches}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for batch, engine in engines.items():
                counter.used.clear()
                for _ in range(args.steps):
                    start = time.perf_counter()
                    engine.step()
                    if round_:
                        times[batch].append(time.perf_counter() - start)
                used[batch] += counter.used
        for batch in args.batches:
            step = statistics.median(times[batch])
            experts = statistics.mean(used[batch]) if used[batch] else 0.0
            reads, flops = step_work(model, batch, experts)
            floor_bytes, floor_flops = reads / bandwidth, flops / rate
            print(f"| {shape} | {batch} | {step * 1e3:.2f} | {batch / step:.0f} | {floor_bytes * 1e3:.2f} | "
                  f"{floor_flops * 1e3:.2f} | {step / max(floor_bytes, floor_flops):.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
