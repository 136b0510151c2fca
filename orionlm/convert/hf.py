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
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    LazyTensors,
    TensorSpec,
    atomic_directory,
    generation_with_stops,
    model_from_tensors,
    read_config_json,
    read_generation_config,
    resolve_device,
    state_dict_for_saving,
    write_safetensors,
)
from ..config import ConfigError, ModelConfig
from ..model import OrionLM
from ..tokenizer import Tokenizer
from .hf_architectures import ARCHITECTURES, HFArchitecture, hf_architecture
from .hf_config import HF_SAMPLING_KEYS, TOKEN_ID_KEYS, ConvertError, HFKeys

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
    if config.quantization_config is not None:
        raise ConvertError("GPTQ codes have no Hugging Face export here; export the full-precision model")
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
    config: ModelConfig, arch: HFArchitecture, tensors: Mapping[str, torch.Tensor], stacked: bool = False
) -> LazyTensors:
    """orionlm tensors under their Hugging Face names, read on demand; experts per expert unless `stacked`, each
    a slice of its stack (the last stacks read are kept, so a stack is read once for all its experts)."""
    tensors = LazyTensors.of(tensors)
    read_stack = lru_cache(maxsize=2)(tensors.__getitem__)  # a layer's gate_up and down stacks
    specs: dict[str, TensorSpec] = {}
    parts: dict[str, tuple[str, int | None, int | None]] = {}  # HF name -> (orionlm name, expert, half of gate_up)
    for name, spec in tensors.specs.items():
        expert = None if stacked else _stacked_expert(name)
        if expert is None:
            specs[_hf_name(arch, name, stacked)] = spec
            parts[_hf_name(arch, name, stacked)] = (name, None, None)
            continue
        layer, kind = expert
        gate_name, up_name, down_name = arch.expert_names
        for j in range(config.num_experts):
            if kind == "gate_up_proj":  # (E, 2I, C) = [gate; up] per expert
                for half, hf_name in enumerate((gate_name, up_name)):
                    specs[hf_name.format(i=layer, j=j)] = TensorSpec((spec.shape[1] // 2, spec.shape[2]), spec.dtype)
                    parts[hf_name.format(i=layer, j=j)] = (name, j, half)
            else:  # (E, C, I)
                specs[down_name.format(i=layer, j=j)] = TensorSpec(spec.shape[1:], spec.dtype)
                parts[down_name.format(i=layer, j=j)] = (name, j, None)

    def read(hf_name: str) -> torch.Tensor:
        name, expert, half = parts[hf_name]
        if expert is None:
            return tensors[name]
        stack = read_stack(name)
        return (stack if half is None else stack.chunk(2, dim=1)[half])[expert]

    return LazyTensors(specs, read)


def _tensor_from_hf(
    config: ModelConfig, arch: HFArchitecture, name: str, read: Callable[[str], torch.Tensor], stacked: bool
) -> torch.Tensor:
    """The inverse of tensors_to_hf for one orionlm tensor, reading its Hugging Face tensors with `read`."""
    expert = None if stacked else _stacked_expert(name)
    if expert is None:
        return read(_hf_name(arch, name, stacked))
    layer, kind = expert
    gate_name, up_name, down_name = arch.expert_names
    experts = range(config.num_experts)
    if kind == "gate_up_proj":
        gate = torch.stack([read(gate_name.format(i=layer, j=j)) for j in experts])  # (E, I, C)
        up = torch.stack([read(up_name.format(i=layer, j=j)) for j in experts])
        return torch.cat([gate, up], dim=1)
    return torch.stack([read(down_name.format(i=layer, j=j)) for j in experts])


def _first_hf_name(arch: HFArchitecture, name: str, stacked: bool) -> str:
    """The Hugging Face name of an orionlm tensor, or of its first expert's first part; its dtype is the result's."""
    expert = None if stacked else _stacked_expert(name)
    if expert is None:
        return _hf_name(arch, name, stacked)
    layer, kind = expert
    gate_name, _, down_name = arch.expert_names
    return (gate_name if kind == "gate_up_proj" else down_name).format(i=layer, j=0)


def _normalize_hf_names(config: ModelConfig, arch: HFArchitecture, names: list[str]) -> dict[str, str]:
    """The names tensors_to_hf gives, each mapped to its name in the files."""
    out = {}
    for stored in names:
        name = stored
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older Llama checkpoints saved
            continue
        if config.tie_embeddings and name == "lm_head.weight":  # some tied checkpoints store the head too
            continue
        if arch.prefix and name != "lm_head.weight" and not name.startswith(arch.prefix):
            name = arch.prefix + name  # BloomModel saved on its own has no prefix
        out[name] = stored
    return out


def hf_tensors(config: ModelConfig, hf: LazyTensors, source: str) -> LazyTensors:
    """Hugging Face tensors -> orionlm tensors, read per tensor as the result is read, in the stored dtype.
    Names and shapes are checked against the config first, so that errors name the tensors as they are in
    the files."""
    arch = ARCHITECTURES[config.hf_model_type]
    stored = _normalize_hf_names(config, arch, list(hf))
    stacked = arch.expert_names is not None and any(name.endswith(_STACKED_SUFFIXES) for name in stored)
    with torch.device("meta"):
        state = OrionLM(config).state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    expected = tensors_to_hf(config, arch, state, stacked).specs
    missing = [name for name in expected if name not in stored]
    if missing:
        raise CheckpointError(
            f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); config.json implies it"
        )
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); config.json has no place for it"
        )
    for name, want in expected.items():
        shape = hf.specs[stored[name]].shape
        if shape != want.shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {shape}, config.json implies {want.shape}")

    def read(name: str) -> torch.Tensor:
        return _tensor_from_hf(config, arch, name, lambda hf_name: hf[stored[hf_name]], stacked)

    specs = {
        name: TensorSpec(tuple(t.shape), hf.specs[stored[_first_hf_name(arch, name, stacked)]].dtype)
        for name, t in state.items()
    }
    return LazyTensors(specs, read)


# ---------------------------------------------------------------------------------------------
# Directories


def read_hf_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory, with the token ids of its generation_config.json."""
    data = read_config_json(directory)
    config = config_from_hf(data, str(directory / "config.json"))
    config.name = directory.name
    generation = read_generation_config(directory)
    token_ids = config.extra.get("hf_token_ids", {}) | {
        key: generation[key] for key in TOKEN_ID_KEYS if generation.get(key) is not None
    }
    if token_ids:
        config.extra["hf_token_ids"] = token_ids
    return config


def load_hf(
    directory: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[OrionLM, Tokenizer | None]:
    """Load a Hugging Face model directory (config.json + safetensors); the tokenizer is None
    when the directory has no tokenizer.json."""
    directory = Path(directory)
    device, dtype = resolve_device(device, dtype)
    config = read_hf_config(directory)
    tensors = hf_tensors(config, LazyTensors.from_directory(directory), str(directory))
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
    """write_hf of a model in memory, with the sampling defaults it was loaded with."""
    generation = getattr(model, "generation_defaults", None) or None
    return write_hf(
        model.config, state_dict_for_saving(model), tokenizer, directory, architecture, max_shard_bytes, generation
    )


def write_hf(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer | None,
    directory: str | Path,
    architecture: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face model directory that transformers' AutoModelForCausalLM loads: config.json,
    safetensors (experts per expert), tokenizer files and generation_config.json, atomically. `tensors` are the
    model's (as checkpoint.model_tensors gives them), read, renamed and written one at a time.

    generation_config.json carries the sampling defaults of `generation` (the source's generation_config.json;
    None: orionlm's) and every stop id (checkpoint.generation_with_stops), so that transformers' `generate`
    samples as orionlm does and stops where it stops, at a chat template's end-of-turn token too.

    The architecture is `architecture`, else the config's hf_model_type, else inferred from the config;
    a config the architecture cannot express is refused before anything is written.
    """
    model_type = architecture or config.hf_model_type or hf_architecture(config)
    hf_config = config_to_hf(config, model_type)
    token_ids = _token_ids(config, tokenizer)
    tensors = LazyTensors.of(tensors)
    head = tensors.specs.get("lm_head.weight") or tensors.specs["model.embed_tokens.weight"]
    hf_config |= token_ids | {"torch_dtype": str(head.dtype).removeprefix("torch.")}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_safetensors(tensors_to_hf(config, ARCHITECTURES[model_type], tensors), tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        generation = generation_with_stops(config, tokenizer, generation)
        generation = {key: generation[key] for key in (*TOKEN_ID_KEYS, *HF_SAMPLING_KEYS) if key in generation}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory
