"""The quantization settings of Hugging Face GPTQ checkpoints (AutoGPTQ, GPTQModel, transformers): read from
config.json's quantization_config or, in older AutoGPTQ directories, quantize_config.json beside it, and written
to both. Every other quantization method, and every GPTQ variant whose tensors orionlm does not read, is refused
in one line that says what orionlm reads.

The tensors themselves are kept as stored (quant.pack describes them): a GPTQ layer becomes a QuantLinear, an
MoE layer's experts a QuantExperts; orionlm.convert.hf maps their names.
"""

from __future__ import annotations

from typing import Any

from ..errors import OrionError
from ..quant.pack import checkpoint_format_of, gptq_config
from .hf_config import ConvertError

READS = "orionlm reads GPTQ checkpoints: quant_method gptq, checkpoint_format gptq or gptq_v2, bits 2, 3, 4 or 8"
KEYS = ("bits", "group_size")  # what every GPTQ config states; the rest has AutoGPTQ's defaults


def _method(raw: dict[str, Any]) -> str:
    """The quant_method; bitsandbytes configs of older transformers name none, AutoGPTQ's quantize_config.json
    neither (there it is GPTQ)."""
    if "quant_method" in raw:
        return str(raw["quant_method"]).lower()
    return "bitsandbytes" if raw.get("load_in_4bit") or raw.get("load_in_8bit") else "gptq"


def gptq_settings(raw: Any, source: str) -> dict[str, Any]:
    """orionlm's record (quant.pack.gptq_config) of a quantization_config or quantize_config.json that `source`
    names; ConvertError for any other method and for what the GPTQ tensors' reader does not read: another
    checkpoint_format (marlin, bitblas, ipex, ...), other bits, per-module settings, packing in other words."""
    if not isinstance(raw, dict):
        raise ConvertError(f"{source}: quantization_config must be an object, got {raw!r}; {READS}")
    method = _method(raw)
    if method != "gptq":
        raise ConvertError(f"{source}: quant_method {method!r} is not supported; {READS} (or convert the "
                           "unquantized checkpoint)")  # fmt: skip
    missing = [key for key in KEYS if not isinstance(raw.get(key), int)]
    if missing:
        raise ConvertError(f"{source}: the GPTQ settings need an integer {missing[0]!r}; got {raw.get(missing[0])!r}")
    if raw.get("dynamic"):
        raise ConvertError(f"{source}: per-module GPTQ settings ('dynamic') are not supported; {READS}, one bits "
                           "and group_size for every layer")  # fmt: skip
    if str(raw.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise ConvertError(f"{source}: GPTQ pack_dtype {raw['pack_dtype']!r} is not supported; {READS}, packed in "
                           "int32 words")  # fmt: skip
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}  # GPTQModel 7 keeps these three there

    def setting(key: str, default: Any) -> Any:
        return raw.get(key, meta.get(key, default))

    try:
        return gptq_config(
            raw["bits"],
            raw["group_size"],
            desc_act=bool(raw.get("desc_act", False)),
            sym=bool(raw.get("sym", True)),
            damp_percent=setting("damp_percent", 0.01),
            static_groups=bool(setting("static_groups", False)),
            true_sequential=bool(setting("true_sequential", True)),
            checkpoint_format=checkpoint_format_of(raw),
        )
    except OrionError as e:
        raise ConvertError(f"{source}: {e}; {READS}") from None


def hf_quantization_config(settings: dict[str, Any], lm_head: bool) -> dict[str, Any]:
    """config.json's quantization_config (and quantize_config.json) of a GPTQ export: orionlm's settings plus the
    keys GPTQModel writes beside them: whether the head is quantized, and the packing word."""
    return settings | {"lm_head": lm_head, "pack_dtype": "int32"}
