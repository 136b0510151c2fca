"""Quantizing a whole model, block by block, as GPTQ's reference does it.

Calibration sequences enter the first block; for each block in turn, the inputs of its linear layers are
collected into Hessians, each linear is quantized (GPTQ, or round-to-nearest) and replaced by a QuantLinear,
and the block is run again on the same inputs to give the next block its inputs: every block is calibrated on
what the already-quantized blocks before it produce, and only one block's activations are held at a time.
With true_sequential, a block's linears are quantized in the order the forward pass calls them, each group
of linears that read the same input (q/k/v; gate/up) after the ones before it are quantized. That order is
recorded from the block's own forward pass, so any block layout works without a table.

MoE experts are quantized one by one, each with its own Hessian from the calibration tokens the router sends
it (gate_up_proj first, then down_proj on what the quantized gate_up_proj produces); an expert that receives
fewer than MIN_EXPERT_TOKENS tokens is rounded to nearest instead, rather than solved from a Hessian of a
handful of tokens. The embedding, the norms, the MoE routers and the LM head stay in full precision (as in
AutoGPTQ), and so do Gated DeltaNet's convolutions, decay parameters (A_log, dt_bias) and gated norm. A
Chimera is calibrated one virtual layer at a time; a looped (shared) block is quantized at its first use,
on the inputs of loop 0, and its later loops run quantized.

A model need not fit in memory (as GPTQModel does it): built on the meta device, it is read from its
checkpoint a block at a time, in float32 on the compute device, and each block, once quantized, stays packed on
the CPU; a model already in memory takes the same path with nothing left to read.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import load_tensors, resolve_device, save_checkpoint
from ..chimera import ChimeraDecoder
from ..data.sources import SourceConfig, iter_documents
from ..model import OrionLM
from ..nn.moe import STACKS, Experts
from ..tokenizer import Tokenizer
from .gptq import Hessian, QuantConfig, QuantError, QuantResult, gptq, rtn
from .linear import QuantExperts, QuantLinear
from .pack import gptq_config

METHODS = ("gptq", "rtn")
KEPT = ("gate", "shared_expert_gate")  # MoE routers: a few numbers per token decide everything after them
MIN_EXPERT_TOKENS = 16  # fewer routed calibration tokens than this: the expert is rounded to nearest instead


def calibration_samples(tokenizer: Tokenizer, source: str, nsamples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(nsamples, seq_len) token ids: windows at random offsets (seeded) in the source's documents joined by
    EOS, as GPTQ samples its calibration set. `source` is a data source path (text, JSONL, Parquet, a
    directory or "hf:NAME")."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids: list[int] = []
    wanted = nsamples * seq_len * 4  # enough text for windows that rarely overlap
    for document in iter_documents(SourceConfig(path=source)):
        ids += tokenizer.encode(document, add_special_tokens=False) + eos
        if len(ids) >= wanted:
            break
    if len(ids) <= seq_len:
        raise QuantError(f"calibration data {source} has {len(ids)} tokens; a {seq_len}-token sample needs more")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, size=nsamples)
    tokens = torch.tensor(ids)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


@dataclass
class LayerReport:
    """One quantized linear: its name, the method used and its output error on the calibration inputs."""

    name: str
    method: str
    error: float | None  # mean over calibration tokens of ||(W - Q) x||^2 (GPTQ); None for RTN


def _block_step(block: nn.Module, states: list[torch.Tensor], contexts: list[tuple]) -> list[torch.Tensor]:
    """A block's outputs for each chunk of calibration states."""
    return [block(x, *context, None)[0] for x, context in zip(states, contexts, strict=True)]


def _chimera_step(decoder: ChimeraDecoder, v: int, states: list[tuple], contexts: list[tuple]) -> list[tuple]:
    """A Chimera's virtual layer v on each chunk's state."""
    return [decoder.step(v, state, *context) for state, context in zip(states, contexts, strict=True)]


def _fits(in_features: int, out_features: int, bits: int) -> bool:
    """Whether the GPTQ format can hold the layer: it packs 32 / bits values along each dimension."""
    return in_features * bits % 32 == 0 and out_features * bits % 32 == 0


class _Stop(Exception):
    """Ends a calibration pass once every layer being calibrated has seen its input: the rest of the block would
    be computed for nothing."""


def _stop(_module: nn.Module, _args: tuple, _output: object) -> None:
    raise _Stop


def _linear_groups(block: nn.Module, run: Callable[[], object], bits: int) -> tuple[list[list[str]], bool]:
    """The block's quantizable linears in the order its forward pass (`run`) calls them, grouped by shared
    input, and whether each was called once (then a pass can stop at the last one it needs). The inputs
    themselves are kept until the grouping is done: an id() alone can be reused by a tensor made after the
    first is freed, which would join o_proj and the MLP's first layer into one group."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, module in block.named_modules():
        if _candidate(name, module) and _fits(module.in_features, module.out_features, bits):
            hooks.append(module.register_forward_hook(lambda m, args, out, n=name: calls.append((n, args[0]))))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, x in calls:
        if any(name in group for group in groups):
            continue
        if x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    return groups, len(calls) == len({name for name, _ in calls})


@torch.no_grad()
def quantize_model(
    model: OrionLM,
    samples: torch.Tensor | None,
    config: QuantConfig,
    method: str = "gptq",
    batch_size: int = 8,
    progress: bool = True,
    log: Callable[[LayerReport], None] = lambda report: None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[LayerReport]:
    """Quantize model's linear layers in place (they become QuantLinear) with calibration `samples`
    (n, seq_len; RTN needs none); returns one report per linear. Sets model.config.quantization_config.

    A model built on the meta device (checkpoint.meta_model) is never held whole: its tensors are read from
    `tensors` when needed, in float32 on `device` (cuda when available) - the embedding first, then one block
    at a time - and each block, once quantized and packed, is kept on the CPU; the final norm and the LM head
    are read last, on the CPU. A model already in memory is quantized where it is, in its own dtype.

    Symmetric quantization is written in checkpoint format "gptq" (AutoGPTQ's v1), asymmetric in "gptq_v2"
    (GPTQModel's): v1 stores zero - 1 and cannot hold the zero point 0 that an asymmetric group without
    negative weights gets."""
    if method not in METHODS:
        raise QuantError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gptq" and samples is None:
        raise QuantError("gptq needs calibration samples")
    checkpoint_format = "gptq" if config.sym else "gptq_v2"
    model.eval()
    for module in model.modules():  # a decode layout's packed q/k/v product would hide the layers from the hooks
        if getattr(module, "packed", None) is not None:
            module.packed = None
    lazy = model.device.type == "meta"
    if lazy and tensors is None:
        raise QuantError("a model on the meta device is quantized from its tensors: pass tensors=")
    device = resolve_device(device)[0] if lazy else model.device
    home = torch.device("cpu") if lazy else device  # where finished blocks are kept
    load = partial(_load, tensors if tensors is not None else {})
    if lazy:
        model.init_buffers(device)
    if method == "rtn":  # no data: each block on its own
        states, contexts, steps = [], [], [(i, None) for i in range(len(model.model.layers))]
    else:
        states, contexts, steps = _calibration(model, samples, batch_size, load, device, home)
    last_use = {index: position for position, (index, _) in enumerate(steps)}
    reports: list[LayerReport] = []

    def emit(report: LayerReport) -> None:
        reports.append(report)
        log(report)

    done = set()
    for position, (index, run) in enumerate(tqdm(steps, desc=f"{method} {config.bits}-bit", unit="layer",
                                                  disable=not progress)):  # fmt: skip
        block = model.model.layers[index]
        if index not in done:  # a looped Chimera block is quantized at its first use, on loop 0's inputs
            done.add(index)
            load(device, block, f"model.layers.{index}.")
            calibrate = None if run is None else partial(_calibrate, run, states, contexts)
            _quantize_block(block, f"model.layers.{index}", calibrate, config, checkpoint_format, emit)
        if run is not None:
            states = run(states, contexts)
        if last_use[index] == position:
            block.to(home)
            _trim_heap()
    load(home, model)  # what calibration did not need: the final norm and the head (RTN: the embedding too)
    if lazy:
        model.to(home).init_buffers(home)
    _record(model, config, checkpoint_format)
    return reports


def _trim_heap() -> None:
    """Give the memory of the freed float weights back to the system. glibc keeps freed allocations below its mmap
    threshold (which grows to 32 MiB) in its heap, where the packed codes allocated after them pin it: without a
    trim a small model's memory grows by about one float block per block. A no-op where libc has no malloc_trim."""
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _load(
    tensors: Mapping[str, torch.Tensor], device: torch.device, module: nn.Module, prefix: str = "", exclude=()
) -> None:
    """The module's tensors still on the meta device, read from `tensors` in float32 on `device`; a module
    already in memory is left as it is."""
    load_tensors(module, tensors, device, torch.float32, "the model being quantized", prefix, exclude)


def _calibration(
    model: OrionLM,
    samples: torch.Tensor,
    batch_size: int,
    load: Callable[..., None],
    device: torch.device,
    home: torch.device,
) -> tuple[list, list[tuple], list[tuple[int, Callable]]]:
    """The calibration chunks' first states (embedded on `device`), their (rope, mask, is_causal), and the
    steps that take the states through the model: (block index, run(states, contexts) -> next states) per
    decoder layer, or per virtual layer of a Chimera. The embedding is kept at `home` once used."""
    load(device, model.model, "model.", ("layers.", "norm."))
    chunks = [c.to(device) for c in samples.split(batch_size)]
    embedded = []
    for ids in chunks:
        x = model.model.embed_tokens(ids)
        embedded.append(model.model.embed_norm(x) if model.config.embedding_norm else x)
    model.model.embed_tokens.to(home)

    def context(ids: torch.Tensor) -> tuple:
        B, T = ids.shape
        position_ids = torch.arange(T, device=device).expand(B, T)
        rope = model.rotary(position_ids) if model.rotary is not None else None
        mask, is_causal = model._attention_mask(B, T, 0, None, position_ids, embedded[0].dtype)
        return rope, mask, is_causal

    contexts = [context(ids) for ids in chunks]
    if isinstance(model.model, ChimeraDecoder):  # each chunk's state: (x, x0, U-Net skip inputs)
        steps = [(b, partial(_chimera_step, model.model, v)) for v, (b, _, _) in enumerate(model.model.schedule)]
        return [(x, x, ()) for x in embedded], contexts, steps
    return embedded, contexts, [(i, partial(_block_step, block)) for i, block in enumerate(model.model.layers)]


def _calibrate(run: Callable, states: list, contexts: list[tuple], part: slice = slice(None)) -> None:
    """Run a step on (part of) the calibration states, one chunk at a time, for what hooks on the block see; a
    hook may end a chunk's pass early (_Stop)."""
    for i in range(len(states))[part]:
        try:
            run(states[i : i + 1], contexts[i : i + 1])
        except _Stop:
            pass


def _quantize_block(
    block: nn.Module,
    prefix: str,
    calibrate: Callable[..., object] | None,
    config: QuantConfig,
    checkpoint_format: str,
    emit: Callable[[LayerReport], None],
) -> None:
    """Quantize one block in place, its linears a group at a time (GPTQ with the Hessians of what
    `calibrate` feeds them), then its experts; without `calibrate`, round every layer to nearest."""
    for report in _unfit(block, prefix, config.bits):
        emit(report)
    if calibrate is None:
        for name, m in list(block.named_modules()):
            if _candidate(name, m) and _fits(m.in_features, m.out_features, config.bits):
                block.set_submodule(name, _quantized(m, rtn(m.weight, config), config, checkpoint_format))
                emit(LayerReport(f"{prefix}.{name}", "rtn", None))
    else:
        groups, called_once = _linear_groups(block, partial(calibrate, slice(1)), config.bits)
        for stage in [[group] for group in groups] if config.true_sequential else [groups]:
            _quantize_stage(block, prefix, stage, calibrate, called_once, config, checkpoint_format, emit)
    for name, experts in _fitting_experts(block, config.bits):
        for report in _quantize_experts(block, name, experts, calibrate, config, checkpoint_format):
            report.name = f"{prefix}.{report.name}"
            emit(report)


def _quantize_stage(
    block: nn.Module,
    prefix: str,
    stage: list[list[str]],
    calibrate: Callable[[], object],
    stop_early: bool,
    config: QuantConfig,
    checkpoint_format: str,
    emit: Callable[[LayerReport], None],
) -> None:
    """GPTQ on the groups of linears of one stage, from one calibration pass: a group's linears share their
    input, so they share one Hessian. With `stop_early` the pass ends at the stage's last linear."""
    hessians, hooks = {}, []
    for group in stage:
        first = block.get_submodule(group[0])
        hessian = Hessian(first.in_features, device=first.weight.device)
        hooks.append(hessian.attach(first))
        hessians.update(dict.fromkeys(group, hessian))
    if stop_early:
        hooks.append(block.get_submodule(stage[-1][-1]).register_forward_hook(_stop))
    try:
        calibrate()
    finally:
        for hook in hooks:
            hook.remove()
    for name, hessian in hessians.items():
        linear = block.get_submodule(name)
        if hessian.count == 0:
            result, used = rtn(linear.weight, config), "rtn (no calibration input)"
        else:
            result, used = gptq(linear.weight, hessian.matrix, config), "gptq"
        block.set_submodule(name, _quantized(linear, result, config, checkpoint_format))
        emit(LayerReport(f"{prefix}.{name}", used, result.loss))


class _Recorder(nn.Module):
    """Stands in for an Experts module during calibration: adds the rows each expert's `stack` receives to
    that expert's Hessian, then computes as the experts do."""

    def __init__(self, experts: Experts, stack: str, hessians: list[Hessian]) -> None:
        super().__init__()
        self.inner, self.stack, self.hessians = experts, stack, hessians

    def grouped(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if name == self.stack:
            for hessian, rows in zip(self.hessians, x.split(counts.tolist()), strict=True):
                if len(rows):
                    hessian.add(rows)
        return self.inner.grouped(name, x, counts)


def _quantize_experts(
    block: nn.Module,
    name: str,
    experts: Experts,
    run: Callable[[], object] | None,
    config: QuantConfig,
    checkpoint_format: str,
) -> list[LayerReport]:
    """Quantize every expert of both stacks (gate_up_proj, then down_proj on what the quantized gate_up
    produces), each on the calibration tokens routed to it when `run` runs the block (GPTQ); an expert that
    gets fewer than MIN_EXPERT_TOKENS of them, or every expert without `run`, is rounded to nearest.
    Replaces the module with QuantExperts."""
    reports, quantized = [], {}
    for stack in STACKS:
        stacked = getattr(experts, stack)
        hessians = [Hessian(stacked.shape[2], device=stacked.device) for _ in range(stacked.shape[0])]
        if run is not None:
            block.set_submodule(name, _Recorder(experts, stack, hessians))
            try:
                run()
            finally:
                block.set_submodule(name, experts)
        layers = []
        for e, hessian in enumerate(hessians):
            if run is None:
                result, used = rtn(stacked[e], config), "rtn"
            elif hessian.count < MIN_EXPERT_TOKENS:
                result, used = rtn(stacked[e], config), f"rtn ({hessian.count} calibration tokens routed here)"
            else:
                result, used = gptq(stacked[e], hessian.matrix, config), f"gptq ({hessian.count} tokens)"
            q, scale, zero, g_idx = result.qweight, result.scale, result.zero, result.g_idx
            layers.append(QuantLinear.from_codes(q, scale, zero, g_idx, config.bits, config.group_size, None,
                                                 checkpoint_format))  # fmt: skip
            reports.append(LayerReport(f"{name}.{stack}.{e}", used, result.loss))
        stacked.copy_(torch.stack([layer.dequantize(stacked.dtype) for layer in layers]))  # what the next stack sees
        quantized[stack] = layers
    block.set_submodule(name, QuantExperts(quantized["gate_up_proj"], quantized["down_proj"]))
    return reports


def _fitting_experts(root: nn.Module, bits: int) -> list[tuple[str, Experts]]:
    """The expert stacks under root whose shapes the GPTQ format can pack."""
    return [(name, module) for name, module in root.named_modules() if isinstance(module, Experts)
            and all(_fits(*getattr(module, stack).shape[:0:-1], bits) for stack in STACKS)]  # fmt: skip


def _candidate(name: str, module: nn.Module) -> bool:
    """A linear layer that is quantized when the format can hold its shape: any but a router."""
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEPT


def _unfit(block: nn.Module, prefix: str, bits: int) -> list[LayerReport]:
    """Reports for the block's layers (and expert stacks) that stay in full precision because of their shape."""
    shapes = [(n, m.in_features, m.out_features) for n, m in block.named_modules() if _candidate(n, m)]
    shapes += [(f"{n}.{stack}", *getattr(m, stack).shape[:0:-1]) for n, m in block.named_modules()
               if isinstance(m, Experts) for stack in STACKS]  # fmt: skip
    return [LayerReport(f"{prefix}.{name}", f"kept in full precision: {i} x {o} does not pack at {bits} bits", None)
            for name, i, o in shapes if not _fits(i, o, bits)]  # fmt: skip


def _quantized(linear: nn.Linear, result: QuantResult, config: QuantConfig, checkpoint_format: str) -> QuantLinear:
    q, scale, zero, g_idx = result.qweight, result.scale, result.zero, result.g_idx
    return QuantLinear.from_codes(q, scale, zero, g_idx, config.bits, config.group_size, linear.bias, checkpoint_format)


def _record(model: OrionLM, config: QuantConfig, checkpoint_format: str) -> None:
    """The settings, as config.json's quantization_config (what loading, and transformers, read)."""
    c = config
    settings = gptq_config(
        c.bits, c.group_size, c.desc_act, c.sym, c.damp_percent, c.static_groups, c.true_sequential, checkpoint_format
    )
    model.config = model.config.replace(quantization_config=settings)


def save_quantized(model: OrionLM, directory: Path, tokenizer: Tokenizer | None) -> None:
    """A quantized model's directory: the model (GPTQ tensors, quantization_config in config.json) and
    quantize_config.json beside it, as AutoGPTQ and GPTQModel write it (checkpoint.write_model_directory)."""
    save_checkpoint(model, directory, tokenizer, getattr(model, "generation_defaults", None) or None)
