"""Training speed of orionlm against transformers: forward + backward + AdamW step, same work.

The same random weights train in both (the transformers model is built, saved with save_pretrained and
loaded into orionlm with load_hf): a Llama (dense) and a Mixtral (8 experts, top-2) with hidden 256,
6 layers, 8 query / 4 key-value heads (head_dim 32), FFN 704 (the expert width for the MoE),
vocabulary 8192, float32, batches of 8 x 256 tokens. Sized for a 2-core CPU: a step is about a
second, big enough that matmuls dominate (as in real training) and small enough for a minute per model.

Both sides see the same batches of random token ids (inputs are tokens[:, :-1], targets tokens[:, 1:]),
use torch.optim.AdamW with the same settings on all parameters, and minimise the same loss: mean
cross-entropy in float32, plus for the MoE the Mixtral load-balancing loss times the same coefficient
(transformers: `labels` + `output_router_logits=True`, its own loss; orionlm: the loss the trainer
computes, orionlm.train.trainer.train). Transformers runs its default expert kernel (grouped_mm) and
attention (sdpa); its per-expert "eager" loop is measured too, for reference.

Steps of the engines alternate, so load from other processes slows them alike; tokens/s is the
batch's tokens over the median step time after warm-up. MFU is the training FLOP/s (6 x active
non-embedding parameters + attention, orionlm.train.metrics.flops_per_token) over the float32 peak of
one large matmul (orionlm.train.metrics.measure_peak_flops, the best of 10 before and 10 after). The
first step's losses of the engines must agree (same weights, same batch): the script says whether they
do. Prints the setup and a markdown table.

    .venv/bin/python benchmarks/train_speed.py [--steps 20] [--warmup 3] [--threads N] [--models dense,moe]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers
from common import machine_line
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import orionlm
from orionlm import OrionLM
from orionlm.convert.hf import load_hf
from orionlm.model import add_router_losses
from orionlm.train.metrics import flops_per_token, measure_peak_flops

SHAPE = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
    intermediate_size=704, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False,
)  # fmt: skip
EXPERTS, TOP_K, AUX_COEF = 8, 2, 0.01
BATCH, SEQ_LEN = 8, 256
ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # transformers' Trainer default

Batch = tuple[torch.Tensor, torch.Tensor]
Step = Callable[[Batch], float]


def hf_model(kind: str, experts_implementation: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "dense":
        return LlamaForCausalLM(LlamaConfig(**SHAPE)).train()
    config = MixtralConfig(**SHAPE, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, router_aux_loss_coef=AUX_COEF)
    model = MixtralForCausalLM(config).train()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model


def to_orionlm(hf: torch.nn.Module) -> OrionLM:
    """The same weights through orionlm's converter (save_pretrained, then load_hf)."""
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = load_hf(tmp, device="cpu", dtype=torch.float32)
    return model.train()


def hf_step(model: torch.nn.Module, moe: bool) -> Step:
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)

    def step(batch: Batch) -> float:
        inputs, targets = batch
        # shift_labels: the targets are already shifted, as orionlm's loader gives them
        out = model(input_ids=inputs, labels=targets, shift_labels=targets, output_router_logits=moe, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def orionlm_step(model: OrionLM) -> Step:
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    config = model.config

    def step(batch: Batch) -> float:
        inputs, targets = batch
        out = model(inputs, targets=targets)
        loss = add_router_losses(out.loss, out, config)  # the trainer's loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def measure(steps: dict[str, Step], batches: list[Batch], warmup: int, timed: int) -> dict[str, tuple[float, float]]:
    """{engine: (first-step loss, median step seconds)}; the engines alternate step by step."""
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + timed):
        for name, step in steps.items():
            start = time.perf_counter()
            loss = step(batches[i % len(batches)])
            elapsed = time.perf_counter() - start
            first.setdefault(name, loss)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: (first[name], statistics.median(times[name])) for name in steps}


def machine_peak(repeats: int = 10) -> float:
    """The best of several measure_peak_flops: each is a fraction of a second, and on a shared machine a
    single one can land on a moment when other work holds a core."""
    return max(measure_peak_flops(torch.device("cpu")) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per engine (the median is kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--models", default="dense,moe", help="which models, comma-separated")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = machine_peak()
    print(f"# training speed: orionlm {orionlm.__version__} vs transformers {transformers.__version__}")
    print(machine_line())
    print(f"model: {SHAPE}; MoE: {EXPERTS} experts top-{TOP_K}, aux loss coefficient {AUX_COEF}; float32")
    print(f"step: batch {BATCH} x {SEQ_LEN} tokens, forward + backward + AdamW {ADAMW}; "
          f"median of {args.steps} steps after {args.warmup} warm-up steps, engines alternating\n")  # fmt: skip

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, BATCH, SEQ_LEN + 1), generator=generator)
    batches = [(t[:, :-1], t[:, 1:].contiguous()) for t in tokens]
    rows = []
    for kind in args.models.split(","):
        moe = kind == "moe"
        hf = hf_model(kind)
        ours = to_orionlm(hf)
        steps = {f"transformers ({hf.config._experts_implementation})" if moe else "transformers": hf_step(hf, moe)}
        if moe:
            eager = hf_model(kind, "eager")
            steps["transformers (eager)"] = hf_step(eager, moe)
        steps["orionlm"] = orionlm_step(ours)
        results = measure(steps, batches, args.warmup, args.steps)
        losses = [loss for loss, _ in results.values()]
        spread = max(losses) - min(losses)
        print(f"{kind}: first-step losses {', '.join(f'{n} {v:.6f}' for n, v in zip(results, losses, strict=True))}; "
              f"max difference {spread:.2e}: {'agree' if spread < 1e-4 else 'DISAGREE'}")  # fmt: skip
        step_flops = flops_per_token(ours.config, SEQ_LEN) * BATCH * SEQ_LEN
        for name, (_, seconds) in results.items():
            rows.append((kind, name, BATCH * SEQ_LEN / seconds, seconds, step_flops / seconds))
        del hf, ours, steps

    peak = max(peak, machine_peak())
    print(f"\nMFU against the float32 matmul peak measured before and after: {peak / 1e9:.1f} GFLOP/s")
    print("\n| model | engine | train tok/s | step (s) | MFU | vs transformers |")
    print("|---|---|---:|---:|---:|---:|")
    baseline = {}
    for kind, name, tps, seconds, flops in rows:
        baseline.setdefault(kind, tps)  # the first engine of each model: transformers' default
        print(f"| {kind} | {name} | {tps:,.0f} | {seconds:.3f} | {flops / peak:.1%} | {tps / baseline[kind]:.2f}x |")


if __name__ == "__main__":
    main()
