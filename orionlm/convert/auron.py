"""Auron checkpoint directories: their config.json keys (from_auron_config, to_auron_config) and tensor names.

Auron's code names the zones' blocks `bottom_blocks.{i}` and `top_blocks.{j}`; a block holds `attn`
(q/k/v/o_proj) or `gdn` (flash-linear-attention's GatedDeltaNet: q/k/v/a/b/g/o_proj, q/k/v_conv1d,
A_log, dt_bias, o_norm), the SwiGLU `ffn` (w1 gate, w3 up, w2 down) and the residual scalars
`attn_lambda`, `mlp_lambda`; the model holds `embed`, `x0_lambdas`, `skip_weights` and `layer_ids`.
The head is tied to `embed` and the RMSNorms have no weights, so neither has a tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    DEFAULT_SHARD_BYTES,
    LazyTensors,
    atomic_directory,
    model_from_tensors,
    read_config_json,
    resolve_device,
    state_dict_for_saving,
    write_safetensors,
)
from ..config import AURON_GENERATION, ConfigError, ModelConfig
from ..errors import OrionError, unknown_names
from ..model import OrionLM
from ..tokenizer import Tokenizer

# Auron's config.json keys and their ModelConfig fields (booleans and sizes that map one to one).
_AURON_KEYS = {
    "dim": "hidden_size",
    "n_heads": "num_heads",
    "n_kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "gdn_n_heads": "gdn_num_heads",
    "gdn_head_dim": "gdn_head_dim",
    "gdn_expand_v": "gdn_expand_v",
    "conv_kernel": "gdn_conv_kernel",
    "gdn_use_gate": "gdn_use_gate",
    "gdn_use_short_conv": "gdn_use_short_conv",
    "attn_interval": "attn_interval",
    "use_x0_inject": "x0_inject",
    "use_resid_lambdas": "resid_lambdas",
    "use_skip_connections": "unet_skips",
    "rope_base": "rope_theta",
    "n_physical_top": "shared_layers",
    "n_top_loops": "loops",
    "max_seq_len": "max_seq_len",
    "vocab_size": "vocab_size",
}
# What Auron's code fixes rather than configures: weightless RMSNorm (eps 1e-6) on the embeddings, in
# every block and before the tied head; no biases; no qk-norm.
_AURON_FIXED = dict(
    architecture="chimera", norm="rmsnorm_noweight", norm_eps=1e-6, embedding_norm=True, tie_embeddings=True
)


def is_auron_config(data: dict[str, Any]) -> bool:
    return "n_bottom" in data and "dim" in data


def from_auron_config(data: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from an Auron config.json. Its FFN width is int(dim x ffn_mult), unrounded, and
    its partial RoPE rotates 2 x int(head_dim x partial_rotary_factor) dims (a factor of 0.25 rotates half
    of each head), which is partial_rotary_factor = that / head_dim here."""
    unknown = [
        k for k in data if k not in (*_AURON_KEYS, "n_bottom", "ffn_mult", "partial_rotary_factor", "use_diff_attn")
    ]
    if unknown:
        raise ConfigError(f"unknown Auron config keys: {unknown_names(unknown, set(_AURON_KEYS))}")
    if data.get("use_diff_attn"):
        raise ConfigError("Auron's differential attention (use_diff_attn: true) is not supported; only false loads")
    fields = {ours: data[theirs] for theirs, ours in _AURON_KEYS.items() if theirs in data}
    dim, head_dim = data["dim"], data.get("head_dim") or data["dim"] // data["n_heads"]
    fields["num_layers"] = data["n_bottom"] + data.get("n_physical_top", 0)
    fields["intermediate_size"] = int(dim * data.get("ffn_mult", 2.67))
    fields["partial_rotary_factor"] = 2 * int(head_dim * data.get("partial_rotary_factor", 0.25)) / head_dim
    return _AURON_FIXED | fields


def to_auron_config(config: ModelConfig) -> dict[str, Any]:
    """The Auron config.json of a chimera config (the inverse of from_auron_config). ffn_mult is the
    shortest decimal that gives the same width (2.67 for 4101 at dim 1536, not 2.669921875)."""
    fixed = {k: getattr(config, k) for k in _AURON_FIXED}
    if fixed != _AURON_FIXED or config.qkv_bias or config.qk_norm or config.o_bias:
        raise ConfigError(f"only Auron-layout chimera models export to Auron's format ({_AURON_FIXED}, no biases)")
    if config.thinks:
        raise ConfigError("a Quiet-STaR model's meta embeddings and mixing head have no place in Auron's format")
    data = {theirs: getattr(config, ours) for theirs, ours in _AURON_KEYS.items()}
    data["n_bottom"] = config.num_layers - config.shared_layers
    exact = config.intermediate_size / config.hidden_size
    shortest = (round(exact, digits) for digits in range(1, 16))
    data["ffn_mult"] = next((m for m in shortest if int(config.hidden_size * m) == config.intermediate_size), exact)
    data["partial_rotary_factor"] = config.rotary_dim / 2 / config.head_dim
    data["use_diff_attn"] = False
    return data


# (Auron's name, ours) for the parts of a block, by prefix
_BLOCK_PARTS = [
    ("attn.", "self_attn."),
    ("gdn.", "linear_attn."),
    ("ffn.w1.", "mlp.gate_proj."),
    ("ffn.w3.", "mlp.up_proj."),
    ("ffn.w2.", "mlp.down_proj."),
    ("attn_lambda", "attn_lambda"),
    ("mlp_lambda", "mlp_lambda"),
]
_TOP = {"embed.weight": "model.embed_tokens.weight"} | {
    name: f"model.{name}" for name in ("x0_lambdas", "skip_weights", "layer_ids")
}
_BLOCK = re.compile(r"(bottom|top)_blocks\.(\d+)\.(.+)")


def _rename_block_part(rest: str, to_ours: bool) -> str | None:
    for theirs, ours in _BLOCK_PARTS:
        old, new = (theirs, ours) if to_ours else (ours, theirs)
        if rest.startswith(old):
            return new + rest[len(old) :]
    return None


def name_to_orionlm(name: str, config: ModelConfig) -> str | None:
    """Our name for one of Auron's tensor names; None when it is not one of theirs."""
    if name in _TOP:
        return _TOP[name]
    match = _BLOCK.fullmatch(name)
    if not match:
        return None
    zone, index, rest = match.groups()
    layer = int(index) + (config.num_layers - config.shared_layers if zone == "top" else 0)
    part = _rename_block_part(rest, to_ours=True)
    return None if part is None else f"model.layers.{layer}.{part}"


def name_to_auron(name: str, config: ModelConfig) -> str:
    """Auron's name for one of ours (the inverse of name_to_orionlm)."""
    for theirs, ours in _TOP.items():
        if name == ours:
            return theirs
    index, rest = name.removeprefix("model.layers.").split(".", 1)
    bottom = config.num_layers - config.shared_layers
    layer = int(index)
    zone = f"bottom_blocks.{layer}" if layer < bottom else f"top_blocks.{layer - bottom}"
    part = _rename_block_part(rest, to_ours=False)
    assert part is not None, name  # every chimera tensor name is in the tables above
    return f"{zone}.{part}"


def read_auron(directory: Path) -> tuple[ModelConfig, LazyTensors]:
    """An Auron checkpoint's config, and its tensors under orionlm's names (read on demand)."""
    try:
        config = ModelConfig.from_dict(from_auron_config(read_config_json(directory)) | {"name": directory.name})
    except (ConfigError, TypeError) as e:
        raise OrionError(f"{directory / 'config.json'}: {e}") from None
    stored = LazyTensors.from_directory(directory)
    names = {}
    for name in stored:
        ours = name_to_orionlm(name, config)
        if ours is None:
            raise OrionError(f"{directory}: tensor {name!r} is not part of Auron's layout (see orionlm.convert.auron)")
        names[ours] = name
    return config, stored.renamed(names)


def load_auron(
    directory: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[OrionLM, Tokenizer | None]:
    """Load an Auron checkpoint directory (config.json with Auron's keys, safetensors with its names)."""
    directory = Path(directory)
    device, dtype = resolve_device(device, dtype)
    config, tensors = read_auron(directory)
    model = model_from_tensors(config, tensors, device, dtype, str(directory))
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    return model, tokenizer


def save_auron(
    model: OrionLM,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """write_auron of a model in memory."""
    return write_auron(model.config, state_dict_for_saving(model), directory, tokenizer, generation_config)


def write_auron(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a chimera model as an Auron checkpoint directory, atomically, with generation_config.json: the
    given sampling defaults, else Auron's (its presence penalty keeps the model from looping). `tensors` are the
    model's (as checkpoint.model_tensors gives them), read, renamed and written one at a time."""
    if config.architecture != "chimera":
        raise OrionError(f"only chimera models have an Auron form; this one is {config.family}")
    auron = to_auron_config(config)
    tensors = LazyTensors.of(tensors)
    renamed = tensors.renamed({name_to_auron(name, config): name for name in tensors})
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(auron, indent=2) + "\n")
        generation = json.dumps(generation_config or AURON_GENERATION, indent=2)
        (tmp / "generation_config.json").write_text(generation + "\n")
        write_safetensors(renamed, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return directory
