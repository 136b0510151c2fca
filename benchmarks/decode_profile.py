"""Where a batch-1 decode step's time goes, in measures a busy machine leaves intact: the CPU time of the calling
thread (time.thread_time: time slices taken by other jobs do not count), with --threads 1 by default.

For generate_speed.py's dense and MoE shapes (float32, the engine's decode layout) it prints, per decode step of
an Engine after a 32-token prompt:

    step        the whole Engine.step (forward, LM head, greedy pick, cache bookkeeping)
    matmuls     the step's weight products alone (the same matrices, layouts and calls, back to back)
    no matmuls  the step with every weight product replaced by zeros of its shape: the per-token work outside
                the weight stream (its tokens are meaningless; only its time is kept)

and, per weight shape of those models, the read speed (GB/s) of the product of one row by the matrix in each
layout, beside a plain sum over the same bytes (what the memory gives one thread). The measurements of a shape
take turns, and each number is the median of --repeats rounds.

    .venv/bin/python benchmarks/decode_profile.py [--shapes dense moe] [--threads 1] [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from common import machine_line
from generate_speed import DECODE_PROMPT_LEN, SHAPE, hf_model, to_orionlm

from orionlm.generation import Engine, GenerationConfig, Request
from orionlm.model import OrionLM
from orionlm.nn import linear as linear_module
from orionlm.nn.linear import to_column_major


def step_times(model: OrionLM, prompt: list[int], tokens: int) -> list[float]:
    """Thread CPU seconds of each decode step of one greedy request (the prefill step left out)."""
    engine = Engine(model, max_batch=1, prefill_chunk=len(prompt))
    engine.submit(Request(prompt, GenerationConfig(max_new_tokens=tokens, do_sample=False)))
    engine.step()
    times = []
    while engine.has_work:
        start = time.thread_time()
        engine.step()
        times.append(time.thread_time() - start)
    return times


def weight_products(model: OrionLM) -> Callable[[], None]:
    """The weight products of one decode step, as the step makes them: packed q|k|v, o, packed gate|up (or the
    router and two experts' batched products), down, the LM head."""
    weights = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        weights += [attention.packed.weight, attention.o_proj.weight]
        if layer.is_moe:
            weights += [mlp.gate.weight, mlp.experts.gate_up_proj[:2], mlp.experts.down_proj[:2]]
        else:
            weights += [mlp.packed.weight, mlp.down_proj.weight]
    weights.append(model.lm_head.weight)
    inputs = [torch.randn(1, 1, w.shape[-1]) for w in weights]

    def run() -> None:
        for weight, x in zip(weights, inputs, strict=True):
            if weight.dim() == 3:  # the chosen experts, one bmm as MoE._single_token makes it
                torch.bmm(x.expand(weight.shape[0], 1, -1), weight.transpose(1, 2))
            else:
                linear_module.linear(x, weight)

    return run


def median_time(fn: Callable[[], object], repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def profile_steps(kind: str, tokens: int, repeats: int) -> None:
    model = to_orionlm(hf_model(kind))
    prompt = torch.randint(0, SHAPE["vocab_size"], (DECODE_PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    step_times(model, prompt, 4)  # the decode layout, warm-up
    products = weight_products(model)

    def zeros_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    def zeros_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_zeros(a.shape[0], a.shape[1], b.shape[2])

    rounds: dict[str, list[float]] = {"step": [], "matmuls": [], "no matmuls": []}
    for _ in range(repeats):
        rounds["step"].append(statistics.median(step_times(model, prompt, tokens)))
        rounds["matmuls"].append(median_time(products))
        with mock.patch.object(linear_module.F, "linear", zeros_linear), mock.patch("torch.bmm", zeros_bmm):
            rounds["no matmuls"].append(statistics.median(step_times(model, prompt, tokens)))
    print(f"| {kind} | " + " | ".join(f"{statistics.median(v) * 1e3:.2f}" for v in rounds.values()) + " |", flush=True)


def stream_speeds(kind_shapes: list[tuple[int, int]], repeats: int) -> None:
    """GB/s of one row times each (out, in) shape, row- and column-major, against a sum over the same bytes; each
    shape as enough distinct matrices to overflow the caches."""
    for out_features, in_features in kind_shapes:
        count = max(2, int(100e6 // (out_features * in_features * 4)))
        rows = [torch.randn(out_features, in_features) for _ in range(count)]
        columns = [to_column_major(w) for w in rows]
        flat = torch.cat([w.flatten() for w in rows])
        x = torch.randn(1, in_features)
        speeds: dict[str, list[float]] = {"row-major": [], "column-major": [], "sum": []}
        for _ in range(repeats):
            for name, matrices in (("row-major", rows), ("column-major", columns)):
                speeds[name].append(median_time(lambda ws=matrices, x=x: [F.linear(x, w) for w in ws]))
            speeds["sum"].append(median_time(flat.sum))
        nbytes = flat.numel() * 4
        print(f"| ({out_features}, {in_features}) | "
              + " | ".join(f"{nbytes / statistics.median(v) / 1e9:.1f}" for v in speeds.values()) + " |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=("dense", "moe"), default=["dense", "moe"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per request")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the median is kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# batch-1 decode step, thread CPU ms, {args.threads} thread(s)\n{machine_line()}\n")
    print("| model | step | matmuls | no matmuls |\n|---|---:|---:|---:|")
    with torch.inference_mode():
        for kind in args.shapes:
            profile_steps(kind, args.tokens, args.repeats)
        hidden, vocab, ffn = SHAPE["hidden_size"], SHAPE["vocab_size"], SHAPE["intermediate_size"]
        print("\n| (out, in) | row-major GB/s | column-major GB/s | sum GB/s |\n|---|---:|---:|---:|")
        shapes = [(2 * hidden, hidden), (hidden, hidden), (2 * ffn, hidden), (hidden, ffn), (vocab, hidden)]
        stream_speeds(shapes, args.repeats)


if __name__ == "__main__":
    main()
