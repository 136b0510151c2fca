"""Weight quantization: GPTQ and round-to-nearest, the GPTQ checkpoint format, and whole-model quantization."""

from .gptq import BITS, Hessian, QuantConfig, QuantError, QuantResult, find_params, gptq, quantize, rtn
from .model import LayerReport, calibration_samples, quantize_model, save_quantized
from .pack import QuantLinear, dequantize, pack_gptq, unpack_gptq

__all__ = [
    "BITS",
    "Hessian",
    "LayerReport",
    "QuantConfig",
    "QuantError",
    "QuantLinear",
    "QuantResult",
    "calibration_samples",
    "dequantize",
    "find_params",
    "gptq",
    "pack_gptq",
    "quantize",
    "quantize_model",
    "rtn",
    "save_quantized",
    "unpack_gptq",
]
