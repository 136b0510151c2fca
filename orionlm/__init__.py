"""orionlm: sparse (MoE) and hybrid language models, from config to serving.

Quick use: `model, tokenizer, device = load_model(path)`, then
`generate(model, tokenizer, device, "The history of")`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import PRESETS, ModelConfig, preset
from .errors import OrionError

if TYPE_CHECKING:
    from .generation import generate, stream
    from .loading import load_model
    from .model import OrionLM

# The model, loading and generation are imported on first use, so that importing one module of a low layer
# (orionlm.nn.lora, orionlm.config) does not load the whole package through this one.
_LAZY = {"OrionLM": "model", "generate": "generation", "load_model": "loading", "stream": "generation"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ModelConfig",
    "OrionError",
    "OrionLM",
    "PRESETS",
    "__version__",
    "generate",
    "load_model",
    "preset",
    "stream",
]
