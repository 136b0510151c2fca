"""Grouped-query attention over a preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .linear import Linear, Packed
from .norm import RMSNorm
from .rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.fused = config.fused_qkv
        if self.fused:
            # BLOOM layout: output rows grouped per head as (heads, [q, k, v], head_dim)
            self.qkv_proj = Linear(hidden, 3 * q_dim, bias=config.qkv_bias)
        else:
            self.q_proj = Linear(hidden, q_dim, bias=config.qkv_bias)
            self.k_proj = Linear(hidden, kv_dim, bias=config.qkv_bias)
            self.v_proj = Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(q_dim, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.packed: Packed | None = None  # q, k and v in one matrix, set by use_decode_layout

    def packable(self) -> list[Linear] | None:
        return None if self.fused else [self.q_proj, self.k_proj, self.v_proj]

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,  # (B, 1 or H, T, L) bool or additive float, or None
        is_causal: bool,
        cache: KVCache | None,
        slot: int | None = None,  # the cache slot; default this layer's index (a looped block has one per loop)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).view(B, T, self.num_heads, 3, self.head_dim).unbind(3)
        else:
            if self.packed is not None and self.packed.valid():
                q, k, v = self.packed(x)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(B, T, self.num_heads, self.head_dim)
            k = k.view(B, T, self.num_kv_heads, self.head_dim)
            v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx if slot is None else slot, k, v)  # (B, kv_heads, L, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
