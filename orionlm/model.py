"""The model for every family: embeddings -> blocks (a plain stack, or Chimera's looped hybrid) -> norm
-> LM head; and add_thought_tokens, which makes a model one that thinks (Quiet-STaR, nn/thinking.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .chimera import ChimeraDecoder
from .config import ModelConfig
from .errors import OrionError
from .nn.alibi import alibi_bias, alibi_slopes
from .nn.attention import Attention
from .nn.cache import KVCache, RaggedCache
from .nn.gdn import GatedDeltaNet
from .nn.linear import Linear
from .nn.loss import linear_cross_entropy
from .nn.mlp import MLP
from .nn.moe import MoE, load_balancing_loss, router_z_loss
from .nn.norm import make_norm
from .nn.rope import RotaryEmbedding
from .nn.thinking import ThinkingHead
from .tokenizer import Tokenizer

START_THOUGHT, END_THOUGHT = "<|startthought|>", "<|endthought|>"  # a thinking model's meta tokens


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V); None when forward computed the loss from targets
    loss: torch.Tensor | None = None  # mean cross-entropy against `targets`, when given
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (unscaled)
    z_loss: torch.Tensor | None = None  # MoE router z-loss (unscaled)
    router_logits: list[torch.Tensor] | None = None  # per MoE layer, (B*T, E)
    expert_counts: torch.Tensor | None = None  # (MoE layers, E) routed slots per expert
    hidden: torch.Tensor | None = None  # (B, T, C) after the final norm, when asked for (output_hidden)


def add_router_losses(loss: torch.Tensor, out: ModelOutput, config: ModelConfig) -> torch.Tensor:
    """loss plus the MoE router losses at the config's weights: what training minimises (loss alone for models
    without experts)."""
    if out.aux_loss is None:
        return loss
    return loss + config.router_aux_loss_coef * out.aux_loss + config.router_z_loss_coef * out.z_loss


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.activation, config.mlp_bias)

    def forward(self, x, rope, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, logits, counts = self.mlp(h)
            return x + out, logits, counts
        return x + self.mlp(h), None, None


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.embedding_norm:
            self.embed_norm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config.norm, config.hidden_size, config.norm_eps)


class OrionLM(nn.Module):
    """A causal language model. Parameter names follow Hugging Face's Llama layout
    (`model.layers.{i}.self_attn.q_proj`), so conversion is a rename."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ChimeraDecoder(config) if config.architecture == "chimera" else Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.thinking = ThinkingHead(config) if config.thinks else None
        self.activation_checkpointing = False
        self.init_buffers()
        if not self.lm_head.weight.is_meta:  # meta-built models get their weights from a checkpoint
            self.reset_parameters()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the position tables; called again after loading weights onto a meta-built model."""
        self.rotary = None
        if self.config.position == "rope":
            self.rotary = RotaryEmbedding(self.config.rotary_dim, self.config.max_seq_len, self.config.rope_theta)
            self.rotary.to(device)
        if self.config.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.config.num_heads).to(device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Each module sets its own parameters (init_weights; torch's own layers in _init_torch_layer):
        Normal(0, initializer_range) weights, zero biases, unit norms; Chimera's extras as Auron starts them
        and GDN's gates and convolutions as fla does. The draws go in named_parameters order, then GDN's
        gates, then the thinking head: the order that fixes which weights a seed gives."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        modules = list(self.model.modules())
        if not self.config.tie_embeddings:  # a tied head is the embedding, set once
            modules.append(self.lm_head)
        for module in modules:
            if hasattr(module, "init_weights"):
                module.init_weights(std, generator)
            else:
                _init_torch_layer(module, std, generator)
        for module in modules:  # the decay gates are drawn after every weight, as they always were
            if isinstance(module, GatedDeltaNet):
                module.reset_gates(generator)
        if self.thinking is not None:
            self.thinking.init_weights(std, generator)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        if isinstance(self.model, ChimeraDecoder):
            return self.model.new_cache(batch_size, capacity, self.device, self.dtype)
        return KVCache(self.config, batch_size, capacity, self.device, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) token ids
        position_ids: torch.Tensor | None = None,  # (B, T); default: continues after the cache
        attention_mask: torch.Tensor | None = None,  # (B, past + T), 1 = real token, 0 = padding
        cache: KVCache | RaggedCache | None = None,  # a RaggedCache takes one token per row
        logits_to_keep: int = 0,  # > 0: logits of the last n positions only (generation needs 1)
        targets: torch.Tensor | None = None,  # (B, T) next-token ids (-100: ignored): return the loss, no logits
        document_ids: torch.Tensor | None = None,  # (B, T) packed rows: a token attends within its document only
        mask: torch.Tensor | None = None,  # (B or 1, 1, T, past + T) bool: the keys each query sees, for any order
        key_positions: torch.Tensor | None = None,  # (B or 1, past + T) with `mask`: the keys' positions (ALiBi)
        output_hidden: bool = False,  # also return the final-norm hidden states
    ) -> ModelOutput:
        B, T = input_ids.shape
        if document_ids is not None and (cache is not None or isinstance(self.model, ChimeraDecoder)):
            # GDN layers carry their state along the whole row, across document boundaries.
            raise OrionError("document_ids (packed documents) work without a cache and in attention-only models")
        past = cache.length if cache is not None else 0
        ragged = isinstance(cache, RaggedCache)
        if position_ids is None:
            if ragged:
                position_ids = cache.lengths.view(B, 1)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if self.thinking is not None:
            x = self.thinking.embed(input_ids, x)
        if self.config.embedding_norm:
            x = self.model.embed_norm(x)
        rope = self.rotary(position_ids) if self.rotary is not None else None
        ragged_lengths = cache.lengths if ragged and not cache.uniform else None
        if mask is not None:
            mask, is_causal = self._explicit_mask(mask, key_positions, past + T, x.dtype), False
        else:
            mask, is_causal = self._attention_mask(
                B, T, past, attention_mask, position_ids, x.dtype, ragged_lengths, document_ids
            )
        router_logits, counts = [], []
        checkpointing = self.activation_checkpointing and self.training
        if isinstance(self.model, ChimeraDecoder):
            keep = attention_mask[:, past:] if attention_mask is not None else None
            x = self.model.run(x, rope, mask, is_causal, cache, keep, checkpointing)
        else:
            for layer in self.model.layers:
                if checkpointing:
                    # Recompute each block's activations in the backward pass instead of storing them.
                    x, logits, layer_counts = checkpoint(layer, x, rope, mask, is_causal, cache, use_reentrant=False)
                else:
                    x, logits, layer_counts = layer(x, rope, mask, is_causal, cache)
                if logits is not None:
                    router_logits.append(logits)
                    counts.append(layer_counts)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.model.norm(x)
        if targets is not None:
            out = ModelOutput(None, loss=linear_cross_entropy(x, self.lm_head.weight, targets))
        else:
            out = ModelOutput(self.lm_head(x))  # (B, T or logits_to_keep, V)
        if output_hidden:
            out.hidden = x
        if not router_logits:
            return out
        out.router_logits, out.expert_counts = router_logits, torch.stack(counts)
        # The router losses only train the router; generation (inference mode) skips their cost.
        if not torch.is_inference_mode_enabled():
            out.aux_loss = load_balancing_loss(
                router_logits, self.config.experts_per_token, out.expert_counts, self.config.router_aux_loss_per_layer
            )
            out.z_loss = router_z_loss(router_logits)
        return out

    def _explicit_mask(self, allowed, key_positions, L, dtype):
        """A caller's mask as scaled_dot_product_attention takes it, with the ALiBi bias of the keys' positions."""
        if self.config.position != "alibi":
            return allowed
        if key_positions is None:
            key_positions = torch.arange(L, device=allowed.device).view(1, L)
        bias = alibi_bias(self.alibi_slopes.float(), key_positions)  # (B or 1, H, 1, L)
        return bias.masked_fill(~allowed, float("-inf")).to(dtype)

    def _attention_mask(self, B, T, past, attention_mask, position_ids, dtype, ragged_lengths=None, document_ids=None):
        """The mask for scaled_dot_product_attention, or (None, is_causal) when the plain causal
        kernel suffices (no padding, no documents, no sliding window in reach, no ALiBi). With
        `ragged_lengths` (B,), row b's query sits at slot ragged_lengths[b] (a RaggedCache) rather than at `past`."""
        L = past + T
        window = self.config.sliding_window
        alibi = self.config.position == "alibi"
        plain = attention_mask is None and ragged_lengths is None and document_ids is None
        if plain and not alibi and (window is None or L <= window):
            if T == 1:
                return None, False
            if past == 0:
                return None, True
        device = position_ids.device
        if ragged_lengths is not None:
            q_slot = ragged_lengths.view(B, 1, 1, 1)
        else:
            q_slot = torch.arange(past, L, device=device).view(1, 1, T, 1)
        k_slot = torch.arange(L, device=device).view(1, 1, 1, L)
        allowed = k_slot <= q_slot  # (1 or B, 1, T, L)
        if window is not None:
            allowed = allowed & (q_slot - k_slot < window)
        if attention_mask is not None:
            # Padding keys are hidden; a padding query still sees itself so its softmax stays finite.
            allowed = allowed & attention_mask.bool().view(B, 1, 1, L)
            allowed = allowed | (k_slot == q_slot)
        if document_ids is not None:
            allowed = allowed & (document_ids.view(B, 1, T, 1) == document_ids.view(B, 1, 1, T))
        if not alibi:
            return allowed, False
        if attention_mask is not None:
            key_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            key_pos = torch.arange(L, device=device).expand(B, L)
        bias = alibi_bias(self.alibi_slopes.float(), key_pos)  # (B, H, 1, L)
        return bias.masked_fill(~allowed, float("-inf")).to(dtype), False


@torch.no_grad()
def run_layers(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    inputs: list[torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, Block, list[torch.Tensor]]]:
    """A model's decoder layers run one at a time from its tensors by name (e.g. a checkpoint.LazyTensors), so
    memory holds the embedding and one layer in `dtype`, never the model. Yields (i, block, states): layer i
    built from its tensors, and the hidden states (B, T, C) entering it for each input (B, T) of token ids.
    When the caller asks for the next layer, every state goes through the block as the caller left it (e.g.
    quantized) and the block is freed. Each input runs with positions 0..T-1 and the mask that forward gives
    it, so the states equal forward's hidden states layer for layer."""
    if config.architecture == "chimera":
        raise OrionError("run_layers steps a plain stack of decoder layers; a Chimera's looped blocks are not one")
    with torch.device("meta"):
        shell = OrionLM(config)
    shell.init_buffers(device)
    embedding = [shell.model.embed_tokens] + [m for m in (getattr(shell.model, "embed_norm", None), shell.thinking)
                                              if m is not None]  # fmt: skip
    for module in embedding:
        _materialize(shell, module, tensors, device, dtype)
    states, contexts = [], []
    for ids in inputs:
        B, T = ids.shape
        ids = ids.to(device)
        x = shell.model.embed_tokens(ids)  # (B, T, C)
        if shell.thinking is not None:
            x = shell.thinking.embed(ids, x)
        if config.embedding_norm:
            x = shell.model.embed_norm(x)
        position_ids = torch.arange(T, device=device).expand(B, T)
        rope = shell.rotary(position_ids) if shell.rotary is not None else None
        states.append(x)
        contexts.append((rope, *shell._attention_mask(B, T, 0, None, position_ids, x.dtype)))
    for module in embedding:
        module.to("meta")
    for i, block in enumerate(shell.model.layers):
        _materialize(shell, block, tensors, device, dtype)
        yield i, block, states
        states = [block(x, *context, None)[0] for x, context in zip(states, contexts, strict=True)]
        block.to("meta")


def _materialize(
    model: nn.Module, module: nn.Module, tensors: Mapping[str, torch.Tensor], device: torch.device | str,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    """Give a meta-built submodule of `model` its tensors, read by their names in the model, in `dtype`."""
    prefix = next(name for name, m in model.named_modules() if m is module) + "."
    state = {name: tensors[prefix + name].to(device, dtype) for name in module.state_dict()}
    module.load_state_dict(state, assign=True)


def _init_torch_layer(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    """torch's layers that orionlm uses as they are: Normal(0, std) embeddings, unit LayerNorms with zero
    biases, and nn.Conv1d's own default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    if isinstance(module, nn.Embedding):
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    elif isinstance(module, nn.Conv1d):  # GDN's short convolutions, which have no bias
        bound = 1 / math.sqrt(module.weight[0].numel())
        module.weight.copy_((torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound)


def count_parameters(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) without building the model: the meta device holds no memory."""
    with torch.device("meta"):
        model = OrionLM(config)
    total = active = 0
    for name, p in model.named_parameters():  # a tied head is the embedding: named once
        total += p.numel()
        if ".experts." in name:
            active += p.numel() // config.num_experts * config.experts_per_token
        else:
            active += p.numel()
    return total, active


def virtual_parameters(config: ModelConfig) -> int:
    """Parameters as the compute sees them: a Chimera's shared top blocks count once per loop."""
    total, _ = count_parameters(config)
    if not config.shared_layers or config.loops == 1:
        return total
    with torch.device("meta"):
        blocks = ChimeraDecoder(config).layers[config.num_layers - config.shared_layers :]
    return total + (config.loops - 1) * sum(p.numel() for p in blocks.parameters())


def add_thought_tokens(model: OrionLM, tokenizer: Tokenizer, n_ahead: int, meta_init: str = "---") -> OrionLM:
    """A thinking model from `model`: <|startthought|> and <|endthought|> added to the tokenizer (in place),
    the vocabulary grown when they do not fit, both meta embeddings set to the embedding of the first token
    of `meta_init`, and a mixing head that starts at w = 0. A model that thinks already only gets the new
    thought length."""
    if model.config.thinks:
        model.config = model.config.replace(thought_length=n_ahead)
        return model
    init = tokenizer.encode(meta_init, add_special_tokens=False)
    if not init:
        raise OrionError(f"quietstar.meta_init {meta_init!r} encodes to no token")
    tokenizer.add_special_tokens([START_THOUGHT, END_THOUGHT])
    ids = [tokenizer.token_to_id(t) for t in (START_THOUGHT, END_THOUGHT)]
    config = model.config
    vocab = max(config.vocab_size, -(-(max(ids) + 1) // 64) * 64)
    thinking = config.replace(vocab_size=vocab, thought_start_id=ids[0], thought_end_id=ids[1], thought_length=n_ahead)
    new = OrionLM(thinking).to(device=model.device, dtype=model.dtype)
    embedding = model.model.embed_tokens.weight.detach()
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in new.state_dict().items():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                old = state[name]
                tensor[: old.shape[0]] = old
                # New rows: the meta tokens' (their inputs come from the thinking head; they are never targets,
                # and generation masks them) and padding; the embedding of `meta_init` keeps them harmless.
                tensor[old.shape[0] :] = embedding[init[0]] if name.startswith("model.") else 0
            elif name in state:
                tensor.copy_(state[name])
        new.thinking.meta_embeddings.copy_(embedding[init[0]].expand(2, -1) / thinking.meta_embedding_scale)
    new.activation_checkpointing = model.activation_checkpointing
    new.generation_defaults = getattr(model, "generation_defaults", None)  # the sampling defaults it was loaded with
    return new
