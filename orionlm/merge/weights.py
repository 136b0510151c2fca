"""Weight merges of models that share one architecture, from mergekit's config format: linear (a weighted
average, Wortsman et al. 2022), SLERP, task arithmetic (Ilharco et al. 2022), TIES (Yadav et al. 2023) and
DARE (Yu et al. 2023) with a linear or a TIES-style sign-consensus sum.

    merge_method: ties
    base_model: runs/base
    models:
      - model: runs/code
        parameters: {weight: 0.6, density: 0.5}
      - model: runs/chat
        parameters: {weight: 0.4, density: 0.5}
    parameters: {normalize: true}
    dtype: bfloat16

A parameter is looked up in the model's own `parameters`, then in the top-level ones, then the method's
default. Its value is a number; a list of numbers, a gradient over the layers (layer i of L reads it at
i / (L - 1), interpolating linearly; tensors outside the layers read the first value); or a list of
`{filter: TEXT, value: ...}` entries, the first whose text occurs in the tensor's name applying (an entry
without a filter matches every tensor), e.g. a different SLERP `t` for self_attn and mlp tensors.

A merge streams: each output tensor is computed from the same tensor of every model, read from disk as it is
needed, and written before the next; the float32 math runs on CHUNK entries at a time, so memory holds the
inputs of one tensor as stored and a few chunks, never a model. DARE's random drops of a tensor come from a
generator seeded from (seed, the tensor's name), drawn chunk by chunk, the same whatever order the tensors are
written in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import DTYPES, LazyTensors, TensorSpec
from ..config import ModelConfig
from .sources import (
    MergedModel,
    MergeError,
    check_tensors,
    load_config,
    model_specs,
    open_source,
    output_dtype,
    tensor_generator,
)

# method -> its parameters and their defaults (None: required)
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"weight": None, "normalize": True},
    "slerp": {"t": None},
    "task_arithmetic": {"weight": None, "normalize": False, "lambda": 1.0},
    "ties": {"weight": None, "density": 1.0, "normalize": True, "lambda": 1.0},
    "dare_linear": {"weight": None, "density": 1.0, "rescale": True, "normalize": False, "lambda": 1.0},
    "dare_ties": {"weight": None, "density": 1.0, "rescale": True, "normalize": False, "lambda": 1.0},
}
PER_MODEL = {"weight", "density"}  # the others are read from the top-level parameters only
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
CHUNK = 1 << 22  # entries per step of a merge's math: memory holds the inputs as stored and a few chunks


@dataclass
class MergeInput:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """mergekit's merge config: `orionlm merge CONFIG.yaml OUT_DIR`."""

    merge_method: str
    models: list[MergeInput]
    base_model: str | None = None  # the task vectors' origin (SLERP: the t = 0 end)
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # None: the base (else first) model's stored dtype
    tokenizer_source: str | None = None  # a model whose tokenizer the output gets; None: base, else first model

    def __post_init__(self) -> None:
        if self.merge_method not in METHODS:
            raise MergeError(f"merge_method {self.merge_method!r} is not one of {', '.join(METHODS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MergeError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        known = METHODS[self.merge_method]
        for where, parameters in [("parameters", self.parameters)] + [
            (f"models.{i}.parameters", m.parameters) for i, m in enumerate(self.models)
        ]:
            unknown = sorted(set(parameters) - set(known))
            if unknown:
                raise MergeError(f"{where}: {', '.join(unknown)} not used by {self.merge_method} (it reads "
                                 f"{', '.join(known)})")  # fmt: skip
        if self.merge_method == "linear":
            if len(self.models) < 2:
                raise MergeError("linear merges at least 2 models")
            return
        if self.base_model is None:
            raise MergeError(f"{self.merge_method} needs base_model (the models' common origin)")
        others = self.others()
        if self.merge_method == "slerp" and (len(others) != 1 or len(self.models) != 2):
            raise MergeError("slerp interpolates two models: list base_model and one other model under models")
        if not others:
            raise MergeError(f"{self.merge_method} needs at least one model besides base_model")

    def others(self) -> list[MergeInput]:
        """The models that are not the base model."""
        return [m for m in self.models if m.model != self.base_model]

    def sources(self) -> list[str]:
        """Every model to load, base first."""
        names = [self.base_model] if self.base_model else []
        return names + [m.model for m in self.models if m.model not in names]


def load_merge_config(path: str | Path) -> MergeConfig:
    return load_config(MergeConfig, path, "merge config", "merge_method, models, base_model, parameters")


def setting(value: Any, tensor: str, t: float, where: str) -> Any:
    """A parameter's value for one tensor at layer position t in [0, 1] (module docstring)."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        scaled = t * (len(value) - 1)
        i = int(scaled)
        j = min(i + 1, len(value) - 1)
        return (1 - (scaled - i)) * value[i] + (scaled - i) * value[j]
    if isinstance(value, list) and all(isinstance(v, dict) and "value" in v for v in value):
        for entry in value:
            if entry.get("filter") in (None, "*") or entry["filter"] in tensor:
                return setting(entry["value"], tensor, t, where)
        return None
    raise MergeError(f"{where}: {value!r} is not a number, a list of numbers or a list of {{filter, value}} entries")


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits in the stack, for gradients: i / (L - 1) for layer i, 0 outside the layers."""
    found = LAYER.search(name)
    if found is None:
        return 0.0
    return int(found.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _spans(numel: int) -> list[slice]:
    """Flat index ranges of CHUNK elements: the float32 (SLERP: float64) math runs on one at a time."""
    return [slice(i, min(i + CHUNK, numel)) for i in range(0, numel, CHUNK)]


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Spherical interpolation between two tensors seen as flat vectors: the angle comes from their directions,
    the result keeps their lengths' interpolation; nearly parallel (or opposite) tensors interpolate linearly.
    Returned in `dtype` (default v0's)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    dot, aa, bb = 0.0, 0.0, 0.0
    for span in _spans(a.numel()):
        x, y = a[span].double(), b[span].double()
        dot, aa, bb = dot + float(x @ y), aa + float(x @ x), bb + float(y @ y)
    cosine = max(-1.0, min(1.0, dot / (max(math.sqrt(aa), 1e-12) * max(math.sqrt(bb), 1e-12))))
    if abs(cosine) > dot_threshold:
        s0, s1 = 1 - t, t
    else:
        theta = math.acos(cosine)
        s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    out = torch.empty(v0.shape, dtype=dtype or v0.dtype)
    flat = out.view(-1)
    for span in _spans(a.numel()):
        flat[span] = s0 * a[span].double() + s1 * b[span].double()
    return out


class Trim:
    """TIES' trim of one task vector, chunk by chunk: keeps its k entries largest in magnitude, those equal to the
    k-th largest taken first to last, so exactly k survive whatever the chunking."""

    def __init__(self, magnitudes: torch.Tensor, k: int) -> None:
        """`magnitudes`: the task vector's |entries|, flat float32; reordered in place (a partial sort)."""
        values = magnitudes.numpy()
        values.partition(values.size - k)
        self.threshold = float(values[values.size - k])
        self.ties = k - int((values[values.size - k + 1 :] > self.threshold).sum())  # entries == threshold kept

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        magnitude = delta.abs()
        equal = magnitude == self.threshold
        keep = (magnitude > self.threshold) | (equal & (equal.flatten().cumsum(0) <= self.ties).view_as(equal))
        self.ties = max(0, self.ties - int(equal.sum()))
        return delta * keep


def drop(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, dividing the kept ones by it (rescale)."""
    if density >= 1:
        return delta
    kept = delta * torch.bernoulli(torch.full(delta.shape, density), generator=generator)
    return kept / density if rescale else kept


def task_vector_merge(
    base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], densities: list[float], method: str,
    normalize: bool, rescale: bool, scale: float, generator: torch.Generator, dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """base + scale * the merged task vectors (tensor - base): sparsified (ties: trim; dare_*: drop), weighted,
    and summed, with TIES' sign election for ties and dare_ties (an entry sums only the weighted deltas whose
    sign is that of the sum of all of them); normalize divides by the weights that took part. The inputs may be
    in any dtype; the math runs in float32 on CHUNK entries at a time, the result is in `dtype` (default base's)."""
    flat_base, flats = base.reshape(-1), [tensor.reshape(-1) for tensor in tensors]
    trims: list[Trim | None] = [None] * len(tensors)
    if method == "ties":
        for i, (flat, density) in enumerate(zip(flats, densities, strict=True)):
            if density < 1:
                magnitudes = torch.empty(flat.numel())
                for span in _spans(flat.numel()):
                    magnitudes[span] = (flat[span].float() - flat_base[span].float()).abs()
                trims[i] = Trim(magnitudes, max(1, int(density * flat.numel())))
                del magnitudes
    w = torch.tensor(weights).view(-1, 1)
    out = torch.empty(base.shape, dtype=dtype or base.dtype)
    for span in _spans(flat_base.numel()):
        origin = flat_base[span].float()
        deltas = []
        for flat, density, trimmer in zip(flats, densities, trims, strict=True):
            delta = flat[span].float() - origin
            if trimmer is not None:
                delta = trimmer(delta)
            elif method.startswith("dare"):
                delta = drop(delta, density, rescale, generator)
            deltas.append(delta)
        weighted = torch.stack(deltas) * w
        if method in ("ties", "dare_ties"):
            elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
            agree = (weighted.sign() == elected).float()
            merged, total = (weighted * agree).sum(dim=0), (w * agree).sum(dim=0)
            total[total == 0] = 1
        else:
            merged, total = weighted.sum(dim=0), w.sum(dim=0).expand_as(origin).clone()
            total[total.abs() < 1e-8] = 1
        if normalize:
            merged = merged / total
        out.view(-1)[span] = origin + scale * merged
    return out


def _check_same_architecture(configs: dict[str, ModelConfig]) -> None:
    def shape(c: ModelConfig) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in ("name", "extra", "hf_model_type")}

    (first, reference), *rest = configs.items()
    for name, config in rest:
        differ = [f"{k} {v} ({first}: {shape(reference)[k]})" for k, v in shape(config).items()
                  if v != shape(reference)[k]]  # fmt: skip
        if differ:
            raise MergeError(f"{name} does not have {first}'s architecture: {', '.join(differ[:4])}; weight "
                             "merges need models of one architecture and shape")  # fmt: skip


def merge_models(config: MergeConfig, seed: int = 0) -> MergedModel:
    """The merged model, its tensors computed one at a time as they are read (in float32, returned in the
    config's dtype, default the base's, else the first model's, stored dtype), and the tokenizer of
    tokenizer_source. The models are opened without reading their weights, so memory holds a few tensors,
    never a model; LoRA adapters are folded in tensor by tensor. DARE's drops for a tensor come from a generator
    seeded from (seed, the tensor's name), so they do not depend on the order tensors are written in."""
    sources = {name: open_source(name) for name in config.sources()}
    _check_same_architecture({name: source.config for name, source in sources.items()})
    first = config.sources()[0]
    reference = sources[first].config
    out_config = dataclasses.replace(reference, extra={**reference.extra, "merge": dataclasses.asdict(config)})
    specs = model_specs(out_config, output_dtype(config.dtype, sources[first]))
    for name, source in sources.items():
        check_tensors(source, {tensor: spec.shape for tensor, spec in specs.items()}, name)
    # every parameter resolved up front, so a missing or bad one fails before anything is computed or written
    parameters = {tensor: _tensor_parameters(config, tensor, layer_position(tensor, reference.num_layers))
                  for tensor in specs}  # fmt: skip

    def read(tensor: str) -> torch.Tensor:
        return _merge_tensor(config, parameters[tensor], lambda model: sources[model].tensors[tensor],
                             tensor_generator(seed, tensor), specs[tensor])  # fmt: skip

    tokenizer_source = config.tokenizer_source or first
    tokenizer = (sources.get(tokenizer_source) or open_source(tokenizer_source)).tokenizer
    return MergedModel(out_config, LazyTensors(specs, read), tokenizer)


def _tensor_parameters(config: MergeConfig, tensor: str, t: float) -> dict[str, Any]:
    """Every parameter the method reads for one tensor at layer position t: a per-model one as a list over the
    models it merges (linear: all; the others: all but the base)."""
    method, defaults = config.merge_method, METHODS[config.merge_method]

    def read(key: str, model: MergeInput | None = None) -> Any:
        scopes = [(f"parameters.{key}", config.parameters)]
        if model is not None:
            scopes.insert(0, (f"{model.model}'s parameters.{key}", model.parameters))
        for where, parameters in scopes:
            value = setting(parameters[key], tensor, t, where) if key in parameters else None
            if key == "density" and value is not None and not 0 < value <= 1:
                raise MergeError(f"{where} is {value}: a density is the fraction of each task vector kept, in (0, 1]")
            if value is not None:
                return value
        if defaults[key] is None:
            owner = f" for {model.model}" if model else ""
            raise MergeError(f"{method} needs parameter {key!r}{owner} (none given for tensor {tensor})")
        return defaults[key]

    models = config.models if method == "linear" else config.others()
    return {key: [read(key, m) for m in models] if key in PER_MODEL else read(key) for key in defaults}


def _merge_tensor(
    config: MergeConfig,
    p: dict[str, Any],
    read: Callable[[str], torch.Tensor],
    generator: torch.Generator,
    spec: TensorSpec,
) -> torch.Tensor:
    """One tensor of the merge, of `spec`'s shape and dtype, from its parameters `p` and each model's tensor as
    stored, read by model name; the math is float32 (a linear merge holds the running sum and one model's tensor)."""
    method = config.merge_method
    if method == "linear":
        weights = [float(w) for w in p["weight"]]
        total = sum(weights) if p["normalize"] and abs(sum(weights)) > 1e-8 else 1.0
        merged = torch.zeros(spec.shape)
        for w, m in zip(weights, config.models, strict=True):
            merged.add_(read(m.model), alpha=w)
        return merged.div_(total).to(spec.dtype)
    base, others = read(str(config.base_model)), config.others()
    if method == "slerp":
        return slerp(float(p["t"]), base, read(others[0].model), dtype=spec.dtype)
    return task_vector_merge(
        base, [read(m.model) for m in others], [float(w) for w in p["weight"]],
        [float(d) for d in p.get("density", [1.0] * len(others))], method, bool(p["normalize"]),
        bool(p.get("rescale", False)), float(p["lambda"]), generator, spec.dtype,
    )  # fmt: skip
