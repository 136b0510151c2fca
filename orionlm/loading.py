"""`load_model`: one entry point for orionlm directories, Hugging Face directories, GGUF files
and Hugging Face Hub ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import (
    LazyTensors,
    model_from_tensors,
    read_config_json,
    read_generation_config,
    read_orionlm_config,
    resolve_device,
)
from .config import ModelConfig
from .convert.auron import is_auron_config, read_auron
from .convert.peft import ADAPTER_CONFIG, load_adapter, thinking_base
from .errors import OrionError, not_here_nor_on_hub, read_json_object, split_revision
from .model import OrionLM
from .tokenizer import Tokenizer

# What a model directory needs; nothing executable is ever fetched.
MODEL_DIR = "model"  # in a training run directory: its final model
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
STATE_JSON = "trainer_state.json"  # in every complete training checkpoint (written last)


def find_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of a training run, oldest first."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("*/" + STATE_JSON):
        found.append((json.loads(path.read_text())["step"], path.parent))
    return sorted(found)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local path as is (a training run directory: its newest checkpoint, else its final model RUN/model, which
    a finished run's newest checkpoint equals); anything else of the form 'org/name' (or 'org/name@REV', REV a
    branch, tag or commit) is taken as a Hub id and downloaded (safetensors only). One that is neither is one line
    saying both: not found locally, and not downloaded as an id."""
    path = Path(name_or_path).expanduser()
    run = (path / "checkpoints").is_dir() or (path / MODEL_DIR).is_dir()
    if path.is_dir() and not (path / "config.json").exists() and run:
        found = find_checkpoints(path)
        if found:
            return found[-1][1]
        if not (path / MODEL_DIR).is_dir():
            raise OrionError(f"{path} is a training run without a complete checkpoint yet")
        return path / MODEL_DIR
    if path.exists():
        return path
    return _download(str(name_or_path))


def _download(name: str) -> Path:
    """The local snapshot of Hub id `name` (ID or ID@REV), downloaded unless cached."""
    repo, revision = split_revision(name)
    if revision is not None and Path(repo).expanduser().exists():
        raise OrionError(f"{name}: {repo} is a local path, and a revision (@{revision}) applies to Hub ids only")
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise OrionError(f"{name} does not exist (not a local path, and not a Hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, HFValidationError, OSError) as e:
        raise OrionError(
            not_here_nor_on_hub(name, "id", e, otherwise=". Check the path, or the id and your connection")
        ) from None


@dataclass
class ModelSource:
    """A model on disk, opened without reading its weights: its config, its tensors under orionlm's names in
    their stored dtypes (read one at a time, on demand), its tokenizer and its sampling defaults."""

    path: Path
    config: ModelConfig
    tensors: LazyTensors
    tokenizer: Tokenizer | None
    generation: dict[str, Any]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model's full-precision weights are stored in: its embedding's."""
        return self.tensors.specs["model.embed_tokens.weight"].dtype

    def load(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OrionLM:
        """The model, each tensor read once and converted to `dtype` (fp32 on CPU, bf16 on CUDA by default)."""
        device, dtype = resolve_device(device, dtype)
        model = model_from_tensors(self.config, self.tensors, device, dtype, str(self.path))
        model.generation_defaults = self.generation
        return model


def open_model(name_or_path: str | Path) -> ModelSource:
    """An orionlm, Hugging Face or Auron directory, a .gguf file, a training run (its newest checkpoint) or a
    Hub id, opened as a ModelSource."""
    path = resolve_model_path(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise OrionError(f"{path} is a file but not a .gguf file; pass a model directory or a GGUF file")
        from .convert.gguf import read_gguf_model

        config, tensors, tokenizer = read_gguf_model(path)
        return ModelSource(path, config, tensors, tokenizer, {})
    data = read_config_json(path)
    if is_auron_config(data):
        config, tensors = read_auron(path)
    elif data.get("model_type", "orionlm") == "orionlm":
        config, tensors = read_orionlm_config(path), LazyTensors.from_directory(path)
    else:
        from .convert.hf import hf_tensors, read_hf_config

        config = read_hf_config(path)
        tensors = hf_tensors(config, LazyTensors.from_directory(path), str(path))
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    return ModelSource(path, config, tensors, tokenizer, read_generation_config(path))


def load_model(
    name_or_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | Literal["auto"] | None = None,
) -> tuple[OrionLM, Tokenizer | None, torch.device]:
    """Load a model and its tokenizer from an orionlm, Hugging Face or Auron directory, a .gguf file,
    a LoRA adapter directory (on the base model it names), or a Hub id; returns (model, tokenizer, device).
    fp32 on CPU, bf16 on CUDA unless dtype is given ("auto": the dtype the weights are stored in); weights
    already in that dtype are not copied."""
    path = resolve_model_path(name_or_path)
    if is_adapter(path):
        return _load_adapted(path, device, dtype)
    source = open_model(path)
    device, dtype = resolve_device(device, source.dtype if dtype == "auto" else dtype)
    return source.load(device, dtype), source.tokenizer, device


def is_adapter(path: Path) -> bool:
    """Whether a (resolved) path is a LoRA adapter directory rather than a model."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base_name(adapter: Path) -> str | None:
    """The base model a LoRA adapter was trained on, as its adapter_config.json names it (none: not named): a Hub id
    with PEFT's `revision` beside it is ID@REV."""
    config = read_json_object(adapter / ADAPTER_CONFIG)
    base, revision = config.get("base_model_name_or_path"), config.get("revision")
    return f"{base}@{revision}" if base and revision else base or None


def same_model(a: str, b: str) -> bool:
    """Whether two model names mean one model: the same name, or local paths to one directory (a training run
    standing for its newest checkpoint). A Hub id is not downloaded to compare it with a local copy."""
    if a == b:
        return True
    first, second = Path(a).expanduser(), Path(b).expanduser()
    if not (first.exists() and second.exists()):
        return False
    return resolve_model_path(first).resolve() == resolve_model_path(second).resolve()


def open_adapter_base(adapter: Path) -> ModelSource:
    """The base model named in a LoRA adapter's config, opened, with the tokenizer saved beside the adapter (the
    fine-tuning run's own) when there is one."""
    base = adapter_base_name(adapter)
    if not base:
        raise OrionError(f"{adapter} is a LoRA adapter that does not name its base model; "
                         f"run orionlm merge-lora --base MODEL --adapter {adapter} --out DIR")  # fmt: skip
    if (resolve_model_path(base) / ADAPTER_CONFIG).is_file():  # also what keeps an adapter from naming itself
        raise OrionError(f"the base model of adapter {adapter} is another adapter ({base}); "
                         "merge that one into its base first (orionlm merge-lora)")  # fmt: skip
    source = open_model(base)
    if (adapter / "tokenizer.json").is_file():
        source.tokenizer = Tokenizer.load(adapter)
    return source


def _load_adapted(
    adapter: Path, device: torch.device | str | None, dtype: torch.dtype | Literal["auto"] | None
) -> tuple[OrionLM, Tokenizer | None, torch.device]:
    """The base model named in a LoRA adapter's config, with the adapter on it (unmerged); a Quiet-STaR adapter's
    base thinks, with its trained thinking head."""
    source = open_adapter_base(adapter)
    device, dtype = resolve_device(device, source.dtype if dtype == "auto" else dtype)
    model = thinking_base(source.load(device, dtype), source.tokenizer, adapter)
    load_adapter(model, adapter)
    return model, source.tokenizer, device


def read_model_config(name_or_path: str | Path) -> ModelConfig:
    """The ModelConfig of a model directory (orionlm, Hugging Face or Auron), a .gguf file or a Hub id,
    without reading the weights."""
    return open_model(name_or_path).config
