"""GPU speed of orionlm against transformers on the same weights (scripts/gpu_check.sh runs it after the CUDA
tests): training tokens/s and MFU, decoding tokens/s at batch 1 and 16, and prefill tokens/s.

Models: the README's MoE (Mixtral layout, 8 experts top-2) scaled to 0.5B parameters (hidden 1024, 6 layers,
16 query / 8 KV heads, expert FFN 2816, vocabulary 32000: 500M total, 188M active), built in transformers
(MixtralForCausalLM) and loaded into orionlm through its converter; and the Chimera at that size, the published
auron-510m shape (4 bottom + 4 shared blocks looped 3 times, hidden 1536), which has no transformers
counterpart (no Qwen3-Next conversion), so it runs in orionlm alone, with fla's kernels where installed.

Training: float32 weights under bf16 autocast (as the trainer runs on CUDA), fused AdamW, batches of 8 x 1024
tokens; the median step after 2 warm-up steps. MFU = training FLOP/s (orionlm.train.trainer.flops_per_token)
over the GPU's dense bf16 peak from its datasheet (PEAK_BF16; the measured peak of a large matmul where the
GPU is not listed). Decoding: bf16 weights (what load_model gives on CUDA), greedy, a 32-token prompt per row,
the tokens generated after every row's first one over the time they took (orionlm: the continuous-batching
engine; transformers: generate, timed by a streamer). Prefill: one 2048-token prompt.

Each measurement is short (a few steps) and guarded: an error or the --budget running out is recorded in its
row and the next one runs; the JSON is rewritten after every row, so a run cut short keeps what it measured.
--tiny runs the same code on tiny shapes in float32 on the CPU in seconds (the CI dry run).

    python benchmarks/gpu.py [--tiny] [--json gpu_benchmark.json] [--budget 110]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from common import cpu_name
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.generation.streamers import BaseStreamer

import orionlm
from orionlm import OrionLM, preset
from orionlm.convert.hf import load_hf
from orionlm.generation import Engine, GenerationConfig, Request
from orionlm.model import add_router_losses
from orionlm.nn.gdn import GatedDeltaNet
from orionlm.train.metrics import flops_per_token, measure_peak_flops

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (without sparsity), matched in order against
# torch.cuda.get_device_name().
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


@dataclass
class Shapes:
    moe: dict[str, Any]  # MixtralConfig keys
    chimera: str  # a preset
    batch: int
    seq_len: int
    prompt: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    prefill: int
    warmup: int
    steps: int


FULL = Shapes(
    moe=dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=8,
             intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096),
    chimera="auron-510m",
    batch=8, seq_len=1024, prompt=32, new_tokens=64, decode_batches=(1, 16), prefill=2048, warmup=2, steps=5,
)  # fmt: skip
TINY = Shapes(
    moe=dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256),
    chimera="tiny-chimera",
    batch=1, seq_len=16, prompt=4, new_tokens=3, decode_batches=(1, 2), prefill=16, warmup=1, steps=1,
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: torch.device) -> tuple[float, str]:
    """The training peak MFU is measured against, and where it comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16:
            if key in name:
                return peak, f"{name}: datasheet dense bf16 peak"
        return measure_peak_flops(device), f"{name}: measured bf16 matmul (not in PEAK_BF16)"
    return measure_peak_flops(device), "CPU: measured float32 matmul"


class Models:
    """The benchmark's models on the device, built once: the MoE in both engines (same weights) and the Chimera."""

    def __init__(self, shapes: Shapes, device: torch.device) -> None:
        torch.manual_seed(0)
        config = MixtralConfig(**shapes.moe, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
        with device:  # random init on the GPU: seconds less for 0.5B parameters
            self.hf = MixtralForCausalLM(config)
            self.chimera = OrionLM(preset(shapes.chimera))
        self.hf.generation_config.eos_token_id = None  # always the asked number of tokens
        self.hf.generation_config.pad_token_id = 0
        with tempfile.TemporaryDirectory() as tmp:
            self.hf.save_pretrained(tmp)
            self.moe, _ = load_hf(tmp, device=device, dtype=torch.float32)


def train_step(model: torch.nn.Module, hf: bool, device: torch.device) -> Callable[[torch.Tensor], float]:
    """One step of fused AdamW (bf16 autocast on CUDA) on a (B, T + 1) token batch: the trainer's loss
    (orionlm: LM + router losses; transformers: labels + output_router_logits, its own)."""
    # lr 0: all of AdamW's work, and the weights stay those both engines started from, for the decode rows
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")
    config = model.config

    def step(tokens: torch.Tensor) -> float:
        inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if hf:
                loss = model(input_ids=inputs, labels=targets, shift_labels=targets, output_router_logits=True).loss
            else:
                out = model(inputs, targets=targets)
                loss = add_router_losses(out.loss, out, config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def measure_training(model, hf: bool, flop_config, shapes: Shapes, device, peak: float) -> dict[str, Any]:
    model.train()
    step = train_step(model, hf, device)
    gen = torch.Generator().manual_seed(1)
    vocab = flop_config.vocab_size
    tokens = torch.randint(0, vocab, (shapes.batch, shapes.seq_len + 1), generator=gen).to(device)
    first = step(tokens)
    for _ in range(shapes.warmup - 1):
        step(tokens)
    times = []
    for _ in range(shapes.steps):
        sync(device)
        start = time.perf_counter()
        step(tokens)
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_s = shapes.batch * shapes.seq_len / seconds
    mfu = flops_per_token(flop_config, shapes.seq_len) * tokens_per_s / peak
    model.zero_grad(set_to_none=True)
    return {"tokens_per_s": tokens_per_s, "step_s": seconds, "mfu": mfu, "first_loss": first}


class StepClock(BaseStreamer):
    """Timestamps every token transformers' generate emits (its first call carries the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def put(self, value: torch.Tensor) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_hf(model, prompts: torch.Tensor, new_tokens: int, device) -> tuple[float, list[int]]:
    """Tokens/s of the steps after every row's first new token, and row 0's tokens."""
    clock = StepClock(device)
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=clock)  # fmt: skip
    elapsed = clock.stamps[-1] - clock.stamps[1]  # stamps[1]: the first new token, after the prefill
    return prompts.shape[0] * (new_tokens - 1) / elapsed, out[0, prompts.shape[1] :].tolist()


def decode_orionlm(model, prompts: torch.Tensor, new_tokens: int, device) -> tuple[float, list[int]]:
    """Tokens/s of the engine's steps once every row is prefilled and has its first token, and row 0's tokens."""
    engine = Engine(model, max_batch=prompts.shape[0], prefill_chunk=prompts.shape[1])
    greedy = GenerationConfig(max_new_tokens=new_tokens, do_sample=False)
    requests = [Request(row.tolist(), greedy) for row in prompts]
    for request in requests:
        engine.submit(request)
    with torch.inference_mode():
        while engine.waiting or engine.prefilling:
            engine.step()
        sync(device)
        before, start = sum(len(r.output) for r in requests), time.perf_counter()
        while engine.has_work:
            engine.step()
        sync(device)
    return (sum(len(r.output) for r in requests) - before) / (time.perf_counter() - start), requests[0].output


def measure_decode(run, model, shapes: Shapes, batch: int, device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, model.config.vocab_size, (batch, shapes.prompt), generator=gen).to(device)
    run(model, prompts, 2, device)  # warm-up
    tokens_per_s, tokens = run(model, prompts, shapes.new_tokens, device)
    return {"tokens_per_s": tokens_per_s, "tokens": tokens}


def measure_prefill(model, hf: bool, shapes: Shapes, device) -> dict[str, Any]:
    """Tokens/s of one prompt's forward to its next-token logits (orionlm: the engine's prefill path, one chunk)."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (1, shapes.prefill), generator=gen).to(device)

    def run() -> None:
        with torch.inference_mode():
            if hf:
                model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            else:
                model(prompt, cache=model.new_cache(1, shapes.prefill), logits_to_keep=1)

    run()
    times = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"tokens_per_s": shapes.prefill / min(times)}


def use_fla(model: OrionLM, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, GatedDeltaNet):
            module.use_fla = on


def fla_version() -> str | None:
    try:
        import fla

        return fla.__version__
    except ImportError:
        return None


def plan(models: Models, shapes: Shapes, device: torch.device, peak: float) -> list[tuple[dict, Callable]]:
    """Every measurement, most important first: (its row's labels, what measures it)."""
    hf, moe, chimera = models.hf, models.moe, models.chimera
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    gdn = "fla GDN" if fla_version() and device.type == "cuda" else "torch GDN"
    rows: list[tuple[dict, Callable]] = [
        ({"task": "train", "model": "moe", "engine": "orionlm"},
         lambda: measure_training(moe, False, moe.config, shapes, device, peak)),
        ({"task": "train", "model": "moe", "engine": "transformers"},
         lambda: measure_training(hf, True, moe.config, shapes, device, peak)),
        ({"task": "train", "model": "chimera", "engine": f"orionlm ({gdn})"},
         lambda: measure_training(chimera, False, chimera.config, shapes, device, peak)),
    ]  # fmt: skip

    def inference() -> None:  # training is done: the weights go to the serving dtype
        for model in (hf, moe, chimera):
            model.to(bf16).eval()

    rows.append(({"task": "to_inference_dtype", "model": "all", "engine": "-"}, inference))
    for batch in shapes.decode_batches:
        for model, name, engine, run in (
            (moe, "moe", "orionlm", decode_orionlm),
            (hf, "moe", "transformers", decode_hf),
            (chimera, "chimera", f"orionlm ({gdn})", decode_orionlm),
        ):
            labels = {"task": f"decode b{batch}", "model": name, "engine": engine}
            rows.append((labels, lambda m=model, r=run, b=batch: measure_decode(r, m, shapes, b, device)))
    rows += [
        ({"task": "prefill", "model": "moe", "engine": "orionlm"},
         lambda: measure_prefill(moe, False, shapes, device)),
        ({"task": "prefill", "model": "moe", "engine": "transformers"},
         lambda: measure_prefill(hf, True, shapes, device)),
        ({"task": "prefill", "model": "chimera", "engine": f"orionlm ({gdn})"},
         lambda: measure_prefill(chimera, False, shapes, device)),
    ]  # fmt: skip
    if gdn == "fla GDN":  # the same Chimera on orionlm's own PyTorch GDN: what the kernels gain
        chimera_torch = lambda: (use_fla(chimera, False), measure_prefill(chimera, False, shapes, device))[1]
        rows.append(({"task": "prefill", "model": "chimera", "engine": "orionlm (torch GDN)"}, chimera_torch))
    return rows


def run_all(rows: list[tuple[dict, Callable]], budget: float, start: float, write: Callable[[], None], results: list):
    """Each measurement in turn, each guarded: an error or the spent budget goes into its row."""
    for labels, measure in rows:
        row = dict(labels)
        if time.perf_counter() - start > budget:
            row["error"] = f"skipped: the {budget:.0f} s budget was spent"
        else:
            began = time.perf_counter()
            try:
                row |= measure() or {}
            except Exception as e:  # one broken path must not hide the others' numbers
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            row["seconds"] = round(time.perf_counter() - began, 2)
        results.append(row)
        print(format_row(row), flush=True)
        write()


def format_row(row: dict[str, Any]) -> str:
    value = row.get("tokens_per_s")
    speed = f"{value:,.0f}" if value is not None else "-"
    mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
    note = row.get("error", "")
    return f"| {row['task']} | {row['model']} | {row['engine']} | {speed} | {mfu} | {note} |"


def setup(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    peak, peak_source = peak_flops(device)
    return {
        "mode": "tiny" if args.tiny else "full",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "orionlm": orionlm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fla": fla_version(),
        "python": platform.python_version(),
        "peak_flops": peak,
        "peak_source": peak_source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, float32, on the CPU: seconds")
    parser.add_argument("--json", type=Path, default=Path("gpu_benchmark.json"), help="where the results go")
    parser.add_argument("--budget", type=float, default=110.0, help="seconds; later measurements are skipped")
    args = parser.parse_args()
    start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    shapes = TINY if args.tiny else FULL
    info = setup(args)
    device = torch.device(info["device"])
    print(f"# GPU benchmark: orionlm {info['orionlm']} vs transformers {info['transformers']}")
    print(f"{info['device_name']}, torch {info['torch']}, fla {info['fla']}; MFU against "
          f"{info['peak_flops'] / 1e12:.1f} TFLOP/s ({info['peak_source']})")  # fmt: skip
    results: list[dict[str, Any]] = []
    report = {"setup": info, "shapes": shapes.__dict__, "results": results}
    write = lambda: args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    write()
    print("\n| task | model | engine | tokens/s | MFU | note |\n|---|---|---|---:|---:|---|")
    try:
        models = Models(shapes, device)
    except Exception as e:  # without the models nothing can be measured; say why
        report["error"] = f"building the models: {type(e).__name__}: {e}"[:300]
        write()
        raise
    run_all(plan(models, shapes, device, info["peak_flops"]), args.budget, start, write, results)
    report["seconds"] = round(time.perf_counter() - start, 1)
    write()


if __name__ == "__main__":
    main()
