"""ModelConfig: one flat, serializable description of every orionlm model, plus named presets."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OrionError, checker, unknown_names

NORMS = ("rmsnorm", "layernorm", "rmsnorm_noweight")
ARCHITECTURES = ("decoder", "chimera")
ACTIVATIONS = ("swiglu", "gelu_tanh", "gelu")
POSITIONS = ("rope", "alibi", "none")


class ConfigError(OrionError):
    """A model configuration that cannot be built; the message says what to change."""


@dataclass
class ModelConfig:
    """Every architecture orionlm runs (dense, MoE, ALiBi, Chimera) is one of these.

    Dense layers use `intermediate_size`; MoE layers use `num_experts` experts of
    `expert_intermediate_size` each, routed top-`experts_per_token`.

    architecture "chimera" (Auron's hybrid): `num_layers` unique blocks, of which the last
    `shared_layers` form the top zone that runs `loops` times; in each zone a block is attention when
    (i + 1) % attn_interval == 0 (i counted within the zone) and Gated DeltaNet otherwise.
    """

    name: str = ""
    architecture: str = "decoder"
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
    # Expert balance (nn/moe.py): the balance loss per MoE layer, averaged, rather than over all layers' tokens at
    # once (Mixtral); its f_e from the step's whole batch (micro-batches and processes, Qwen) rather than each
    # micro-batch; the per-expert routing bias (DeepSeek-V3) and how far each optimizer step moves it (0: frozen).
    router_aux_loss_per_layer: bool = False
    router_aux_loss_global: bool = False
    router_bias_update_rate: float = 0.0
    router_score_bias: bool = False  # the gates hold the bias; always when router_bias_update_rate > 0
    # Chimera (architecture "chimera")
    attn_interval: int = 4
    shared_layers: int = 0  # the last n of num_layers: the looped top zone
    loops: int = 1  # how many times the top zone runs
    gdn_num_heads: int | None = None  # None: num_heads
    gdn_head_dim: int | None = None  # None: head_dim
    gdn_expand_v: float = 2.0  # value head dim = gdn_head_dim x gdn_expand_v
    gdn_conv_kernel: int = 4
    gdn_use_gate: bool = True
    gdn_use_short_conv: bool = True
    gdn_norm_eps: float = 1e-5
    x0_inject: bool = False  # x += lambda_v * x0 before virtual layer v (lambda init 0)
    resid_lambdas: bool = False  # learned scalars on each block's residual stream (init sqrt(1.1))
    unet_skips: bool = False  # the inputs of the first half of virtual layers feed the second half
    # Quiet-STaR (a model that thinks before each token): the ids of <|startthought|> and <|endthought|>;
    # None: no thinking head. A thought is the start token, thought_length - 3 sampled tokens and the end
    # token (the paper's n_ahead counts the pass before them too).
    thought_start_id: int | None = None
    thought_end_id: int | None = None
    thought_length: int = 12
    meta_embedding_scale: float = 100.0  # the meta embeddings are stored divided by this: a larger step size
    # Which Hugging Face architecture this model came from or exports to (None: inferred)
    hf_model_type: str | None = None
    # a quantized model's GPTQ settings (quantize_config.json's keys, read there by transformers); None: not quantized
    quantization_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, never read by the model

    def __post_init__(self) -> None:
        self.check_sizes()  # before the derived sizes below divide by them
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
        # a rate moves a bias, so it brings one; a bias without a rate stays as trained (DeepSeek-V3's last stage)
        self.router_score_bias = bool(self.router_score_bias or self.router_bias_update_rate > 0)
        if self.moe_layers is not None:
            self.moe_layers = sorted(set(int(i) for i in self.moe_layers))
        if self.architecture == "chimera":
            self.gdn_num_heads = self.gdn_num_heads or self.num_heads
            self.gdn_head_dim = self.gdn_head_dim or self.head_dim
        self.validate()

    def check_sizes(self) -> None:
        need = checker(ConfigError)
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len")
        optional = ("num_kv_heads", "head_dim")
        for key in sizes + tuple(k for k in optional if getattr(self, k) is not None):
            value = getattr(self, key)
            whole = isinstance(value, int) and not isinstance(value, bool)
            need(whole and value > 0, f"{key} must be a positive integer, got {value!r}")

    def validate(self) -> None:
        need = checker(ConfigError)
        self.check_sizes()
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
        meta = (self.thought_start_id, self.thought_end_id)
        if meta != (None, None):
            need(None not in meta, "set both thought_start_id and thought_end_id, or neither")
            need(
                all(0 <= i < self.vocab_size for i in meta) and meta[0] != meta[1],
                f"thought_start_id and thought_end_id must be two different ids below vocab_size, got {meta}",
            )
        length = self.thought_length
        need(length >= 3, f"thought_length counts the start and end tokens, so it is at least 3; got {length}")
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
        need(self.router_bias_update_rate >= 0, "router_bias_update_rate must be >= 0 (0: the bias stays as it is)")
        balancing = self.router_score_bias or self.router_aux_loss_per_layer or self.router_aux_loss_global
        need(
            self.num_experts or not balancing,
            "router_score_bias, router_bias_update_rate and router_aux_loss_* balance experts: set num_experts > 0",
        )
        need(
            self.architecture in ARCHITECTURES,
            f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}",
        )
        if self.architecture == "chimera":
            need(not self.num_experts, "chimera blocks have a dense SwiGLU FFN: set num_experts to 0")
            need(self.position == "rope" and self.activation == "swiglu", "chimera uses RoPE and SwiGLU")
            need(self.attn_interval >= 1, f"attn_interval must be >= 1, got {self.attn_interval}")
            need(
                0 <= self.shared_layers <= self.num_layers,
                f"shared_layers ({self.shared_layers}) must be between 0 and num_layers ({self.num_layers})",
            )
            need(self.loops >= 1, f"loops must be >= 1, got {self.loops}")
            need(self.shared_layers or self.loops == 1, "loops > 1 needs shared_layers > 0")
            need(self.gdn_conv_kernel >= 1, "gdn_conv_kernel must be >= 1")
            v_dim = self.gdn_head_dim * self.gdn_expand_v
            need(v_dim == int(v_dim) and v_dim > 0, "gdn_head_dim x gdn_expand_v must be a positive whole number")
        else:
            chimera_only = ("shared_layers", "x0_inject", "resid_lambdas", "unet_skips")
            set_keys = [k for k in chimera_only if getattr(self, k)]
            need(not set_keys and self.loops == 1, f"{set_keys or ['loops']} need architecture 'chimera'")

    # Derived properties: kept out of the JSON, computed from the fields above.
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def virtual_layers(self) -> int:
        """Blocks run per token: the bottom zone once, the shared top zone `loops` times."""
        return self.num_layers + (self.loops - 1) * self.shared_layers

    def is_attention_layer(self, index: int) -> bool:
        """Whether unique block `index` is attention (the rest of a chimera's blocks are Gated DeltaNet)."""
        if self.architecture != "chimera":
            return True
        bottom = self.num_layers - self.shared_layers
        within = index if index < bottom else index - bottom
        return (within + 1) % self.attn_interval == 0

    @property
    def family(self) -> str:
        if self.architecture == "chimera":
            return "chimera"
        if self.position == "alibi":
            return "alibi"
        return "moe" if self.num_experts else "dense"

    @property
    def thinks(self) -> bool:
        """Whether this is a Quiet-STaR model (meta tokens and a mixing head)."""
        return self.thought_start_id is not None

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
BLOOM_LAYOUT = dict(
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


def _auron(dim: int, heads: int, kv_heads: int, bottom: int, top: int, **changes: Any) -> dict[str, Any]:
    """An Auron preset (orionlm.convert.auron reads and writes its config.json). What Auron's code fixes:
    weightless RMSNorm (eps 1e-6) on the embeddings, in every block and before the tied head, no biases.
    What the published config.json files share: 64-dim heads, ffn_mult 2.67 (an unrounded FFN width of
    int(dim x 2.67)), one attention block in 4, x0 injection, residual lambdas, U-Net skips, RoPE on half of
    each head (Auron's partial_rotary_factor 0.25 counts pairs) and the top zone looped 3 times."""
    return dict(
        architecture="chimera", norm="rmsnorm_noweight", norm_eps=1e-6, embedding_norm=True, tie_embeddings=True,
        hidden_size=dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=64, gdn_num_heads=heads, gdn_head_dim=64,
        gdn_expand_v=2, gdn_conv_kernel=4, intermediate_size=int(dim * 2.67), attn_interval=4, x0_inject=True,
        resid_lambdas=True, unet_skips=True, rope_theta=10000.0, partial_rotary_factor=0.5,
        num_layers=bottom + top, shared_layers=top, loops=3, max_seq_len=2048, vocab_size=151936,
    ) | changes  # fmt: skip


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
    "tiny-alibi": _TINY | BLOOM_LAYOUT | dict(num_kv_heads=4, intermediate_size=256),
    # 2 bottom + 2 shared blocks looped twice (6 virtual layers), GDN then attention in each zone
    "tiny-chimera": _auron(64, 4, 2, bottom=2, top=2, head_dim=16, gdn_head_dim=16, attn_interval=2, loops=2)
    | dict(vocab_size=512, max_seq_len=256),
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
    "poro-34b": BLOOM_LAYOUT
    | dict(
        vocab_size=128000,
        hidden_size=7168,
        num_layers=54,
        num_heads=56,
        intermediate_size=4 * 7168,
        norm_eps=1e-5,
        max_seq_len=2048,
    ),
    # Auron (Depth-Efficient Language Models via Hybrid Recurrent-Attention Weight Sharing). 510M: its
    # config.json (509.9M unique, 786.9M virtual parameters). 279M and 1.1B: the published depth and width
    # (4 + 4x3 at dim 1024, 6 + 6x3 at dim 2048) with the 510M file's 64-dim heads and 4:1 GQA.
    "auron-279m": _auron(1024, 16, 4, bottom=4, top=4),
    "auron-510m": _auron(1536, 24, 6, bottom=4, top=4),
    "auron-1.1b": _auron(2048, 32, 8, bottom=6, top=6),
}

# generation_config.json defaults that come with a preset (save_checkpoint writes them)
AURON_GENERATION = dict(
    do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.0, presence_penalty=1.5
)  # fmt: skip
PRESET_GENERATION: dict[str, dict[str, Any]] = {
    name: AURON_GENERATION for name in ("tiny-chimera", "auron-279m", "auron-510m", "auron-1.1b")
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset as a ModelConfig, with optional field overrides."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({"name": name, **PRESETS[name], **overrides})
