"""Every GGUF type orionlm writes and reads: file size, perplexity and batch-1 decoding speed, through llama.cpp
(llama-cpp-python) and through orionlm after reading the file back (dequantized).

The model is a small dense Llama trained here on the TinyStories sample in ../shared/data (hidden 256, 2 layers,
4 heads of 64 with 2 KV heads, SwiGLU 768, a 1024-token BPE trained on the same text; the loss comparisons'
AdamW, cosine schedule and 8 x 256-token batches, --steps of them; the last 5% of the windows held out), so that
every matrix row is whole 256-value k-quant blocks and the perplexity column measures a model that has learnt its
text (random weights would give meaningless perplexity). --model takes any other orionlm model directory.

Each row is `convert to-gguf --dtype TYPE` of that model (the quantized types through llama.cpp's quantizer from
an F16 file). Perplexity is per token, exp(mean NLL), on the held-out stories at the end of the sample (each
story one window, the prefix token first, as `orionlm eval --tasks wikitext` scores a document), computed twice:
by llama.cpp on the file (its logits for every position) and by orionlm on the model read back from it. Speed is
greedy decoding of --new-tokens after a 32-token prompt (prefill included; best of --repeats after a warm-up),
both with --threads threads (orionlm in float32).

    nice -n 10 .venv/bin/python benchmarks/gguf_types.py [--model DIR] [--steps 100] [--out runs/gguf_types]
        [--stories 40] [--new-tokens 32] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from common import ROOT, SEPARATOR, TINYSTORIES, comparison_recipe, cpu_name, train_runs, train_tokenizer

import orionlm
from orionlm.cli.convert import convert_to_gguf
from orionlm.convert.gguf import GGUF_DTYPES, load_gguf
from orionlm.data.sources import SourceConfig, iter_documents
from orionlm.eval.scoring import perplexity, prefix_token
from orionlm.generation import GenerationConfig, generate_ids
from orionlm.loading import ModelSource, open_model
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

MODEL = dict(preset="tiny-dense", overrides=dict(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=64, intermediate_size=768, max_seq_len=512))  # fmt: skip
OPTIM = {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0}
SCHEDULE = {"kind": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.1}
PROMPT_TOKENS = 32
MIB = 2**20


def trained_model(out: Path, steps: int) -> Path:
    """The training run of the benchmark's model (its final model in RUN/model), trained into out/model unless a
    previous run left it there."""
    run = out / "model"
    if not (run / "model" / "config.json").is_file():
        train_tokenizer(TINYSTORIES, out / "tokenizer", MODEL["overrides"]["vocab_size"])
        train_runs({"model": comparison_recipe(MODEL, OPTIM, SCHEDULE, out, "model", TINYSTORIES, steps)}, out, [])
    return run


def held_out_stories(tokenizer: Tokenizer, count: int, context: int) -> list[str]:
    """The last `count` stories of the sample that fit one window of the model's context."""
    stories = list(iter_documents(SourceConfig(path=str(TINYSTORIES), doc_separator=SEPARATOR)))[-count:]
    return [s for s in stories if len(tokenizer.encode(s, add_special_tokens=False)) < context]


def llama_cpp_perplexity(llm: llama_cpp.Llama, tokenizer: Tokenizer, stories: list[str]) -> float:
    """Token perplexity from llama.cpp's logits, over the same tokens orionlm.eval.scoring.perplexity scores."""
    nll, count = 0.0, 0
    for story in stories:
        ids = [prefix_token(tokenizer)] + tokenizer.encode(story, add_special_tokens=False)
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V): predictions of ids[1:]
        shifted = logits - logits.max(1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        nll -= float(logprobs[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return math.exp(nll / count)


def best_rate(run: Callable[[], None], new_tokens: int, repeats: int) -> float:
    """Tokens per second of the fastest of `repeats` runs, after a warm-up run."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def llama_cpp_decode(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> list[int]:
    """llama.cpp's greedy continuation of prompt (its end-of-text token does not stop it)."""
    output = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        output.append(token)
        if len(output) == new_tokens:
            return output
    return output


def orionlm_decode(model: OrionLM, prompt: list[int], new_tokens: int) -> list[int]:
    """orionlm's greedy continuation of prompt."""
    (output,) = generate_ids(model, [prompt], config=GenerationConfig(max_new_tokens=new_tokens, do_sample=False))
    assert len(output) == new_tokens, "no stop tokens are set: every run generates exactly new_tokens"
    return output


def measure(path: Path, source: ModelSource, stories: list[str], prompt: list[int], args: argparse.Namespace) -> dict:
    """One row of the table for the GGUF file at `path`."""
    tokenizer, context = source.tokenizer, source.config.max_seq_len
    llm = llama_cpp.Llama(str(path), n_ctx=context, n_threads=args.threads, logits_all=True, verbose=False, seed=0)
    model, _ = load_gguf(path, device="cpu", dtype=torch.float32)
    row = {
        "MiB": path.stat().st_size / MIB,
        "ppl llama.cpp": llama_cpp_perplexity(llm, tokenizer, stories),
        "ppl orionlm": perplexity(model, tokenizer, stories, progress=False).token_perplexity,
        "tok/s llama.cpp": best_rate(
            lambda: llama_cpp_decode(llm, prompt, args.new_tokens), args.new_tokens, args.repeats
        ),  # fmt: skip
        "tok/s orionlm": best_rate(
            lambda: orionlm_decode(model, prompt, args.new_tokens), args.new_tokens, args.repeats
        ),  # fmt: skip
    }
    llm.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="an orionlm model directory (default: train one)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of 8 x 256 tokens for the default model")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gguf_types", help="the model and GGUF files")
    parser.add_argument("--stories", type=int, default=40, help="held-out stories at the end of the sample scored")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per speed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed generation runs (the best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp's and torch's threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model or trained_model(args.out, args.steps)
    source = open_model(str(model_dir))
    print(f"# GGUF types: orionlm {orionlm.__version__}, llama-cpp-python {llama_cpp.__version__}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {cpu_name()}, {os.cpu_count()} cores, "
          f"{args.threads} threads for llama.cpp and torch")  # fmt: skip
    stories = held_out_stories(source.tokenizer, args.stories, source.config.max_seq_len)
    if not stories:
        raise SystemExit(f"none of the last {args.stories} stories fits the model's context; raise --stories")
    tokens = sum(len(source.tokenizer.encode(s, add_special_tokens=False)) for s in stories)
    print(f"model: {model_dir} ({source.config.hidden_size} hidden, {source.config.num_layers} layers); "
          f"perplexity on {len(stories)} held-out TinyStories stories ({tokens:,} tokens)")  # fmt: skip
    prompt = source.tokenizer.encode(stories[0], add_special_tokens=False)[:PROMPT_TOKENS]
    print("| type | MiB | ppl llama.cpp | ppl orionlm | decode tok/s llama.cpp | decode tok/s orionlm |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in GGUF_DTYPES:
        path = args.out / f"model-{dtype}.gguf"
        with contextlib.redirect_stdout(io.StringIO()):  # its "wrote PATH"
            convert_to_gguf(str(model_dir), path, dtype=dtype, force=True)
        row = measure(path, source, stories, prompt, args)
        cells = [f"{row[k]:.2f}" for k in ("MiB", "ppl llama.cpp", "ppl orionlm")]
        cells += [f"{row[k]:.0f}" for k in ("tok/s llama.cpp", "tok/s orionlm")]
        print(f"| {dtype} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
