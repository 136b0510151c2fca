"""Prefill and decode speed of orionlm's generation loop against transformers' generate.

The same random weights run in both: a Llama (dense) and a Mixtral (8 experts, top-2) with hidden 512,
8 layers, 8 query / 4 key-value heads, FFN 1408, vocabulary 32000, float32. Prefill is a 512-token
prompt with one new token (best of --repeats runs). Decode is batch 1, greedy, 128 new tokens after a
32-token prompt: tokens/s is one over the median time of a decode step, taken from every step of
--repeats runs (a streamer timestamps transformers' steps), because other work on a shared machine
only ever slows some steps down; the wall time of the fastest whole run is shown too. Prints the
setup and a markdown table.

    .venv/bin/python benchmarks/generate_speed.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers
from common import machine_line
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.generation.streamers import BaseStreamer

import orionlm
from orionlm import OrionLM
from orionlm.convert.hf import load_hf
from orionlm.generation import Engine, GenerationConfig, Request, generate_ids

SHAPE = dict(
    vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    intermediate_size=1408, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False,
)  # fmt: skip
PROMPT_LEN, DECODE_PROMPT_LEN, NEW_TOKENS = 512, 32, 128


def hf_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "dense":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    else:
        model = MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=8, num_experts_per_tok=2))
    model.generation_config.eos_token_id = None  # always generate exactly the asked number of tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def to_orionlm(hf: torch.nn.Module) -> OrionLM:
    """The same weights through orionlm's converter (save_pretrained, then load_hf)."""
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = load_hf(tmp, device="cpu", dtype=torch.float32)
    return model.eval()


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class StepClock(BaseStreamer):
    """Timestamps every token transformers' generate emits (its first call carries the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure(kind: str, repeats: int) -> list[tuple[str, str, float, float, float]]:
    """(kind, engine, prefill tok/s, decode tok/s from the median step, seconds for 128 tokens)."""
    hf = hf_model(kind)
    ours = to_orionlm(hf)
    generator = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(0, SHAPE["vocab_size"], (1, PROMPT_LEN), generator=generator)
    short_prompt = long_prompt[:, :DECODE_PROMPT_LEN]
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False)

    def run_hf(prompt: torch.Tensor, new: int, steps: list[float] | None = None) -> list[int]:
        clock = StepClock()
        with torch.inference_mode():
            out = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False, streamer=clock
            )
        if steps is not None:  # stamps[1] is the first new token, after the prefill
            steps += [b - a for a, b in itertools.pairwise(clock.stamps[1:])]
        return out[0, prompt.shape[1] :].tolist()

    def run_ours(prompt: torch.Tensor, new: int, steps: list[float] | None = None) -> list[int]:
        # generate_ids' loop (the engine's steps: the prefill and first token, then one token each), timed
        engine = Engine(ours, max_batch=1, prefill_chunk=prompt.shape[1])
        request = Request(prompt[0].tolist(), greedy.replace(max_new_tokens=new))
        engine.submit(request)
        engine.step()
        while engine.has_work:
            start = time.perf_counter()
            engine.step()
            if steps is not None:
                steps.append(time.perf_counter() - start)
        return request.output

    ours_tokens = generate_ids(ours, short_prompt.tolist(), config=greedy)[0]
    assert run_ours(short_prompt, NEW_TOKENS) == ours_tokens, "the timed loop must be generate_ids' loop"
    same = run_hf(short_prompt, NEW_TOKENS) == ours_tokens
    print(f"{kind}: greedy tokens identical to transformers: {same}")
    rows = []
    for name, run in (("transformers", run_hf), ("orionlm", run_ours)):
        prefill = best_time(lambda run=run: run(long_prompt, 1), repeats)
        steps: list[float] = []
        full = best_time(lambda run=run, steps=steps: run(short_prompt, NEW_TOKENS, steps), repeats)
        rows.append((kind, name, PROMPT_LEN / prefill, 1 / statistics.median(steps), full))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# generate speed: orionlm {orionlm.__version__} vs transformers {transformers.__version__}")
    print(machine_line())
    print(f"model: {SHAPE}; MoE: 8 experts top-2; float32")
    print(f"prefill: {PROMPT_LEN}-token prompt, 1 new token; decode: {DECODE_PROMPT_LEN}-token prompt, "
          f"{NEW_TOKENS} new tokens, batch 1, greedy; {args.repeats} runs after a warm-up\n")  # fmt: skip
    rows = measure("dense", args.repeats) + measure("moe", args.repeats)
    print(
        f"\n| model | engine | prefill tok/s | decode tok/s | {NEW_TOKENS} tokens (s) | prefill vs HF | decode vs HF |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    baseline = {kind: (p, d) for kind, name, p, d, _ in rows if name == "transformers"}
    for kind, name, prefill, decode, full in rows:
        base_p, base_d = baseline[kind]
        ratios = f"{prefill / base_p:.2f}x | {decode / base_d:.2f}x"
        print(f"| {kind} | {name} | {prefill:,.0f} | {decode:,.1f} | {full:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
