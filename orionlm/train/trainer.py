"""The training loop: one process on a laptop CPU, or many under torchrun (DDP, or FSDP2 to shard).

Its modes: pretraining from scratch, fine-tuning (sft) on text windows or chat rows (data/sft.py), Quiet-STaR
(quietstar.py: learning to think, on text windows) and DPO (dpo.py: preference pairs, data/preference.py). Every
mode but pretraining trains either every parameter or, with a `lora:` section (mode lora: sft with adapters), LoRA
adapters on the frozen base, plus, for Quiet-STaR, the thinking head and meta embeddings in full (DPO's reference
is then the model with its adapters off). A run directory holds the resolved recipe, run.json (versions, machine,
data), metrics.jsonl, the tokenizer it trained (if any), the charts, checkpoints, and model/, the final model.
Checkpoints are checkpoints/<tokens seen>/ when pretraining, checkpoints/checkpoint-<step>/ when fine-tuning or
thinking; each is a loadable model directory (with adapters: a PEFT adapter directory) plus the training state
(optimizer, data position, RNG), so `--resume` continues bit-identically on CPU. model/ is the last checkpoint
without its training state, written when the run ends (a rerun replaces it). The process writing a run holds its
lock (lock.py): no other run writes into it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import platform
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import atomic_directory, read_safetensors, save_checkpoint
from ..config import ModelConfig
from ..convert.peft import load_adapter, write_adapter, write_thinking_config
from ..data import build_dataset
from ..data.chat import IGNORE
from ..data.loader import MixtureDataset
from ..data.preference import build_preference_dataset
from ..data.sft import ChatDataset, build_chat_dataset
from ..errors import OrionError, read_json_object
from ..loading import MODEL_DIR, STATE_JSON, find_checkpoints, load_model, resolve_model_path
from ..model import END_THOUGHT, START_THOUGHT, OrionLM, add_router_losses, add_thought_tokens, count_parameters
from ..nn.lora import apply_lora
from ..tokenizer import Tokenizer
from .balance import ExpertLoad
from .distributed import full_state, load_full_state, setup_distributed, wrap_model
from .dpo import DPO
from .lock import acquire, release
from .metrics import Interval, MetricsLog, flops_per_token, measure_peak_flops, throughput
from .optim import build_optimizer
from .plot import human_tokens, plot_run
from .quietstar import QuietStar
from .recipe import Recipe, RecipeError, chat_packing, check_context
from .run_tokenizer import prepare_tokenizer
from .schedule import lr_factor

STATE_FILE = "trainer_state.pt"


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
        if (out_dir / "metrics.jsonl").is_file():  # a run that saved nothing: its records are still not ours
            raise RecipeError(f"{out_dir} already holds a run (metrics.jsonl); choose another --run.out_dir")
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


def publish_model(checkpoint: Path, target: Path) -> None:
    """target (RUN/model): the checkpoint without its training state, replacing an older one atomically. The
    weights are hard-linked where the filesystem allows, so they are not on disk twice (every save writes new files,
    never into old ones); the small files are copied, so that editing one (a config.json) leaves the checkpoint's
    as it was."""

    def link_or_copy(source: str, destination: str) -> None:
        if source.endswith(".safetensors"):
            with contextlib.suppress(OSError):
                os.link(source, destination)
                return
        shutil.copy2(source, destination)

    with atomic_directory(target) as tmp:
        shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(STATE_FILE, STATE_JSON),
                        copy_function=link_or_copy, dirs_exist_ok=True)  # fmt: skip


def as_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """A batch as the model's keyword arguments: text batches are (inputs, targets), chat batches dicts."""
    if isinstance(batch, dict):
        return batch
    inputs, targets = batch
    return {"input_ids": inputs, "targets": targets}


def units(batch: dict[str, torch.Tensor]) -> float:
    """What a batch's mean loss is over: its targets, or a preference batch's pairs."""
    if "sequence_ids" in batch:
        return float(batch["sequence_ids"].max() + 1) / 2
    return float((batch["targets"] != IGNORE).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class Trainer:
    """One run of a recipe, in torchtitan's shape: `setup` builds everything (run directory, tokenizer, data,
    model, optimizer, and the saved state when resuming); `train` loops over `train_step` (the step's
    micro-batches through `forward_backward`, then the optimizer), calling `log`, `evaluate` and `save` at
    their intervals."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe, self.run = recipe, recipe.run
        self.d = setup_distributed(recipe.run.device)
        self.out_dir = Path(recipe.run.out_dir)
        self.lora = recipe.adapters is not None
        self.thinking = recipe.quietstar if recipe.mode == "quietstar" else None
        self.preference = recipe.dpo if recipe.mode == "dpo" else None
        self.parts = self.thinking is not None or self.preference is not None  # outputs with metrics to log
        self.sharded = recipe.run.fsdp and self.d.world_size > 1
        self.step = self.tokens = 0
        self.last_record: dict[str, Any] = {}  # the newest metrics record, summarized in each checkpoint
        self.lock = acquire(self.out_dir) if self.d.main else None  # rank 0 writes the run
        try:
            self.setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the run directory (its lock); train() does when it ends, however it ends."""
        if self.lock is not None:
            release(self.lock)
            self.lock = None

    def setup(self) -> None:
        """Everything before the first step; the run's settings are checked before any data is tokenized."""
        recipe, run, d = self.recipe, self.run, self.d
        self.resume_dir = resolve_resume(recipe, self.out_dir)
        self.last_checkpoint = self.resume_dir  # the newest checkpoint of the run: model/ at the end
        self._plan_steps()
        self._prepare_run_dir()
        base, base_tokenizer = self._load_base()
        self._check_context(base)
        self.tokenizer = prepare_tokenizer(recipe, self.out_dir, d, self.resume_dir, base_tokenizer)
        config = base.config if base is not None else model_config(recipe, self.tokenizer, self.resume_dir)
        # A resumed Quiet-STaR run's tokenizer holds the thought tokens, for which its base model grows (_build_model)
        thought_tokens = [START_THOUGHT, END_THOUGHT] if self.thinking is not None and not config.thinks else []
        tokens = self.tokenizer.vocab_size - sum(self.tokenizer.token_to_id(t) is not None for t in thought_tokens)
        if tokens > config.vocab_size:
            raise RecipeError(f"the tokenizer has {tokens} tokens, the model {config.vocab_size}")
        packed = chat_packing(recipe, config)
        if d.main:
            self.dataset = self._build_dataset(packed, run.progress)
        d.barrier()
        if not d.main:  # text: the cache rank 0 wrote
            self.dataset = self._build_dataset(packed, False)
        if self.preference is not None and not packed:  # padded, each of a step's batch_size pairs is two rows
            self.tokens_per_step *= 2
            if run.max_tokens is not None:
                self.total_steps = math.ceil(run.max_tokens / self.tokens_per_step)
                self._check_schedule()
        if run.max_epochs is not None:
            self.total_steps = max(1, math.ceil(run.max_epochs * sum(self.dataset.train_windows) / self.rows_per_step))
            self._check_schedule()

        self.model, self.config = self._build_model(base, config)
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.wrapped = wrap_model(self._objective(), recipe, d)
        self.optimizer = build_optimizer(self.model, recipe.optim)
        self.loader = self.dataset.train_loader(run.batch_size, rank=d.rank, world_size=d.world_size)
        if self.resume_dir is not None:
            self._load_state()
            if d.main:
                print(self._resume_line())
        self.metrics_log = None
        if d.main:  # the run's records, once nothing can refuse it: a refused run writes nothing
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resume_step = self.step if self.resume_dir is not None else None
            self.metrics_log = MetricsLog(self.out_dir, resume_step, run.tensorboard)  # refuses a corrupt record
            recipe.save(self.out_dir / "recipe.yaml")
            self._write_run_info()

        self.peak_flops = run.peak_flops or measure_peak_flops(d.device) * d.world_size
        self.step_flops = flops_per_token(self.config, recipe.data.seq_len) * self.tokens_per_step
        if self.thinking is not None:
            # every thought pass runs the model on the whole batch again (attention grows, uncounted)
            self.step_flops *= self.thinking.n_passes * (self.thinking.n_ahead + self.thinking.n_ahead_talk - 1)
        if self.preference is not None:  # the reference's forward pass: a third of a training step's
            self.step_flops *= 4 / 3
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else contextlib.nullcontext()
        )
        self.val_batches = [
            as_inputs(b) for b in self.dataset.val_batches(run.batch_size, max_batches=run.eval_batches)
        ]
        self.interval = Interval(d.device, run.grad_accum)
        self.expert_load = ExpertLoad(self.config, d, move_bias=not self.lora)

    def _plan_steps(self) -> None:
        """Check the run's length and sharding settings and size a step; count the steps when that needs no data."""
        run = self.run
        if sum(x is not None for x in (run.max_steps, run.max_tokens, run.max_epochs)) != 1:
            raise RecipeError("run: give exactly one of max_steps, max_tokens or max_epochs (one given on the command "
                              "line replaces the recipe's)")  # fmt: skip
        if run.fsdp and self.recipe.optim.name == "muon":
            # Newton-Schulz orthogonalises whole matrices; FSDP2 holds each process's shard only.
            raise RecipeError("optim.name=muon needs whole matrices: train it with DDP (run.fsdp=false) or use adamw")
        self.rows_per_step = run.batch_size * run.grad_accum * self.d.world_size
        self.tokens_per_step = self.rows_per_step * self.recipe.data.seq_len  # row slots: chat rows may end in padding
        if run.max_epochs is None:
            self.total_steps = run.max_steps or math.ceil(run.max_tokens / self.tokens_per_step)
            self._check_schedule()

    def _check_schedule(self) -> None:
        """The schedule fits the run's total_steps (checked before any data is tokenized); a warm-up cut to fit is
        said once."""
        warning = self.recipe.schedule.warmup_warning(self.total_steps)
        if warning and self.d.main:
            print(warning, file=sys.stderr)

    def _check_context(self, base: OrionLM | None) -> None:
        """data.seq_len within the context of the model the run trains (check_context)."""
        if base is not None:
            config = base.config
        elif self.resume_dir is not None:
            config = ModelConfig.load(self.resume_dir / "config.json")
        else:
            config = self.recipe.model.build()
        check_context(self.recipe, config.max_seq_len, resuming=self.resume_dir is not None and base is None)

    def _resume_line(self) -> str:
        """What --resume picked up and where the run now goes."""
        line = f"resuming from {self.resume_dir} (step {self.step}, {self.tokens:,} tokens); "
        planned = read_json_object(self.resume_dir / STATE_JSON, RecipeError).get("total_steps")
        if self.step >= self.total_steps:
            line += f"its {self.total_steps} steps are done: raise run.max_steps (or max_tokens, max_epochs) to go on"
        else:
            line += f"running to step {self.total_steps}"
        if planned is not None and planned != self.total_steps:
            line += f" (the checkpoint's run was to step {planned})"
        return line

    def _prepare_run_dir(self) -> None:
        recipe = self.recipe
        if recipe.model.path is not None and Path(recipe.model.path).is_dir():
            # A run directory means its newest checkpoint now: the saved recipe names that one, for merge-lora.
            recipe.model.path = str(resolve_model_path(recipe.model.path))
        if self.d.main:
            killed = [*(self.out_dir / "checkpoints").glob(".*.tmp-*"), *self.out_dir.glob(f".{MODEL_DIR}.tmp-*")]
            for stale in killed:  # left by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
        self.d.barrier()

    def _load_base(self) -> tuple[OrionLM | None, Tokenizer | None]:
        """The model to fine-tune and its tokenizer; none when pretraining or resuming a full checkpoint (which
        holds the model itself). A LoRA run always starts from its base, and so does DPO (its reference model)."""
        path = self.recipe.model.path
        if path is None or (self.resume_dir is not None and not self.lora and self.preference is None):
            return None, None
        base, tokenizer, _ = load_model(path, device="cpu", dtype=torch.float32)
        if base.config.quantization_config and not self.lora:
            raise RecipeError(
                f"{path} is quantized: its weights are integer codes that cannot be trained; train a LoRA "
                "adapter on it (mode: lora, or a lora section with mode: dpo) or fine-tune the full-precision model"
            )
        return base, tokenizer

    def _build_dataset(self, packed: bool | None, progress: bool) -> MixtureDataset | ChatDataset:
        if self.preference is not None:
            return build_preference_dataset(self.recipe.data, self.tokenizer, packed, progress=progress)
        if packed is not None:
            return build_chat_dataset(self.recipe.data, self.tokenizer, packed, progress=progress)
        return build_dataset(self.recipe.data, self.tokenizer, progress=progress)

    def _build_model(self, base: OrionLM | None, config: ModelConfig) -> tuple[OrionLM, ModelConfig]:
        """The model on its device: the base or fresh weights, then the thought tokens, then the LoRA adapters (which
        train the thinking head fully: lora.modules_to_save)."""
        run = self.run
        torch.manual_seed(run.seed)
        if base is not None:
            model = base
        else:
            model = OrionLM(config)
            model.reset_parameters(seed=run.seed)
        if self.thinking is not None:
            model = add_thought_tokens(model, self.tokenizer, self.thinking.n_ahead, self.thinking.meta_init)
            config = model.config
        if self.lora:
            if self.resume_dir is not None:
                load_adapter(model, self.resume_dir)
            else:
                apply_lora(model, self.recipe.adapters)
        model.activation_checkpointing = run.activation_checkpointing
        model.to(self.d.device)
        return model, config

    def _objective(self) -> torch.nn.Module:
        """What a batch goes through: the model, or the Quiet-STaR or DPO loss around it. DPO's reference is a frozen
        copy of the starting model (taken before a resumed run loads its weights), or with LoRA none: the model
        with its adapters disabled."""
        if self.thinking is not None:
            return QuietStar(self.model, self.thinking)
        if self.preference is not None:
            reference = None if self.lora else copy.deepcopy(self.model)
            return DPO(self.model, self.preference, reference)
        return self.model

    def _load_state(self) -> None:
        """The resumed checkpoint's weights (a LoRA adapter's are loaded already), optimizer, data position,
        RNG and counters."""
        path = self.resume_dir / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            # weights_only refuses anything but tensors and plain containers: a file written elsewhere, or a
            # truncated one, is never unpickled as code
            reason = str(e).strip().splitlines()[0]
            raise RecipeError(
                f"{path} cannot be resumed from (corrupt, truncated or not orionlm's): {reason}"
            ) from None
        if self.lora:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            model_state = read_safetensors(self.resume_dir)
            if self.config.tie_embeddings:
                model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
            load_full_state(self.model, self.optimizer, model_state, state["optimizer"], self.sharded)
        self.loader.load_state_dict(state["data"])
        rank = self.d.rank if len(state["rng"]) > self.d.rank else 0
        torch.set_rng_state(state["rng"][rank])
        self.step, self.tokens = state["step"], state["tokens"]

    def _write_run_info(self) -> None:
        """run.json (versions, machine, sizes, data) and the run's one-line summary."""
        config, d = self.config, self.d
        total_params, active_params = count_parameters(config)
        info = {
            "orionlm": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "device": str(d.device),
            "world_size": d.world_size,
            "mode": self.recipe.mode,
            "total_params": total_params,
            "active_params": active_params,
            "trainable_params": self.trainable_params,
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "peak_lr": self.optimizer.param_groups[0]["base_lr"],  # the first group's, as lr in metrics.jsonl
            "data": self.dataset.stats(),
        }
        if isinstance(self.dataset, MixtureDataset):  # text: the loss chart's context-free line
            info["unigram_entropy"] = self.dataset.unigram_entropy(self.config.vocab_size)
        (self.out_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        adapted = f", {self.trainable_params:,} trained (LoRA)" if self.lora else ""
        print(
            f"{config.name or config.family}: {total_params:,} parameters ({active_params:,} active{adapted}), "
            f"{self.total_steps} steps x {self.tokens_per_step:,} tokens, {d.world_size} process(es) on {d.device}"
        )

    def target_weights(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Each micro-batch's weight: its targets (DPO: pairs) over the mean count per micro-batch of all processes
        (all 1.0 when every micro-batch has as many). Weighting each micro-batch's mean loss so makes the step's
        gradient that of the mean over all its targets, however they are spread (chat rows differ in targets)."""
        counts = [units(b) for b in micro_batches]
        n_targets = torch.tensor(counts, device=self.d.device)
        return n_targets / self.d.mean(n_targets.mean())

    def forward_backward(self, batch: dict[str, torch.Tensor], weight: torch.Tensor, sync: bool = True) -> Any:
        """One micro-batch: forward, its weighted loss plus the router losses, backward (divided by grad_accum,
        so that a step's micro-batches add up to their mean). Under DDP gradients are averaged across processes
        only when `sync` (once, at a step's last micro-batch). Returns the model's output."""
        no_sync = self.d.world_size > 1 and not self.run.fsdp and not sync
        with self.wrapped.no_sync() if no_sync else contextlib.nullcontext(), self.autocast:
            out = self.wrapped(**to_device(batch, self.d.device))
            self.expert_load.add(out)
            total = add_router_losses(out.loss * weight, out, self.config)
            (total / self.run.grad_accum).backward()
        return out

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """One optimizer step on grad_accum micro-batches; returns the gradient norm when clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(self.step, self.total_steps, self.recipe.schedule)
        weights = self.target_weights(micro_batches)
        for micro, batch in enumerate(micro_batches):
            out = self.forward_backward(batch, weights[micro], sync=micro == len(micro_batches) - 1)
            self.interval.add(out, weights[micro], parts=self.parts)
        grad_norm = None
        if self.recipe.optim.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.expert_load.end_step(self.model)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.interval.steps += 1
        return grad_norm

    def evaluate(self) -> dict[str, float]:
        """The mean loss over the validation targets (chat: every assistant token weighs the same; DPO: every
        pair), and Quiet-STaR's or DPO's metrics, as val_* entries."""
        self.wrapped.eval()
        sums: dict[str, float] = {}
        count = 0.0
        with torch.no_grad(), self.autocast:
            for batch in self.val_batches:
                n = units(batch)
                out = self.wrapped(**to_device(batch, self.d.device))
                values = {"loss": out.loss} | (out.metrics if self.parts else {})
                for key, value in values.items():
                    sums[f"val_{key}"] = sums.get(f"val_{key}", 0.0) + value.item() * n
                count += n
        self.wrapped.train()
        return {key: total / count for key, total in sums.items()} if count else {"val_loss": float("nan")}

    def log(self, grad_norm: torch.Tensor | None, evaluating: bool) -> None:
        """A metrics record of the steps since the last (metrics.py lists its keys), written and shown on the
        progress bar; with `evaluating`, the validation metrics too."""
        elapsed = time.perf_counter() - self.interval.start
        loss, parts = self.interval.losses(self.d)
        lr = self.optimizer.param_groups[0]["lr"]
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr} | parts
        if grad_norm is not None:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            record["grad_norm"] = norm.item()
        steps = self.interval.steps
        record |= throughput(self.tokens_per_step * steps, self.step_flops * steps, elapsed, self.peak_flops)
        record |= self.interval.router_stats(self.d)
        if evaluating:
            record |= self.evaluate()
        self.last_record = record
        if self.metrics_log is not None:
            self.metrics_log.write(record)
        shown = {k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if k in record}
        self.bar.set_postfix(shown, refresh=False)
        self.interval.reset()

    def save(self) -> None:
        """A checkpoint of the current step (its model directory or adapter plus the training state), written by
        rank 0, which then drops all but the newest run.keep_last."""
        model_state, optim_state = full_state(self.model, self.optimizer, self.sharded)
        rng = [torch.get_rng_state()]
        if self.d.world_size > 1:
            gathered: list[Any] = [None] * self.d.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if not self.d.main:
            return
        state = {"optimizer": optim_state, "data": self.loader.state_dict(), "rng": rng, "step": self.step,
                 "tokens": self.tokens}  # fmt: skip
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "metrics": self.last_record,
        }
        write_state = partial(self._write_state, state, summary)
        name = human_tokens(self.tokens) if self.recipe.mode == "pretrain" else f"checkpoint-{self.step}"
        target = self.out_dir / "checkpoints" / name
        if self.lora:
            with atomic_directory(target) as tmp:
                write_adapter(self.model, tmp, base_model=self.recipe.model.path)
                if self.thinking is not None:
                    write_thinking_config(tmp, self.thinking.n_ahead, self.thinking.meta_init)
                self.tokenizer.save(tmp)
                write_state(tmp)
        else:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
            if self.config.tie_embeddings:
                tensors.pop("lm_head.weight", None)
            save_checkpoint(self.model, target, self.tokenizer, tensors=tensors, write_extra=write_state)
        self.last_checkpoint = target
        if self.run.keep_last:
            for _, old in find_checkpoints(self.out_dir)[: -self.run.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def _write_state(self, state: dict[str, Any], summary: dict[str, Any], directory: Path) -> None:
        torch.save(state, directory / STATE_FILE)
        (directory / STATE_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        self.recipe.save(directory / "recipe.yaml")

    def _save_due(self) -> bool:
        """At every save_every_steps steps, on crossing a multiple of save_every_tokens, and at the end."""
        run, tokens = self.run, self.tokens
        every = run.save_every_tokens
        crossed_tokens = every and tokens // every > (tokens - self.tokens_per_step) // every
        by_steps = run.save_every_steps and self.step % run.save_every_steps == 0
        return bool(by_steps or crossed_tokens or self.step == self.total_steps)

    def train(self) -> Path:
        """Run the steps left (all of them, or those after the resumed checkpoint); returns the run directory."""
        run, d = self.run, self.d
        self.wrapped.train()
        if self.recipe.mode != "pretrain" and self.resume_dir is None:
            # Where fine-tuning starts from: the base model's held-out loss, logged as step 0.
            start = {"step": 0, "tokens": 0} | self.evaluate()
            if self.metrics_log is not None:
                self.metrics_log.write(start)
                print(f"validation loss before fine-tuning: {start['val_loss']:.4f}")
        progress = d.main and run.progress
        self.bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True
        )
        self.interval.reset()
        while self.step < self.total_steps:
            grad_norm = self.train_step([as_inputs(next(self.loader)) for _ in range(run.grad_accum)])
            self.bar.update(1)
            evaluating = bool(run.eval_every and self.step % run.eval_every == 0) or self.step == self.total_steps
            if self.step % run.log_every == 0 or evaluating:
                self.log(grad_norm, evaluating)
            if self._save_due():
                self.save()
        self.bar.close()
        d.barrier()
        if d.main:
            publish_model(self.last_checkpoint, self.out_dir / MODEL_DIR)
            print(f"wrote {self.out_dir / MODEL_DIR} (the final model)")
        if d.main and run.plot:
            try:
                for path in plot_run(self.out_dir):
                    print(f"wrote {path}")
            except OrionError as e:
                print(f"no charts: {e}", file=sys.stderr)
        return self.out_dir


def train(recipe: Recipe) -> Path:
    """Run a recipe; returns the run directory (its final model in RUN/model)."""
    trainer = Trainer(recipe)
    try:
        return trainer.train()
    finally:
        trainer.close()
