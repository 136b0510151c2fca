"""`orionlm quantize`: a GPTQ (or round-to-nearest) model directory from a full-precision one."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..errors import OrionError, with_revision
from .common import logs_to_stderr, print_json


def quantize_checkpoint(
    model: str,
    out: Path,
    /,
    *,
    revision: str | None = None,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    asym: bool = False,
    damp: float = 0.01,
    dataset: str | None = None,
    seq_len: int = 2048,
    nsamples: int = 128,
    method: Literal["gptq", "rtn"] = "gptq",
    seed: int = 0,
    device: str | None = None,
    force: bool = False,
    json: bool = False,
) -> None:
    """Quantize a model's linear layers to GPTQ checkpoints (AutoGPTQ's format): block by block with
    calibration text (GPTQ), or round-to-nearest (RTN, no data). The model is read one block at a time (in
    float32 on the device), so memory holds a block and the packed blocks before it, never the whole model.
    Prints each layer's output error and writes OUT as a model directory with quantize_config.json; orionlm
    loads it for generate, serve and eval.

    MoE experts are quantized one by one on the tokens routed to each. Kept in full precision: the
    embedding, norms, MoE routers and the LM head, and Gated DeltaNet's convolutions and decay parameters.
    A Chimera is calibrated one virtual layer at a time; a looped block is quantized on its first loop's inputs.

    Examples:
      orionlm quantize runs/m runs/m-gptq4 --bits 4 --dataset ../shared/data/pretrain/en_c4_sample.jsonl.gz
      orionlm quantize runs/m runs/m-rtn3 --bits 3 --method rtn

    Args:
        model: the model to quantize (a model directory, a .gguf file or a Hub id)
        revision: a branch, tag or commit of the Hub id MODEL (the same as MODEL@REV)
        out: the quantized model directory to write
        bits: bits per weight: 2, 3, 4 or 8
        group_size: input columns sharing a scale and zero point; -1 for one per output row
        act_order: quantize columns by decreasing activation size (desc_act)
        static_groups: find the groups' parameters before GPTQ's updates (fast act-order inference)
        asym: a zero point per group (default: symmetric)
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean (damp_percent)
        dataset: calibration text: a file, directory or hf:NAME (hf:NAME@REV: a revision; needed by gptq)
        seq_len: tokens per calibration sample
        nsamples: calibration samples
        method: gptq (with calibration) or rtn (round to nearest)
        seed: where the calibration samples are taken
        device: cpu, cuda or cuda:N (default: cuda when available)
        force: replace out if it exists
        json: print the results as one JSON document: out, bits, weight_bytes and each layer's name, method and
            output error (the per-layer lines go to stderr)
    """
    from tqdm import tqdm

    from ..checkpoint import meta_model, refuse_existing
    from ..loading import open_model
    from ..quant.gptq import QuantConfig
    from ..quant.model import LayerReport, calibration_samples, quantize_model, save_quantized

    refuse_existing(out, force)
    config = QuantConfig(bits=bits, group_size=group_size, sym=not asym, desc_act=act_order,
                         static_groups=static_groups, damp_percent=damp)  # fmt: skip
    if method == "gptq" and dataset is None:
        raise OrionError("gptq needs calibration text: --dataset FILE (or --method rtn)")
    model = with_revision(model, revision)
    source = open_model(model)
    if source.config.quantization_config is not None:
        raise OrionError(f"{model} is already quantized; quantize its full-precision original")
    if source.tokenizer is None:
        raise OrionError(f"{model} has no tokenizer; calibration text cannot be tokenized")
    samples = None
    if method == "gptq":
        samples = calibration_samples(source.tokenizer, dataset, nsamples=nsamples, seq_len=seq_len, seed=seed)

    def log(report: LayerReport) -> None:
        error = f", output error {report.error:.4g}" if report.error is not None else ""
        tqdm.write(f"{report.name}: {report.method}{error}")

    lm = meta_model(source.config, source.tensors, str(source.path))  # read a block at a time as it is quantized
    lm.generation_defaults = source.generation
    with logs_to_stderr(json):
        reports = quantize_model(lm, samples, config, method, log=log, tensors=source.tensors, device=device)
        save_quantized(lm, out, source.tokenizer)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        print(f"wrote {out}: {len(reports)} linear layers at {bits} bits, {size / 2**20:.1f} MiB of weights")
    if json:
        layers = [{"name": r.name, "method": r.method, "output_error": r.error} for r in reports]
        print_json({"model": model, "out": str(out), "method": method, "bits": bits, "group_size": group_size,
                    "weight_bytes": size, "layers": layers})  # fmt: skip
