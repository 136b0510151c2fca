"""Hugging Face model directories: read and write llama, mistral, mixtral, qwen2, qwen3, qwen2_moe,
qwen3_moe and bloom checkpoints through an explicit config map and tensor-name map per architecture.

Tensor names: orionlm keeps Hugging Face Llama's names, so the Llama-family maps are the identity
except for the experts. MoE experts are read in both layouts that exist on disk: one tensor per expert
and projection (what transformers 4 writes, and transformers 5 writes back on save) and the stacked
`mlp.experts.gate_up_proj` / `mlp.experts.down_proj` that transformers 5 holds in memory. They are
written per expert, the layout every version of transformers reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    atomic_directory,
    model_from_tensors,
    read_config_json,
    read_generation_config,
    read_safetensors,
    resolve_device,
    state_dict_for_saving,
    write_safetensors,
)
from ..config import BLOOM_LAYOUT, ConfigError, ModelConfig
from ..errors import OrionError
from ..model import OrionLM
from ..tokenizer import Tokenizer

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "bloom": "BloomForCausalLM",
}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class ConvertError(OrionError):
    """A Hugging Face config or model that orionlm cannot convert; the message names the key."""


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig

# transformers' config-class defaults for the keys a config.json may leave out (transformers 5.x).
_COMMON_DEFAULTS: dict[str, Any] = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "head_dim": None,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
_QWEN_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
}
_QWEN_MOE_DEFAULTS: dict[str, Any] = {
    "decoder_sparse_step": 1,
    "mlp_only_layers": None,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _COMMON_DEFAULTS
    | {"max_position_embeddings": 2048, "num_key_value_heads": None, "attention_bias": False, "mlp_bias": False},
    "mistral": _COMMON_DEFAULTS | {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
    "mixtral": _COMMON_DEFAULTS
    | {
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "num_key_value_heads": 8,
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    },
    "qwen2": _COMMON_DEFAULTS | _QWEN_DEFAULTS | {"num_key_value_heads": 32},
    "qwen3": _COMMON_DEFAULTS | _QWEN_DEFAULTS | {"num_key_value_heads": 32, "head_dim": 128, "attention_bias": False},
    "qwen2_moe": _COMMON_DEFAULTS
    | _QWEN_DEFAULTS
    | _QWEN_MOE_DEFAULTS
    | {
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "qkv_bias": True,
    },
    "qwen3_moe": _COMMON_DEFAULTS
    | _QWEN_MOE_DEFAULTS
    | {
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "num_key_value_heads": 4,
        "attention_bias": False,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    },
    "bloom": {
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "apply_residual_connection_post_layernorm": False,
        "seq_length": 2048,  # ALiBi has no position limit; this is only the advertised context
    },
}


class _Keys:
    """A config.json read with its architecture's defaults; a missing key without a default is an error."""

    def __init__(self, data: dict[str, Any], model_type: str, source: str) -> None:
        self.data, self.model_type, self.source = data, model_type, source
        self.defaults = _DEFAULTS[model_type]

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


def _rope_theta(k: _Keys) -> float:
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


def _rope_fields(k: _Keys) -> dict[str, Any]:
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


def _qwen_window(k: _Keys, default_sliding: Callable[[int], bool]) -> int | None:
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


def _qwen_experts(k: _Keys, num_experts: int) -> dict[str, Any]:
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


def _from_llama(k: _Keys) -> dict[str, Any]:
    bias = bool(k("attention_bias"))  # q, k, v and o together
    return _rope_fields(k) | dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(k("mlp_bias")))


def _from_mistral(k: _Keys) -> dict[str, Any]:
    return _rope_fields(k) | dict(sliding_window=k("sliding_window"))


def _from_mixtral(k: _Keys) -> dict[str, Any]:
    return _rope_fields(k) | dict(
        sliding_window=k("sliding_window"),
        num_experts=k("num_local_experts"),
        experts_per_token=k("num_experts_per_tok"),
        expert_intermediate_size=k("intermediate_size"),
        norm_topk_prob=True,
        router_aux_loss_coef=k("router_aux_loss_coef"),
        router_jitter=k("router_jitter_noise"),
    )


def _from_qwen2(k: _Keys) -> dict[str, Any]:
    # transformers' Qwen2 always has q/k/v biases and none on o_proj.
    window = _qwen_window(k, lambda i: i >= k("max_window_layers"))
    return _rope_fields(k) | dict(qkv_bias=True, sliding_window=window)


def _from_qwen3(k: _Keys) -> dict[str, Any]:
    bias = bool(k("attention_bias"))
    window = _qwen_window(k, lambda i: i >= k("max_window_layers"))
    return _rope_fields(k) | dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)


def _from_qwen2_moe(k: _Keys) -> dict[str, Any]:
    window = _qwen_window(k, lambda i: i % 2 == 0 and i < k("max_window_layers"))
    return (
        _rope_fields(k)
        | _qwen_experts(k, k("num_experts"))
        | dict(
            qkv_bias=bool(k("qkv_bias")),
            sliding_window=window,
            shared_expert_intermediate_size=k("shared_expert_intermediate_size"),
            shared_expert_gate=True,
        )
    )


def _from_qwen3_moe(k: _Keys) -> dict[str, Any]:
    bias = bool(k("attention_bias"))
    window = k("sliding_window") if k("use_sliding_window") else None  # every layer alike
    # Hub files say num_experts; transformers 5 saves it under its attribute name num_local_experts.
    experts = _qwen_experts(k, k("num_experts", "num_local_experts"))
    return _rope_fields(k) | experts | dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)


def _from_bloom(k: _Keys) -> dict[str, Any]:
    if k("apply_residual_connection_post_layernorm"):
        raise k.error(
            "apply_residual_connection_post_layernorm=true is not supported; orionlm's BLOOM blocks take the "
            "residual before the layer norm (as the published BLOOM models do)"
        )
    hidden = k("n_embed", "hidden_size")
    return BLOOM_LAYOUT | dict(
        vocab_size=k("vocab_size"),
        hidden_size=hidden,
        num_layers=k("n_layer", "num_hidden_layers"),
        num_heads=k("n_head", "num_attention_heads"),
        intermediate_size=4 * hidden,
        norm_eps=k("layer_norm_epsilon"),
        max_seq_len=k("seq_length"),
        tie_embeddings=bool(k("tie_word_embeddings")),
        initializer_range=k("initializer_range"),
    )


_READERS: dict[str, Callable[[_Keys], dict[str, Any]]] = {
    "llama": _from_llama,
    "mistral": _from_mistral,
    "mixtral": _from_mixtral,
    "qwen2": _from_qwen2,
    "qwen3": _from_qwen3,
    "qwen2_moe": _from_qwen2_moe,
    "qwen3_moe": _from_qwen3_moe,
    "bloom": _from_bloom,
}


def config_from_hf(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (already parsed); `source` names it in errors."""
    model_type = data.get("model_type")
    if model_type not in _READERS:
        raise ConvertError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    quantization = data.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
        raise ConvertError(
            f"{source}: quantization_config ({method}) is not supported; convert the unquantized checkpoint"
        )
    fields = _READERS[model_type](_Keys(data, model_type, source)) | dict(hf_model_type=model_type)
    token_ids = {key: data[key] for key in TOKEN_ID_KEYS if data.get(key) is not None}
    try:
        return ModelConfig(**fields, extra={"hf_token_ids": token_ids} if token_ids else {})
    except (ConfigError, TypeError) as e:
        raise ConvertError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------
# ModelConfig -> config.json


def hf_architecture(config: ModelConfig) -> str:
    """The Hugging Face model_type a config exports to when it names none."""
    if config.architecture == "chimera":
        raise ConvertError("chimera models have no Hugging Face architecture; export with `orionlm convert to-auron`")
    if config.position == "alibi":
        return "bloom"
    if config.num_experts:
        if config.shared_expert_intermediate_size:
            return "qwen2_moe"
        return "qwen3_moe" if config.qk_norm else "mixtral"
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias and not config.o_bias:
        return "qwen2"
    return "mistral" if config.sliding_window else "llama"


def _require(config: ModelConfig, arch: str, **wanted: Any) -> None:
    for key, value in wanted.items():
        have = getattr(config, key)
        if have != value:
            raise ConvertError(
                f"Hugging Face {arch} cannot express {key}={have!r} (it needs {value!r}); "
                "pick another architecture or change the config"
            )


def _require_moe(config: ModelConfig, arch: str, shared_expert: bool) -> None:
    if not config.num_experts:
        raise ConvertError(f"Hugging Face {arch} is a mixture of experts; this config has num_experts=0")
    if shared_expert and not (config.shared_expert_intermediate_size and config.shared_expert_gate):
        raise ConvertError(
            f"Hugging Face {arch} has a gated shared expert in every MoE layer; set shared_expert_intermediate_size "
            "and shared_expert_gate, or export as qwen3_moe or mixtral"
        )
    if not shared_expert:
        _require(config, arch, shared_expert_intermediate_size=0)


def _require_attention_bias(config: ModelConfig, arch: str) -> bool:
    if config.qkv_bias != config.o_bias:
        raise ConvertError(
            f"Hugging Face {arch}'s attention_bias covers q/k/v and o together; this config has "
            f"qkv_bias={config.qkv_bias} and o_bias={config.o_bias}"
        )
    return config.qkv_bias


def _rope_config(c: ModelConfig, arch: str) -> dict[str, Any]:
    _require(c, arch, position="rope", norm="rmsnorm", activation="swiglu", fused_qkv=False, embedding_norm=False)
    _require(c, arch, partial_rotary_factor=1.0)
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


def _qwen_window_config(c: ModelConfig) -> dict[str, Any]:
    kind = "sliding_attention" if c.sliding_window else "full_attention"
    return {
        "use_sliding_window": c.sliding_window is not None,
        "sliding_window": c.sliding_window,
        "max_window_layers": 0 if c.sliding_window else c.num_layers,
        "layer_types": [kind] * c.num_layers,
    }


def _qwen_moe_config(c: ModelConfig) -> dict[str, Any]:
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


def _to_llama(c: ModelConfig) -> dict[str, Any]:
    _require(c, "llama", num_experts=0, qk_norm=False, sliding_window=None)
    bias = _require_attention_bias(c, "llama")
    return _rope_config(c, "llama") | {"attention_bias": bias, "mlp_bias": c.mlp_bias}


def _to_mistral(c: ModelConfig) -> dict[str, Any]:
    _require(c, "mistral", num_experts=0, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False)
    return _rope_config(c, "mistral") | {"sliding_window": c.sliding_window}


def _to_mixtral(c: ModelConfig) -> dict[str, Any]:
    _require_moe(c, "mixtral", shared_expert=False)
    _require(c, "mixtral", qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False)
    _require(c, "mixtral", norm_topk_prob=True)
    if not all(c.is_moe_layer(i) for i in range(c.num_layers)):
        raise ConvertError(
            f"Hugging Face mixtral has experts in every layer; this config has moe_layers={c.moe_layers}"
        )
    return _rope_config(c, "mixtral") | {
        "intermediate_size": c.expert_intermediate_size,  # every layer is MoE: no dense MLP size
        "sliding_window": c.sliding_window,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.experts_per_token,
        "router_aux_loss_coef": c.router_aux_loss_coef,
        "router_jitter_noise": c.router_jitter,
    }


def _to_qwen2(c: ModelConfig) -> dict[str, Any]:
    _require(c, "qwen2", num_experts=0, qk_norm=False, qkv_bias=True, o_bias=False, mlp_bias=False)
    return _rope_config(c, "qwen2") | _qwen_window_config(c)


def _to_qwen3(c: ModelConfig) -> dict[str, Any]:
    _require(c, "qwen3", num_experts=0, qk_norm=True, mlp_bias=False)
    bias = _require_attention_bias(c, "qwen3")
    return _rope_config(c, "qwen3") | _qwen_window_config(c) | {"attention_bias": bias}


def _to_qwen2_moe(c: ModelConfig) -> dict[str, Any]:
    _require_moe(c, "qwen2_moe", shared_expert=True)
    _require(c, "qwen2_moe", qk_norm=False, o_bias=False, mlp_bias=False)
    return (
        _rope_config(c, "qwen2_moe")
        | _qwen_window_config(c)
        | _qwen_moe_config(c)
        | {"qkv_bias": c.qkv_bias, "shared_expert_intermediate_size": c.shared_expert_intermediate_size}
    )


def _to_qwen3_moe(c: ModelConfig) -> dict[str, Any]:
    _require_moe(c, "qwen3_moe", shared_expert=False)
    _require(c, "qwen3_moe", qk_norm=True, mlp_bias=False)
    bias = _require_attention_bias(c, "qwen3_moe")
    return (
        _rope_config(c, "qwen3_moe")
        | _qwen_moe_config(c)
        | {
            "attention_bias": bias,
            "use_sliding_window": c.sliding_window is not None,
            "sliding_window": c.sliding_window,
        }
    )


def _to_bloom(c: ModelConfig) -> dict[str, Any]:
    _require(c, "bloom", position="alibi", norm="layernorm", activation="gelu_tanh", fused_qkv=True)
    _require(c, "bloom", embedding_norm=True, qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=False)
    _require(c, "bloom", num_experts=0, sliding_window=None, intermediate_size=4 * c.hidden_size)
    _require(c, "bloom", head_dim=c.hidden_size // c.num_heads)
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "layer_norm_epsilon": c.norm_eps,
        "apply_residual_connection_post_layernorm": False,
        "seq_length": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.initializer_range,
    }


_WRITERS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {
    "llama": _to_llama,
    "mistral": _to_mistral,
    "mixtral": _to_mixtral,
    "qwen2": _to_qwen2,
    "qwen3": _to_qwen3,
    "qwen2_moe": _to_qwen2_moe,
    "qwen3_moe": _to_qwen3_moe,
    "bloom": _to_bloom,
}


def config_to_hf(config: ModelConfig, architecture: str) -> dict[str, Any]:
    """config.json for `architecture`; raises ConvertError when the architecture cannot express the config."""
    if architecture not in _WRITERS:
        raise ConvertError(f"architecture {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    if config.thinks:
        raise ConvertError("a Quiet-STaR model's meta embeddings and mixing head have no Hugging Face layout")
    return {"architectures": [ARCHITECTURES[architecture]], "model_type": architecture} | _WRITERS[architecture](config)


# ---------------------------------------------------------------------------------------------
# Tensor names

# Module paths whose Hugging Face name differs from orionlm's (orionlm name -> HF name); {i} is the
# layer. Every other tensor has the same name in both.
_MODULE_NAMES: dict[str, dict[str, str]] = {
    "mixtral": {"model.layers.{i}.mlp.gate": "model.layers.{i}.block_sparse_moe.gate"},
    "bloom": {
        "model.embed_tokens": "transformer.word_embeddings",
        "model.embed_norm": "transformer.word_embeddings_layernorm",
        "model.norm": "transformer.ln_f",
        "model.layers.{i}.input_layernorm": "transformer.h.{i}.input_layernorm",
        "model.layers.{i}.self_attn.qkv_proj": "transformer.h.{i}.self_attention.query_key_value",
        "model.layers.{i}.self_attn.o_proj": "transformer.h.{i}.self_attention.dense",
        "model.layers.{i}.post_attention_layernorm": "transformer.h.{i}.post_attention_layernorm",
        "model.layers.{i}.mlp.up_proj": "transformer.h.{i}.mlp.dense_h_to_4h",
        "model.layers.{i}.mlp.down_proj": "transformer.h.{i}.mlp.dense_4h_to_h",
    },
}
# The per-expert layout: (gate, up, down) projection of expert {j} in layer {i}.
_EXPERT_NAMES: dict[str, tuple[str, str, str]] = {
    "mixtral": (
        "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
        "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
        "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
    ),
    "qwen2_moe": (
        "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
        "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
        "model.layers.{i}.mlp.experts.{j}.down_proj.weight",
    ),
}
_EXPERT_NAMES["qwen3_moe"] = _EXPERT_NAMES["qwen2_moe"]
_STACKED_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def _split_layer(name: str) -> tuple[str, str | None]:
    """'model.layers.3.mlp.gate' -> ('model.layers.{i}.mlp.gate', '3'); other names pass through."""
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return ".".join(["model", "layers", "{i}", *parts[3:]]), parts[2]
    return name, None


def _hf_name(arch: str, name: str, stacked: bool) -> str:
    """The Hugging Face name of one orionlm tensor (not a per-expert one)."""
    if stacked:  # transformers 5's in-memory names are orionlm's
        return name
    module, param = name.rsplit(".", 1)
    template, layer = _split_layer(module)
    renamed = _MODULE_NAMES.get(arch, {}).get(template)
    return name if renamed is None else f"{renamed.format(i=layer)}.{param}"


def _stacked_expert(name: str) -> tuple[str, str] | None:
    """(layer, 'gate_up_proj' or 'down_proj') for a stacked expert tensor's orionlm name."""
    template, layer = _split_layer(name)
    if layer is not None and template.endswith(_STACKED_SUFFIXES):
        return layer, template.rsplit(".", 1)[1]
    return None


def tensors_to_hf(
    config: ModelConfig, arch: str, state: dict[str, torch.Tensor], stacked: bool = False
) -> dict[str, torch.Tensor]:
    """orionlm tensors under their Hugging Face names; experts per expert unless `stacked`."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        expert = None if stacked else _stacked_expert(name)
        if expert is None:
            out[_hf_name(arch, name, stacked)] = tensor
            continue
        layer, kind = expert
        gate_name, up_name, down_name = _EXPERT_NAMES[arch]
        if kind == "gate_up_proj":  # (E, 2I, C) = [gate; up] per expert
            gate, up = tensor.chunk(2, dim=1)
            for j in range(config.num_experts):
                # clone: safetensors refuses tensors that share storage
                out[gate_name.format(i=layer, j=j)] = gate[j].clone()
                out[up_name.format(i=layer, j=j)] = up[j].clone()
        else:  # (E, C, I)
            for j in range(config.num_experts):
                out[down_name.format(i=layer, j=j)] = tensor[j].clone()
    return out


def _tensors_from_hf(
    config: ModelConfig, arch: str, names: list[str], hf: dict[str, torch.Tensor], stacked: bool
) -> dict[str, torch.Tensor]:
    """The inverse of tensors_to_hf for the orionlm tensor `names`, whose sources are known to exist."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        expert = None if stacked else _stacked_expert(name)
        if expert is None:
            out[name] = hf.pop(_hf_name(arch, name, stacked))
            continue
        layer, kind = expert
        gate_name, up_name, down_name = _EXPERT_NAMES[arch]
        experts = range(config.num_experts)
        if kind == "gate_up_proj":
            gate = torch.stack([hf.pop(gate_name.format(i=layer, j=j)) for j in experts])  # (E, I, C)
            up = torch.stack([hf.pop(up_name.format(i=layer, j=j)) for j in experts])
            out[name] = torch.cat([gate, up], dim=1)
        else:
            out[name] = torch.stack([hf.pop(down_name.format(i=layer, j=j)) for j in experts])
    return out


def _normalize_hf_names(config: ModelConfig, arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older Llama checkpoints saved
            continue
        if config.tie_embeddings and name == "lm_head.weight":  # some tied checkpoints store the head too
            continue
        if arch == "bloom" and name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name  # BloomModel saved on its own has no prefix
        out[name] = tensor
    return out


def _convert_tensors(
    config: ModelConfig, arch: str, tensors: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> orionlm tensors, checking names and shapes against the config first
    so that errors name the tensors as they are in the files."""
    tensors = _normalize_hf_names(config, arch, tensors)
    stacked = arch in _EXPERT_NAMES and any(name.endswith(_STACKED_SUFFIXES) for name in tensors)
    with torch.device("meta"):
        state = OrionLM(config).state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    expected = tensors_to_hf(config, arch, state, stacked)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(
            f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); config.json implies it"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); config.json has no place for it"
        )
    for name, want in expected.items():
        if tuple(tensors[name].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, config.json implies "
                f"{tuple(want.shape)}"
            )
    return _tensors_from_hf(config, arch, list(state), dict(tensors), stacked)


# ---------------------------------------------------------------------------------------------
# Directories


def load_hf(
    directory: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[OrionLM, Tokenizer | None]:
    """Load a Hugging Face model directory (config.json + safetensors); the tokenizer is None
    when the directory has no tokenizer.json."""
    directory = Path(directory)
    device, dtype = resolve_device(device, dtype)
    config_path = directory / "config.json"
    data = read_config_json(directory)
    config = config_from_hf(data, str(config_path))
    config.name = directory.name
    generation = read_generation_config(directory)
    token_ids = config.extra.get("hf_token_ids", {}) | {
        key: generation[key] for key in TOKEN_ID_KEYS if generation.get(key) is not None
    }
    if token_ids:
        config.extra["hf_token_ids"] = token_ids
    tensors = _convert_tensors(config, config.hf_model_type, read_safetensors(directory), str(directory))
    model = model_from_tensors(config, tensors, device, dtype, str(directory))
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    return model, tokenizer


def _token_ids(config: ModelConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """bos/eos/pad ids: those the model came with (config.extra), else the tokenizer's."""
    ids = dict(config.extra.get("hf_token_ids", {}))
    if tokenizer is not None:
        for key, value in zip(TOKEN_ID_KEYS, (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id), strict=True):
            if value is not None:
                ids.setdefault(key, value)
    return {key: ids.get(key) for key in TOKEN_ID_KEYS}


def save_hf(
    model: OrionLM,
    tokenizer: Tokenizer | None,
    directory: str | Path,
    architecture: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face model directory that transformers' AutoModelForCausalLM loads: config.json,
    safetensors (experts per expert), tokenizer files and generation_config.json, atomically.

    The architecture is `architecture`, else the config's hf_model_type, else inferred from the config;
    a config the architecture cannot express is refused before anything is written.
    """
    config = model.config
    arch = architecture or config.hf_model_type or hf_architecture(config)
    hf_config = config_to_hf(config, arch)
    token_ids = _token_ids(config, tokenizer)
    hf_config |= token_ids | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    tensors = tensors_to_hf(config, arch, state_dict_for_saving(model))
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        generation = {key: value for key, value in token_ids.items() if value is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory
