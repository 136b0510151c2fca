"""The dense feed-forward network: SwiGLU (Llama) or a GELU MLP (BLOOM)."""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, Packed


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.packed: Packed | None = None  # gate and up in one matrix, set by use_decode_layout

    def packable(self) -> list[Linear] | None:
        return [self.gate_proj, self.up_proj] if self.activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            if self.packed is not None and self.packed.valid():
                gate, up = self.packed(x)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(F.silu(gate) * up)
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.down_proj(F.gelu(self.up_proj(x), approximate=approximate))
