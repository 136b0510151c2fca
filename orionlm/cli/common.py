"""What several verbs do first: set the CPU threads (every verb that computes: `compute_setup`, whose options the
parser gives each of them) and load a model (in the dtype asked for), often one that must come with its
tokenizer."""

from __future__ import annotations

import json as jsonlib
import math
import os
import sys
from contextlib import AbstractContextManager, nullcontext, redirect_stdout
from typing import Any, Literal

from ..errors import OrionError

DType = Literal["auto", "float32", "bfloat16", "float16"]  # --dtype; auto: as the weights are stored


def compute_setup(*, threads: int | None = None) -> None:
    """Set up the process for a verb that computes.

    Args:
        threads: CPU threads for torch (default: one per core this process may use, or OMP_NUM_THREADS); where
            other processes share the cores, fewer (often 1) can be many times faster
    """
    # More threads than cores is refused: torch's OpenMP threads spin-wait for each other, so an extra thread only
    # waits for a core. Only the intra-op pool is set: orionlm starts no inter-op work (no torch.jit.fork).
    if threads is None:
        return
    import torch

    cores = usable_cores()
    if not 1 <= threads <= cores:
        raise OrionError(f"--threads must be from 1 to {cores} (the cores this process may run on), got {threads}")
    torch.set_num_threads(threads)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as torch's default thread count counts them)."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no affinity mask to ask
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load(model: str, device: str | None, dtype: DType | None):
    """(model, tokenizer, device): the model in `dtype` (default float32 on CPU, bfloat16 on CUDA). Half
    precision on the CPU gets a one-line note on stderr: CPUs without native bfloat16 compute it slowly."""
    import torch

    from ..checkpoint import DTYPES
    from ..loading import load_model

    lm, tokenizer, used = load_model(model, device=device, dtype=DTYPES.get(dtype, dtype))
    if used.type == "cpu" and lm.dtype in (torch.bfloat16, torch.float16):
        name = str(lm.dtype).removeprefix("torch.")
        sys.stderr.write(f"note: {name} on the CPU: matrix products are slow on CPUs without native {name} "
                         "support; --dtype float32 is faster there, at twice the memory\n")  # fmt: skip
    return lm, tokenizer, used


def load_with_tokenizer(model: str, purpose: str, device: str | None, dtype: DType | None = None):
    """(model, tokenizer) on `device` in `dtype`; a model without a tokenizer is a one-line error saying what
    needs it."""
    lm, tokenizer, _ = load(model, device, dtype)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; {purpose} needs one")
    return lm, tokenizer


def logs_to_stderr(json: bool) -> AbstractContextManager:
    """With --json stdout carries one JSON document, so what a verb prints on the way (logs, tables) goes to
    stderr."""
    return redirect_stdout(sys.stderr) if json else nullcontext()


def print_json(data: Any) -> None:
    """A verb's results as one JSON document on stdout; NaN (e.g. the standard error of a single item) is null,
    since JSON has no NaN."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    sys.stdout.write(jsonlib.dumps(finite(data), indent=2) + "\n")
