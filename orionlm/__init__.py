"""orionlm: sparse (MoE) and hybrid language models, from config to serving.

Quick use: `model, tokenizer, device = load_model(path)`, then
`generate(model, tokenizer, device, "The history of")` (or `stream(...)`, with the same arguments, for the text
as it comes); `save_model(model, path, tokenizer)` writes a model directory that load_model reads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import PRESETS, ModelConfig, preset
from .errors import OrionError

if TYPE_CHECKING:
    from .checkpoint import save_model
    from .generation import generate, stream
    from .loading import load_model
    from .model import OrionLM

# The model, loading and generation are imported on first use, so that importing one module of a low layer
# (orionlm.nn.lora, orionlm.config) does not load the whole package through this one.
_LAZY = {
    "OrionLM": "model",
    "generate": "generation",
    "load_model": "loading",
    "save_model": "checkpoint",
    "stream": "generation",
}


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
    "save_model",
    "stream",
]
