"""Fine-tuning cost in orionlm: LoRA against full fine-tuning (with peft as the peer), and packed against
padded chat rows.

The model is a small MoE: preset tiny-moe with hidden 256, 4 layers, 8 query / 4 key-value heads, 8 experts
of width 704 (top-2), vocabulary 8192, weights in float32 (bfloat16 autocast on CUDA, as the trainer runs).
A step is what the trainer does (orionlm.train.trainer.train): forward with the loss plus the router's
auxiliary losses, backward, gradient clipping at 1.0, then the fused AdamW of
orionlm.train.optim.build_optimizer (lr 3e-4, betas 0.9/0.95, weight decay 0.1) on the trainable parameters.

LoRA vs full fine-tuning: four trainees start from the same weights and see the same batches of random
token ids (batch x seq_len, every position a target): orionlm training every parameter; orionlm LoRA with
r 16, alpha 32 on q/k/v/o and on the expert stacks (target_parameters experts.gate_up_proj and
experts.down_proj); orionlm LoRA on q/k/v/o alone; and peft's LoRA with the same targets and settings on
transformers' Mixtral loaded from the model's save_hf export (its loss with output_router_logits, the same
auxiliary loss; torch.optim.AdamW with the same settings, fused). The adapters' B factors start at zero, so
the four first-step losses must agree; the script says whether they do. The trainees' steps alternate,
so load from other processes slows them alike; tokens/s is the batch's tokens over the median step time
after the warm-up steps.

Memory: the training state is counted from the tensors: the weights (frozen ones included), a gradient for
every trainable parameter, and the optimizer's state after a step. The step's peak is the state held when
the step begins (weights and optimizer state; gradients are freed after each step) plus the most the step's
own allocations hold at once above it: on CUDA torch.cuda.max_memory_allocated minus memory_allocated before
the step; on CPU the allocations and frees that the CPU allocator reports to torch.profiler (profile_memory),
added up in time order (this agreed within 1% with the rise of the process's peak RSS over a step, with
glibc's mmap threshold fixed so that freed tensors leave the process). Both count tensor bytes only, not the
allocator's cache or the process's code; one untimed step after the warm-up is measured.

Packing vs padding: the same MoE, fully fine-tuned, on the chat rows of a real data set (GSM8K by default,
assistant tokens as targets) built by orionlm.data.sft.build_chat_dataset both ways: packed (several
conversations per row, attention kept within each) and padded (one per row; a batch is cut after its
longest row). Same batch size and seq_len, batches drawn by the trainer's loader, steps alternating. Fill
is the share of row slots holding a real token; trained tokens/s counts the targets (assistant tokens)
over the time of the timed steps: both layouts hold the same targets, so its ratio is the epoch-time ratio.
The tokenizer is a byte-level BPE trained on the conversations' text (or --tokenizer DIR). Prints the
setup and a markdown table for each.

    .venv/bin/python benchmarks/finetune_speed.py [--which all|lora|packing] [--steps 10] [--warmup 1]
        [--batch-size 8] [--seq-len 512] [--device cpu|cuda] [--data FILE.jsonl.gz] [--tokenizer DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from common import ROOT, cpu_name
from torch import nn
from torch._C._profiler import _EventType
from transformers import AutoModelForCausalLM

import orionlm
from orionlm import OrionLM
from orionlm.config import ModelConfig, preset
from orionlm.convert.hf import save_hf
from orionlm.data.chat import IGNORE, read_conversations
from orionlm.data.loader import DataConfig
from orionlm.data.sft import build_chat_dataset
from orionlm.data.sources import SourceConfig
from orionlm.model import add_router_losses
from orionlm.nn.lora import LoRAConfig, apply_lora
from orionlm.tokenizer import Tokenizer
from orionlm.train.optim import OptimConfig, build_optimizer

GSM8K = ROOT.parent / "shared" / "data" / "sft" / "gsm8k_train_messages.jsonl.gz"
VOCAB = 8192
SHAPE = dict(
    hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, num_experts=8, experts_per_token=2,
    expert_intermediate_size=704,
)  # fmt: skip
OPTIM = OptimConfig()  # AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0.1, grad clip 1.0: the trainer's defaults
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_STACKS = ["experts.gate_up_proj", "experts.down_proj"]
RANK, ALPHA = 16, 32.0
MIB = 2**20

Batch = dict[str, torch.Tensor]


@dataclass
class Trainee:
    """A model, its optimizer and the trainer's loss on a batch of the model's keyword arguments."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[Batch], torch.Tensor]

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def held_bytes(self) -> int:
        """Weights and optimizer state: what stays allocated between steps."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))  # fmt: skip
        return weights + state

    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state: a gradient has its parameter's shape and dtype."""
        return self.held_bytes() + sum(p.numel() * p.element_size() for p in self.trainable)


def orionlm_trainee(name: str, model: OrionLM) -> Trainee:
    config = model.config

    def loss(batch: Batch) -> torch.Tensor:
        out = model(**batch)
        return add_router_losses(out.loss, out, config)  # the trainer's loss

    return Trainee(name, model.train(), build_optimizer(model, OPTIM), loss)


def peft_trainee(name: str, model: nn.Module) -> Trainee:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                  weight_decay=OPTIM.weight_decay, fused=True)  # fmt: skip

    def loss(batch: Batch) -> torch.Tensor:
        # shift_labels: the targets are already shifted; output_router_logits adds Mixtral's auxiliary loss
        targets = batch["targets"]
        out = model(input_ids=batch["input_ids"], labels=targets, shift_labels=targets, output_router_logits=True,
                    use_cache=False)  # fmt: skip
        return out.loss

    return Trainee(name, model.train(), optimizer, loss)


def train_step(trainee: Trainee, batch: Batch, autocast: contextlib.AbstractContextManager) -> float:
    """One optimizer step as the trainer takes it; returns the loss (reading it waits for the device)."""
    with autocast:
        loss = trainee.loss(batch)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(trainee.trainable, OPTIM.grad_clip)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _allocations(nodes: list) -> list[tuple[int, int]]:
    found = []
    for node in nodes:
        if node.tag == _EventType.Allocation:
            found.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative for a free
        found += _allocations(node.children)
    return found


def step_peak(run: Callable[[], object], device: torch.device) -> int:
    """The most bytes that tensors allocated while `run` runs hold at once, above what was held before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # The CPU allocator has no peak counter, but reports every allocation and free to the profiler. Its event
    # tree is the only place that keeps them one by one (the public event list folds them into their ops).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    sizes = [size for _, size in sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()))]
    return max(itertools.accumulate(sizes), default=0)


def moe_config(vocab_size: int, seq_len: int) -> ModelConfig:
    return preset("tiny-moe", vocab_size=vocab_size, max_seq_len=seq_len, **SHAPE)


def base_model(config: ModelConfig) -> OrionLM:
    model = OrionLM(config)
    model.reset_parameters(seed=0)
    return model


def lora_table(args: argparse.Namespace, device: torch.device, autocast: contextlib.AbstractContextManager) -> None:
    base = base_model(moe_config(VOCAB, args.seq_len))
    models = {"orionlm full fine-tuning": copy.deepcopy(base)}
    for name, parameters in (("orionlm LoRA attention + experts", EXPERT_STACKS), ("orionlm LoRA attention", [])):
        models[name] = copy.deepcopy(base)
        config = LoRAConfig(r=RANK, alpha=ALPHA, target_modules=ATTENTION, target_parameters=parameters)
        apply_lora(models[name], config)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(base, None, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=ATTENTION,
                           target_parameters=EXPERT_STACKS)  # fmt: skip
    # on the device before the optimizers are built, so that each creates its state there
    trainees = [orionlm_trainee(name, model.to(device)) for name, model in models.items()]
    trainees.append(peft_trainee("peft LoRA attention + experts", peft.get_peft_model(hf, lora).to(device)))
    del base, models

    print(f"\n## LoRA vs full fine-tuning: {args.batch_size} x {args.seq_len} random tokens a step")
    print(f"LoRA r {RANK}, alpha {ALPHA:g}, on {ATTENTION}, with and without the expert stacks {EXPERT_STACKS}; "
          f"peft's on transformers' {type(hf).__name__} ({hf.config._experts_implementation} experts, "
          f"{hf.config._attn_implementation} attention) loaded from orionlm's save_hf export")  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (4, args.batch_size, args.seq_len + 1), generator=generator).to(device)
    batches = [{"input_ids": t[:, :-1], "targets": t[:, 1:].contiguous()} for t in tokens]

    first = [train_step(t, batches[0], autocast) for t in trainees]
    for i in range(1, args.warmup):
        for trainee in trainees:
            train_step(trainee, batches[i % len(batches)], autocast)
    spread = max(first) - min(first)
    tolerance = 1e-4 if device.type == "cpu" else 2e-2  # bfloat16 autocast rounds differently in each
    print(f"first-step losses {', '.join(f'{loss:.5f}' for loss in first)}; max difference {spread:.1e}: "
          f"{'agree' if spread < tolerance else 'DISAGREE'}")  # fmt: skip
    peaks = {}
    for trainee in trainees:
        held = trainee.held_bytes()
        batch = batches[args.warmup % len(batches)]
        peaks[trainee.name] = held + step_peak(lambda t=trainee, b=batch: train_step(t, b, autocast), device)
    times: dict[str, list[float]] = {t.name: [] for t in trainees}
    for i in range(args.steps):
        for trainee in trainees:
            start = time.perf_counter()
            train_step(trainee, batches[(args.warmup + 1 + i) % len(batches)], autocast)
            times[trainee.name].append(time.perf_counter() - start)

    print("\n| trainee | trainable params | train tok/s | step (s) | training state (MiB) | step peak (MiB) "
          "| tok/s vs full | state vs full | peak vs full |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    full = None
    for trainee in trainees:
        seconds = statistics.median(times[trainee.name])
        row = (args.batch_size * args.seq_len / seconds, trainee.state_bytes() / MIB, peaks[trainee.name] / MIB)
        full = full or row
        trainable = sum(p.numel() for p in trainee.trainable)
        print(f"| {trainee.name} | {trainable:,} | {row[0]:,.0f} | {seconds:.3f} | {row[1]:,.1f} | {row[2]:,.1f} | "
              + " | ".join(f"{mine / theirs:.2f}x" for mine, theirs in zip(row, full, strict=True)) + " |")  # fmt: skip


def chat_tokenizer(args: argparse.Namespace) -> Tokenizer:
    if args.tokenizer is not None:
        return Tokenizer.load(args.tokenizer)
    texts = [m["content"] for conversation in read_conversations(args.data) for m in conversation]
    return Tokenizer.train_bpe_from_texts(texts, VOCAB)


def packing_table(args: argparse.Namespace, device: torch.device, autocast: contextlib.AbstractContextManager) -> None:
    tokenizer = chat_tokenizer(args)
    data = DataConfig(sources=[SourceConfig(path=str(args.data))], seq_len=args.seq_len, val_fraction=0.0,
                      format="chat")  # fmt: skip
    datasets = {layout: build_chat_dataset(data, tokenizer, packed=layout == "packed", progress=False)
                for layout in ("packed", "padded")}  # fmt: skip
    base = base_model(moe_config(max(VOCAB, tokenizer.vocab_size), args.seq_len))
    trainees = {layout: orionlm_trainee(layout, copy.deepcopy(base).to(device)) for layout in datasets}
    loaders = {layout: dataset.train_loader(args.batch_size) for layout, dataset in datasets.items()}
    (stats,) = datasets["packed"].stats()
    origin = f"{args.tokenizer}" if args.tokenizer else "a BPE trained on their text"
    print(f"\n## packed vs padded chat rows: {args.data.name}, rows of {args.seq_len}, batches of {args.batch_size}")
    print(f"data: {stats['conversations']:,} conversations, {stats['truncated']:,} cut at seq_len + 1 tokens, "
          f"{stats['train_tokens']:,} tokens of which {stats['trained_tokens']:,} targets (assistant turns); "
          f"{tokenizer.vocab_size}-token tokenizer: {origin}; full fine-tuning")  # fmt: skip

    measured: dict[str, list[tuple[float, int, int]]] = {layout: [] for layout in datasets}  # seconds, targets, width
    for i in range(args.warmup + args.steps):
        for layout, trainee in trainees.items():
            batch = {k: v.to(device) for k, v in next(loaders[layout]).items()}
            start = time.perf_counter()
            train_step(trainee, batch, autocast)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                measured[layout].append((elapsed, int((batch["targets"] != IGNORE).sum()), batch["input_ids"].shape[1]))

    print("\n| layout | rows/epoch | fill | mean batch width | targets/step | step (s) | trained tok/s "
          "| epoch (est., s) | epoch vs packed |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    packed_epoch = None
    for layout, dataset in datasets.items():
        (stats,) = dataset.stats()
        seconds, targets, widths = (sum(column) for column in zip(*measured[layout], strict=True))
        steps = len(measured[layout])
        rate = targets / seconds
        epoch = stats["trained_tokens"] / rate
        packed_epoch = packed_epoch or epoch
        print(f"| {layout} | {stats['train_rows']:,} | {stats['fill']:.1%} | {widths / steps:.0f} | "
              f"{targets / steps:,.0f} | {seconds / steps:.3f} | {rate:,.0f} | {epoch:,.0f} | "
              f"{epoch / packed_epoch:.2f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=("all", "lora", "packing"), default="all", help="which tables")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainee")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows a step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens a row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--data", type=Path, default=GSM8K, help="chat conversations, JSONL (.gz), for packing")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer directory (default: train a BPE)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    if args.which != "lora" and not args.data.is_file():
        raise SystemExit(f"{args.data} is missing: pass --data with a JSONL(.gz) file of chat conversations, one "
                         '{"messages": [{"role": ..., "content": ...}, ...]} a line, or use --which lora')  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"# fine-tuning speed: orionlm {orionlm.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")  # fmt: skip
    print(f"torch {torch.__version__}, python {platform.python_version()}, {machine}")
    print(f"model: preset tiny-moe with {SHAPE}, vocabulary {VOCAB}; float32 weights"
          + (", bfloat16 autocast" if device.type == "cuda" else ""))  # fmt: skip
    memory = "one measured for memory (LoRA table) and " if args.which != "packing" else ""
    print(f"step: forward + backward + clip {OPTIM.grad_clip} + fused AdamW (lr {OPTIM.lr}, betas {OPTIM.betas}, "
          f"weight decay {OPTIM.weight_decay}); {args.warmup} warm-up step(s), then {memory}{args.steps} timed, "
          "trainees alternating")  # fmt: skip
    if args.which in ("all", "lora"):
        lora_table(args, device, autocast)
    if args.which in ("all", "packing"):
        packing_table(args, device, autocast)


if __name__ == "__main__":
    main()
