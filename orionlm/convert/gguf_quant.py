"""llama.cpp's own quantizer (llama_model_quantize, through llama-cpp-python) turning an F16 GGUF file into one
of its quantized file types: the legacy block types (Q4_0 ... Q8_0: 32 weights, one scale and for _1 a minimum
per block) and the k-quants (super-blocks of 256 weights with 6- or 4-bit sub-block scales). An _M type is
llama.cpp's mixture: most matrices in the named type, some (attn_v, ffn_down in part, the head) a type or two
higher. Rows that are not whole blocks get a fallback type (in the llama.cpp of llama-cpp-python 0.3.36: Q4_0 for
Q2_K and Q3_K, Q5_0 for Q4_K, Q8_0 for Q6_K; older ones chose IQ4_NL for Q2_K and Q3_K; F16 where nothing
fits), which orionlm reads as well.

llama.cpp logs each tensor as it quantizes it ("[  12/ 291] blk.1.attn_q.weight - ..."); those lines drive the
progress bar, and its "failed to quantize: REASON" line makes the message when it fails.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import require
from .gguf_vocab import GGUFError

# --dtype -> llama.cpp's llama_ftype (the names of llama-cpp-python's LLAMA_FTYPE_MOSTLY_* constants)
LLAMA_CPP_TYPES = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
    "q2_k": "Q2_K", "q3_k_m": "Q3_K_M", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
}  # fmt: skip
_TENSOR_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# matched by text: ggml's log levels were renumbered between versions
_FAILURE_LINE = re.compile(rb"failed to quantize: (.*)")


def require_llama_cpp() -> Any:
    """The llama_cpp module; MissingExtra (one line with the pip command) when llama-cpp-python is not installed."""
    return require("llama_cpp", "llamacpp", "writing llama.cpp's quantized GGUF types (q4_k_m, ...)")


def llama_cpp_quantize(src: Path, dst: Path, dtype: str) -> None:
    """Quantize the F16/F32 GGUF file src into dst as llama.cpp's file type `dtype` (a key of LLAMA_CPP_TYPES),
    showing a progress bar per tensor on a terminal; GGUFError with llama.cpp's reason when it fails."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_CPP_TYPES[dtype]}")
    reasons: list[str] = []
    with tqdm(desc=f"quantizing to {dtype} (llama.cpp)", unit="tensor", file=sys.stderr, disable=None) as bar:

        @llama_cpp.llama_log_callback
        def log(level: int, text: bytes, _: ctypes.c_void_p) -> None:
            if failure := _FAILURE_LINE.search(text):
                reasons.append(failure[1].decode("utf-8", "replace").strip())
            elif line := _TENSOR_LINE.match(text):
                bar.total = int(line[2])
                bar.set_postfix_str(line[3].decode("utf-8", "replace"), refresh=False)
                bar.update(int(line[1]) - bar.n)

        previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
        try:
            failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:  # the logger before (llama-cpp-python's): `log` is freed when this function returns
            llama_cpp.llama_log_set(previous, user_data)
    if failed:
        reason = "; ".join(reasons) or f"llama_model_quantize returned {failed}"
        raise GGUFError(f"llama.cpp could not quantize the model to {dtype}: {reason}")
