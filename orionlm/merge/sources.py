"""What both merges share: reading their YAML config, opening the input models without reading their weights
(a LoRA adapter folded into its base one tensor at a time), the output's tensors and dtype, per-tensor random
generators, and the merged model they return, whose tensors are computed one at a time as they are written."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    DEFAULT_SHARD_BYTES,
    DTYPES,
    LazyTensors,
    TensorSpec,
    dtype_from_name,
    model_from_tensors,
    write_model_directory,
)
from ..config import ModelConfig
from ..convert.peft import attach_adapter, read_adapter
from ..errors import OrionError
from ..loading import ModelSource, is_adapter, open_adapter_base, open_model, resolve_model_path
from ..model import OrionLM
from ..nn.lora import ADAPTED, ExpertLowRank
from ..tokenizer import Tokenizer
from ..train.recipe import build_dataclass, read_yaml_mapping


class MergeError(OrionError):
    """A merge config or set of models that cannot be merged; the message says what to change."""


def load_config(cls: Any, path: str | Path, what: str, keys: str) -> Any:
    """A merge config dataclass from a YAML file; every problem is one MergeError naming the file."""
    data = read_yaml_mapping(path, what, f"keys ({keys}, ...)")
    try:
        return build_dataclass(cls, data, "config")
    except OrionError as e:
        raise MergeError(f"{path}: {e}") from None


def open_source(name_or_path: str) -> ModelSource:
    """A model to merge, opened without reading its weights; a LoRA adapter (an adapter directory, or a LoRA
    run's newest checkpoint) is its base model with the adapter folded in as each tensor is read. Quantized
    models are refused (their weights are integer codes)."""
    path = resolve_model_path(name_or_path)
    source = open_adapter_base(path) if is_adapter(path) else open_model(path)
    if source.config.quantization_config is not None:
        raise MergeError(f"{name_or_path} is quantized; merge the full-precision models, then quantize the result")
    if is_adapter(path):
        source.tensors = _folded(source, path)
    return source


def _folded(base: ModelSource, adapter: Path) -> LazyTensors:
    """The base's tensors with the adapter folded in, float32 where adapted, as nn.lora's merge_lora folds it:
    reading an adapted tensor gives its wrapped layer (built on meta) only that tensor, in float32, and its
    factors, and takes the tensor from the layer's merged()."""
    tensors, (config, factors) = base.tensors, read_adapter(adapter)
    if config.modules_to_save:
        raise MergeError(f"{adapter} also trains {config.modules_to_save} fully, beside its factors: fold it into its "
                         "base first (orionlm merge-lora), then merge that model")  # fmt: skip
    with torch.device("meta"):
        skeleton = OrionLM(base.config)
    attach_adapter(skeleton, config, factors, adapter)
    owners = {}  # adapted tensor -> (its layer, the layer's tensors to give it: the tensor and its factors)
    for name, module in skeleton.named_modules():
        if isinstance(module, ADAPTED):
            for param in module.factors if isinstance(module, ExpertLowRank) else ["weight"]:
                holder = module.factors[param] if isinstance(module, ExpertLowRank) else ""
                keys = [param] + [f"{holder}.lora_{x}.weight".lstrip(".") for x in "AB"]
                owners[f"{name}.{param}"] = (name, keys)
    specs = {name: TensorSpec(spec.shape, torch.float32) if name in owners else spec
             for name, spec in tensors.specs.items()}  # fmt: skip

    @torch.no_grad()
    def read(name: str) -> torch.Tensor:
        if name not in owners:
            return tensors[name]
        owner, keys = owners[name]
        layer = skeleton.get_submodule(owner)
        state = {key: (tensors if key == keys[0] else factors)[f"{owner}.{key}"].float() for key in keys}
        layer.load_state_dict(state, strict=False, assign=True)
        try:
            return layer.merged().state_dict()[keys[0]].detach()
        finally:
            layer.to("meta")  # the layer holds no weights between reads

    return LazyTensors(specs, read)


def output_dtype(name: str | None, source: ModelSource) -> torch.dtype:
    """The dtype a merge writes: the one its config names, else the one `source` stores its weights in (float32
    for a single file such as a GGUF)."""
    return DTYPES[name] if name else dtype_from_name("auto", source.path)


def model_specs(config: ModelConfig, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """The tensors a model directory of this config holds (a tied head is the embedding, stored once), in the
    order a saved model writes them, all in `dtype`."""
    with torch.device("meta"):
        state = OrionLM(config).state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    return {name: TensorSpec(tuple(t.shape), dtype) for name, t in state.items()}


def check_tensors(source: ModelSource, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Every tensor a merge will read from `source` is there with the shape it needs, checked from the specs
    before anything is computed."""
    tensors = source.tensors
    for name, shape in shapes.items():
        if name not in tensors:
            raise MergeError(f"{where} has no tensor {name!r}; its weights do not match its config.json")
        have = tensors.specs[name].shape
        if have != tuple(shape):
            raise MergeError(f"{where}: tensor {name!r} has shape {have}, the merge needs {tuple(shape)}")


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one tensor's random draws, seeded from (seed, the tensor's name) by a stable hash: the
    draws do not depend on the order tensors are computed in (the writer's, not the model's)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


@dataclass
class MergedModel:
    """A merge's result before it is written: its config, its tensors (each computed as it is read) and the
    tokenizer it gets."""

    config: ModelConfig
    tensors: LazyTensors
    tokenizer: Tokenizer | None

    def load(self) -> OrionLM:
        """The merged model on CPU in the output dtype, every tensor computed."""
        dtype = next(iter(self.tensors.specs.values())).dtype
        return model_from_tensors(self.config, self.tensors, torch.device("cpu"), dtype, "merge")

    def save(
        self,
        directory: str | Path,
        write_extra: Callable[[Path], None] | None = None,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        progress: bool = True,
    ) -> Path:
        """Write the model directory (atomically), computing and writing one tensor at a time."""
        bar = tqdm(total=len(self.tensors), desc="tensors", disable=not progress)

        def read(name: str) -> torch.Tensor:
            tensor = self.tensors[name]
            bar.update()
            return tensor

        with bar:
            tensors = LazyTensors(self.tensors.specs, read)
            return write_model_directory(self.config, tensors, directory, self.tokenizer, None, max_shard_bytes,
                                         write_extra)  # fmt: skip
