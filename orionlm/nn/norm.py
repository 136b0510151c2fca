"""RMSNorm (with or without a weight) and LayerNorm behind one constructor."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as Llama and Mistral do) so bf16 activations keep their precision.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y if self.weight is None else self.weight * y

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        if self.weight is not None:
            self.weight.fill_(1.0)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "rmsnorm_noweight":
        return RMSNorm(dim, eps, weight=False)
    return nn.LayerNorm(dim, eps=eps)
