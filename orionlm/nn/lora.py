"""LoRA: low-rank adapters on linear layers and on the MoE expert stacks, named as PEFT names them.

A wrapped layer computes base(x) + scaling * B(A(dropout(x))) with the base weight frozen, A (r, in)
initialised as PEFT does (Kaiming-uniform) and B (out, r) at zero, so training starts from the base model;
scaling is alpha / r, or alpha / sqrt(r) with rsLoRA. The wrapped layer keeps its `weight` and `bias`
under their own names, so the model's state dict (and its checkpoints) keep the base names and only gain
`<module>.lora_A.weight` / `<module>.lora_B.weight`, which are PEFT's names after its
`base_model.model.` prefix (convert.peft reads and writes the adapter files): an adapter written here loads in
`peft` on the Hugging Face export of the same base model, and one written by `peft` loads here.

The expert stacks (E, out, in) are parameters, not layers: LoRAConfig.target_parameters names them, as
PEFT's does. Each adapted stack gets A (r*E, in) and B (out, r*E) in PEFT's layout, expert e's delta being
scaling * B[:, e::E] @ A[e*r:(e+1)*r], and every MoE path multiplies by the stack plus its delta
(LoRAExperts.weights). PEFT nests one wrapper per adapted parameter of a module, in the module's parameter
order, so with both stacks adapted gate_up_proj's factors are `experts.base_layer.lora_A/B` and down_proj's
`experts.lora_A/B`; the modules here are nested the same way, so the names match.

The MoE router (target module "gate") is a LoRALinear whose term MoE.route adds to its float32 logits.

LoRAConfig.modules_to_save (PEFT's name) lists modules that train fully beside the adapters, such as a Quiet-STaR
model's thinking head: apply_lora leaves them trainable, and the adapter file holds their parameters too.

This module knows the full-precision layers only. Which wrapper adapts a layer is looked up by the layer's
class in LINEAR_WRAPPERS and EXPERT_WRAPPERS, which other packages extend with their own layers (quant.lora:
the GPTQ ones): the core knows no backend, as in peft, whose GPTQ layer imports its LoRA layer and never the
reverse.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrionError
from .linear import Linear
from .moe import STACKS, Experts, MoE, grouped_linear, swiglu_expert


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module names: the last part or a dotted suffix ("q_proj", "mlp.gate"), or regular expressions matched
    # against the full name
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # parameters, matched as the suffix of "<module>.<parameter>" ("experts.gate_up_proj", "mlp.experts.down_proj",
    # "mlp.gate.weight"): the MoE expert stacks, or the weight of a linear layer
    target_parameters: list[str] = field(default_factory=list)
    rslora: bool = False
    # modules trained fully beside the adapters and saved with them (PEFT's modules_to_save), matched as PEFT
    # matches them, as the end of the module's name: a Quiet-STaR run's "thinking" (mixing head, meta embeddings)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise OrionError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got {self}")
        if not self.target_modules and not self.target_parameters:
            raise OrionError("LoRA needs target_modules or target_parameters (both are empty)")
        for key in ("target_modules", "target_parameters", "modules_to_save"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(t, str) and t for t in value):
                raise OrionError(f"LoRA {key} must be a list of non-empty names; got {value!r}")
        if self.dropout and self.target_parameters:
            raise OrionError(
                f"LoRA dropout ({self.dropout}) cannot be used with target_parameters: an adapted parameter is "
                "used as weight + delta, so there is no input of the adapter alone to drop out (PEFT refuses it "
                "too); set dropout to 0"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def matches(self, name: str) -> bool:
        return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in self.target_modules)

    def matches_parameter(self, name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in self.target_parameters)


def _add_factors(module: nn.Module, in_features: int, out_features: int, rank: int, like: torch.Tensor) -> None:
    """module.lora_A (rank, in), Kaiming-uniform as PEFT initialises it, and module.lora_B (out, rank), zero."""
    module.lora_A = nn.Linear(in_features, rank, bias=False, device=like.device, dtype=like.dtype)
    module.lora_B = nn.Linear(rank, out_features, bias=False, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(module.lora_B.weight)


class LowRank:
    """What LoRALinear (and quant.lora.LoRAQuantLinear) add to their layer's forward: scaling * B A dropout(x)."""

    adapter_enabled = True  # False inside adapters_disabled: the layer computes its base alone

    def _add_adapter(self, config: LoRAConfig, like: torch.Tensor) -> None:
        _add_factors(self, self.in_features, self.out_features, config.r, like)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), in x's dtype (the router computes its logits in float32)."""
        h = F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype))
        return F.linear(h, self.lora_B.weight.to(x.dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.adapter(x) if self.adapter_enabled else out


class LoRALinear(LowRank, Linear):
    """A Linear whose frozen weight is adapted by a trainable low-rank product."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same parameters, not copies
        _adopt_buffers(self, base)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._add_adapter(config, base.weight)

    def merged(self) -> Linear:
        """A plain Linear holding weight + scaling * B A."""
        layer = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        layer.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype).contiguous())
        layer.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        _adopt_buffers(layer, self)
        return layer


def _adopt_buffers(layer: nn.Module, base: nn.Module) -> None:
    """base's own buffers (a router's e_score_correction_bias), the same tensors, on the layer that replaces it."""
    for name, buffer in base.named_buffers(recurse=False):
        layer.register_buffer(name, buffer)


class ExpertLowRank:
    """What LoRAExperts (and quant.lora.LoRAQuantExperts) add to their expert stacks `names` (of gate_up_proj,
    down_proj): per-expert low-rank products. The grouped path (training, prefill) adds scaling * (x A_e^T) B_e^T
    to each expert's product, never forming a delta matrix: two thin grouped products, r (in + out) / (in * out)
    of the base's flops. weights() (single-token decoding: the k chosen experts; the reference path) builds
    stack + delta."""

    adapter_enabled = True  # False inside adapters_disabled: the stacks compute their base alone

    def _add_adapters(
        self, config: LoRAConfig, names: list[str], shapes: dict[str, tuple[int, int]], like: torch.Tensor
    ) -> None:
        """shapes: each stack's (out, in) per expert."""
        self.scaling = config.scaling
        self.factors: dict[str, str] = {}  # adapted stack -> the submodule holding its lora_A / lora_B
        path = ""
        # PEFT wraps the parameters in the module's order, each wrapper around the previous one: the last is
        # outermost (its factors directly on the module), the earlier ones under base_layer
        for name in reversed([n for n in STACKS if n in names]):
            if self.factors:
                self.get_submodule(path).base_layer = nn.Module()
                path = f"{path}.base_layer".lstrip(".")
            out_features, in_features = shapes[name]
            _add_factors(self.get_submodule(path), in_features, out_features, config.r * self.num_experts, like)
            self.factors[name] = path

    def delta_factors(self, name: str, experts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """B (k, out, r) and A (k, r, in) of the given experts, such that their deltas are scaling * B @ A."""
        holder = self.get_submodule(self.factors[name])
        A = holder.lora_A.weight.unflatten(0, (self.num_experts, -1))  # (E, r, in): A's rows are expert-major
        B = holder.lora_B.weight.unflatten(1, (-1, self.num_experts)).permute(2, 0, 1)  # (E, out, r): rank-major
        return (B, A) if experts is None else (B[experts], A[experts])

    def grouped(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = super().grouped(name, x, counts)
        if name not in self.factors or not self.adapter_enabled:
            return out
        B, A = self.delta_factors(name)
        low = grouped_linear(x, A.to(x.dtype), counts) * self.scaling  # (M, r): scaled where it is small
        return out.add_(grouped_linear(low, B.to(x.dtype).contiguous(), counts))  # no third (M, out) tensor

    def weights(self, experts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        stacks = dict(zip(STACKS, super().weights(experts), strict=True))
        for name in self.factors if self.adapter_enabled else ():
            B, A = self.delta_factors(name, experts)
            dtype = stacks[name].dtype
            stacks[name] = torch.baddbmm(stacks[name], B.to(dtype), A.to(dtype), alpha=self.scaling)
        return stacks["gate_up_proj"], stacks["down_proj"]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up_proj, down_proj = (w[0].to(x.dtype) for w in self.weights(slice(e, e + 1)))
        return swiglu_expert(x, gate_up_proj, down_proj)


class LoRAExperts(ExpertLowRank, Experts):
    """Experts whose frozen stacks are adapted by per-expert low-rank products (see ExpertLowRank)."""

    def __init__(self, base: Experts, config: LoRAConfig, names: list[str]) -> None:
        num_experts, two_intermediate, hidden = base.gate_up_proj.shape
        super().__init__(num_experts, hidden, two_intermediate // 2, device="meta")
        self.num_experts = num_experts
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj  # the same parameters, not copies
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        shapes = {name: tuple(getattr(self, name).shape[1:]) for name in STACKS}
        self._add_adapters(config, names, shapes, base.gate_up_proj)

    def merged(self) -> Experts:
        """Plain Experts holding each stack + scaling * B A."""
        num_experts, two_intermediate, hidden = self.gate_up_proj.shape
        experts = Experts(num_experts, hidden, two_intermediate // 2, device="meta")
        for name in STACKS:
            weight = getattr(self, name)
            if name in self.factors:
                B, A = self.delta_factors(name)
                weight = (weight.float() + torch.bmm(B.float(), A.float()) * self.scaling).to(weight.dtype)
            setattr(experts, name, nn.Parameter(weight.detach().contiguous()))
        return experts


ADAPTED = (LowRank, ExpertLowRank)
# The wrapper class of each kind of layer, by the layer's class: a linear layer's is built as wrapper(layer,
# config), an expert-stack module's as wrapper(experts, config, names of the adapted stacks). Other packages add
# their layers here (quant.lora: QuantLinear and QuantExperts).
LINEAR_WRAPPERS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: LoRALinear}
EXPERT_WRAPPERS: dict[type[nn.Module], type[nn.Module]] = {Experts: LoRAExperts}


def is_linear(module: nn.Module) -> bool:
    """Whether LoRA adapts the module as a linear layer (its class, or a base of it, has a wrapper)."""
    return isinstance(module, tuple(LINEAR_WRAPPERS))


def is_experts(module: nn.Module) -> bool:
    """Whether LoRA adapts the module as an MoE layer's expert stacks."""
    return isinstance(module, tuple(EXPERT_WRAPPERS))


def _wrapper(wrappers: dict[type[nn.Module], type[nn.Module]], module: nn.Module) -> type[nn.Module]:
    """The wrapper registered for the nearest class of the module's that has one."""
    return next(wrappers[cls] for cls in type(module).__mro__ if cls in wrappers)


def routers(model: nn.Module) -> set[str]:
    """Names of the MoE routers: Hugging Face's MoE models hold them as custom modules, not nn.Linear."""
    return {f"{name}.gate".lstrip(".") for name, module in model.named_modules() if isinstance(module, MoE)}


def layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """Every module but the adapters' own, with the names of its parameters, in model order; expert-stack
    modules with their stacks' names and without their submodules (GPTQ experts' per-expert layers are parts of
    the stacks)."""
    stacked: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if ".lora_" in name or (stacked and name.startswith(stacked)):
            continue
        if is_experts(module):
            stacked += (f"{name}.",)
            yield name, module, list(STACKS)
        else:
            yield name, module, [param for param, _ in module.named_parameters(recurse=False)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every matching linear layer (target_modules, or its weight in target_parameters) and expert stack
    (target_parameters) and freeze everything else; returns the wrapped layer names and expert stack names.
    Layers of other packages are adapted by the wrappers they register (quant.lora: GPTQ layers and experts,
    their codes frozen: QLoRA)."""
    linears, experts, parameters = [], {}, []
    for name, module, params in layers(model):
        if isinstance(module, ADAPTED):
            continue
        linear = is_linear(module)
        if linear and config.matches(name):
            linears.append(name)
        for param in params:
            if not config.matches_parameter(f"{name}.{param}"):
                continue
            parameters.append(f"{name}.{param}")
            if is_experts(module):
                experts.setdefault(name, []).append(param)
            elif linear and param == "weight":
                if name not in linears:
                    linears.append(name)
            else:
                raise OrionError(
                    f"LoRA target parameter {name}.{param} is a {type(module).__name__} parameter; target_parameters "
                    "can adapt the MoE expert stacks (experts.gate_up_proj, experts.down_proj) and linear weights"
                )
    if not linears and not experts:
        raise OrionError(f"no linear layer matches the LoRA target modules {config.target_modules}, "
                         f"and no parameter the target parameters {config.target_parameters}")  # fmt: skip
    if config.target_parameters and not parameters:
        raise OrionError(f"no parameter matches the LoRA target parameters {config.target_parameters}")
    if "lm_head" in linears:
        raise OrionError(
            "LoRA cannot adapt lm_head: the training loss multiplies by lm_head.weight directly (fused "
            "cross-entropy), which would skip the adapter"
        )
    if config.dropout and set(linears) & routers(model):
        raise OrionError(
            f"LoRA dropout ({config.dropout}) cannot be used on the MoE router (gate): PEFT adapts the Hugging Face "
            "router's weight as a parameter, which refuses dropout, so the adapter would not load there"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in linears:
        layer = model.get_submodule(name)
        model.set_submodule(name, _wrapper(LINEAR_WRAPPERS, layer)(layer, config))
        # use_decode_layout may have packed this layer with its siblings into one matrix whose product skips
        # the adapter; drop the pack (use_decode_layout leaves modules with adapters unpacked)
        parent = model.get_submodule(name.rpartition(".")[0])
        if getattr(parent, "packed", None) is not None:
            parent.packed = None
    for name, params in experts.items():
        stacks = model.get_submodule(name)
        model.set_submodule(name, _wrapper(EXPERT_WRAPPERS, stacks)(stacks, config, params))
    for name in saved_modules(model, config):
        model.get_submodule(name).requires_grad_(True)
    model.lora_config = config
    return linears + [f"{name}.{param}" for name, params in experts.items() for param in params]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model without its LoRA adapters inside the block, with them again after: the base model it adapts, with
    no second copy of its weights (DPO's reference model)."""
    adapted = [module for module in model.modules() if isinstance(module, ADAPTED)]
    for module in adapted:
        module.adapter_enabled = False
    try:
        yield model
    finally:
        for module in adapted:
            del module.adapter_enabled  # the class's True again


def saved_modules(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The modules config.modules_to_save names: trained fully beside the adapters, so none may hold one."""
    names = [name for name, _ in model.named_modules() if name and name.endswith(tuple(config.modules_to_save))]
    unmatched = [t for t in config.modules_to_save if not any(name.endswith(t) for name in names)]
    if unmatched:
        raise OrionError(f"no module matches LoRA modules_to_save {unmatched}")
    for name in names:
        if any(isinstance(m, ADAPTED) for m in model.get_submodule(name).modules()):
            raise OrionError(f"LoRA module to save {name} holds adapted layers: a module trains fully or through "
                             "adapters; narrow target_modules")  # fmt: skip
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place: the model is a plain model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ADAPTED):
            model.set_submodule(name, module.merged())
    model.__dict__.pop("lora_config", None)
