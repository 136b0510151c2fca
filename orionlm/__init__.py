"""orionlm: sparse (MoE) and hybrid language models, from config to serving."""

from .config import PRESETS, ModelConfig, preset
from .model import OrionLM

__version__ = "0.1.0"

__all__ = ["ModelConfig", "OrionLM", "PRESETS", "preset", "__version__"]
