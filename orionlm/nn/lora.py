"""LoRA: low-rank adapters on linear layers and on the MoE expert stacks, saved and loaded as PEFT files.

A wrapped layer computes base(x) + scaling * B(A(dropout(x))) with the base weight frozen, A (r, in)
initialised as PEFT does (Kaiming-uniform) and B (out, r) at zero, so training starts from the base model;
scaling is alpha / r, or alpha / sqrt(r) with rsLoRA. The wrapped layer keeps its `weight` and `bias`
under their own names, so the model's state dict (and its checkpoints) keep the base names and only gain
`<module>.lora_A.weight` / `<module>.lora_B.weight`, which are PEFT's names after its
`base_model.model.` prefix: an adapter written here loads in `peft` on the Hugging Face export of the
same base model, and one written by `peft` loads here.

The expert stacks (E, out, in) are parameters, not layers: LoRAConfig.target_parameters names them, as
PEFT's does. Each adapted stack gets A (r*E, in) and B (out, r*E) in PEFT's layout, expert e's delta being
scaling * B[:, e::E] @ A[e*r:(e+1)*r], and every MoE path multiplies by the stack plus its delta
(LoRAExperts.weights). PEFT nests one wrapper per adapted parameter of a module, in the module's parameter
order, so with both stacks adapted gate_up_proj's factors are `experts.base_layer.lora_A/B` and down_proj's
`experts.lora_A/B`; the modules here are nested the same way, so the names match.

The MoE router (target module "gate") is a LoRALinear whose term MoE.route adds to its float32 logits.
Hugging Face's routers are not nn.Linear, so the PEFT file names it as the parameter "mlp.gate.weight".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import OrionError
from ..quant.pack import STACKS, QuantExperts, QuantLinear
from .linear import Linear
from .moe import Experts, MoE, grouped_linear, swiglu_expert

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


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

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise OrionError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got {self}")
        if not self.target_modules and not self.target_parameters:
            raise OrionError("LoRA needs target_modules or target_parameters (both are empty)")
        for key in ("target_modules", "target_parameters"):
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


class _LowRank:
    """What LoRALinear and LoRAQuantLinear add to their layer's forward: scaling * B A dropout(x)."""

    def _add_adapter(self, config: LoRAConfig, like: torch.Tensor) -> None:
        _add_factors(self, self.in_features, self.out_features, config.r, like)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), in x's dtype (the router computes its logits in float32)."""
        h = F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype))
        return F.linear(h, self.lora_B.weight.to(x.dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.adapter(x)


class LoRALinear(_LowRank, Linear):
    """A Linear whose frozen weight is adapted by a trainable low-rank product."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same parameters, not copies
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
        return layer


def _float_like(layer: QuantLinear) -> torch.Tensor:
    """What a quantized layer's adapter is created like: float32 on its device (its own tensors are integer codes
    and float16 scales)."""
    return layer.qweight.new_empty(0, dtype=torch.float32)


def _cannot_merge(module: nn.Module) -> OrionError:
    return OrionError(
        f"cannot merge a LoRA adapter into the GPTQ {type(module).__name__.removeprefix('LoRA')} layers of a quantized "
        "model (that would need quantizing again): merge it into the full-precision model that was quantized "
        "(orionlm merge-lora --base FP_MODEL --adapter DIR), or run it unmerged (load the adapter directory)"
    )


class LoRAQuantLinear(_LowRank, QuantLinear):
    """A GPTQ layer (its weight is integer codes, frozen by nature) adapted by a trainable low-rank product in
    floating point: QLoRA's recipe with GPTQ's codes. The codes keep their names, so the model's state dict only
    gains the factors, as with LoRALinear."""

    def __init__(self, base: QuantLinear, config: LoRAConfig) -> None:
        super().__init__(base.in_features, base.out_features, base.bits, base.group_size, base.bias is not None,
                         base.checkpoint_format, base.keep_dequantized, device="meta")  # fmt: skip
        for name, tensor in base.named_buffers(recurse=False):
            setattr(self, name, tensor)  # the same codes, not copies
        self._add_adapter(config, _float_like(base))

    def merged(self) -> QuantLinear:
        raise _cannot_merge(self)


class _ExpertLowRank:
    """What LoRAExperts and LoRAQuantExperts add to their expert stacks `names` (of gate_up_proj, down_proj):
    per-expert low-rank products. The grouped path (training, prefill) adds scaling * (x A_e^T) B_e^T to each
    expert's product, never forming a delta matrix: two thin grouped products, r (in + out) / (in * out) of the
    base's flops. weights() (single-token decoding: the k chosen experts; the reference path) builds stack + delta."""

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
        if name not in self.factors:
            return out
        B, A = self.delta_factors(name)
        low = grouped_linear(x, A.to(x.dtype), counts) * self.scaling  # (M, r): scaled where it is small
        return out.add_(grouped_linear(low, B.to(x.dtype).contiguous(), counts))  # no third (M, out) tensor

    def weights(self, experts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        stacks = dict(zip(STACKS, super().weights(experts), strict=True))
        for name in self.factors:
            B, A = self.delta_factors(name, experts)
            dtype = stacks[name].dtype
            stacks[name] = torch.baddbmm(stacks[name], B.to(dtype), A.to(dtype), alpha=self.scaling)
        return stacks["gate_up_proj"], stacks["down_proj"]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up_proj, down_proj = (w[0].to(x.dtype) for w in self.weights(slice(e, e + 1)))
        return swiglu_expert(x, gate_up_proj, down_proj)


class LoRAExperts(_ExpertLowRank, Experts):
    """Experts whose frozen stacks are adapted by per-expert low-rank products (see _ExpertLowRank)."""

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


class LoRAQuantExperts(_ExpertLowRank, QuantExperts):
    """GPTQ experts (one QuantLinear per expert and stack) adapted as LoRAExperts adapts a stack, in the same
    PEFT layout: an adapter trained on the quantized experts loads on the full-precision ones and back."""

    def __init__(self, base: QuantExperts, config: LoRAConfig, names: list[str]) -> None:
        super().__init__(list(base.gate_up_proj), list(base.down_proj))  # the same layers, not copies
        self.num_experts = len(base.down_proj)
        shapes = {name: (getattr(self, name)[0].out_features, getattr(self, name)[0].in_features) for name in STACKS}
        self._add_adapters(config, names, shapes, _float_like(base.down_proj[0]))

    def merged(self) -> QuantExperts:
        raise _cannot_merge(self)


ADAPTED = (_LowRank, _ExpertLowRank)


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def _routers(model: nn.Module) -> set[str]:
    """Names of the MoE routers: Hugging Face's MoE models hold them as custom modules, not nn.Linear."""
    return {f"{name}.gate".lstrip(".") for name, module in model.named_modules() if isinstance(module, MoE)}


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """Every module but the adapters' own, with the names of its parameters, in model order; GPTQ experts with
    their stacks' names, their per-expert layers left out (they are parts of the stacks)."""
    stacked: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if ".lora_" in name or (stacked and name.startswith(stacked)):
            continue
        if isinstance(module, QuantExperts):
            stacked += (f"{name}.",)
            yield name, module, list(STACKS)
        else:
            yield name, module, [param for param, _ in module.named_parameters(recurse=False)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every matching linear layer (target_modules, or its weight in target_parameters) and expert stack
    (target_parameters) and freeze everything else; returns the wrapped layer names and expert stack names.
    GPTQ layers and experts (quant.pack) are adapted in the same way, their codes frozen: QLoRA."""
    linears, experts, parameters = [], {}, []
    for name, module, params in _layers(model):
        if isinstance(module, ADAPTED):
            continue
        is_linear = isinstance(module, (nn.Linear, QuantLinear))
        if is_linear and config.matches(name):
            linears.append(name)
        for param in params:
            if not config.matches_parameter(f"{name}.{param}"):
                continue
            parameters.append(f"{name}.{param}")
            if isinstance(module, (Experts, QuantExperts)):
                experts.setdefault(name, []).append(param)
            elif is_linear and param == "weight":
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
    if config.dropout and set(linears) & _routers(model):
        raise OrionError(
            f"LoRA dropout ({config.dropout}) cannot be used on the MoE router (gate): PEFT adapts the Hugging Face "
            "router's weight as a parameter, which refuses dropout, so the adapter would not load there"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in linears:
        layer = model.get_submodule(name)
        _replace(model, name, (LoRAQuantLinear if isinstance(layer, QuantLinear) else LoRALinear)(layer, config))
        # use_decode_layout may have packed this layer with its siblings into one matrix whose product skips
        # the adapter; drop the pack (use_decode_layout leaves modules with adapters unpacked)
        parent = model.get_submodule(name.rpartition(".")[0])
        if getattr(parent, "packed", None) is not None:
            parent.packed = None
    for name, params in experts.items():
        stacks = model.get_submodule(name)
        wrapper = LoRAQuantExperts if isinstance(stacks, QuantExperts) else LoRAExperts
        _replace(model, name, wrapper(stacks, config, params))
    model.lora_config = config
    return linears + [f"{name}.{param}" for name, params in experts.items() for param in params]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place: the model is a plain model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ADAPTED):
            _replace(model, name, module.merged())
    model.__dict__.pop("lora_config", None)


def _peft_suffix(name: str) -> str:
    """The name after its layer index ("model.layers.3.mlp.experts" -> "mlp.experts"): a target that PEFT
    matches in every layer and nowhere else."""
    return re.split(r"\.\d+\.", name)[-1]


def _peft_targets(entries: list[tuple[str, str, bool]]) -> list[str]:
    """The short name where every entry with that short name is adapted, else the adapted ones' full names
    (a regex picked some layers): PEFT matches either as a suffix, and so does LoRAConfig."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for short, full, adapted in entries:
        groups.setdefault(short, ([], []))[not adapted].append(full)
    return [t for short, (adapted, other) in groups.items() for t in ([short] if adapted and not other else adapted)]


def save_adapter(model: nn.Module, directory: str | Path, base_model: str = "") -> Path:
    """A new directory holding the adapter as PEFT writes it (see write_adapter), written atomically."""
    from ..checkpoint import atomic_directory

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapter(model, tmp, base_model)
    return directory


def write_adapter(model: nn.Module, directory: Path, base_model: str = "") -> None:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them, into an existing directory."""
    config: LoRAConfig = model.lora_config
    tensors = {f"{PEFT_PREFIX}{name}": p.detach().to("cpu").contiguous()
               for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}  # fmt: skip
    routers = _routers(model)
    layers, stacks = [], []  # (PEFT's short target, full name, adapted) in model order
    for name, module, params in _layers(model):
        adapted = isinstance(module, ADAPTED)
        if name in routers:  # PEFT adapts the Hugging Face router's weight as a parameter
            stacks.append((f"{_peft_suffix(name)}.weight", f"{name}.weight", adapted))
        elif isinstance(module, (nn.Linear, QuantLinear)):
            layers.append((name.rsplit(".", 1)[-1], name, adapted))
        elif isinstance(module, (Experts, QuantExperts)):
            for param in params:  # in the order PEFT nests them
                stacks.append((f"{_peft_suffix(name)}.{param}", f"{name}.{param}", adapted and param in module.factors))
    modules, parameters = _peft_targets(layers), _peft_targets(stacks)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model), "r": config.r,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora, "bias": "none",
        "target_modules": modules or None, "target_parameters": parameters or None, "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
    }  # fmt: skip
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Wrap the model's layers as the adapter says and load its weights (written here or by PEFT)."""
    directory = Path(directory)
    try:
        data = json.loads((directory / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise OrionError(f"{directory} is not a LoRA adapter directory: {e}") from None
    if data.get("peft_type") != "LORA":
        raise OrionError(f"{directory}: peft_type {data.get('peft_type')!r}; only LORA adapters load")
    if data.get("bias", "none") != "none" or data.get("modules_to_save"):
        raise OrionError(f"{directory}: adapters with trained biases or modules_to_save are not supported")
    if data.get("rank_pattern") or data.get("alpha_pattern") or data.get("use_dora"):
        raise OrionError(f"{directory}: adapters with per-layer ranks or alphas, or DoRA, are not supported")
    targets, parameters = data.get("target_modules") or [], data.get("target_parameters") or []
    config = LoRAConfig(r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0)),
                        target_modules=[targets] if isinstance(targets, str) else list(targets),
                        target_parameters=list(parameters), rslora=bool(data.get("use_rslora", False)))  # fmt: skip
    apply_lora(model, config)
    # PEFT names the weights <module>.lora_A.weight (older files: .lora_A.default.weight)
    state = {name.removeprefix(PEFT_PREFIX).replace(".default.", "."): t for name, t in tensors.items()}
    expected = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OrionError(f"{directory}: adapter weights do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
    with torch.no_grad():
        for name, p in expected.items():
            if state[name].shape != p.shape:
                raise OrionError(f"{directory}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[name])
    return config
