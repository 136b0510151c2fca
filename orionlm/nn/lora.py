"""LoRA: low-rank adapters on linear layers, saved and loaded as PEFT files.

A wrapped layer computes base(x) + scaling * B(A(dropout(x))) with the base weight frozen, A (r, in)
initialised as PEFT does (Kaiming-uniform) and B (out, r) at zero, so training starts from the base model;
scaling is alpha / r, or alpha / sqrt(r) with rsLoRA. The wrapped layer keeps its `weight` and `bias`
under their own names, so the model's state dict (and its checkpoints) keep the base names and only gain
`<module>.lora_A.weight` / `<module>.lora_B.weight`, which are PEFT's names after its
`base_model.model.` prefix: an adapter written here loads in `peft` on the Hugging Face export of the
same base model, and one written by `peft` loads here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import OrionError
from .linear import Linear

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module names (the last part, e.g. "q_proj") or regular expressions matched against the full name
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise OrionError(f"LoRA needs r >= 1, alpha > 0, 0 <= dropout < 1 and target modules; got {self}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def matches(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return any(leaf == t or re.fullmatch(t, name) for t in self.target_modules)


class LoRALinear(Linear):
    """A Linear whose frozen weight is adapted by a trainable low-rank product."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same parameters, not copies
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> Linear:
        """A plain Linear holding weight + scaling * B A."""
        layer = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        layer.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype).contiguous())
        layer.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return layer


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every matching linear layer and freeze everything else; returns the wrapped names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and ".lora_" not in n and config.matches(n)]  # fmt: skip
    if not names:
        raise OrionError(f"no linear layer matches the LoRA target modules {config.target_modules}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), config))
    model.lora_config = config
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place: the model is a plain model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    model.__dict__.pop("lora_config", None)


def save_adapter(model: nn.Module, directory: str | Path, base_model: str = "") -> Path:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them."""
    from ..checkpoint import atomic_directory

    config: LoRAConfig = model.lora_config
    tensors = {f"{PEFT_PREFIX}{name}": p.detach().to("cpu").contiguous()
               for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}  # fmt: skip
    wrapped = sorted({name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for name in tensors})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": config.r,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora, "bias": "none",
        "target_modules": wrapped, "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True,
    }  # fmt: skip
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


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
    targets = data["target_modules"]
    config = LoRAConfig(r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0)),
                        target_modules=[targets] if isinstance(targets, str) else list(targets),
                        rslora=bool(data.get("use_rslora", False)))  # fmt: skip
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
