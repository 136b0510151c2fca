"""The experts' load over an optimizer step, for the two balancing methods that need more than one micro-batch
(nn/moe.py describes all three):

- global-batch balancing (router_aux_loss_global; Qiu et al. 2025): each micro-batch's balance loss takes f_e from
  the routed slots of the step so far, summed over its micro-batches and all-reduced over the processes at each
  micro-batch, as Megatron-LM accumulates them over gradient accumulation. The step's last micro-batch, and every
  one when there is a single micro-batch per step, sees the whole global batch; under DDP the mean over processes
  of their losses is then the loss of the global batch computed at once (DDP averages the gradients alike).
- auxiliary-loss-free balancing (router_bias_update_rate; DeepSeek-V3): once the optimizer has stepped, each
  layer's routing bias moves by the slots its experts took over the whole step, on every process. A LoRA run
  leaves it as the base has it, as it leaves every base weight (its checkpoints hold the adapter alone).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..model import OrionLM
from ..nn.moe import MoE, load_balancing_loss
from .distributed import Dist


class ExpertLoad:
    """Routed slots per MoE layer and expert, summed over the current step's micro-batches."""

    def __init__(self, config: ModelConfig, d: Dist, move_bias: bool = True) -> None:
        self.config, self.d = config, d
        self.rate = config.router_bias_update_rate if move_bias else 0.0
        self.active = bool(config.num_experts) and (config.router_aux_loss_global or self.rate > 0)
        self.counts: torch.Tensor | None = None  # (MoE layers, E); every process's when global

    def add(self, out: Any) -> None:
        """A micro-batch's output (its expert_counts); with global-batch balancing its aux_loss becomes the
        balance loss with f_e from the step's counts so far on all processes."""
        if not self.active or out.expert_counts is None:
            return
        counts = out.expert_counts.detach().float()
        if self.config.router_aux_loss_global:
            counts = self.d.sum(counts)
        self.counts = counts if self.counts is None else self.counts + counts
        if self.config.router_aux_loss_global:
            c = self.config
            out.aux_loss = load_balancing_loss(out.router_logits, c.experts_per_token, self.counts,
                                               c.router_aux_loss_per_layer)  # fmt: skip

    def end_step(self, model: OrionLM) -> None:
        """After the optimizer step: move the routing biases by the step's load, and start counting anew."""
        if self.counts is None:
            return
        if self.rate > 0:
            load = self.counts if self.config.router_aux_loss_global else self.d.sum(self.counts)
            moes = [m for m in model.modules() if isinstance(m, MoE)]  # in layer order, as the counts
            for moe, layer_load in zip(moes, load, strict=True):
                moe.update_score_bias(layer_load, self.rate)
        self.counts = None
