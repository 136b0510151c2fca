"""The dense feed-forward network: SwiGLU (Llama) or a GELU MLP (BLOOM)."""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.down_proj(F.gelu(self.up_proj(x), approximate=approximate))
