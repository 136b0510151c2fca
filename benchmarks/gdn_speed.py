"""Training speed of the Gated DeltaNet recurrence: orionlm's chunked form against its step-by-step loop
and transformers' Qwen3-Next torch chunked function (`torch_chunk_gated_delta_rule`), on the same inputs.

One step is a forward and a backward through the recurrence alone (no projections): q, k (unit vectors),
v, the log decays g and the write strengths beta, all requiring gradients, a random projection of the
output as the loss. Shapes as in Auron's GDN layers: heads of d_k 64 and d_v 128 (expand_v 2), float32,
chunks of 64. The engines' steps alternate, so load from other processes slows them alike; tokens/s is
B x T over the median step time after a warm-up step. The outputs of the three must agree (printed).
Prints the setup and a markdown table.

    .venv/bin/python benchmarks/gdn_speed.py [--batch 1] [--heads 8] [--lengths 512 2048] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

from orionlm.nn.gdn import chunk_gated_delta_rule, recurrent_gated_delta_rule

D_K, D_V = 64, 128

Rule = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
ENGINES: dict[str, Rule] = {
    "orionlm chunked": lambda *a: chunk_gated_delta_rule(*a, chunk_size=64),
    "orionlm recurrent": recurrent_gated_delta_rule,
    "transformers chunked": lambda *a: torch_chunk_gated_delta_rule(*a, chunk_size=64),
}


def make_inputs(batch: int, length: int, heads: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(batch, length, heads, D_K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, D_K, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, D_V, generator=gen)
    g = F.logsigmoid(torch.randn(batch, length, heads, generator=gen) + 3)  # decays mostly near 1, as trained
    beta = torch.rand(batch, length, heads, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def step(rule: Rule, inputs: list[torch.Tensor], weight: torch.Tensor) -> tuple[float, torch.Tensor]:
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    out, _ = rule(*inputs)
    (out * weight).sum().backward()
    return time.perf_counter() - start, out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}"
        f" ({os.cpu_count()} cores, {args.threads} threads, load average {os.getloadavg()[0]:.2f}), float32;"
        f" batch {args.batch}, {args.heads} heads, d_k {D_K}, d_v {D_V}, chunk 64, forward + backward\n"
    )
    print("| T | implementation | ms / step | tokens/s | vs recurrent | max output diff vs recurrent |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in args.lengths:
        inputs = make_inputs(args.batch, length, args.heads)
        weight = torch.randn(args.batch, length, args.heads, D_V)
        times: dict[str, list[float]] = {name: [] for name in ENGINES}
        outputs = {}
        for i in range(args.steps + 1):
            for name, rule in ENGINES.items():
                seconds, outputs[name] = step(rule, inputs, weight)
                if i > 0:  # the first step warms up
                    times[name].append(seconds)
        median = {name: statistics.median(t) for name, t in times.items()}
        for name in ENGINES:
            diff = (outputs[name] - outputs["orionlm recurrent"]).abs().max().item()
            print(
                f"| {length} | {name} | {median[name] * 1e3:,.1f} | {args.batch * length / median[name]:,.0f} |"
                f" {median['orionlm recurrent'] / median[name]:.1f}x | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
