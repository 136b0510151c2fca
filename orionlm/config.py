"""ModelConfig: one flat, serializable description of every orionlm model, plus named presets."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OrionError, unknown_names

NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "gelu_tanh", "gelu")
POSITIONS = ("rope", "alibi", "none")


class ConfigError(OrionError):
    """A model configuration that cannot be built; the message says what to change."""


@dataclass
class ModelConfig:
    """Every architecture orionlm runs (dense, MoE, ALiBi) is one of these.

    Dense layers use `intermediate_size`; MoE layers use `num_experts` experts of
    `expert_intermediate_size` each, routed top-`experts_per_token`.
    """

    name: str = ""
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: same as num_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 11008
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    position: str = "rope"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    max_seq_len: int = 4096
    sliding_window: int | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False  # BLOOM's query_key_value layout: (heads, 3, head_dim) rows
    embedding_norm: bool = False
    initializer_range: float = 0.02
    # Mixture of experts
    num_experts: int = 0
    experts_per_token: int = 2
    expert_intermediate_size: int | None = None  # None: intermediate_size
    moe_layers: list[int] | None = None  # None: every layer when num_experts > 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    # Which Hugging Face architecture this model came from or exports to (None: inferred)
    hf_model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, never read by the model

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}), "
                    "or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_experts and self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        if self.moe_layers is not None:
            self.moe_layers = sorted(set(int(i) for i in self.moe_layers))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len"):
            need(getattr(self, key) > 0, f"{key} must be positive, got {getattr(self, key)}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})",
        )
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor must be in (0, 1]")
        if self.position == "rope":
            need(
                self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                f"head_dim ({self.head_dim}) x partial_rotary_factor ({self.partial_rotary_factor}) "
                f"gives {self.rotary_dim} rotary dims; it must be a positive even number",
            )
        if self.fused_qkv:
            need(
                self.num_kv_heads == self.num_heads,
                "fused_qkv (BLOOM layout) needs num_kv_heads == num_heads",
            )
        need(self.norm_eps > 0, "norm_eps must be positive")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or null")
        if self.num_experts:
            need(self.num_experts >= 2, f"num_experts must be 0 (dense) or >= 2, got {self.num_experts}")
            need(
                1 <= self.experts_per_token <= self.num_experts,
                f"experts_per_token ({self.experts_per_token}) must be between 1 and num_experts ({self.num_experts})",
            )
            need(self.activation == "swiglu", "MoE experts are SwiGLU: set activation to 'swiglu'")
            bad = [i for i in (self.moe_layers or []) if not 0 <= i < self.num_layers]
            need(not bad, f"moe_layers {bad} are outside 0..{self.num_layers - 1}")
        else:
            need(
                not self.moe_layers and not self.shared_expert_intermediate_size,
                "moe_layers and shared experts need num_experts > 0",
            )
        need(self.router_jitter >= 0, "router_jitter must be >= 0")

    # Derived properties: kept out of the JSON, computed from the fields above.
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def family(self) -> str:
        if self.position == "alibi":
            return "alibi"
        return "moe" if self.num_experts else "dense"

    def is_moe_layer(self, index: int) -> bool:
        if not self.num_experts:
            return False
        return self.moe_layers is None or index in self.moe_layers

    # Serialization
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "orionlm", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        model_type = data.pop("model_type", "orionlm")
        if model_type != "orionlm":
            raise ConfigError(f"config has model_type {model_type!r}; convert it with `orionlm convert from-hf`")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [key for key in data if key not in known]
        if unknown:
            raise ConfigError(f"unknown config keys: {unknown_names(unknown, known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return ModelConfig.from_dict({**dataclasses.asdict(self), **changes})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def _mistral_7b(**changes: Any) -> dict[str, Any]:
    # mistralai/Mistral-7B-v0.1 config.json
    return (
        dict(
            vocab_size=32000,
            hidden_size=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            intermediate_size=14336,
            rope_theta=10000.0,
            max_seq_len=32768,
            sliding_window=4096,
            norm_eps=1e-5,
            hf_model_type="mistral",
        )
        | changes
    )


_TINY = dict(
    vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=256
)

# BLOOM's layout: LayerNorm, GELU (tanh) MLP 4x wide, fused QKV, ALiBi, embedding LayerNorm, biases everywhere
_BLOOM = dict(
    norm="layernorm",
    activation="gelu_tanh",
    position="alibi",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    fused_qkv=True,
    embedding_norm=True,
    tie_embeddings=True,
    hf_model_type="bloom",
)

PRESETS: dict[str, dict[str, Any]] = {
    # Tiny presets: random-init test models of each family (not published models).
    "tiny-dense": dict(_TINY, hf_model_type="llama"),
    "tiny-moe": dict(_TINY, num_experts=4, experts_per_token=2, expert_intermediate_size=96, hf_model_type="mixtral"),
    "tiny-qwen-moe": dict(
        _TINY,
        num_experts=4,
        experts_per_token=2,
        expert_intermediate_size=64,
        qkv_bias=True,
        shared_expert_intermediate_size=128,
        shared_expert_gate=True,
        norm_topk_prob=False,
        hf_model_type="qwen2_moe",
    ),
    "tiny-alibi": _TINY | _BLOOM | dict(num_kv_heads=4, intermediate_size=256),
    # mistralai/Mistral-7B-v0.1 config.json
    "mistral-7b": _mistral_7b(),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 46.7B total, 12.9B active
    "mixtral-8x7b": _mistral_7b(
        max_seq_len=32768,
        sliding_window=None,
        rope_theta=1e6,
        num_experts=8,
        experts_per_token=2,
        router_aux_loss_coef=0.02,
        hf_model_type="mixtral",
    ),
    # OrionStarAI/Orion-MoE8x7B: hidden 4096, 32 layers, 32 q / 8 kv heads, FFN 14592, 8 experts top-2,
    # untied embeddings, RoPE, context 8192, vocab 113664
    "orion-moe-8x7b": dict(
        vocab_size=113664,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14592,
        max_seq_len=8192,
        num_experts=8,
        experts_per_token=2,
        tie_embeddings=False,
        hf_model_type="mixtral",
    ),
    # Harmony-4x7B, a frankenMoE: the Mixtral layout over 4 Mistral-7B experts, top-2 (24.2B total)
    "harmony-4x7b": _mistral_7b(
        sliding_window=None,
        num_experts=4,
        experts_per_token=2,
        hf_model_type="mixtral",
    ),
    # LumiOpen/Poro-34B config.json (BLOOM architecture with ALiBi): 34.2B parameters
    "poro-34b": _BLOOM
    | dict(
        vocab_size=128000,
        hidden_size=7168,
        num_layers=54,
        num_heads=56,
        intermediate_size=4 * 7168,
        norm_eps=1e-5,
        max_seq_len=2048,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset as a ModelConfig, with optional field overrides."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({"name": name, **PRESETS[name], **overrides})
