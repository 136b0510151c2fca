"""Rotary position embeddings in Hugging Face's rotate-half layout, full or partial."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables for positions 0..max_len-1; `forward` looks them up by position id."""

    def __init__(self, rotary_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.max_len = 0
        self._build(max_len)

    def _build(self, max_len: int) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, rotary_dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, rotary_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.max_len = max_len

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, rotary_dim) for position_ids (B, T)."""
        needed = int(position_ids.max()) + 1
        if needed > self.max_len:
            device = self.cos.device
            self._build(max(needed, 2 * self.max_len))
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x (B, H, T, D); the rest pass through (partial RoPE)."""
    rot = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)
