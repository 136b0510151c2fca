"""The Chimera (Auron) layer stack: Gated DeltaNet and attention blocks, unique bottom blocks and a shared
top zone run `loops` times, with x0 injection, residual lambdas, U-Net skips and per-loop layer ids.

Virtual layers v = 0..n-1 are the bottom blocks, then the top blocks loop after loop. Before each one
x += lambda_v * x0, where x0 is the normalised embedding. The inputs of the first n // 2 virtual layers
are stored; after layer v of the second half, w_j * stored_j is added back with j = n - 1 - v (a U-Net
over depth). A top GDN block adds its loop's layer-id vector to its normalised input, so the shared
weights can tell the loops apart. Every virtual layer has its own cache: a KV slot for attention, a
GDNState for GDN, so a looped block keeps one per loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .nn.attention import Attention
from .nn.cache import HybridCache
from .nn.gdn import GatedDeltaNet
from .nn.mlp import MLP
from .nn.norm import make_norm

RESID_LAMBDA_INIT = math.sqrt(1.1)
RESID_LAMBDAS = ("attn_lambda", "mlp_lambda")


def _lambdas_as_scalars(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A block's state dict holds its residual lambdas 0-dim, as Auron's files and ours always have."""
    for name in RESID_LAMBDAS:
        t = state_dict[prefix + name]
        placements = getattr(t, "placements", None)
        if placements is not None:
            # A DTensor (FSDP2 shards the lambdas on their one dimension): a view cannot drop a sharded
            # dimension, so the lambda is replicated first (a single element).
            from torch.distributed.tensor import Replicate

            t = t.redistribute(placements=[Replicate()] * len(placements))
        state_dict[prefix + name] = t.reshape(())


def _lambdas_from_scalars(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Loading takes the lambdas 0-dim (files, state dicts) or shaped (1,) as the parameters are."""
    for name in RESID_LAMBDAS:
        if prefix + name in state_dict and state_dict[prefix + name].dim() == 0:
            state_dict[prefix + name] = state_dict[prefix + name].reshape(1)


class ChimeraBlock(nn.Module):
    """h = norm(x) (+ layer id); x = r_a x + mixer(h); x = r_m x + SwiGLU(norm(x))."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.is_attention = config.is_attention_layer(index)
        self.input_layernorm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        if self.is_attention:
            self.self_attn = Attention(config, index)
        else:
            self.linear_attn = GatedDeltaNet(
                config.hidden_size, config.gdn_num_heads, config.gdn_head_dim, config.gdn_expand_v,
                config.gdn_conv_kernel, config.gdn_use_gate, config.gdn_use_short_conv, config.gdn_norm_eps,
            )  # fmt: skip
        self.post_attention_layernorm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, "swiglu")
        if config.resid_lambdas:
            # Shape (1,), not 0-dim: FSDP2's fully_shard refuses scalar parameters. The hooks keep state dicts,
            # and so every file written or read, in Auron's 0-dim layout.
            self.attn_lambda = nn.Parameter(torch.full((1,), RESID_LAMBDA_INIT))
            self.mlp_lambda = nn.Parameter(torch.full((1,), RESID_LAMBDA_INIT))
            self.register_state_dict_post_hook(_lambdas_as_scalars)
            self.register_load_state_dict_pre_hook(_lambdas_from_scalars)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """The residual lambdas start at sqrt(1.1), as Auron's do."""
        if hasattr(self, "attn_lambda"):
            self.attn_lambda.fill_(RESID_LAMBDA_INIT)
            self.mlp_lambda.fill_(RESID_LAMBDA_INIT)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: HybridCache | None,
        slot: int,  # this virtual layer's cache slot (KV or GDN state)
        layer_id: torch.Tensor | None,  # (C,) added to a top GDN block's input
        keep: torch.Tensor | None,  # (B, T) 1 = real token; padding enters GDN as zeros
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.is_attention:
            y = self.self_attn(h, rope, mask, is_causal, cache, slot)
        else:
            if layer_id is not None:
                h = h + layer_id.to(h.dtype)
            if keep is not None:
                # A zero input writes nothing into the GDN state (k = 0) and is what the short convolution
                # sees before a sequence starts, so left padding leaves no trace.
                h = h * keep.unsqueeze(-1).to(h.dtype)
            y = self.linear_attn(h, cache.states[slot] if cache is not None else None)
        if hasattr(self, "attn_lambda"):
            x = self.attn_lambda.to(x.dtype) * x + y
            return self.mlp_lambda.to(x.dtype) * x + self.mlp(self.post_attention_layernorm(x))
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x))


class ChimeraDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        C, n = config.hidden_size, config.virtual_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, C)
        self.embed_norm = make_norm(config.norm, C, config.norm_eps)
        self.layers = nn.ModuleList(ChimeraBlock(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config.norm, C, config.norm_eps)
        if config.x0_inject:
            self.x0_lambdas = nn.Parameter(torch.zeros(n))
        if config.unet_skips:
            self.skip_weights = nn.Parameter(torch.ones(n // 2, C))
        if config.shared_layers:
            self.layer_ids = nn.Parameter(torch.zeros(config.loops, config.shared_layers, C))
        # (unique block, loop or None for the bottom, cache slot) of each virtual layer
        bottom = config.num_layers - config.shared_layers
        order = [(i, None) for i in range(bottom)]
        order += [(bottom + j, loop) for loop in range(config.loops) for j in range(config.shared_layers)]
        counters = {True: 0, False: 0}
        self.schedule: list[tuple[int, int | None, int]] = []
        for block, loop in order:
            kind = config.is_attention_layer(block)
            self.schedule.append((block, loop, counters[kind]))
            counters[kind] += 1
        self.attention_slots, self.gdn_slots = counters[True], counters[False]

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """As Auron starts them: x0 injection and layer ids off (0), U-Net skips on (1)."""
        for name, value in (("x0_lambdas", 0.0), ("skip_weights", 1.0), ("layer_ids", 0.0)):
            if hasattr(self, name):
                getattr(self, name).fill_(value)

    def new_cache(self, batch_size: int, capacity: int, device, dtype) -> HybridCache:
        gdn = next((b.linear_attn for b in self.layers if not b.is_attention), None)
        states = [gdn.new_state(batch_size, device, dtype) for _ in range(self.gdn_slots)] if gdn else []
        return HybridCache(self.attention_slots, states, self.config, batch_size, capacity, device, dtype)

    def run(
        self,
        x: torch.Tensor,  # (B, T, C) normalised embeddings
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: HybridCache | None,
        keep: torch.Tensor | None,
        checkpointing: bool,
    ) -> torch.Tensor:
        state = (x, x, ())
        for v in range(len(self.schedule)):
            state = self.step(v, state, rope, mask, is_causal, cache, keep, checkpointing)
        return state[0]

    def step(
        self,
        v: int,
        state: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]],
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: HybridCache | None = None,
        keep: torch.Tensor | None = None,
        checkpointing: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Virtual layer v on state (x, x0, the stored U-Net skip inputs); returns the next state. The state is
        never changed in place, so a step can be run again on the same state (quantization calibrates that way)."""
        x, x0, stored = state
        n = len(self.schedule)
        block, loop, slot = self.schedule[v]
        if self.config.x0_inject:
            x = x + self.x0_lambdas[v].to(x.dtype) * x0
        if self.config.unet_skips and v < n // 2:
            stored = (*stored, x)
        layer = self.layers[block]
        layer_id = None
        if loop is not None and not layer.is_attention:
            layer_id = self.layer_ids[loop, block - (self.config.num_layers - self.config.shared_layers)]
        args = (x, rope, mask, is_causal, cache, slot, layer_id, keep)
        x = checkpoint(layer, *args, use_reentrant=False) if checkpointing else layer(*args)
        j = n - 1 - v
        if self.config.unet_skips and j < n // 2:
            x = x + self.skip_weights[j].to(x.dtype) * stored[j]
        return x, x0, stored
