"""One record per Hugging Face architecture orionlm reads and writes: llama, mistral, mixtral, qwen2, qwen3,
qwen2_moe, qwen3_moe and bloom. A record holds all that is particular to its architecture: the model class
config.json names, transformers' defaults for the keys a file may leave out, the config map in both
directions (read: config.json -> ModelConfig fields, write: the reverse, refusing what the architecture
cannot express) and the tensor names that differ from orionlm's, as templates ({i} the layer, {j} the
expert). orionlm.convert.hf applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import BLOOM_LAYOUT, ModelConfig
from .hf_config import (
    COMMON_DEFAULTS,
    QWEN_DEFAULTS,
    QWEN_MOE_DEFAULTS,
    ConvertError,
    HFKeys,
    qwen_experts,
    qwen_moe_config,
    qwen_window,
    qwen_window_config,
    require,
    require_attention_bias,
    require_moe,
    rope_config,
    rope_fields,
)


@dataclass(frozen=True)
class HFArchitecture:
    """How one Hugging Face architecture maps onto orionlm, config and tensors."""

    model_type: str  # config.json's model_type
    class_name: str  # config.json's architectures entry: transformers' model class
    defaults: dict[str, Any]  # transformers' config-class defaults (5.x) for keys a config.json may leave out
    read: Callable[[HFKeys], dict[str, Any]]  # config.json -> ModelConfig fields
    write: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> config.json keys; ConvertError if it cannot
    # orionlm module path -> the Hugging Face one ({i}: the layer); every other tensor has the same name in both
    module_names: dict[str, str] = field(default_factory=dict)
    # the per-expert layout on disk: (gate, up, down) weight of expert {j} in layer {i}; None: no experts
    expert_names: tuple[str, str, str] | None = None
    prefix: str = ""  # what every name but lm_head starts with, and the bare base model (BloomModel) leaves off


def _from_llama(k: HFKeys) -> dict[str, Any]:
    bias = bool(k("attention_bias"))  # q, k, v and o together
    return rope_fields(k) | dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(k("mlp_bias")))


def _to_llama(c: ModelConfig) -> dict[str, Any]:
    require(c, "llama", num_experts=0, qk_norm=False, sliding_window=None)
    bias = require_attention_bias(c, "llama")
    return rope_config(c, "llama") | {"attention_bias": bias, "mlp_bias": c.mlp_bias}


LLAMA = HFArchitecture(
    "llama",
    "LlamaForCausalLM",
    defaults=COMMON_DEFAULTS
    | {"max_position_embeddings": 2048, "num_key_value_heads": None, "attention_bias": False, "mlp_bias": False},
    read=_from_llama,
    write=_to_llama,
)


def _from_mistral(k: HFKeys) -> dict[str, Any]:
    return rope_fields(k) | dict(sliding_window=k("sliding_window"))


def _to_mistral(c: ModelConfig) -> dict[str, Any]:
    require(c, "mistral", num_experts=0, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False)
    return rope_config(c, "mistral") | {"sliding_window": c.sliding_window}


MISTRAL = HFArchitecture(
    "mistral",
    "MistralForCausalLM",
    defaults=COMMON_DEFAULTS | {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
    read=_from_mistral,
    write=_to_mistral,
)


def _from_mixtral(k: HFKeys) -> dict[str, Any]:
    return rope_fields(k) | dict(
        sliding_window=k("sliding_window"),
        num_experts=k("num_local_experts"),
        experts_per_token=k("num_experts_per_tok"),
        expert_intermediate_size=k("intermediate_size"),
        norm_topk_prob=True,
        router_aux_loss_coef=k("router_aux_loss_coef"),
        router_jitter=k("router_jitter_noise"),
    )


def _to_mixtral(c: ModelConfig) -> dict[str, Any]:
    require_moe(c, "mixtral", shared_expert=False)
    require(c, "mixtral", qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False)
    require(c, "mixtral", norm_topk_prob=True)
    if not all(c.is_moe_layer(i) for i in range(c.num_layers)):
        raise ConvertError(
            f"Hugging Face mixtral has experts in every layer; this config has moe_layers={c.moe_layers}"
        )
    return rope_config(c, "mixtral") | {
        "intermediate_size": c.expert_intermediate_size,  # every layer is MoE: no dense MLP size
        "sliding_window": c.sliding_window,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.experts_per_token,
        "router_aux_loss_coef": c.router_aux_loss_coef,
        "router_jitter_noise": c.router_jitter,
    }


MIXTRAL = HFArchitecture(
    "mixtral",
    "MixtralForCausalLM",
    defaults=COMMON_DEFAULTS
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
    read=_from_mixtral,
    write=_to_mixtral,
    module_names={"model.layers.{i}.mlp.gate": "model.layers.{i}.block_sparse_moe.gate"},
    expert_names=(
        "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
        "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
        "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
    ),
)


def _from_qwen2(k: HFKeys) -> dict[str, Any]:
    # transformers' Qwen2 always has q/k/v biases and none on o_proj.
    window = qwen_window(k, lambda i: i >= k("max_window_layers"))
    return rope_fields(k) | dict(qkv_bias=True, sliding_window=window)


def _to_qwen2(c: ModelConfig) -> dict[str, Any]:
    require(c, "qwen2", num_experts=0, qk_norm=False, qkv_bias=True, o_bias=False, mlp_bias=False)
    return rope_config(c, "qwen2") | qwen_window_config(c)


QWEN2 = HFArchitecture(
    "qwen2",
    "Qwen2ForCausalLM",
    defaults=COMMON_DEFAULTS | QWEN_DEFAULTS | {"num_key_value_heads": 32},
    read=_from_qwen2,
    write=_to_qwen2,
)


def _from_qwen3(k: HFKeys) -> dict[str, Any]:
    bias = bool(k("attention_bias"))
    window = qwen_window(k, lambda i: i >= k("max_window_layers"))
    return rope_fields(k) | dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)


def _to_qwen3(c: ModelConfig) -> dict[str, Any]:
    require(c, "qwen3", num_experts=0, qk_norm=True, mlp_bias=False)
    bias = require_attention_bias(c, "qwen3")
    return rope_config(c, "qwen3") | qwen_window_config(c) | {"attention_bias": bias}


QWEN3 = HFArchitecture(
    "qwen3",
    "Qwen3ForCausalLM",
    defaults=COMMON_DEFAULTS | QWEN_DEFAULTS | {"num_key_value_heads": 32, "head_dim": 128, "attention_bias": False},
    read=_from_qwen3,
    write=_to_qwen3,
)


_MLP_EXPERTS = (
    "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
    "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
    "model.layers.{i}.mlp.experts.{j}.down_proj.weight",
)


def _from_qwen2_moe(k: HFKeys) -> dict[str, Any]:
    window = qwen_window(k, lambda i: i % 2 == 0 and i < k("max_window_layers"))
    return (
        rope_fields(k)
        | qwen_experts(k, k("num_experts"))
        | dict(
            qkv_bias=bool(k("qkv_bias")),
            sliding_window=window,
            shared_expert_intermediate_size=k("shared_expert_intermediate_size"),
            shared_expert_gate=True,
        )
    )


def _to_qwen2_moe(c: ModelConfig) -> dict[str, Any]:
    require_moe(c, "qwen2_moe", shared_expert=True)
    require(c, "qwen2_moe", qk_norm=False, o_bias=False, mlp_bias=False)
    return (
        rope_config(c, "qwen2_moe")
        | qwen_window_config(c)
        | qwen_moe_config(c)
        | {"qkv_bias": c.qkv_bias, "shared_expert_intermediate_size": c.shared_expert_intermediate_size}
    )


QWEN2_MOE = HFArchitecture(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    defaults=COMMON_DEFAULTS
    | QWEN_DEFAULTS
    | QWEN_MOE_DEFAULTS
    | {
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "qkv_bias": True,
    },
    read=_from_qwen2_moe,
    write=_to_qwen2_moe,
    expert_names=_MLP_EXPERTS,
)


def _from_qwen3_moe(k: HFKeys) -> dict[str, Any]:
    bias = bool(k("attention_bias"))
    window = k("sliding_window") if k("use_sliding_window") else None  # every layer alike
    # Hub files say num_experts; transformers 5 saves it under its attribute name num_local_experts.
    experts = qwen_experts(k, k("num_experts", "num_local_experts"))
    return rope_fields(k) | experts | dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)


def _to_qwen3_moe(c: ModelConfig) -> dict[str, Any]:
    require_moe(c, "qwen3_moe", shared_expert=False)
    require(c, "qwen3_moe", qk_norm=True, mlp_bias=False)
    bias = require_attention_bias(c, "qwen3_moe")
    return (
        rope_config(c, "qwen3_moe")
        | qwen_moe_config(c)
        | {
            "attention_bias": bias,
            "use_sliding_window": c.sliding_window is not None,
            "sliding_window": c.sliding_window,
        }
    )


QWEN3_MOE = HFArchitecture(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    defaults=COMMON_DEFAULTS
    | QWEN_MOE_DEFAULTS
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
    read=_from_qwen3_moe,
    write=_to_qwen3_moe,
    expert_names=_MLP_EXPERTS,
)


def _from_bloom(k: HFKeys) -> dict[str, Any]:
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


def _to_bloom(c: ModelConfig) -> dict[str, Any]:
    require(c, "bloom", position="alibi", norm="layernorm", activation="gelu_tanh", fused_qkv=True)
    require(c, "bloom", embedding_norm=True, qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=False)
    require(c, "bloom", num_experts=0, sliding_window=None, intermediate_size=4 * c.hidden_size)
    require(c, "bloom", head_dim=c.hidden_size // c.num_heads)
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


BLOOM = HFArchitecture(
    "bloom",
    "BloomForCausalLM",
    defaults={
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "apply_residual_connection_post_layernorm": False,
        "seq_length": 2048,  # ALiBi has no position limit; this is only the advertised context
    },
    read=_from_bloom,
    write=_to_bloom,
    module_names={
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
    prefix="transformer.",
)


ARCHITECTURES: dict[str, HFArchitecture] = {
    arch.model_type: arch for arch in (LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN2_MOE, QWEN3_MOE, BLOOM)
}
# GPTQModel (7.x) names Mixtral's tensors as transformers 5 holds them unfused, mlp.gate and
# mlp.experts.{j}.gate_proj/up_proj/down_proj for w1/w3/w2; AutoGPTQ-era GPTQ files use the Hub's names. Both are
# read; a GPTQ export is written in GPTQModel's, the loader of GPTQ MoE checkpoints (transformers 5 has none).
GPTQMODEL_NAMES: dict[str, HFArchitecture] = {"mixtral": replace(MIXTRAL, module_names={}, expert_names=_MLP_EXPERTS)}


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
