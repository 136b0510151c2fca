"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290): learn from preference pairs without a
reward model.

For a prompt x with a chosen response y_w and a rejected one y_l, each response's implicit reward is
beta * (log pi(y | x) - log pi_ref(y | x)), the log-probabilities summed over the response's tokens, pi the model
being trained and pi_ref the model it started from. Losses, per pair, with d = r_w - r_l the reward margin:

    sigmoid  -(1 - eps) log sigmoid(d) - eps log sigmoid(-d)      DPO; eps = label_smoothing > 0 is cDPO, which
                                                                  takes each label as flipped with probability eps
    ipo      (h - 1 / (2 beta))^2,  h = the log-ratio margin per response token (each response's summed log-ratio
             over its token count)                                IPO (Azar et al. 2023, arXiv 2310.12036), as TRL
                                                                  computes it

The reference log-probabilities are computed once per batch without gradients, by a frozen copy of the starting
model (full fine-tuning) or, when the run trains LoRA adapters, by the same model with its adapters disabled (no
second copy). Logged per step: loss, rewards/chosen and rewards/rejected (mean beta * log-ratio), rewards/accuracy
(the share of pairs with r_w > r_l) and rewards/margin (mean r_w - r_l); the same on the validation pairs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.chat import IGNORE
from ..errors import OrionError
from ..model import OrionLM
from ..nn.lora import adapters_disabled

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    beta: float = 0.1  # how far from the reference the rewards may pull (IPO: its regularisation tau)
    label_smoothing: float = 0.0  # cDPO: the probability that a pair's preference is flipped (sigmoid loss)
    loss_type: str = "sigmoid"  # sigmoid (DPO, cDPO) | ipo

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise OrionError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise OrionError(f"dpo.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise OrionError(f"dpo.label_smoothing is a flip probability in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise OrionError("dpo.label_smoothing smooths the sigmoid loss: set dpo.loss_type=sigmoid or "
                             "dpo.label_smoothing=0")  # fmt: skip


def sequence_logps(
    logits: torch.Tensor, targets: torch.Tensor, sequence_ids: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of n sequences' summed log-probability of its targets, and its target count: logits (B, T, V),
    targets (B, T) (IGNORE where no loss is taken), sequence_ids (B, T) (-1 on padding). Both (n,) float32."""
    counted = (targets != IGNORE) & (sequence_ids >= 0)
    safe = targets.masked_fill(~counted, 0)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    index = sequence_ids.clamp(min=0).flatten()
    sums = logps.new_zeros(n).index_add(0, index, (logps * counted).flatten())
    counts = logps.new_zeros(n).index_add(0, index, counted.flatten().float())
    return sums, counts


def preference_loss(
    logps: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, settings: DPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards (detached), from (2P,) summed log-probabilities of the
    model and the reference and response token counts, ordered chosen, rejected, chosen, ..."""
    ratios = logps - reference  # (2P,)
    chosen, rejected = ratios[0::2], ratios[1::2]
    if settings.loss_type == "ipo":
        per_token = ratios / counts.clamp(min=1)
        losses = (per_token[0::2] - per_token[1::2] - 1 / (2 * settings.beta)) ** 2
    else:
        margin = settings.beta * (chosen - rejected)
        eps = settings.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    return losses, settings.beta * chosen.detach(), settings.beta * rejected.detach()


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "rewards/margin": (chosen - rejected).mean(),
    }


@dataclass
class DPOOutput:
    loss: torch.Tensor  # the mean loss over the batch's pairs
    aux_loss: torch.Tensor | None  # the model's MoE router losses
    z_loss: torch.Tensor | None
    expert_counts: torch.Tensor | None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for the log


class DPO(nn.Module):
    """An OrionLM whose forward is the DPO loss of a batch of pairs (data.preference), so the trainer (and DDP)
    can wrap it. `reference` is the frozen starting model; None: the model itself with its adapters disabled."""

    def __init__(self, model: OrionLM, settings: DPOConfig, reference: OrionLM | None = None) -> None:
        super().__init__()
        self.model, self.settings, self.reference = model, settings, reference
        if reference is not None:
            reference.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> DPO:
        """Train or evaluate the model; a reference copy stays in eval mode (no router jitter: the same
        reference log-probabilities for a batch whenever they are computed)."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        sequence_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> DPOOutput:
        n = int(sequence_ids.max()) + 1  # 2 x the batch's pairs
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "document_ids": document_ids}
        with torch.no_grad():
            disabled = adapters_disabled(self.model) if self.reference is None else contextlib.nullcontext()
            with disabled:
                reference_logits = (self.model if self.reference is None else self.reference)(**inputs).logits
            reference, _ = sequence_logps(reference_logits, targets, sequence_ids, n)
            del reference_logits
        out = self.model(**inputs)
        logps, counts = sequence_logps(out.logits, targets, sequence_ids, n)
        losses, chosen, rejected = preference_loss(logps, reference, counts, self.settings)
        metrics = reward_metrics(chosen, rejected)
        return DPOOutput(losses.mean(), out.aux_loss, out.z_loss, out.expert_counts, metrics)
