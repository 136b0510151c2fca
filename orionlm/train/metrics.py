"""What a training run measures and logs: the loss and its parts summed over each log interval, router
statistics, throughput and MFU (model FLOPs over a measured peak), written to metrics.jsonl by rank 0.

metrics.jsonl holds one JSON record a line, keys in this order: step, tokens, loss, lr, Quiet-STaR's loss parts
(base_loss, talk_loss, ...) or DPO's (rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin),
grad_norm (when optim.grad_clip is set), tokens_per_s, mfu, then for MoE aux_loss, z_loss and expert_fractions
(per MoE layer, the share of routed slots each expert took), then val_* entries on evaluation steps.
Every mode but pretraining begins with a step-0 record: the starting model's val_* entries.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import MissingExtra, OrionError, require
from ..model import count_parameters, virtual_parameters
from .distributed import Dist


def measure_peak_flops(device: torch.device) -> float:
    """FLOP/s of a large matmul in the training dtype: the denominator of the MFU estimate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    # A generator of its own: the global one is the run's (a resumed run has just restored it; Quiet-STaR samples
    # its thoughts from it)
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
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


def throughput(tokens: int, flops: float, seconds: float, peak_flops: float) -> dict[str, float]:
    """tokens_per_s, and mfu: the model FLOP/s achieved as a fraction of the peak."""
    return {"tokens_per_s": tokens / seconds, "mfu": flops / seconds / peak_flops}


class Interval:
    """Sums over the optimizer steps since the last record, on the device (read once per record, so that
    logging does not synchronize every step). Each micro-batch adds its share of its step."""

    def __init__(self, device: torch.device, grad_accum: int) -> None:
        self.grad_accum = grad_accum
        self.loss = torch.zeros((), device=device)
        self.parts: dict[str, torch.Tensor] = {}  # Quiet-STaR's loss parts, DPO's rewards
        self.router = torch.zeros(2, device=device)  # aux loss, z-loss
        self.expert_counts: torch.Tensor | None = None
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, out: Any, weight: torch.Tensor, parts: bool) -> None:
        """A micro-batch's output: its weighted loss, router losses and expert counts, and (`parts`) the
        Quiet-STaR or DPO metrics, weighted as the loss."""
        if out.aux_loss is not None:
            self.router += torch.stack([out.aux_loss.detach(), out.z_loss.detach()]) / self.grad_accum
            counts = out.expert_counts.detach().float()
            self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
        self.loss += (out.loss * weight).detach() / self.grad_accum
        if parts:
            for key, value in out.metrics.items():
                self.parts[key] = self.parts.get(key, 0.0) + (value * weight).detach() / self.grad_accum

    def losses(self, d: Dist) -> tuple[float, dict[str, float]]:
        """The mean loss per step over all processes, and the mean of each Quiet-STaR loss part or DPO metric."""
        loss = d.mean(self.loss).item() / self.steps
        return loss, {key: d.mean(value).item() / self.steps for key, value in self.parts.items()}

    def router_stats(self, d: Dist) -> dict[str, Any]:
        """MoE's mean aux and z losses and each layer's expert fractions; nothing for a dense model."""
        if self.expert_counts is None:
            return {}
        sums = d.mean(self.router) / self.steps
        fractions = self.expert_counts / self.expert_counts.sum(dim=-1, keepdim=True)
        return {
            "aux_loss": sums[0].item(),
            "z_loss": sums[1].item(),
            "expert_fractions": [[round(f, 5) for f in row] for row in fractions.tolist()],
        }

    def reset(self) -> None:
        self.loss.zero_()
        self.parts.clear()
        self.router.zero_()
        self.steps, self.expert_counts = 0, None
        self.start = time.perf_counter()


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each line of a metrics.jsonl and its record. A last line that is not JSON is a write that a killed run cut
    short and is left out; anywhere else it is an error."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise OrionError(f"{path} line {number} is not JSON; mend or delete that line") from None
    return records


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed: without it, a note says so once), written by rank 0 only."""

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # Records written after the checkpoint we resume from are replaced by the resumed run's.
            kept = [line for line, record in read_records(self.path) if record["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            try:
                board = require("torch.utils.tensorboard", "tensorboard", "TensorBoard logging (run.tensorboard)")
                self.writer = board.SummaryWriter(str(out_dir / "tensorboard"))
            except MissingExtra as e:
                print(
                    f"note: {e}; logging to metrics.jsonl only (--run.tensorboard=false hides this note)",
                    file=sys.stderr,
                )

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])
