"""Read and write a model directory: config.json, safetensors (sharded past a size), tokenizer,
chat template and generation defaults. Writes are atomic; reads never unpickle."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import PRESET_GENERATION, ConfigError, ModelConfig
from .errors import OrionError, read_json_object
from .model import OrionLM
from .tokenizer import Tokenizer

SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a LoRA adapter (PEFT's names)
QUANTIZE_CONFIG = "quantize_config.json"  # a GPTQ model's settings, beside config.json (AutoGPTQ's name)
DEFAULT_SHARD_BYTES = 5 * 1024**3
DEFAULT_GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 256}


class CheckpointError(OrionError):
    """A model directory that cannot be read; the message names the file and the tensor."""


def resolve_device(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when available; one asked for must exist here, see check_device) and dtype: bf16 on
    CUDA; fp32 on CPU, where bf16 matmuls have no native support and are slow."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def check_device(device: torch.device | str, option: str = "--device") -> torch.device:
    """`device` as a torch.device when this torch on this machine can compute on it; else an OrionError that
    names it as `option` (where the user gave it) and says what to use instead. Without the check, torch fails
    late with "AssertionError: Torch not compiled with CUDA enabled"."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise OrionError(f"{option} {device}: not a device; use cpu, cuda, cuda:N or mps") from None
    why = _unavailable(parsed)
    if why is not None:
        raise OrionError(f"{option} {device}: {why}; use {option} cpu")
    return parsed


def _unavailable(device: torch.device) -> str | None:
    """Why this torch on this machine cannot compute on `device`, or None when it can."""
    build = f"torch {torch.__version__}"
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch has no CUDA ({build})"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"no CUDA device is visible ({build}; check the driver and CUDA_VISIBLE_DEVICES)"
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        built = "no Apple GPU (MPS) is available" if torch.backends.mps.is_built() else "this torch has no MPS"
        return f"{built} ({build})"
    return None


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is {directory} a model directory?")
    return read_json_object(path, CheckpointError)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names users give
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def stored_dtype(directory: str | Path) -> torch.dtype:
    """The dtype of the first floating tensor in a directory's safetensors (float32 when there is none)."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None
    return torch.float32


def dtype_from_name(name: str, source: Path) -> torch.dtype:
    """The dtype a user names (a key of DTYPES, or "auto": a directory's stored dtype, float32 for a file)."""
    if name != "auto":
        return DTYPES[name]
    return torch.float32 if source.is_file() else stored_dtype(source)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and dtype, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors by name, read one at a time on demand: `specs` gives every name's shape and dtype without
    reading data, `lazy[name]` reads that one tensor in its stored dtype. Nothing stays open between reads,
    so a tensor's pages of a memory-mapped file leave memory once the caller drops the tensor."""

    def __init__(self, specs: dict[str, TensorSpec], read: Callable[[str], torch.Tensor]) -> None:
        self.specs = specs
        self._read = read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._read(name)

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def renamed(self, names: dict[str, str]) -> LazyTensors:
        """The tensors under new names: `names` maps each new name to its name here."""
        return LazyTensors({new: self.specs[old] for new, old in names.items()}, lambda new: self._read(names[new]))

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> LazyTensors:
        """Any Mapping of tensors as a LazyTensors (itself when it is one), its specs read off the tensors."""
        if isinstance(tensors, LazyTensors):
            return tensors
        return cls({name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}, tensors.__getitem__)

    def cast(self, dtype: torch.dtype) -> LazyTensors:
        """The same tensors converted to `dtype` as each is read, but for a GPTQ layer's (codes, float16 scales and
        bias) and integer tensors, which keep their stored dtypes."""
        kept = {name for name, spec in self.specs.items()
                if not spec.dtype.is_floating_point or f"{name.rsplit('.', 1)[0]}.qweight" in self.specs}  # fmt: skip
        specs = {name: spec if name in kept else TensorSpec(spec.shape, dtype) for name, spec in self.specs.items()}
        return LazyTensors(specs, lambda name: self._read(name) if name in kept else self._read(name).to(dtype))

    @classmethod
    def from_directory(cls, directory: Path) -> LazyTensors:
        """The tensors of model.safetensors or of the shards listed in model.safetensors.index.json (orionlm or
        Hugging Face layout), memory-mapped."""
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is corrupt ({e}); it must hold a 'weight_map'") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory} has no model.safetensors (nor {SAFETENSORS_INDEX})")
        specs: dict[str, TensorSpec] = {}
        location: dict[str, Path] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing (listed in {SAFETENSORS_INDEX})")
            with _open_safetensors(path) as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    specs[key] = TensorSpec(tuple(tensor.get_shape()), _safetensors_dtype(tensor.get_dtype(), path))
                    location[key] = path

        def read(key: str) -> torch.Tensor:
            with _open_safetensors(location[key]) as f:
                return f.get_tensor(key)

        return cls(specs, read)


SAFETENSORS_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _safetensors_dtype(name: str, path: Path) -> torch.dtype:
    for dtype, stored in SAFETENSORS_NAMES.items():
        if stored == name:
            return dtype
    raise CheckpointError(f"{path}: safetensors dtype {name} is not supported")


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open, with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""
    return dict(LazyTensors.from_directory(directory))


def model_from_tensors(
    config: ModelConfig, tensors: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype, source: str
) -> OrionLM:
    """Build the model on the meta device and adopt the given tensors, checking every name and shape. Each tensor
    is read once and converted to `dtype` (quantized ones keep theirs), so a LazyTensors source in the dtype
    asked for is never copied: memory holds the model once."""
    model = _meta_model(config, tensors)
    load_tensors(model, model_tensors(config, tensors, source, model), device, dtype, source)
    model.init_buffers(device)
    return model.eval()


def model_tensors(
    config: ModelConfig, tensors: Mapping[str, torch.Tensor], source: str, model: OrionLM | None = None
) -> LazyTensors:
    """The tensors a model of `config` holds, checked by name and shape against it before any is read, in its
    state dict's order and without a tied head: what save_checkpoint writes, whatever the source's layout, so
    every exporter writes the same file from any source of one model."""
    lazy = LazyTensors.of(tensors)
    expected = (model or _meta_model(config, lazy)).state_dict()
    names = set(lazy)
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        names.discard("lm_head.weight")
    missing = sorted(set(expected) - names)
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, want in expected.items():
        if lazy.specs[name].shape != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {lazy.specs[name].shape}, config.json "
                                  f"implies {tuple(want.shape)}")  # fmt: skip
    return LazyTensors({name: lazy.specs[name] for name in expected}, lazy.__getitem__)


def meta_model(config: ModelConfig, tensors: Mapping[str, torch.Tensor], source: str) -> OrionLM:
    """The model built on the meta device, with `tensors` checked against it (model_tensors); load_tensors then
    fills it, all at once or a part at a time."""
    model = _meta_model(config, tensors)
    model_tensors(config, tensors, source, model)
    return model.eval()


def _meta_model(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> OrionLM:
    """The model on the meta device, its GPTQ layers where the tensors hold codes."""
    from .quant.linear import quantized_shells

    with torch.device("meta"):
        model = OrionLM(config)
        if config.quantization_config is not None:
            quantized_shells(model, config.quantization_config, tensors)
    return model


def load_tensors(
    module: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    prefix: str = "",
    exclude: tuple[str, ...] = (),
) -> None:
    """Read each of module's tensors still on the meta device (but those whose names start with one of
    `exclude`) from tensors[prefix + name] (checked by model_tensors or meta_model), and adopt it on `device` in
    `dtype` (GPTQ's tensors keep theirs). A whole model's tied LM head (not among `tensors`) is tied again."""
    state = {}
    for name, want in module.state_dict().items():
        if not want.is_meta or name.startswith(exclude) or prefix + name not in tensors:
            continue
        tensor = tensors[prefix + name]
        if tensor.dtype != want.dtype and not (tensor.is_floating_point() and want.is_floating_point()):
            raise CheckpointError(f"{source}: tensor {prefix + name!r} has dtype {tensor.dtype}; expected {want.dtype}")
        quantized = name.rsplit(".", 1)[-1] in QUANT_BUFFERS
        state[name] = tensor.to(device=device, dtype=want.dtype if quantized else dtype)
    module.load_state_dict(state, strict=False, assign=True)
    if isinstance(module, OrionLM) and module.config.tie_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight


QUANT_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")  # a GPTQ layer's tensors keep their stored dtypes


def weight_bytes(directory: Path) -> dict[str, int]:
    """Bytes of a model directory's safetensors files on disk, and of its tensors once loaded for CPU (float
    tensors as float32, quantized ones as stored); read from the file headers, not the weights. Empty for a
    file or a directory without safetensors."""
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return {}
    memory = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                numel = math.prod(tensor.get_shape())
                stored = {"F16": 2, "BF16": 2, "I64": 8, "U8": 1, "I8": 1}.get(tensor.get_dtype(), 4)
                memory += numel * (stored if key.rsplit(".", 1)[-1] in QUANT_BUFFERS else 4)
    return {"disk_bytes": sum(f.stat().st_size for f in files), "memory_bytes": memory}


def read_orionlm_config(directory: Path) -> ModelConfig:
    """The ModelConfig of an orionlm model directory."""
    try:
        return ModelConfig.from_dict(read_config_json(directory))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None


def load_checkpoint(
    directory: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[OrionLM, Tokenizer | None]:
    """Load an orionlm model directory; the tokenizer is None when the directory has none."""
    directory = Path(directory)
    device, dtype = resolve_device(device, dtype)
    config = read_orionlm_config(directory)
    model = model_from_tensors(config, LazyTensors.from_directory(directory), device, dtype, str(directory))
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    return model, tokenizer


def read_generation_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return {}
    return read_json_object(path, CheckpointError)


def _id_list(value: int | list[int] | None) -> list[int]:
    """generation_config.json's eos_token_id (an id, a list of ids or absent) as a list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def generation_with_stops(
    config: ModelConfig, tokenizer: Tokenizer | None, generation: dict[str, Any] | None
) -> dict[str, Any]:
    """What a model's generation_config.json holds: `generation` (None: orionlm's sampling defaults and the
    preset's), the bos and pad ids it lacks (the model's Hugging Face ids, else the tokenizer's), and as
    eos_token_id every id generation stops at: its own, the model's, the tokenizer's EOS and the chat template's
    end-of-turn token. transformers stops only at these, so a chat model without its end-of-turn id never stops."""
    data = dict((DEFAULT_GENERATION | PRESET_GENERATION.get(config.name, {})) if generation is None else generation)
    known = config.extra.get("hf_token_ids", {})
    for key, own in (("bos_token_id", "bos_id"), ("pad_token_id", "pad_id")):
        value = data.get(key, known.get(key, None if tokenizer is None else getattr(tokenizer, own)))
        if value is not None:
            data[key] = value
    stops = [*_id_list(data.get("eos_token_id")), *_id_list(data.pop("stop_token_ids", None)),
             *_id_list(known.get("eos_token_id"))]  # fmt: skip
    if tokenizer is not None:
        stops += [i for i in (tokenizer.eos_id, tokenizer.end_of_turn_id) if i is not None]
    stops = list(dict.fromkeys(stops))
    if stops:
        data["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return data


def state_dict_for_saving(model: OrionLM) -> dict[str, torch.Tensor]:
    """The model's tensors, contiguous on CPU, without the tied head (safetensors forbids aliases)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """model.safetensors, or numbered shards plus an index when the total passes max_shard_bytes. Tensors are
    read from `tensors` one at a time as they are written, so a LazyTensors source streams: memory holds one
    tensor, not the model."""
    specs = LazyTensors.of(tensors).specs
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    if len(shards) == 1:
        _write_safetensors_file(directory / "model.safetensors", shards[0], specs, tensors)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors_file(directory / file, shard, specs, tensors)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs.values())}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_safetensors_file(
    path: Path, names: list[str], specs: dict[str, TensorSpec], tensors: Mapping[str, torch.Tensor]
) -> None:
    """One safetensors file (metadata {"format": "pt"}), its header from the specs, then each tensor's bytes as
    it is read. Larger elements first, as safetensors orders them, so every tensor is aligned to its dtype."""
    names = sorted(names, key=lambda name: (-specs[name].dtype.itemsize, name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        spec = specs[name]
        header[name] = {"dtype": SAFETENSORS_NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            tensor = tensors[name].detach().to("cpu").contiguous()
            if (tuple(tensor.shape), tensor.dtype) != (specs[name].shape, specs[name].dtype):
                raise CheckpointError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, not as announced")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def refuse_existing(path: Path, force: bool) -> None:
    """Outputs are replaced only when asked (--force), and then only what orionlm writes: a file, an empty
    directory or a model directory. Any other directory (a folder of runs, data) is never deleted."""
    if not path.exists():
        return
    if not force:
        raise OrionError(f"{path} exists; pass --force to replace it")
    if path.is_dir() and any(path.iterdir()) and not is_model_directory(path):
        raise OrionError(f"{path} is not a model directory, so it is never replaced, not even with --force (that "
                         "would delete everything in it); choose another output path")  # fmt: skip


def is_model_directory(path: Path) -> bool:
    """config.json beside safetensors weights (a model, an Auron checkpoint) or a LoRA adapter."""
    weights = ("model.safetensors", SAFETENSORS_INDEX)
    return (
        (path / "config.json").is_file()
        and any((path / w).is_file() for w in weights)
        or all((path / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    )


def _out_of_space(error: BaseException, directory: Path) -> bool:
    """Whether a write failed for want of disk space: ENOSPC itself, or the RuntimeError that torch.save's
    writer turns it into (then the disk is seen to be full)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and "write" in str(error) and shutil.disk_usage(directory).free < 2**20


def _disk_full(target: Path) -> CheckpointError:
    return CheckpointError(f"the disk is full: {target} was not written (nothing of it is left behind); free some "
                           "space and run again")  # fmt: skip


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """A temporary sibling path to write a single-file output to; on success it replaces `target`, on failure it
    is deleted, a full disk reported as atomic_directory reports it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException as e:
        full = _out_of_space(e, target.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise _disk_full(target) from None
        raise
    os.replace(tmp, target)


class atomic_directory:
    """A context manager yielding a temporary sibling of `target`; on success it replaces target."""

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            full = _out_of_space(exc, self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if full:
                raise _disk_full(self.target) from None
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    model: OrionLM,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    tensors: dict[str, torch.Tensor] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete model directory atomically (a temporary directory, then a rename).

    `tensors` replaces the model's own state dict (e.g. one gathered from FSDP shards); `write_extra`
    adds files (e.g. the training state) to the directory before it is renamed into place."""
    state = tensors if tensors is not None else state_dict_for_saving(model)
    return write_model_directory(
        model.config, state, directory, tokenizer, generation_config, max_shard_bytes, write_extra
    )


def save_model(
    model: OrionLM,
    path: str | Path,
    tokenizer: Tokenizer | None = None,
    generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Save a model (and its tokenizer) as a model directory that load_model reads back as it was: the sampling
    defaults it was loaded with (its generation_config.json) go along unless `generation_config` replaces them.

    The directory appears whole or not at all. An existing model directory at `path` is replaced; any other
    existing directory or file is refused, nothing in it deleted."""
    path = Path(path)
    if path.is_file():
        raise OrionError(f"{path} is a file; a model is saved as a directory")
    refuse_existing(path, force=True)
    if generation_config is None:
        generation_config = getattr(model, "generation_defaults", None) or None
    return save_checkpoint(model, path, tokenizer, generation_config, max_shard_bytes)


def write_model_directory(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """save_checkpoint without a model: the config and tensors (a LazyTensors streams them to the shards)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config.save(tmp / "config.json")
        write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        generation = generation_with_stops(config, tokenizer, generation_config)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if config.quantization_config is not None:  # beside config.json, as AutoGPTQ and GPTQModel write it
            (tmp / QUANTIZE_CONFIG).write_text(json.dumps(config.quantization_config, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
    return directory
