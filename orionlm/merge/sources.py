"""What both merges share: reading their YAML config, loading the input models ready to merge, and picking
the output dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import stored_dtype
from ..errors import OrionError
from ..loading import load_model, resolve_model_path
from ..model import OrionLM
from ..nn.lora import merge_lora
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


def load_source(name_or_path: str) -> tuple[OrionLM, Tokenizer | None]:
    """A model to merge, float32 on CPU, with the LoRA adapter it may be (an adapter directory, or a LoRA run)
    folded into its weights; quantized models are refused (their weights are integer codes)."""
    model, tokenizer, _ = load_model(name_or_path, device="cpu", dtype=torch.float32)
    if model.config.quantization_config is not None:
        raise MergeError(f"{name_or_path} is quantized; merge the full-precision models, then quantize the result")
    merge_lora(model)
    return model.eval(), tokenizer


def source_dtype(name_or_path: str) -> torch.dtype:
    """The dtype a model directory stores its weights in (float32 for anything else, e.g. a GGUF file): a
    merge's output dtype when its config names none."""
    return stored_dtype(resolve_model_path(name_or_path))
