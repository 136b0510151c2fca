"""The training loop: one process on a laptop CPU, or many under torchrun (DDP, or FSDP2 to shard).

Four modes share it: pretraining from scratch, full fine-tuning (sft) and LoRA (adapters on a frozen
base), on text windows or chat rows (data/sft.py), and Quiet-STaR (quietstar.py: learning to think, on text
windows). A run directory holds the resolved recipe, run.json (versions, machine, data), metrics.jsonl, the
tokenizer it trained (if any), the charts, and checkpoints: checkpoints/<tokens seen>/ when pretraining,
checkpoints/checkpoint-<step>/ when fine-tuning or thinking. Each is a
loadable model directory (a PEFT adapter directory for LoRA) plus the training state (optimizer, data
position, RNG), so `--resume` continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import atomic_directory, read_safetensors, save_checkpoint
from ..config import ModelConfig
from ..convert.peft import load_adapter, write_adapter
from ..data import build_dataset, iter_documents
from ..data.chat import IGNORE
from ..data.sft import build_chat_dataset
from ..errors import OrionError
from ..loading import STATE_JSON, find_checkpoints, load_model, resolve_model_path
from ..model import OrionLM, count_parameters, virtual_parameters
from ..nn.lora import apply_lora
from ..tokenizer import Tokenizer
from .optim import build_optimizer
from .quietstar import QuietStar, add_thought_tokens
from .recipe import Recipe, RecipeError
from .schedule import lr_factor

STATE_FILE = "trainer_state.pt"


@dataclass
class Dist:
    """Where this process stands: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world_size == 1:
        return Dist(0, 1, torch.device(("cuda" if cuda else "cpu") if device == "auto" else device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def human_tokens(n: int) -> str:
    """An exact short name for a token count: 100000000000 -> '100B', 1638400 -> '1.6384M', 512 -> '512'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            digits = len(str(scale)) - 1
            return f"{n / scale:.{digits}f}".rstrip("0").rstrip(".") + unit
    return str(n)


def measure_peak_flops(device: torch.device) -> float:
    """FLOP/s of a large matmul in the training dtype: the denominator of the MFU estimate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    repeats = 20 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x active non-embedding parameters plus the
    attention scores (PaLM's estimate, appendix B). A Chimera's looped blocks count once per loop; its GDN
    layers' state updates (a few percent of their projections at these sizes) are left out."""
    total, active = count_parameters(config)
    active += virtual_parameters(config) - total
    active -= config.vocab_size * config.hidden_size  # the embedding lookup is not a matmul
    bottom = config.num_layers - config.shared_layers
    attention_layers = sum(config.is_attention_layer(i) for i in range(bottom))
    attention_layers += config.loops * sum(config.is_attention_layer(i) for i in range(bottom, config.num_layers))
    attention = 12 * attention_layers * config.num_heads * config.head_dim * seq_len
    return 6 * active + attention


def prepare_tokenizer(
    recipe: Recipe, out_dir: Path, d: Dist, resume_dir: Path | None, base_tokenizer: Tokenizer | None
) -> Tokenizer:
    """The run's tokenizer: the checkpoint's when resuming, a given one, the base model's, one trained on
    the data (by rank 0, saved in the run directory), or byte-level."""
    section = recipe.tokenizer
    if resume_dir is not None:
        return Tokenizer.load(resume_dir)
    if section.path is not None:
        return Tokenizer.load(section.path)
    if recipe.model.path is not None:
        if base_tokenizer is None:
            raise RecipeError(f"model.path {recipe.model.path} has no tokenizer: give tokenizer.path")
        return base_tokenizer
    if section.train_vocab_size is None:
        return Tokenizer.byte_level()
    target = out_dir / "tokenizer"
    if d.main and not (target / "tokenizer.json").is_file():
        total = sum(s.weight for s in recipe.data.sources)
        texts = []
        for source in recipe.data.sources:
            budget = int(section.train_max_bytes * source.weight / total)
            for document in iter_documents(source):
                texts.append(document)
                budget -= len(document.encode("utf-8", errors="replace"))
                if budget <= 0:
                    break
        print(f"training a {section.train_vocab_size}-token BPE tokenizer on {sum(map(len, texts)):,} characters")
        tokenizer = Tokenizer.train_bpe_from_texts(texts, section.train_vocab_size)
        target.mkdir(parents=True, exist_ok=True)
        tokenizer.save(target)
    d.barrier()
    return Tokenizer.load(target)


def model_config(recipe: Recipe, tokenizer: Tokenizer, resume_dir: Path | None) -> ModelConfig:
    if resume_dir is not None:
        return ModelConfig.load(resume_dir / "config.json")
    config = recipe.model.build()
    if tokenizer.vocab_size > config.vocab_size:
        config = config.replace(vocab_size=-(-tokenizer.vocab_size // 64) * 64)
    return config


def resolve_resume(recipe: Recipe, out_dir: Path) -> Path | None:
    resume = recipe.run.resume
    if resume is None:
        if find_checkpoints(out_dir):
            raise RecipeError(
                f"{out_dir} already has checkpoints; pass --resume to continue that run or choose another --run.out_dir"
            )
        return None
    if resume == "latest":
        found = find_checkpoints(out_dir)
        if not found:
            raise RecipeError(f"--resume: {out_dir}/checkpoints has no checkpoint to resume from")
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_JSON).is_file():
        raise RecipeError(f"--resume {path}: not a checkpoint ({STATE_JSON} is missing)")
    return path


def wrap_model(model: OrionLM, recipe: Recipe, d: Dist) -> torch.nn.Module:
    """Shard (FSDP2) or replicate (DDP) across processes; compile when asked."""
    if d.world_size > 1 and recipe.run.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped: torch.nn.Module = model
    elif d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    else:
        wrapped = model
    if recipe.run.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def full_state(model: OrionLM, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts with full (unsharded) tensors on CPU."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    model: OrionLM, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict, fsdp: bool
) -> None:
    if not fsdp:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed), written by rank 0 only."""

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # Records written after the checkpoint we resume from are replaced by the resumed run's.
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])


def as_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """A batch as the model's keyword arguments: text batches are (inputs, targets), chat batches dicts."""
    if isinstance(batch, dict):
        return batch
    inputs, targets = batch
    return {"input_ids": inputs, "targets": targets}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train(recipe: Recipe) -> Path:
    """Run a recipe; returns the run directory."""
    d = setup_distributed(recipe.run.device)
    run = recipe.run
    out_dir = Path(run.out_dir)
    resume_dir = resolve_resume(recipe, out_dir)
    if sum(x is not None for x in (run.max_steps, run.max_tokens, run.max_epochs)) != 1:
        raise RecipeError("run: give exactly one of max_steps, max_tokens or max_epochs")
    if run.fsdp and recipe.optim.name == "muon":
        # Newton-Schulz orthogonalises whole matrices; FSDP2 holds each process's shard only.
        raise RecipeError("optim.name=muon needs whole matrices: train it with DDP (run.fsdp=false) or use adamw")
    seq_len = recipe.data.seq_len
    rows_per_step = run.batch_size * run.grad_accum * d.world_size
    tokens_per_step = rows_per_step * seq_len  # row slots: chat rows may end in padding
    if run.max_epochs is None:
        total_steps = run.max_steps or math.ceil(run.max_tokens / tokens_per_step)
        recipe.schedule.phases(total_steps)  # a schedule that cannot fit fails now, not after tokenizing
    if recipe.model.path is not None and Path(recipe.model.path).is_dir():
        # A run directory means its newest checkpoint now: the saved recipe names that one, for merge-lora.
        recipe.model.path = str(resolve_model_path(recipe.model.path))
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / "checkpoints").glob(".*.tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        recipe.save(out_dir / "recipe.yaml")
    d.barrier()

    lora = recipe.mode == "lora"
    base, base_tokenizer = None, None
    if recipe.model.path is not None and (resume_dir is None or lora):  # a full checkpoint holds the model itself
        base, base_tokenizer, _ = load_model(recipe.model.path, device="cpu", dtype=torch.float32)
        if base.config.quantization_config and not lora:
            raise RecipeError(
                f"{recipe.model.path} is quantized: its weights are integer codes that cannot be trained; train a "
                "LoRA adapter on it (mode: lora) or fine-tune the full-precision model"
            )
    tokenizer = prepare_tokenizer(recipe, out_dir, d, resume_dir, base_tokenizer)
    config = base.config if base is not None else model_config(recipe, tokenizer, resume_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise RecipeError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}")
    packed = None
    if recipe.data_format == "chat":
        packed = recipe.data.packing
        if packed is None:
            packed = config.architecture != "chimera"
        elif packed and config.architecture == "chimera":
            raise RecipeError("data.packing: GDN layers carry state across packed conversations; set it to false")

    def build(progress: bool) -> Any:
        if packed is not None:
            return build_chat_dataset(recipe.data, tokenizer, packed, progress=progress)
        return build_dataset(recipe.data, tokenizer, progress=progress)

    if d.main:
        dataset = build(run.progress)
    d.barrier()
    if not d.main:  # text: the cache rank 0 wrote
        dataset = build(False)
    if run.max_epochs is not None:
        total_steps = max(1, math.ceil(run.max_epochs * sum(dataset.train_windows) / rows_per_step))
        recipe.schedule.phases(total_steps)

    torch.manual_seed(run.seed)
    if base is not None:
        model = base
    else:
        model = OrionLM(config)
        model.reset_parameters(seed=run.seed)
    if lora:
        if resume_dir is not None:
            load_adapter(model, resume_dir)
        else:
            apply_lora(model, recipe.lora)
    thinking = recipe.quietstar if recipe.mode == "quietstar" else None
    if thinking is not None:
        model = add_thought_tokens(model, tokenizer, thinking.n_ahead, thinking.meta_init)
        config = model.config
    model.activation_checkpointing = run.activation_checkpointing
    model.to(d.device)
    total_params, active_params = count_parameters(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    wrapped = wrap_model(model if thinking is None else QuietStar(model, thinking), recipe, d)
    optimizer = build_optimizer(model, recipe.optim)
    loader = dataset.train_loader(run.batch_size, rank=d.rank, world_size=d.world_size)
    step = tokens = 0
    if resume_dir is not None:
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=True)
        if lora:  # the adapter weights are loaded already
            optimizer.load_state_dict(state["optimizer"])
        else:
            model_state = read_safetensors(resume_dir)
            if config.tie_embeddings:
                model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
            load_full_state(model, optimizer, model_state, state["optimizer"], run.fsdp and d.world_size > 1)
        loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"][d.rank] if len(state["rng"]) > d.rank else state["rng"][0])
        step, tokens = state["step"], state["tokens"]

    if d.main:
        info = {
            "orionlm": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "device": str(d.device),
            "world_size": d.world_size,
            "mode": recipe.mode,
            "total_params": total_params,
            "active_params": active_params,
            "trainable_params": trainable,
            "tokens_per_step": tokens_per_step,
            "total_steps": total_steps,
            "data": dataset.stats(),
        }
        (out_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        adapted = f", {trainable:,} trained (LoRA)" if lora else ""
        print(
            f"{config.name or config.family}: {total_params:,} parameters ({active_params:,} active{adapted}), "
            f"{total_steps} steps x {tokens_per_step:,} tokens, {d.world_size} process(es) on {d.device}"
        )
    log = MetricsLog(out_dir, step if resume_dir is not None else None, run.tensorboard) if d.main else None
    peak = run.peak_flops or measure_peak_flops(d.device) * d.world_size
    step_flops = flops_per_token(config, seq_len) * tokens_per_step
    if thinking is not None:  # every thought pass runs the model on the whole batch again (attention grows, uncounted)
        step_flops *= thinking.n_passes * (thinking.n_ahead + thinking.n_ahead_talk - 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else contextlib.nullcontext()
    val_batches = [as_inputs(b) for b in dataset.val_batches(run.batch_size, max_batches=run.eval_batches)]

    def evaluate() -> dict[str, float]:
        """The mean loss over the validation targets (chat: every assistant token weighs the same), and
        Quiet-STaR's metrics, as val_* entries."""
        wrapped.eval()
        sums: dict[str, float] = {}
        count = 0.0
        with torch.no_grad(), autocast:
            for batch in val_batches:
                n = (batch["targets"] != IGNORE).sum().item()
                out = wrapped(**to_device(batch, d.device))
                values = {"loss": out.loss} | (out.metrics if thinking is not None else {})
                for key, value in values.items():
                    sums[f"val_{key}"] = sums.get(f"val_{key}", 0.0) + value.item() * n
                count += n
        wrapped.train()
        return {key: total / count for key, total in sums.items()} if count else {"val_loss": float("nan")}

    def save() -> None:
        model_state, optim_state = full_state(model, optimizer, run.fsdp and d.world_size > 1)
        rng = [torch.get_rng_state()]
        if d.world_size > 1:
            gathered: list[Any] = [None] * d.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if not d.main:
            return
        state = {"optimizer": optim_state, "data": loader.state_dict(), "rng": rng, "step": step, "tokens": tokens}
        summary = {"step": step, "tokens": tokens, "total_steps": total_steps, "metrics": last_record}

        def write_state(directory: Path) -> None:
            torch.save(state, directory / STATE_FILE)
            (directory / STATE_JSON).write_text(json.dumps(summary, indent=2) + "\n")
            recipe.save(directory / "recipe.yaml")

        name = human_tokens(tokens) if recipe.mode == "pretrain" else f"checkpoint-{step}"
        target = out_dir / "checkpoints" / name
        if lora:
            with atomic_directory(target) as tmp:
                write_adapter(model, tmp, base_model=recipe.model.path)
                tokenizer.save(tmp)
                write_state(tmp)
        else:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
            if config.tie_embeddings:
                tensors.pop("lm_head.weight", None)
            save_checkpoint(model, target, tokenizer, tensors=tensors, write_extra=write_state)
        found = find_checkpoints(out_dir)
        if run.keep_last:
            for _, old in found[: -run.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    wrapped.train()
    if recipe.mode != "pretrain" and resume_dir is None:
        # Where fine-tuning starts from: the base model's held-out loss, logged as step 0.
        start = {"step": 0, "tokens": 0} | evaluate()
        if log is not None:
            log.write(start)
            print(f"validation loss before fine-tuning: {start['val_loss']:.4f}")
    bar = tqdm(total=total_steps, initial=step, disable=not (d.main and run.progress), unit="step", dynamic_ncols=True)
    last_record: dict[str, Any] = {}
    interval_loss = torch.zeros((), device=d.device)
    interval_metrics: dict[str, torch.Tensor] = {}  # Quiet-STaR's loss parts, summed over the interval
    interval_steps = 0
    interval_start = time.perf_counter()
    expert_counts = None
    router_sums = torch.zeros(2, device=d.device)  # aux loss, z-loss
    while step < total_steps:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, total_steps, recipe.schedule)
        micro_batches = [as_inputs(next(loader)) for _ in range(run.grad_accum)]
        # Each micro-batch's mean loss weighs by its share of the step's targets, so that the step's gradient
        # is that of the mean over all its targets, however they are spread (chat rows differ in targets).
        n_targets = torch.tensor([float((b["targets"] != IGNORE).sum()) for b in micro_batches], device=d.device)
        shares = n_targets / d.mean(n_targets.mean())  # all 1.0 when every micro-batch has as many targets
        for micro, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext()
            if d.world_size > 1 and not run.fsdp and micro < run.grad_accum - 1:
                sync = wrapped.no_sync()  # gradients are averaged across processes once, at the last micro-step
            with sync, autocast:
                out = wrapped(**to_device(batch, d.device))
                loss = total = out.loss * shares[micro]
                if out.aux_loss is not None:
                    total = total + config.router_aux_loss_coef * out.aux_loss + config.router_z_loss_coef * out.z_loss
                    router_sums += torch.stack([out.aux_loss.detach(), out.z_loss.detach()]) / run.grad_accum
                    counts = out.expert_counts.detach().float()
                    expert_counts = counts if expert_counts is None else expert_counts + counts
                (total / run.grad_accum).backward()
            interval_loss += loss.detach() / run.grad_accum
            if thinking is not None:
                for key, value in out.metrics.items():
                    interval_metrics[key] = interval_metrics.get(key, 0.0) + value / run.grad_accum
        grad_norm = None
        if recipe.optim.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        interval_steps += 1
        bar.update(1)

        evaluating = (run.eval_every and step % run.eval_every == 0) or step == total_steps
        if step % run.log_every == 0 or evaluating or step == total_steps:
            elapsed = time.perf_counter() - interval_start
            record: dict[str, Any] = {
                "step": step,
                "tokens": tokens,
                "loss": d.mean(interval_loss).item() / interval_steps,
                "lr": optimizer.param_groups[0]["lr"],
            }
            for key, value in interval_metrics.items():
                record[key] = d.mean(value).item() / interval_steps
            if grad_norm is not None:
                norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                record["grad_norm"] = norm.item()
            record["tokens_per_s"] = tokens_per_step * interval_steps / elapsed
            record["mfu"] = step_flops * interval_steps / elapsed / peak
            if expert_counts is not None:
                sums = d.mean(router_sums) / interval_steps
                record["aux_loss"], record["z_loss"] = sums[0].item(), sums[1].item()
                fractions = expert_counts / expert_counts.sum(dim=-1, keepdim=True)
                record["expert_fractions"] = [[round(f, 5) for f in row] for row in fractions.tolist()]
            if evaluating:
                record |= evaluate()
            last_record = record
            if log is not None:
                log.write(record)
            bar.set_postfix(
                {k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if k in record}, refresh=False
            )
            interval_loss.zero_()
            interval_metrics.clear()
            router_sums.zero_()
            interval_steps, expert_counts = 0, None
            interval_start = time.perf_counter()

        crossed_tokens = (
            run.save_every_tokens
            and tokens // run.save_every_tokens > (tokens - tokens_per_step) // run.save_every_tokens
        )
        if (run.save_every_steps and step % run.save_every_steps == 0) or crossed_tokens or step == total_steps:
            save()
    bar.close()
    d.barrier()
    if d.main and run.plot:
        from .plot import plot_run

        try:
            for path in plot_run(out_dir):
                print(f"wrote {path}")
        except OrionError as e:
            print(f"no charts: {e}", file=sys.stderr)
    return out_dir
