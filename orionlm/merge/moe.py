"""frankenMoE: a Mixtral-style MoE (or a Qwen2-MoE with one shared expert) assembled from dense models of one
architecture, its routers set from prompts instead of trained. The config is mergekit-moe's format.

Everything but the MLPs comes from the base model; expert e of layer i is the MLP of layer i of expert e's
source model. Router row e of layer i (gate_mode):
- hidden: the base model's hidden state entering layer i at the last token of each of the expert's positive
  prompts (each run alone, after BOS), averaged, minus the same for its negative prompts, L2-normalised;
- cheap_embed: the sum of the base model's token embeddings over all the prompts' tokens, L2-normalised (the
  negatives' likewise, subtracted, normalised again), the same for every layer;
- random: standard normal rows (seeded).
A shared expert's gate row (Qwen2-MoE's sigmoid gate) is computed the same way from its own prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import DTYPES, model_from_tensors
from ..config import ModelConfig
from ..model import OrionLM
from ..tokenizer import Tokenizer
from .sources import MergeError, load_config, load_source, source_dtype

GATE_MODES = ("hidden", "cheap_embed", "random")
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe"}  # config name -> hf_model_type
# A source model must match the base in all of these to lend it its MLPs.
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "vocab_size", "activation", "norm", "position", "mlp_bias")  # fmt: skip


class MoEMergeError(MergeError):
    """A moe-merge config or set of models that cannot make an MoE; the message says what to change."""


@dataclass
class ExpertSource:
    """One expert: the dense model whose MLPs it is, and the prompts that should be routed to it."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None  # standard deviation of Gaussian noise added to its MLP weights
    residual_scale: float | None = None  # multiplies its down_proj: how much it writes to the residual stream


@dataclass
class MoEMergeConfig:
    """mergekit-moe's config: `orionlm moe-merge CONFIG.yaml OUT_DIR`."""

    base_model: str
    experts: list[ExpertSource]
    gate_mode: str = "hidden"
    dtype: str | None = None  # None: the base model's stored dtype
    experts_per_token: int = 2
    shared_experts: list[ExpertSource] | None = None
    architecture: str | None = None  # "mixtral" or "qwen"; None: qwen with a shared expert, else mixtral

    def __post_init__(self) -> None:
        if self.gate_mode not in GATE_MODES:
            raise MoEMergeError(f"gate_mode {self.gate_mode!r} is not one of {', '.join(GATE_MODES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MoEMergeError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.architecture is None:
            self.architecture = "qwen" if self.shared_experts else "mixtral"
        if self.architecture not in ARCHITECTURES:
            raise MoEMergeError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        shared = len(self.shared_experts or [])
        if self.architecture == "mixtral" and shared:
            raise MoEMergeError("a Mixtral MoE has no shared experts: drop shared_experts or set architecture: qwen")
        if self.architecture == "qwen" and shared != 1:
            raise MoEMergeError(f"a Qwen2-MoE has exactly one shared expert; shared_experts lists {shared}")
        if self.experts_per_token < 1:
            raise MoEMergeError(f"experts_per_token must be at least 1, got {self.experts_per_token}")
        if len(self.experts) < max(self.experts_per_token, 2):
            raise MoEMergeError(
                f"{len(self.experts)} expert(s) listed, but an MoE needs at least 2 and at least experts_per_token "
                f"({self.experts_per_token}): add experts or lower experts_per_token"
            )
        if self.gate_mode == "random":
            return
        for where, expert in self.named_experts():
            if not expert.positive_prompts:
                raise MoEMergeError(
                    f"{where} ({expert.source_model}) has no positive_prompts; gate_mode {self.gate_mode} sets its "
                    "router row from them (or use gate_mode: random)"
                )
        prompts = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
        if len(prompts) == 1:
            raise MoEMergeError(
                "every expert has the same prompts, so the router could not tell them apart: give each expert "
                "positive_prompts like the text it should receive"
            )

    def named_experts(self) -> list[tuple[str, ExpertSource]]:
        """("experts.0", expert), ..., then ("shared_experts.0", expert)."""
        return [(f"experts.{i}", e) for i, e in enumerate(self.experts)] + [
            (f"shared_experts.{i}", e) for i, e in enumerate(self.shared_experts or [])
        ]


def load_moe_merge_config(path: str | Path) -> MoEMergeConfig:
    return load_config(MoEMergeConfig, path, "moe-merge config", "base_model, experts, gate_mode")


def _check_dense(config: ModelConfig, source: str) -> None:
    if config.family != "dense" or config.activation != "swiglu" or config.mlp_bias:
        raise MoEMergeError(
            f"{source} is a {config.family} model with a {config.activation} MLP; moe-merge builds from dense "
            "models with bias-free SwiGLU MLPs (Llama, Mistral, Qwen2 style)"
        )


def _check_same_shapes(base: ModelConfig, other: ModelConfig, where: str, source: str) -> None:
    differ = [f"{k} {getattr(other, k)} (base {getattr(base, k)})" for k in SHAPE_KEYS
              if getattr(other, k) != getattr(base, k)]  # fmt: skip
    if differ:
        raise MoEMergeError(
            f"{where} ({source}) does not match the base model: {', '.join(differ)}; every source model must "
            "have the base model's architecture and shapes"
        )


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's tokens after BOS (when the tokenizer has one), as mergekit tokenizes router prompts."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(prompt, add_special_tokens=False)


@torch.inference_mode()
def layer_inputs(model: OrionLM, ids: list[int]) -> torch.Tensor:
    """(num_layers, C): the hidden state entering each decoder layer at the last of `ids` (transformers'
    hidden_states[:-1] at the last position)."""
    states: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, args: states.append(args[0][0, -1].float()))
        for layer in model.model.layers
    ]
    try:
        model(torch.tensor([ids], device=model.device), logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(states)


def _prompt_vector(model: OrionLM, tokenizer: Tokenizer, prompts: list[str], mode: str) -> torch.Tensor:
    """(num_layers, C): what a set of prompts contributes to a router row, before the final normalisation."""
    if mode == "hidden":
        return torch.stack([layer_inputs(model, prompt_ids(tokenizer, p)) for p in prompts]).mean(dim=0)
    ids = torch.tensor([i for p in prompts for i in prompt_ids(tokenizer, p)], device=model.device)
    summed = model.model.embed_tokens.weight[ids].float().sum(dim=0)
    return F.normalize(summed, dim=-1).expand(model.config.num_layers, -1)


def gate_vectors(
    model: OrionLM, tokenizer: Tokenizer, experts: list[ExpertSource], mode: str, generator: torch.Generator
) -> torch.Tensor:
    """(num_layers, len(experts), C) router rows, float32, computed with the base `model` (module docstring)."""
    L, C = model.config.num_layers, model.config.hidden_size
    if mode == "random":
        return torch.randn(L, len(experts), C, generator=generator)
    rows = []
    for expert in experts:
        row = _prompt_vector(model, tokenizer, expert.positive_prompts or [], mode)
        if expert.negative_prompts:
            row = row - _prompt_vector(model, tokenizer, expert.negative_prompts, mode)
        rows.append(F.normalize(row, dim=-1))
    return torch.stack(rows, dim=1).cpu()


def _mlp_weights(
    model: OrionLM, layer: int, expert: ExpertSource, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_proj, up_proj, down_proj) weights of a dense model's layer, float32, with the expert's noise and
    residual scale applied."""
    mlp = model.model.layers[layer].mlp
    weights = [mlp.gate_proj.weight.detach().float().cpu(), mlp.up_proj.weight.detach().float().cpu(),
               mlp.down_proj.weight.detach().float().cpu()]  # fmt: skip
    if expert.noise_scale:
        weights = [w + torch.randn(w.shape, generator=generator) * expert.noise_scale for w in weights]
    if expert.residual_scale is not None:
        weights[2] = weights[2] * expert.residual_scale
    return weights[0], weights[1], weights[2]


def moe_merge(config: MoEMergeConfig, seed: int = 0, progress: bool = True) -> tuple[OrionLM, Tokenizer]:
    """The MoE the config describes, on CPU in the config's dtype (default: the base model's), and the base
    model's tokenizer. `seed` drives random gates and noise."""
    generator = torch.Generator().manual_seed(seed)
    base, tokenizer = load_source(config.base_model)
    if tokenizer is None:
        raise MoEMergeError(f"base model {config.base_model} has no tokenizer; the merged model needs one")
    _check_dense(base.config, config.base_model)
    shared = config.shared_experts or []
    gates = gate_vectors(base, tokenizer, config.experts + shared, config.gate_mode, generator)
    L, E, I = base.config.num_layers, len(config.experts), base.config.intermediate_size  # noqa: E741
    moe_config = dataclasses.replace(
        base.config, name=f"{base.config.name or 'dense'}-moe{E}", num_experts=E,
        experts_per_token=config.experts_per_token, expert_intermediate_size=I, moe_layers=None,
        norm_topk_prob=True, shared_expert_intermediate_size=I if shared else 0, shared_expert_gate=bool(shared),
        hf_model_type=ARCHITECTURES[str(config.architecture)], quantization_config=None,
        extra={**base.config.extra, "moe_merge": dataclasses.asdict(config)},
    )  # fmt: skip
    state: dict[str, Any] = {k: v.float() for k, v in base.state_dict().items() if ".mlp." not in k}
    gate_up = torch.empty(L, E, 2 * I, base.config.hidden_size)
    down = torch.empty(L, E, base.config.hidden_size, I)
    for slot, (where, expert) in enumerate(tqdm(config.named_experts(), desc="experts", disable=not progress)):
        source = base if expert.source_model == config.base_model else _load_expert(base.config, where, expert)
        for i in range(L):
            gate_proj, up_proj, down_proj = _mlp_weights(source, i, expert, generator)
            prefix = f"model.layers.{i}.mlp."
            if slot < E:
                gate_up[i, slot] = torch.cat([gate_proj, up_proj])
                down[i, slot] = down_proj
            else:
                state[prefix + "shared_expert.gate_proj.weight"] = gate_proj
                state[prefix + "shared_expert.up_proj.weight"] = up_proj
                state[prefix + "shared_expert.down_proj.weight"] = down_proj
                state[prefix + "shared_expert_gate.weight"] = gates[i, slot:]
    for i in range(L):
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "gate.weight"] = gates[i, :E]
        state[prefix + "experts.gate_up_proj"] = gate_up[i]
        state[prefix + "experts.down_proj"] = down[i]
    dtype = DTYPES[config.dtype] if config.dtype else source_dtype(config.base_model)
    return model_from_tensors(moe_config, state, torch.device("cpu"), dtype, "moe-merge"), tokenizer


def _load_expert(base: ModelConfig, where: str, expert: ExpertSource) -> OrionLM:
    model, _ = load_source(expert.source_model)
    _check_dense(model.config, expert.source_model)
    _check_same_shapes(base, model.config, where, expert.source_model)
    return model
