"""Weight quantization: GPTQ and round-to-nearest, the GPTQ checkpoint format, its layers, and whole-model
quantization. Importing the package registers the GPTQ layers' LoRA wrappers (quant.lora) with nn.lora."""

from .gptq import BITS, Hessian, QuantConfig, QuantError, QuantResult, find_params, gptq, quantize, rtn
from .linear import QuantExperts, QuantLinear
from .lora import LoRAQuantExperts, LoRAQuantLinear
from .model import LayerReport, calibration_samples, quantize_model, save_quantized
from .pack import dequantize, pack_gptq, unpack_gptq

__all__ = [
    "BITS",
    "Hessian",
    "LayerReport",
    "LoRAQuantExperts",
    "LoRAQuantLinear",
    "QuantConfig",
    "QuantError",
    "QuantExperts",
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
