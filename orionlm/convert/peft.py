"""PEFT's LoRA adapter files, read and written: adapter_config.json (peft_type "LORA", r, lora_alpha, the
targets, ...) and adapter_model.safetensors, whose factors are named `base_model.model.<module>.lora_A.weight`
(older files: `.lora_A.default.weight`). The adapted layers and their names are nn.lora's; this module maps
them to the files and back.

PEFT matches targets as name suffixes, so they are written as the layer's last name where every layer of that
name is adapted, else as the adapted layers' full names. Hugging Face's MoE routers are not nn.Linear, so the
file names an adapted router as the parameter "mlp.gate.weight" (target_parameters), as it names the expert
stacks ("mlp.experts.gate_up_proj").

Modules trained fully beside the adapters (LoRAConfig.modules_to_save, PEFT's modules_to_save: a Quiet-STaR run's
"thinking") are listed in the config, and their tensors stored with the factors under their own names after the
prefix (`base_model.model.thinking.meta_embeddings`), as PEFT stores them. A Quiet-STaR adapter's base is made to
think first, as its run made it: thinking_config.json beside the adapter holds add_thought_tokens' settings, and
the tokenizer beside it the thought tokens (thinking_base).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_directory
from ..errors import OrionError, read_json_object, split_revision
from ..model import OrionLM, add_thought_tokens
from ..nn.lora import ADAPTED, LoRAConfig, apply_lora, is_experts, is_linear, layers, routers, saved_modules
from ..tokenizer import Tokenizer

PEFT_PREFIX = "base_model.model."
THINKING_CONFIG = "thinking_config.json"  # beside a Quiet-STaR adapter: how its run made the base think


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
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapter(model, tmp, base_model)
    return directory


def write_adapter(model: nn.Module, directory: Path, base_model: str = "") -> None:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them, into an existing directory."""
    config: LoRAConfig = model.lora_config
    tensors = {f"{PEFT_PREFIX}{name}": p.detach().to("cpu").contiguous()
               for name, p in adapter_parameters(model, config).items()}  # fmt: skip
    gates = routers(model)
    linears, stacks = [], []  # (PEFT's short target, full name, adapted) in model order
    for name, module, params in layers(model):
        adapted = isinstance(module, ADAPTED)
        if name in gates:  # PEFT adapts the Hugging Face router's weight as a parameter
            stacks.append((f"{_peft_suffix(name)}.weight", f"{name}.weight", adapted))
        elif is_linear(module):
            linears.append((name.rsplit(".", 1)[-1], name, adapted))
        elif is_experts(module):
            for param in params:  # in the order PEFT nests them
                stacks.append((f"{_peft_suffix(name)}.{param}", f"{name}.{param}", adapted and param in module.factors))
    modules, parameters = _peft_targets(linears), _peft_targets(stacks)
    base, revision = split_revision(str(base_model))  # PEFT keeps a Hub id's revision in a key of its own
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": revision,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "bias": "none",
        "target_modules": modules or None, "target_parameters": parameters or None, "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": config.modules_to_save or None, "init_lora_weights": True,
    }  # fmt: skip
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter(directory: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter's LoRAConfig and its factors under the names the adapted model gives them (written here or by
    PEFT)."""
    directory = Path(directory)
    config_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise OrionError(
            f"{directory} is not a LoRA adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    data = read_json_object(config_path)
    lacking = [key for key in ("r", "lora_alpha") if key not in data]
    if lacking:
        raise OrionError(f"{config_path} lacks {' and '.join(lacking)}; it is not a complete LoRA adapter config")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise OrionError(f"{weights} is corrupt or truncated: {e}") from None
    if data.get("peft_type") != "LORA":
        raise OrionError(f"{directory}: peft_type {data.get('peft_type')!r}; only LORA adapters load")
    if data.get("bias", "none") != "none":
        raise OrionError(f"{directory}: adapters with trained biases are not supported")
    if data.get("rank_pattern") or data.get("alpha_pattern") or data.get("use_dora"):
        raise OrionError(f"{directory}: adapters with per-layer ranks or alphas, or DoRA, are not supported")
    targets, parameters = data.get("target_modules") or [], data.get("target_parameters") or []
    config = LoRAConfig(r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0)),
                        target_modules=[targets] if isinstance(targets, str) else list(targets),
                        target_parameters=list(parameters), rslora=bool(data.get("use_rslora", False)),
                        modules_to_save=list(data.get("modules_to_save") or []))  # fmt: skip
    # PEFT names the weights <module>.lora_A.weight (older files: .lora_A.default.weight)
    return config, {name.removeprefix(PEFT_PREFIX).replace(".default.", "."): t for name, t in tensors.items()}


def load_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Wrap the model's layers as the adapter says and load its weights (written here or by PEFT)."""
    config, state = read_adapter(directory)
    attach_adapter(model, config, state, directory)
    return config


def attach_adapter(model: nn.Module, config: LoRAConfig, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Wrap the model's layers as `config` says and load the factors and fully trained modules `state`
    (read_adapter's), checking that they fit. On a model built on the meta device this checks the adapter and wraps
    the layers, holding no weights."""
    apply_lora(model, config)
    expected = adapter_parameters(model, config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OrionError(f"{directory}: adapter weights do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
    with torch.no_grad():
        for name, p in expected.items():
            if state[name].shape != p.shape:
                raise OrionError(f"{directory}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[name])


def adapter_parameters(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Parameter]:
    """What an adapter file holds of an adapted model, by name: the factors and the modules_to_save's parameters."""
    params = {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    for module in saved_modules(model, config):
        params |= {f"{module}.{n}": p for n, p in model.get_submodule(module).named_parameters()}
    return params


def write_thinking_config(directory: Path, thought_length: int, meta_init: str) -> None:
    """Beside a Quiet-STaR adapter: the add_thought_tokens settings that made its base a thinking model."""
    settings = {"thought_length": thought_length, "meta_init": meta_init}
    (directory / THINKING_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")


def thinking_base(model: OrionLM, tokenizer: Tokenizer, directory: str | Path) -> OrionLM:
    """The model the adapter in `directory` goes on: its base made to think as its Quiet-STaR run made it (the
    tokenizer: the run's, beside the adapter, holding the thought tokens), any other adapter's base as it is."""
    path = Path(directory) / THINKING_CONFIG
    if not path.is_file():
        return model
    settings = read_json_object(path)
    if not isinstance(settings.get("thought_length"), int) or not isinstance(settings.get("meta_init"), str):
        raise OrionError(f"{path} must hold thought_length (a number) and meta_init (text)")
    return add_thought_tokens(model, tokenizer, settings["thought_length"], settings["meta_init"])
