"""Quiet-STaR's parts beside the language model (Zelikman et al. 2024, arXiv 2403.09629).

The meta tokens <|startthought|> and <|endthought|> have input embeddings of their own, stored divided
by `meta_embedding_scale` and multiplied back on use: under Adam a parameter moves about lr per step
whatever its scale, so the embeddings move `scale` times faster than the rest of the model (the
reference's factor 100).

The mixing head decides, per position, how much of the prediction comes from the thought: an MLP on
[base hidden state; post-thought hidden state] gives a weight w, and the head sees
(1 - w) * base + w * thought. Its last layer starts at zero, so a new thinking model predicts exactly as
its base does. As in the reference, w is not squashed into [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


class ThinkingHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.meta_ids = (config.thought_start_id, config.thought_end_id)
        self.scale = config.meta_embedding_scale
        self.meta_embeddings = nn.Parameter(torch.zeros(2, C))  # start, end; divided by scale
        self.mixing_head = nn.Sequential(
            nn.Linear(2 * C, C), nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 1, bias=False)
        )

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) hidden layers with zero biases, and a zero last layer (w = 0). The meta embeddings
        are set from the vocabulary when the tokens are added (add_thought_tokens)."""
        for module in self.mixing_head:
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
        self.mixing_head[-1].weight.zero_()

    def embed(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) with the meta tokens' rows replaced by their own embeddings."""
        for row, token in enumerate(self.meta_ids):
            x = torch.where((input_ids == token).unsqueeze(-1), (self.meta_embeddings[row] * self.scale).to(x.dtype), x)
        return x

    def mix(self, base: torch.Tensor, thought: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed hidden states (..., C), mixing weights (...,)) from the base and post-thought states."""
        w = self.mixing_head(torch.cat([base, thought], dim=-1))  # (..., 1)
        return base + w * (thought - base), w.squeeze(-1)
