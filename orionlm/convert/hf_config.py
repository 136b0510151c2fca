"""Hugging Face config.json <-> ModelConfig: what the architectures share. Each architecture's own reader,
writer and defaults are its record in orionlm.convert.hf_architectures.

Reading: a key a config.json leaves out takes transformers' config-class default for its architecture; a
key without one is an error that names it. Writing: an architecture refuses a config it cannot express,
naming the field and the value it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import ModelConfig
from ..errors import OrionError

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# generation_config.json's sampling defaults that an export carries: transformers applies all but the two OpenAI
# penalties, and keeps those too, so they come back on import
HF_SAMPLING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty")  # fmt: skip


class ConvertError(OrionError):
    """A Hugging Face config or model that orionlm cannot convert; the message names the key."""


# transformers' config-class defaults for the keys a config.json may leave out (transformers 5.x).
COMMON_DEFAULTS: dict[str, Any] = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "head_dim": None,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
QWEN_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
}
QWEN_MOE_DEFAULTS: dict[str, Any] = {
    "decoder_sparse_step": 1,
    "mlp_only_layers": None,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
}


class HFKeys:
    """A config.json read with its architecture's defaults; a missing key without a default is an error."""

    def __init__(self, data: dict[str, Any], model_type: str, defaults: dict[str, Any], source: str) -> None:
        self.data, self.model_type, self.defaults, self.source = data, model_type, defaults, source

    def __call__(self, *keys: str) -> Any:
        """The first of `keys` present in the file, else the default of the first key."""
        for key in keys:
            if key in self.data:
                return self.data[key]
        if keys[0] in self.defaults:
            return self.defaults[keys[0]]
        raise self.error(f"{keys[0]!r} is missing; a {self.model_type} config.json needs it")

    def error(self, message: str) -> ConvertError:
        return ConvertError(f"{self.source}: {message}")


def _rope_theta(k: HFKeys) -> float:
    # transformers 5 keeps RoPE settings in `rope_parameters`; older files use `rope_theta` plus
    # `rope_scaling`, which transformers lets take precedence when both are present.
    key = "rope_scaling" if k.data.get("rope_scaling") else "rope_parameters"
    params = k.data.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise k.error(f"{key} must be one flat object; per-layer RoPE parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise k.error(
            f"{key} has rope_type {kind!r}; orionlm supports only plain RoPE (rope_type 'default', no rope scaling)"
        )
    partial = params.get("partial_rotary_factor", k.data.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        # transformers' default RoPE for these architectures rotates the whole head and ignores the factor.
        raise k.error(
            f"partial_rotary_factor {partial} is not supported for {k.model_type}: transformers rotates the whole "
            "head there; remove the key or set it to 1.0"
        )
    return float(params.get("rope_theta", k("rope_theta")))


def rope_fields(k: HFKeys) -> dict[str, Any]:
    """The fields every RoPE architecture (Llama family) maps the same way."""
    activation = k("hidden_act")
    if activation not in ("silu", "swish"):
        raise k.error(f"hidden_act {activation!r} is not supported; the SwiGLU MLP needs 'silu'")
    heads = k("num_attention_heads")
    return dict(
        vocab_size=k("vocab_size"),
        hidden_size=k("hidden_size"),
        num_layers=k("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=k("num_key_value_heads") or heads,  # null: multi-head attention
        head_dim=k("head_dim") or None,  # null: hidden_size // num_heads
        intermediate_size=k("intermediate_size"),
        norm="rmsnorm",
        norm_eps=k("rms_norm_eps"),
        activation="swiglu",
        position="rope",
        rope_theta=_rope_theta(k),
        max_seq_len=k("max_position_embeddings"),
        tie_embeddings=bool(k("tie_word_embeddings")),
        initializer_range=k("initializer_range"),
    )


def qwen_window(k: HFKeys, default_sliding: Callable[[int], bool]) -> int | None:
    """Qwen's sliding window applies per layer (`layer_types`, or by default the layers that
    `default_sliding` picks from max_window_layers); orionlm has one window for every layer."""
    window = k("sliding_window")
    if not k("use_sliding_window") or not window:
        return None
    layers = range(k("num_hidden_layers"))
    types = k("layer_types") or ["sliding_attention" if default_sliding(i) else "full_attention" for i in layers]
    sliding = {kind == "sliding_attention" for kind in types}
    if sliding == {False}:
        return None
    if sliding == {True}:
        return window
    raise k.error(
        "sliding-window attention on only some layers (layer_types / max_window_layers) is not supported; "
        "orionlm applies one sliding_window to every layer"
    )


def qwen_experts(k: HFKeys, num_experts: int) -> dict[str, Any]:
    # transformers: layer i is MoE unless listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0.
    num_layers, step = k("num_hidden_layers"), k("decoder_sparse_step")
    dense = set(k("mlp_only_layers") or [])
    moe = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    return dict(
        num_experts=num_experts,
        experts_per_token=k("num_experts_per_tok"),
        expert_intermediate_size=k("moe_intermediate_size"),
        moe_layers=None if len(moe) == num_layers else moe,
        norm_topk_prob=bool(k("norm_topk_prob")),
        router_aux_loss_coef=k("router_aux_loss_coef"),
    )


def require(config: ModelConfig, arch: str, **wanted: Any) -> None:
    for key, value in wanted.items():
        have = getattr(config, key)
        if have != value:
            raise ConvertError(
                f"Hugging Face {arch} cannot express {key}={have!r} (it needs {value!r}); "
                "pick another architecture or change the config"
            )


def require_moe(config: ModelConfig, arch: str, shared_expert: bool) -> None:
    if not config.num_experts:
        raise ConvertError(f"Hugging Face {arch} is a mixture of experts; this config has num_experts=0")
    if shared_expert and not (config.shared_expert_intermediate_size and config.shared_expert_gate):
        raise ConvertError(
            f"Hugging Face {arch} has a gated shared expert in every MoE layer; set shared_expert_intermediate_size "
            "and shared_expert_gate, or export as qwen3_moe or mixtral"
        )
    if not shared_expert:
        require(config, arch, shared_expert_intermediate_size=0)


def require_attention_bias(config: ModelConfig, arch: str) -> bool:
    if config.qkv_bias != config.o_bias:
        raise ConvertError(
            f"Hugging Face {arch}'s attention_bias covers q/k/v and o together; this config has "
            f"qkv_bias={config.qkv_bias} and o_bias={config.o_bias}"
        )
    return config.qkv_bias


def rope_config(c: ModelConfig, arch: str) -> dict[str, Any]:
    require(c, arch, position="rope", norm="rmsnorm", activation="swiglu", fused_qkv=False, embedding_norm=False)
    require(c, arch, partial_rotary_factor=1.0)
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        # rope_theta for transformers 4, rope_parameters for transformers 5
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.initializer_range,
    }


def qwen_window_config(c: ModelConfig) -> dict[str, Any]:
    kind = "sliding_attention" if c.sliding_window else "full_attention"
    return {
        "use_sliding_window": c.sliding_window is not None,
        "sliding_window": c.sliding_window,
        "max_window_layers": 0 if c.sliding_window else c.num_layers,
        "layer_types": [kind] * c.num_layers,
    }


def qwen_moe_config(c: ModelConfig) -> dict[str, Any]:
    moe = [i for i in range(c.num_layers) if c.is_moe_layer(i)]
    return {
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.experts_per_token,
        "moe_intermediate_size": c.expert_intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(c.num_layers) if i not in moe],
        "norm_topk_prob": c.norm_topk_prob,
        "router_aux_loss_coef": c.router_aux_loss_coef,
    }
