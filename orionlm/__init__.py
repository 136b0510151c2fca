"""orionlm: sparse (MoE) and hybrid language models, from config to serving.

Quick use: `model, tokenizer, device = load_model(path)`, then
`generate(model, tokenizer, device, "The history of")`.
"""

from .config import PRESETS, ModelConfig, preset
from .errors import OrionError
from .generation import generate, stream
from .loading import load_model
from .model import OrionLM

__version__ = "0.1.0"

__all__ = ["ModelConfig", "OrionError", "OrionLM", "PRESETS", "generate", "load_model", "preset", "stream"]
