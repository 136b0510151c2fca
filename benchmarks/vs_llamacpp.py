"""orionlm against llama.cpp (and transformers) on the same random weights: batch-1 decoding and prefill on the CPU,
against the memory-bandwidth limit measured in the same run.

Shapes (--shapes): generate_speed.py's dense Llama and 8-expert top-2 Mixtral (hidden 512, 8 layers, 8 query / 4
KV heads, FFN 1408, vocabulary 32000) and checkpoints.py's 0.84B Mistral (hidden 2048, 13 layers, 16 / 4 heads,
FFN 7168, vocabulary 32000), float32 random weights written as a Hugging Face directory with a small BPE tokenizer.
Formats (--formats), each orionlm's against llama.cpp's on the same weights:

    fp32  orionlm float32 (and transformers)  |  llama.cpp on `convert to-gguf --dtype f32`
    f16   orionlm --dtype float16              |  `convert to-gguf --dtype f16`
    bf16  orionlm --dtype bfloat16             |  llama.cpp's own BF16 conversion of the F32 file (to-gguf has none)
    int8  orionlm GPTQ 8-bit, group 128        |  `convert to-gguf --dtype q8_0` (Q8_0: blocks of 32)
    int4  orionlm GPTQ 4-bit, group 128        |  `convert to-gguf --dtype q4_0` (Q4_0: blocks of 32)

The GPTQ checkpoints are written by `quantize --method rtn` (round to nearest: random weights have nothing to
calibrate on, and the format, hence the speed, is GPTQ's). llama.cpp runs through llama-cpp-python; a file it
cannot load leaves its format out, with a line saying so.

Decode is the whole-request wall time of --tokens greedy tokens after a 32-token prompt (prefill included, as a
user waits for it); prefill is a --prefill-token prompt and one new token. Every engine runs with --threads threads.
The engines of one format take turns (orionlm, llama.cpp, transformers, then again, --repeats rounds after a
warm-up round) and each number is the median, so a slow spell on a shared machine hits them alike. Each round also
times three sums over a 1 GiB float32 tensor with the same threads; the fastest of all is the read bandwidth, and
an engine's limit is that bandwidth over the bytes of weights it reads for one token (every stored weight but the
embedding table, of which it reads one row; for MoE the router and top-k of the experts): "% of limit" is its
decode speed against that. The fp32 greedy tokens of orionlm, llama.cpp and transformers are compared and the
agreement printed. Prints the setup and a markdown table.

    .venv/bin/python benchmarks/vs_llamacpp.py [--shapes dense moe 0.84b] [--formats fp32 f16 bf16 int8 int4]
        [--tokens 128] [--prefill 512] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import torch
import transformers
from checkpoints import tokenizer, write_random_mistral
from common import machine_line, read_bandwidth
from generate_speed import DECODE_PROMPT_LEN, SHAPE, hf_model
from gguf_types import llama_cpp_decode, orionlm_decode

import orionlm
from orionlm.checkpoint import LazyTensors
from orionlm.cli.convert import convert_to_gguf
from orionlm.cli.quantize import quantize_checkpoint
from orionlm.config import ModelConfig
from orionlm.convert.gguf import read_gguf
from orionlm.loading import load_model, read_model_config

SHAPES = ("dense", "moe", "0.84b")
# format -> (orionlm: a torch dtype or GPTQ bits, llama.cpp's file type)
FORMATS = {"fp32": (torch.float32, "f32"), "f16": (torch.float16, "f16"), "bf16": (torch.bfloat16, "bf16"),
           "int8": (8, "q8_0"), "int4": (4, "q4_0")}  # fmt: skip
BANDWIDTH_BYTES = 2**30


def write_model(shape: str, directory: Path) -> Path:
    """The shape's random float32 weights as a Hugging Face directory with checkpoints.py's BPE tokenizer (with
    merges, which llama.cpp needs; the vocabulary past it is padding)."""
    if shape == "0.84b":
        return write_random_mistral(directory, shape, dtype=torch.float32)
    hf_model(shape).save_pretrained(directory)
    tokenizer().save(directory)
    return directory


def stored_bytes(sizes: dict[str, int], config: ModelConfig) -> float:
    """Bytes of weights one decoded token reads, from each stored tensor's bytes by name (Hugging Face, orionlm's
    GPTQ or GGUF names): all but the embedding table (one row of it), the experts' tensors a top-k share."""
    share = config.experts_per_token / config.num_experts if config.num_experts else 1.0
    total = 0.0
    for name, size in sizes.items():
        if "embed_tokens" in name or name.startswith("token_embd"):
            continue
        total += size * share if "experts." in name or "_exps" in name else size
    return total


def directory_sizes(directory: Path, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Each tensor's bytes in a model directory's safetensors, as stored or (for float tensors) in `dtype`."""
    sizes = {}
    for name, spec in LazyTensors.from_directory(directory).specs.items():
        kind = dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype
        sizes[name] = math.prod(spec.shape) * kind.itemsize
    return sizes


def gguf_sizes(path: Path) -> dict[str, int]:
    return {tensor.name: int(tensor.n_bytes) for tensor in read_gguf(path)[1].tensors}


def write_gguf_file(model_dir: Path, path: Path, kind: str, work: Path) -> Path:
    """`convert to-gguf` of the model, or for bf16 llama.cpp's quantizer run on the F32 export."""
    with contextlib.redirect_stdout(io.StringIO()):  # its "wrote PATH"
        if kind != "bf16":
            convert_to_gguf(str(model_dir), path, dtype=kind, force=True)
            return path
        f32 = work / "model-f32.gguf"
        if not f32.is_file():
            convert_to_gguf(str(model_dir), f32, dtype="f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama.cpp could not convert {f32} to BF16")
    return path


@dataclass
class Timings:
    """One engine's measurements on one shape and format, and the bytes of weights it reads per token."""

    shape: str
    format: str
    engine: str
    bytes_per_token: float
    decode_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)


@dataclass
class Engine:
    """One engine on one format: its greedy decode (prompt, new tokens -> tokens) and its prefill."""

    decode: Callable[[list[int], int], list[int]]
    prefill: Callable[[list[int]], object]
    timings: Timings


def orionlm_engine(model_dir: Path, dtype: torch.dtype | int, work: Path, config: ModelConfig, row: dict) -> Engine:
    if isinstance(dtype, int):  # GPTQ bits
        quantized = work / f"gptq-{dtype}bit"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its report, bar
            quantize_checkpoint(str(model_dir), quantized, bits=dtype, method="rtn", force=True)
        model, _, _ = load_model(quantized, device="cpu")
        sizes = directory_sizes(quantized)
    else:
        model, _, _ = load_model(model_dir, device="cpu", dtype=dtype)
        sizes = directory_sizes(model_dir, dtype)
    model.eval()
    return Engine(lambda prompt, n: orionlm_decode(model, prompt, n), lambda prompt: orionlm_decode(model, prompt, 1),
                  Timings(engine="orionlm", bytes_per_token=stored_bytes(sizes, config), **row))  # fmt: skip


def llama_cpp_engine(path: Path, threads: int, context: int, config: ModelConfig, row: dict) -> Engine:
    llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=context, n_ubatch=context, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)  # fmt: skip

    def prefill(prompt: list[int]) -> None:
        llm.reset()
        llm.eval(prompt)

    timings = Timings(engine="llama.cpp", bytes_per_token=stored_bytes(gguf_sizes(path), config), **row)
    return Engine(lambda prompt, n: llama_cpp_decode(llm, prompt, n), prefill, timings)


def transformers_engine(model_dir: Path, config: ModelConfig, row: dict) -> Engine:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # always generate exactly the asked number of tokens
    model.generation_config.pad_token_id = 0

    def run(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out[0, len(prompt) :].tolist()

    return Engine(run, lambda prompt: run(prompt, 1),
                  Timings(engine="transformers", bytes_per_token=stored_bytes(directory_sizes(model_dir), config),
                          **row))  # fmt: skip


def agreement(ours: list[int], other: list[int]) -> str:
    same = next((i for i, (a, b) in enumerate(zip(ours, other, strict=True)) if a != b), len(ours))
    return f"{same}/{len(ours)} tokens identical" + ("" if same == len(ours) else f" (first difference at {same})")


def run_format(engines: list[Engine], prompt: list[int], long_prompt: list[int], tokens: int, repeats: int,
               data: torch.Tensor, bandwidth: list[float]) -> dict[str, list[int]]:  # fmt: skip
    """The engines take turns, a warm-up round and `repeats` timed ones, each round also timing a bandwidth
    sample. Returns each engine's greedy tokens."""
    outputs = {}
    for round_ in range(repeats + 1):
        bandwidth.append(read_bandwidth(data))
        for engine in engines:
            start = time.perf_counter()
            outputs[engine.timings.engine] = engine.decode(prompt, tokens)
            decode = time.perf_counter() - start
            start = time.perf_counter()
            engine.prefill(long_prompt)
            if round_:  # the first round warms up
                engine.timings.decode_s.append(decode)
                engine.timings.prefill_s.append(time.perf_counter() - start)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens decoded per request")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is kept)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every engine (the issue's table: 2)")
    parser.add_argument("--work", type=Path, default=None, help="where the models are written (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    print(f"# orionlm {orionlm.__version__} vs llama.cpp (llama-cpp-python {llama_cpp.__version__}) and "
          f"transformers {transformers.__version__}")  # fmt: skip
    print(machine_line())
    print(f"batch 1; decode: {args.tokens} greedy tokens after {DECODE_PROMPT_LEN} prompt tokens, whole-request "
          f"wall time; prefill: {args.prefill} tokens; {args.threads} threads each; median of {args.repeats} "
          f"interleaved rounds after a warm-up round\n")  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(0, SHAPE["vocab_size"], (args.prefill,), generator=generator).tolist()
    prompt = long_prompt[:DECODE_PROMPT_LEN]
    data = torch.ones(BANDWIDTH_BYTES // 4)
    bandwidth: list[float] = []
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for shape in args.shapes:
            work = Path(tmp) / shape
            model_dir = write_model(shape, work / "hf")
            config = read_model_config(model_dir)
            for fmt in args.formats:
                dtype, kind = FORMATS[fmt]
                path = write_gguf_file(model_dir, work / f"model-{kind}.gguf", kind, work)
                context = max(args.prefill, DECODE_PROMPT_LEN + args.tokens) + 1
                row = {"shape": shape, "format": fmt}
                try:
                    theirs = llama_cpp_engine(path, args.threads, context, config, row)
                except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
                    print(f"{shape} {fmt}: llama.cpp does not run {path.name} ({e}); format left out", flush=True)
                    continue
                engines = [orionlm_engine(model_dir, dtype, work, config, row), theirs]
                if fmt == "fp32":
                    engines.append(transformers_engine(model_dir, config, row))
                outputs = run_format(engines, prompt, long_prompt, args.tokens, args.repeats, data, bandwidth)
                if fmt == "fp32":
                    for name in ("llama.cpp", "transformers"):
                        print(f"{shape} fp32 greedy tokens, orionlm vs {name}: "
                              f"{agreement(outputs['orionlm'], outputs[name])}", flush=True)  # fmt: skip
                rows += [engine.timings for engine in engines]
                del engines  # the models, before the next format's load
    best = max(bandwidth)
    print(f"\nread bandwidth: {best / 1e9:.1f} GB/s (the fastest of {3 * len(bandwidth)} sums over 1 GiB, "
          f"{args.threads} threads; the rounds' median {statistics.median(bandwidth) / 1e9:.1f})\n")  # fmt: skip
    print(
        "| model | format | engine | decode tok/s | % of limit | limit tok/s | MB/token | prefill tok/s "
        "| decode vs llama.cpp | prefill vs llama.cpp |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rates = {(t.shape, t.format, t.engine): (args.tokens / statistics.median(t.decode_s),
                                             args.prefill / statistics.median(t.prefill_s)) for t in rows}  # fmt: skip
    for t in rows:
        decode, prefill = rates[t.shape, t.format, t.engine]
        base_decode, base_prefill = rates[t.shape, t.format, "llama.cpp"]
        limit = best / t.bytes_per_token
        print(f"| {t.shape} | {t.format} | {t.engine} | {decode:,.1f} | {100 * decode / limit:.0f}% | {limit:,.0f} | "
              f"{t.bytes_per_token / 1e6:,.1f} | {prefill:,.0f} | {decode / base_decode:.2f}x | "
              f"{prefill / base_prefill:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
