"""What several verbs do first: set the CPU threads and load a model (in the dtype asked for), often one that must
come with its tokenizer."""

from __future__ import annotations

import sys
from typing import Literal

import torch

from ..checkpoint import DTYPES, set_threads
from ..errors import OrionError

DType = Literal["auto", "float32", "bfloat16", "float16"]  # --dtype; auto: as the weights are stored


def load(model: str, device: str | None, dtype: DType | None):
    """(model, tokenizer, device): the model in `dtype` (default float32 on CPU, bfloat16 on CUDA). Half
    precision on the CPU gets a one-line note on stderr: CPUs without native bfloat16 compute it slowly."""
    from ..loading import load_model

    lm, tokenizer, used = load_model(model, device=device, dtype=DTYPES.get(dtype, dtype))
    if used.type == "cpu" and lm.dtype in (torch.bfloat16, torch.float16):
        name = str(lm.dtype).removeprefix("torch.")
        sys.stderr.write(f"note: {name} on the CPU: matrix products are slow on CPUs without native {name} "
                         "support; --dtype float32 is faster there, at twice the memory\n")  # fmt: skip
    return lm, tokenizer, used


def load_with_tokenizer(model: str, purpose: str, device: str | None, threads: int | None, dtype: DType | None = None):
    """(model, tokenizer) on `device` in `dtype`, computing with `threads` CPU threads; a model without a
    tokenizer is a one-line error saying what needs it."""
    set_threads(threads)
    lm, tokenizer, _ = load(model, device, dtype)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; {purpose} needs one")
    return lm, tokenizer
