"""Hugging Face model directories: read and write llama, mistral, mixtral, qwen2, qwen3, qwen2_moe,
qwen3_moe and bloom checkpoints through each architecture's record (orionlm.convert.hf_architectures:
its config map and tensor-name templates).

Tensor names: orionlm keeps Hugging Face Llama's names, so the Llama-family maps are the identity
except for the experts. MoE experts are read in both layouts that exist on disk: one tensor per expert
and projection (what transformers 4 writes, and transformers 5 writes back on save) and the stacked
`mlp.experts.gate_up_proj` / `mlp.experts.down_proj` that transformers 5 holds in memory. They are
written per expert, the layout every version of transformers reads.

GPTQ checkpoints (settings: orionlm.convert.hf_gptq) keep their codes: a layer's qweight, qzeros, scales, g_idx
and bias are renamed as its weight would be, into a QuantLinear. A GPTQ expert is one layer per expert and
projection in the files, and in orionlm a QuantExperts whose gate_up layer per expert joins the gate and up
layers along the outputs (the last dimension of qweight, qzeros and scales; g_idx, over the inputs, is theirs
alike).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    DEFAULT_SHARD_BYTES,
    QUANT_BUFFERS,
    QUANTIZE_CONFIG,
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
from ..errors import read_json_object
from ..model import OrionLM
from ..quant.linear import QuantExperts, QuantLinear, quantized_shells
from ..tokenizer import Tokenizer
from .hf_architectures import ARCHITECTURES, GPTQMODEL_NAMES, HFArchitecture, hf_architecture
from .hf_config import HF_SAMPLING_KEYS, TOKEN_ID_KEYS, ConvertError, HFKeys
from .hf_gptq import gptq_settings, hf_quantization_config

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
    arch = ARCHITECTURES[model_type]
    fields = arch.read(HFKeys(data, model_type, arch.defaults, source)) | dict(hf_model_type=model_type)
    fields |= {key: data[key] for key in ROUTER_BIAS_KEYS if key in data}
    if quantization is not None:
        fields["quantization_config"] = gptq_settings(quantization, f"{source}: quantization_config")
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
    data = {"architectures": [arch.class_name], "model_type": architecture} | arch.write(config)
    if config.router_score_bias:
        data |= {key: getattr(config, key) for key in ROUTER_BIAS_KEYS}
    return data


# A routing bias (aux-loss-free balancing, nn/moe.py) is written as DeepSeek-V3 writes it, the tensor
# mlp.gate.e_score_correction_bias (under the architecture's name for mlp.gate), with these keys in config.json that
# say it is there; transformers' mixtral and qwen MoE classes have no such bias and route without it.
ROUTER_BIAS_KEYS = ("router_score_bias", "router_bias_update_rate")


# ---------------------------------------------------------------------------------------------
# Tensor names

_STACKED_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
# an expert stack ('model.layers.3.mlp.experts.down_proj') or one GPTQ expert's tensor (QuantExperts:
# 'model.layers.3.mlp.experts.down_proj.5.qweight')
_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(?:\.(\d+)\.(\w+))?")


def _split_layer(name: str) -> tuple[str, str | None]:
    """'model.layers.3.mlp.gate' -> ('model.layers.{i}.mlp.gate', '3'); other names pass through."""
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return ".".join(["model", "layers", "{i}", *parts[3:]]), parts[2]
    return name, None


def _hf_name(arch: HFArchitecture, name: str, stacked: bool) -> str:
    """The Hugging Face name of one orionlm tensor (not an expert's)."""
    if stacked:  # transformers 5's in-memory names are orionlm's
        return name
    module, param = name.rsplit(".", 1)
    template, layer = _split_layer(module)
    renamed = arch.module_names.get(template)
    return name if renamed is None else f"{renamed.format(i=layer)}.{param}"


@dataclass(frozen=True)
class _Part:
    """One Hugging Face tensor cut from an orionlm tensor: expert `expert` of a stack (None: the whole tensor), then
    half `half` of dimension `dim` (None: all of it)."""

    hf_name: str
    expert: int | None = None
    half: int | None = None
    dim: int = 0

    def spec(self, spec: TensorSpec) -> TensorSpec:
        shape = list(spec.shape[1:] if self.expert is not None else spec.shape)
        if self.half is not None:  # a GPTQ gate_up's qzeros halve in whole words: down_proj packs I inputs too
            shape[self.dim] //= 2
        return TensorSpec(tuple(shape), spec.dtype)

    def cut(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor if self.expert is None else tensor[self.expert]
        return tensor if self.half is None else tensor.chunk(2, dim=self.dim)[self.half]


def _parts(config: ModelConfig, arch: HFArchitecture, name: str, stacked: bool) -> list[_Part]:
    """The Hugging Face tensors an orionlm tensor is written as (experts per expert unless `stacked`; a
    stacked gate_up_proj as separate gate and up tensors)."""
    match = _EXPERTS.fullmatch(name) if arch.expert_names is not None else None
    if match is None or stacked and match[3] is None:
        return [_Part(_hf_name(arch, name, stacked))]
    layer, stack, expert, tensor = match.groups()
    gate, up, down = (template.format(i=layer, j="{j}").removesuffix("weight") + (tensor or "weight")
                      for template in arch.expert_names)  # fmt: skip
    halves = [gate, up] if stack == "gate_up_proj" else [down]
    if expert is None:  # a stack (E, out, in) of float weights: gate_up_proj is [gate; up] per expert
        return [_Part(hf.format(j=j), j, half if len(halves) == 2 else None)
                for j in range(config.num_experts) for half, hf in enumerate(halves)]  # fmt: skip
    # one GPTQ expert's tensor: its last dimension is the outputs'; g_idx, over the inputs, is gate's and up's
    split = len(halves) == 2 and tensor != "g_idx"
    return [_Part(hf.format(j=expert), None, half if split else None, -1) for half, hf in enumerate(halves)]


def tensors_to_hf(
    config: ModelConfig, arch: HFArchitecture, tensors: Mapping[str, torch.Tensor], stacked: bool = False
) -> LazyTensors:
    """orionlm tensors under their Hugging Face names, read on demand; experts per expert unless `stacked`, each
    a part of its stack (or of its GPTQ layer), and the last tensors cut into parts are kept, so a stack is read
    once for all its experts."""
    tensors = LazyTensors.of(tensors)
    read_whole = lru_cache(maxsize=2)(tensors.__getitem__)  # a layer's gate_up and down stacks
    specs: dict[str, TensorSpec] = {}
    parts: dict[str, tuple[str, _Part, bool]] = {}  # HF name -> (orionlm name, part, whether one of several)
    for name, spec in tensors.specs.items():
        cut = _parts(config, arch, name, stacked)
        for part in cut:
            specs[part.hf_name] = part.spec(spec)
            parts[part.hf_name] = (name, part, len(cut) > 1)

    def read(hf_name: str) -> torch.Tensor:
        name, part, shared = parts[hf_name]
        return part.cut(read_whole(name) if shared else tensors[name])

    return LazyTensors(specs, read)


def _assemble(parts: list[_Part], read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The inverse of _Part.cut over all the parts of one orionlm tensor, reading each with `read`."""
    experts: dict[int | None, list[_Part]] = {}
    for part in parts:
        experts.setdefault(part.expert, []).append(part)
    pieces = []
    for group in experts.values():
        if group[0].half is not None:
            pieces.append(torch.cat([read(part.hf_name) for part in group], dim=group[0].dim))
            continue
        first = read(group[0].hf_name)
        for part in group[1:]:  # the copies of one tensor: a GPTQ expert's g_idx, in its gate and up layers
            if not torch.equal(read(part.hf_name), first):
                raise CheckpointError(f"{part.hf_name} differs from {group[0].hf_name}: orionlm holds an expert's "
                                      "gate and up projections as one GPTQ layer, with one g_idx (act-order) for "
                                      "both")  # fmt: skip
        pieces.append(first)
    return pieces[0] if parts[0].expert is None else torch.stack(pieces)


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


class _StoredAs:
    """The orionlm names whose (first) Hugging Face tensor the files hold: what quantized_shells asks."""

    def __init__(self, config: ModelConfig, arch: HFArchitecture, stored: Container[str], stacked: bool) -> None:
        self.config, self.arch, self.stored, self.stacked = config, arch, stored, stacked

    def __contains__(self, name: object) -> bool:
        return _parts(self.config, self.arch, str(name), self.stacked)[0].hf_name in self.stored


def _expected_state(
    config: ModelConfig, arch: HFArchitecture, stored: Container[str], stacked: bool, source: str
) -> dict[str, torch.Tensor]:
    """The state dict (on meta) of the model the files hold: GPTQ layers where they hold codes."""
    with torch.device("meta"):
        model = OrionLM(config)
    if config.quantization_config is not None:
        quantized_shells(model, config.quantization_config, _StoredAs(config, arch, stored, stacked))
        if not any(isinstance(module, (QuantLinear, QuantExperts)) for module in model.modules()):
            raise CheckpointError(f"{source}: config.json has a GPTQ quantization_config, but no layer is stored "
                                  "as GPTQ codes (qweight)")  # fmt: skip
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    return state


def _spelled_as(model_type: str, names: Iterable[str]) -> HFArchitecture:
    """The architecture's record, in GPTQModel's names where it has its own (GPTQMODEL_NAMES) and the files use
    them."""
    arch, gptqmodel = ARCHITECTURES[model_type], GPTQMODEL_NAMES.get(model_type)
    if gptqmodel is None:
        return arch
    down = (
        re.escape(gptqmodel.expert_names[2].removesuffix("weight")).replace(r"\{i\}", r"\d+").replace(r"\{j\}", r"\d+")
    )
    return gptqmodel if any(re.fullmatch(down + r"\w+", name) for name in names) else arch


def hf_tensors(config: ModelConfig, hf: LazyTensors, source: str) -> LazyTensors:
    """Hugging Face tensors -> orionlm tensors, read per tensor as the result is read, in the stored dtype (GPTQ
    codes as stored). Names and shapes are checked against the config first, so that errors name the tensors as
    they are in the files."""
    arch = _spelled_as(config.hf_model_type, hf)
    stored = _normalize_hf_names(config, arch, list(hf))
    stacked = arch.expert_names is not None and any(name.endswith(_STACKED_SUFFIXES) for name in stored)
    state = _expected_state(config, arch, stored, stacked, source)
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
    quant = config.quantization_config
    for name, want in expected.items():
        shape = hf.specs[stored[name]].shape
        if shape != want.shape:
            settings = ""
            if quant is not None and name.rsplit(".", 1)[-1] in QUANT_BUFFERS:
                settings = f" with GPTQ bits {quant['bits']} and group_size {quant['group_size']}"
            raise CheckpointError(f"{source}: tensor {name!r} has shape {shape}, config.json implies {want.shape}"
                                  f"{settings}")  # fmt: skip
    parts = {name: _parts(config, arch, name, stacked) for name in state}

    def read(name: str) -> torch.Tensor:
        return _assemble(parts[name], lambda hf_name: hf[stored[hf_name]])

    specs = {name: TensorSpec(tuple(t.shape), hf.specs[stored[parts[name][0].hf_name]].dtype)
             for name, t in state.items()}  # fmt: skip
    return LazyTensors(specs, read)


# ---------------------------------------------------------------------------------------------
# Directories


def read_hf_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory, with the token ids of its generation_config.json."""
    data = read_config_json(directory)
    config = config_from_hf(data, str(directory / "config.json"))
    config.name = directory.name
    if config.quantization_config is None and (directory / QUANTIZE_CONFIG).is_file():  # older AutoGPTQ
        path = directory / QUANTIZE_CONFIG
        config.quantization_config = gptq_settings(read_json_object(path, CheckpointError), str(path))
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
    safetensors (experts per expert), tokenizer files and generation_config.json, atomically; a GPTQ model's
    codes as they are, with its settings as quantization_config and in quantize_config.json, and its tensors
    named as GPTQModel names them (GPTQMODEL_NAMES). `tensors` are the
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
    arch = ARCHITECTURES[model_type]
    quantized = config.quantization_config is not None
    if quantized:
        lm_head = "lm_head.qweight" in tensors
        hf_config["quantization_config"] = hf_quantization_config(config.quantization_config, lm_head)
        arch = GPTQMODEL_NAMES.get(model_type, arch)
    renamed = tensors_to_hf(config, arch, tensors)
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if quantized:  # where AutoGPTQ, and GPTQModel, read the settings too
            (tmp / QUANTIZE_CONFIG).write_text(json.dumps(hf_config["quantization_config"], indent=2) + "\n")
        write_safetensors(renamed, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        generation = generation_with_stops(config, tokenizer, generation)
        generation = {key: generation[key] for key in (*TOKEN_ID_KEYS, *HF_SAMPLING_KEYS) if key in generation}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory
