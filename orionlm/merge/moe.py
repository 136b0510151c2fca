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

The MoE streams: the sources are opened without reading their weights, the router rows are computed first
(hidden runs the base one decoder layer at a time in float32, holding its embedding and one layer), and each
output tensor is read or built (a layer's expert stack from that layer's MLP tensors of each source) as it is
written, so memory holds a few tensors, never a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import DTYPES, LazyTensors
from ..config import ModelConfig
from ..loading import ModelSource
from ..model import run_layers
from ..tokenizer import Tokenizer
from .sources import (
    MergedModel,
    MergeError,
    check_tensors,
    load_config,
    model_specs,
    open_source,
    output_dtype,
    tensor_generator,
)

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


def _hidden_states(base: ModelSource, tokenizer: Tokenizer, prompts: list[str], progress: bool) -> torch.Tensor:
    """(len(prompts), num_layers, C): the hidden state entering each decoder layer at the last token of each
    prompt, run alone (transformers' hidden_states[:-1] at the last position). The base model runs one layer at
    a time in float32 from its tensors on disk, so memory holds its embedding and one layer."""
    L, C = base.config.num_layers, base.config.hidden_size
    inputs = [torch.tensor([prompt_ids(tokenizer, p)]) for p in prompts]
    states = torch.empty(len(prompts), L, C)
    layers = run_layers(base.config, base.tensors, inputs)
    for i, _, entering in tqdm(layers, total=L, desc="hidden gates", disable=not progress):
        for j, x in enumerate(entering):
            states[j, i] = x[0, -1].float()
    return states


def gate_vectors(
    base: ModelSource, tokenizer: Tokenizer, experts: list[ExpertSource], mode: str, seed: int, progress: bool = False
) -> torch.Tensor:
    """(num_layers, len(experts), C) router rows, float32, computed with the base model (module docstring):
    random rows read nothing, cheap_embed reads only the embedding, hidden runs the base layer by layer."""
    L, C = base.config.num_layers, base.config.hidden_size
    if mode == "random":
        return torch.randn(L, len(experts), C, generator=torch.Generator().manual_seed(seed))
    prompts = list(dict.fromkeys(p for e in experts for p in (e.positive_prompts or []) + (e.negative_prompts or [])))
    if mode == "hidden":
        states = dict(zip(prompts, _hidden_states(base, tokenizer, prompts, progress), strict=True))
    else:
        embed = base.tensors["model.embed_tokens.weight"]

    def vector(prompts: list[str]) -> torch.Tensor:
        """(L, C): what a set of prompts contributes to a router row, before the final normalisation."""
        if mode == "hidden":
            return torch.stack([states[p] for p in prompts]).mean(dim=0)
        ids = torch.tensor([i for p in prompts for i in prompt_ids(tokenizer, p)])
        return F.normalize(embed[ids].float().sum(dim=0), dim=-1).expand(L, -1)

    rows = []
    for expert in experts:
        row = vector(expert.positive_prompts or [])
        if expert.negative_prompts:
            row = row - vector(expert.negative_prompts)
        rows.append(F.normalize(row, dim=-1))
    return torch.stack(rows, dim=1)


def _projections(
    source: ModelSource, layer: int, expert: ExpertSource, names: tuple[str, ...], generator: torch.Generator
) -> list[torch.Tensor]:
    """The named MLP projection weights (gate_proj, up_proj, down_proj) of a dense model's layer, float32, with
    the expert's noise and residual scale applied."""
    weights = []
    for name in names:
        weight = source.tensors[f"model.layers.{layer}.mlp.{name}.weight"].float()
        if expert.noise_scale:
            weight = weight + torch.randn(weight.shape, generator=generator) * expert.noise_scale
        if name == "down_proj" and expert.residual_scale is not None:
            weight = weight * expert.residual_scale
        weights.append(weight)
    return weights


def moe_merge(config: MoEMergeConfig, seed: int = 0, progress: bool = True) -> MergedModel:
    """The MoE the config describes, its tensors computed one at a time as they are read, in the config's dtype
    (default: the base model's stored dtype), with the base model's tokenizer. Everything but the MLPs is read
    from the base; each layer's expert stacks from the sources' MLP tensors of that layer. `seed` drives random
    gates (drawn as one (layers, experts, C) tensor) and noise_scale (each output tensor's noise from a
    generator seeded from (seed, its name), whatever order the tensors are written in)."""
    base = open_source(config.base_model)
    if base.tokenizer is None:
        raise MoEMergeError(f"base model {config.base_model} has no tokenizer; the merged model needs one")
    _check_dense(base.config, config.base_model)
    sources = {config.base_model: base}
    for where, expert in config.named_experts():
        if expert.source_model not in sources:
            sources[expert.source_model] = _open_expert(base, where, expert)
    shared = config.shared_experts or []
    gates = gate_vectors(base, base.tokenizer, config.experts + shared, config.gate_mode, seed, progress)
    E, I = len(config.experts), base.config.intermediate_size  # noqa: E741
    moe_config = dataclasses.replace(
        base.config, name=f"{base.config.name or 'dense'}-moe{E}", num_experts=E,
        experts_per_token=config.experts_per_token, expert_intermediate_size=I, moe_layers=None,
        norm_topk_prob=True, shared_expert_intermediate_size=I if shared else 0, shared_expert_gate=bool(shared),
        hf_model_type=ARCHITECTURES[str(config.architecture)], quantization_config=None,
        extra={**base.config.extra, "moe_merge": dataclasses.asdict(config)},
    )  # fmt: skip
    specs = model_specs(moe_config, output_dtype(config.dtype, base))
    check_tensors(base, {name: spec.shape for name, spec in specs.items() if ".mlp." not in name}, config.base_model)

    def mlp(name: str) -> torch.Tensor:
        """One MLP tensor of the MoE, float32."""
        prefix, part = name.split(".mlp.")
        i = int(prefix.rsplit(".", 1)[1])
        if part in ("gate.weight", "shared_expert_gate.weight"):
            return gates[i, :E] if part == "gate.weight" else gates[i, E:]
        generator = tensor_generator(seed, name)
        if part.startswith("shared_expert."):
            return _projections(sources[shared[0].source_model], i, shared[0], (part.split(".")[1],), generator)[0]
        names = ("gate_proj", "up_proj") if part == "experts.gate_up_proj" else ("down_proj",)
        return torch.stack([torch.cat(_projections(sources[e.source_model], i, e, names, generator))
                            for e in config.experts])  # fmt: skip

    def read(name: str) -> torch.Tensor:
        tensor = mlp(name) if ".mlp." in name else base.tensors[name].float()
        return tensor.to(specs[name].dtype)

    return MergedModel(moe_config, LazyTensors(specs, read), base.tokenizer)


def _open_expert(base: ModelSource, where: str, expert: ExpertSource) -> ModelSource:
    source = open_source(expert.source_model)
    _check_dense(source.config, expert.source_model)
    _check_same_shapes(base.config, source.config, where, expert.source_model)
    C, I = base.config.hidden_size, base.config.intermediate_size  # noqa: E741
    shapes = {"gate_proj": (I, C), "up_proj": (I, C), "down_proj": (C, I)}
    check_tensors(source, {f"model.layers.{i}.mlp.{name}.weight": shape for i in range(base.config.num_layers)
                           for name, shape in shapes.items()}, f"{where} ({expert.source_model})")  # fmt: skip
    return source
