"""Decode speed of a Chimera model against a dense model with the same unique parameters, by context length.

The Chimera is the tiny-chimera preset grown to hidden 512: 8 unique blocks, the last 4 shared and run 3
times (16 virtual layers), attention in 1 block of 4 (4 virtual attention layers; the other 12 are Gated
DeltaNet), 8 query / 2 key-value heads of 64, GDN heads of 64 (values 128), FFN int(512 x 2.67), vocabulary
8192. The dense model is the tiny-dense preset (Llama layout, tied embeddings) at hidden 512 with the same
attention heads and 11 layers, its FFN width solved so that the unique parameter counts match. Both have
random weights, float32, on CPU: large enough that a decode step streams weights rather than paying Python
overhead, so the numbers reflect the work per token.

A GDN layer carries a fixed-size state, so its cost per token does not grow with the context; an attention
layer reads its whole KV cache every step. The Chimera computes more per token (its shared blocks run 3
times) but has fewer attention layers, so its speed should fall less as the context grows.

Decode is batch 1, greedy, --new-tokens tokens after a prompt of each --lengths tokens, through orionlm's
engine (as generate_ids and the server run it, with the CPU decode layout). The prefill is not timed: the two models are
prefilled, then their decode steps alternate one for one, so load from other processes slows both alike.
tokens/s is one over the median step time over --repeats runs, after a warm-up run. A sanity line first
checks that the Chimera's cached greedy decode equals greedy decode by full recompute (no cache).
Prints the setup and a markdown table.

    .venv/bin/python benchmarks/chimera_decode.py [--lengths 128 512 2048 4096] [--new-tokens 64] [--repeats 3]
        [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from common import cpu_name

import orionlm
from orionlm import ModelConfig, OrionLM, preset
from orionlm.generation import Engine, GenerationConfig, Request
from orionlm.model import count_parameters, virtual_parameters

ATTENTION = dict(hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64, vocab_size=8192, max_seq_len=8192)
CHIMERA = dict(
    ATTENTION,
    gdn_num_heads=8,
    gdn_head_dim=64,
    num_layers=8,
    shared_layers=4,
    loops=3,
    attn_interval=4,
    intermediate_size=int(512 * 2.67),
)
DENSE_LAYERS = 11
CHECK_PROMPT, CHECK_TOKENS = 32, 16


def dense_config(unique: int) -> ModelConfig:
    """tiny-dense with DENSE_LAYERS layers and the FFN width whose parameter count is closest to `unique`.
    The count is linear in the width, so two counts give the slope."""

    def config(width: int) -> ModelConfig:
        return preset("tiny-dense", **ATTENTION, num_layers=DENSE_LAYERS, intermediate_size=width, tie_embeddings=True)

    base = count_parameters(config(1))[0]
    slope = count_parameters(config(2))[0] - base
    return config(1 + round((unique - base) / slope))


def build(config: ModelConfig, seed: int) -> OrionLM:
    torch.manual_seed(seed)  # the constructor's reset_parameters draws from the global generator
    return OrionLM(config).eval()


def decode_steps(models: dict[str, OrionLM], prompt: list[int], new_tokens: int) -> dict[str, list[float]]:
    """Seconds of every decode step of each model (the prefill, their first step, is not timed)."""
    greedy = GenerationConfig(max_new_tokens=new_tokens, do_sample=False)
    engines = {name: Engine(model, max_batch=1, prefill_chunk=len(prompt)) for name, model in models.items()}
    for engine in engines.values():
        engine.submit(Request(prompt, greedy))
        engine.step()
    times: dict[str, list[float]] = {name: [] for name in models}
    while any(engine.has_work for engine in engines.values()):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - start)
    return times


def check_cached_decode(model: OrionLM, prompt: list[int], new_tokens: int) -> tuple[bool, float]:
    """(same greedy tokens, max |log-probability difference| over the steps): the engine's cached steps
    (recurrent GDN, KV cache) against a full forward over the whole sequence so far at every step."""
    engine = Engine(model, max_batch=1)
    vocab = model.config.vocab_size
    request = Request(prompt, GenerationConfig(max_new_tokens=new_tokens, do_sample=False), logprobs=vocab)
    engine.submit(request)
    cached = []
    while engine.has_work:
        for event in engine.step():
            cached.append(torch.tensor([lp for _, lp in sorted(event.logprob.top)]))
    ids, diff = list(prompt), 0.0
    with torch.inference_mode():
        for logprobs in cached:
            full = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            diff = max(diff, (full - logprobs).abs().max().item())
            ids.append(int(full.argmax()))
    return ids[len(prompt) :] == request.output, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated after each prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per prompt length")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chimera_cfg = preset("tiny-chimera", **CHIMERA)
    unique = count_parameters(chimera_cfg)[0]
    dense_cfg = dense_config(unique)
    models = {"chimera": build(chimera_cfg, 0), "dense": build(dense_cfg, 0)}
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, ATTENTION["vocab_size"], (max(args.lengths),), generator=gen).tolist()

    print(f"# Chimera vs dense decode speed: orionlm {orionlm.__version__}")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {cpu_name()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"chimera: tiny-chimera with {CHIMERA}: {chimera_cfg.virtual_layers} virtual layers, "
        f"{models['chimera'].model.attention_slots} of them attention; {unique:,} unique parameters, "
        f"{virtual_parameters(chimera_cfg):,} virtual"
    )
    print(
        f"dense: tiny-dense with {ATTENTION}, num_layers {DENSE_LAYERS}, intermediate_size "
        f"{dense_cfg.intermediate_size}, tied embeddings: {count_parameters(dense_cfg)[0]:,} parameters"
    )
    print(
        f"decode: batch 1, greedy, {args.new_tokens} new tokens ({args.new_tokens - 1} timed steps) after each "
        f"prompt, float32, steps of the two models alternating; median step of {args.repeats} runs after a "
        f"warm-up"
    )
    same, diff = check_cached_decode(models["chimera"], prompt[:CHECK_PROMPT], CHECK_TOKENS)
    print(
        f"chimera, {CHECK_PROMPT}-token prompt, {CHECK_TOKENS} new tokens: cached greedy decode equals full "
        f"recompute: {same} (max log-probability difference {diff:.1e})\n"
    )

    decode_steps(models, prompt[: min(args.lengths)], args.new_tokens)
    speeds: dict[int, dict[str, float]] = {}
    for length in args.lengths:
        steps: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, times in decode_steps(models, prompt[:length], args.new_tokens).items():
                steps[name] += times
        speeds[length] = {name: 1 / statistics.median(times) for name, times in steps.items()}

    print("| context | chimera tok/s | dense tok/s | chimera / dense |")
    print("|---:|---:|---:|---:|")
    for length, speed in speeds.items():
        print(
            f"| {length} | {speed['chimera']:.1f} | {speed['dense']:.1f} | {speed['chimera'] / speed['dense']:.2f}x |"
        )
    short, long = min(args.lengths), max(args.lengths)
    drops = ", ".join(f"{name} {1 - speeds[long][name] / speeds[short][name]:.0%}" for name in models)
    print(f"\nspeed lost from {short} to {long} tokens of context: {drops}")


if __name__ == "__main__":
    main()
