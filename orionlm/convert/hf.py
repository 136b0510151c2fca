"""Hugging Face model directories: read and write llama, mistral, mixtral, qwen2, qwen3, qwen2_moe,
qwen3_moe and bloom checkpoints through each architecture's record (orionlm.convert.hf_architectures:
its config map and tensor-name templates).

Tensor names: orionlm keeps Hugging Face Llama's names, so the Llama-family maps are the identity
except for the experts. MoE experts are read in both layouts that exist on disk: one tensor per expert
and projection (what transformers 4 writes, and transformers 5 writes back on save) and the stacked
`mlp.experts.gate_up_proj` / `mlp.experts.down_proj` that transformers 5 holds in memory. They are
written per expert, the layout every version of transformers reads.
"""

from __future__ import annotations

import json
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
from ..config import ConfigError, ModelConfig
from ..model import OrionLM
from ..tokenizer import Tokenizer
from .hf_architectures import ARCHITECTURES, HFArchitecture, hf_architecture
from .hf_config import TOKEN_ID_KEYS, ConvertError, HFKeys

# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (already parsed); `source` names it in errors."""
    model_type = data.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConvertError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    quantization = data.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
        raise ConvertError(
            f"{source}: quantization_config ({method}) is not supported; convert the unquantized checkpoint"
        )
    arch = ARCHITECTURES[model_type]
    fields = arch.read(HFKeys(data, model_type, arch.defaults, source)) | dict(hf_model_type=model_type)
    token_ids = {key: data[key] for key in TOKEN_ID_KEYS if data.get(key) is not None}
    try:
        return ModelConfig(**fields, extra={"hf_token_ids": token_ids} if token_ids else {})
    except (ConfigError, TypeError) as e:
        raise ConvertError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, architecture: str) -> dict[str, Any]:
    """config.json for `architecture`; raises ConvertError when the architecture cannot express the config."""
    if architecture not in ARCHITECTURES:
        raise ConvertError(f"architecture {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    if config.thinks:
        raise ConvertError("a Quiet-STaR model's meta embeddings and mixing head have no Hugging Face layout")
    arch = ARCHITECTURES[architecture]
    return {"architectures": [arch.class_name], "model_type": architecture} | arch.write(config)


# ---------------------------------------------------------------------------------------------
# Tensor names

_STACKED_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def _split_layer(name: str) -> tuple[str, str | None]:
    """'model.layers.3.mlp.gate' -> ('model.layers.{i}.mlp.gate', '3'); other names pass through."""
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return ".".join(["model", "layers", "{i}", *parts[3:]]), parts[2]
    return name, None


def _hf_name(arch: HFArchitecture, name: str, stacked: bool) -> str:
    """The Hugging Face name of one orionlm tensor (not a per-expert one)."""
    if stacked:  # transformers 5's in-memory names are orionlm's
        return name
    module, param = name.rsplit(".", 1)
    template, layer = _split_layer(module)
    renamed = arch.module_names.get(template)
    return name if renamed is None else f"{renamed.format(i=layer)}.{param}"


def _stacked_expert(name: str) -> tuple[str, str] | None:
    """(layer, 'gate_up_proj' or 'down_proj') for a stacked expert tensor's orionlm name."""
    template, layer = _split_layer(name)
    if layer is not None and template.endswith(_STACKED_SUFFIXES):
        return layer, template.rsplit(".", 1)[1]
    return None


def tensors_to_hf(
    config: ModelConfig, arch: HFArchitecture, state: dict[str, torch.Tensor], stacked: bool = False
) -> dict[str, torch.Tensor]:
    """orionlm tensors under their Hugging Face names; experts per expert unless `stacked`."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        expert = None if stacked else _stacked_expert(name)
        if expert is None:
            out[_hf_name(arch, name, stacked)] = tensor
            continue
        layer, kind = expert
        gate_name, up_name, down_name = arch.expert_names
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
    config: ModelConfig, arch: HFArchitecture, names: list[str], hf: dict[str, torch.Tensor], stacked: bool
) -> dict[str, torch.Tensor]:
    """The inverse of tensors_to_hf for the orionlm tensor `names`, whose sources are known to exist."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        expert = None if stacked else _stacked_expert(name)
        if expert is None:
            out[name] = hf.pop(_hf_name(arch, name, stacked))
            continue
        layer, kind = expert
        gate_name, up_name, down_name = arch.expert_names
        experts = range(config.num_experts)
        if kind == "gate_up_proj":
            gate = torch.stack([hf.pop(gate_name.format(i=layer, j=j)) for j in experts])  # (E, I, C)
            up = torch.stack([hf.pop(up_name.format(i=layer, j=j)) for j in experts])
            out[name] = torch.cat([gate, up], dim=1)
        else:
            out[name] = torch.stack([hf.pop(down_name.format(i=layer, j=j)) for j in experts])
    return out


def _normalize_hf_names(
    config: ModelConfig, arch: HFArchitecture, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older Llama checkpoints saved
            continue
        if config.tie_embeddings and name == "lm_head.weight":  # some tied checkpoints store the head too
            continue
        if arch.prefix and name != "lm_head.weight" and not name.startswith(arch.prefix):
            name = arch.prefix + name  # BloomModel saved on its own has no prefix
        out[name] = tensor
    return out


def _convert_tensors(
    config: ModelConfig, arch: HFArchitecture, tensors: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> orionlm tensors, checking names and shapes against the config first
    so that errors name the tensors as they are in the files."""
    tensors = _normalize_hf_names(config, arch, tensors)
    stacked = arch.expert_names is not None and any(name.endswith(_STACKED_SUFFIXES) for name in tensors)
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
    arch = ARCHITECTURES[config.hf_model_type]
    tensors = _convert_tensors(config, arch, read_safetensors(directory), str(directory))
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
    model_type = architecture or config.hf_model_type or hf_architecture(config)
    hf_config = config_to_hf(config, model_type)
    token_ids = _token_ids(config, tokenizer)
    hf_config |= token_ids | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    tensors = tensors_to_hf(config, ARCHITECTURES[model_type], state_dict_for_saving(model))
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        generation = {key: value for key, value in token_ids.items() if value is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory
