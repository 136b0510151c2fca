"""`orionlm info` and `orionlm init`: inspect a model, write a new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import OrionError
from .common import print_json


def info(
    model: str | None = None, /, *, revision: str | None = None, preset: str | None = None, json: bool = False
) -> None:
    """Print a model's architecture and parameter counts (total; active per token for MoE; virtual, with
    looped blocks counted once per loop, for Chimera).

    Examples:
      orionlm info --preset mixtral-8x7b
      orionlm info runs/m --json

    Args:
        model: a model directory (orionlm, Hugging Face or Auron), a .gguf file or a Hub id
        revision: a branch, tag or commit of the Hub id MODEL (the same as MODEL@REV)
        preset: a preset name instead of a model (see `orionlm info --preset list`)
        json: print JSON with total_params, active_params, virtual_params and the config
    """
    from ..checkpoint import weight_bytes
    from ..config import PRESETS
    from ..config import preset as get_preset
    from ..errors import with_revision
    from ..loading import read_model_config, resolve_model_path
    from ..model import count_parameters, virtual_parameters

    if (model is None) == (preset is None):
        raise OrionError("give either a model path or --preset NAME")
    model = with_revision(model, revision)
    if preset == "list":
        print("\n".join(PRESETS))
        return
    sizes: dict[str, int] = {}
    if preset is not None:
        config = get_preset(preset)
    else:
        path = resolve_model_path(model)
        config, sizes = read_model_config(path), weight_bytes(path)
    total, active = count_parameters(config)
    virtual = virtual_parameters(config)
    if json:
        counts = {"total_params": total, "active_params": active, "virtual_params": virtual}
        print_json(counts | sizes | {"config": config.to_dict()})
        return
    rows = [
        ("name", config.name or "-"),
        ("family", config.family),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("heads (q / kv), head dim", f"{config.num_heads} / {config.num_kv_heads}, {config.head_dim}"),
        ("position", _position(config)),
        ("context", config.max_seq_len),
        ("vocab", f"{config.vocab_size} ({'tied' if config.tie_embeddings else 'untied'} embeddings)"),
    ]
    if config.num_experts:
        moe_layers = "all" if config.moe_layers is None else ",".join(map(str, config.moe_layers))
        rows += [
            ("experts", f"{config.num_experts}, top-{config.experts_per_token}, FFN {config.expert_intermediate_size}"),
            ("MoE layers", moe_layers),
        ]
        if config.shared_expert_intermediate_size:
            rows.append(("shared expert FFN", config.shared_expert_intermediate_size))
    if config.architecture == "chimera":
        bottom = config.num_layers - config.shared_layers
        rows += [
            ("blocks", f"{bottom} bottom + {config.shared_layers} shared x {config.loops} loops "
                       f"= {config.virtual_layers} virtual layers"),
            ("mixers", f"Gated DeltaNet, attention every {config.attn_interval} blocks; GDN {config.gdn_num_heads} "
                       f"heads x {config.gdn_head_dim} (values x {config.gdn_expand_v:g})"),
        ]  # fmt: skip
    if not config.num_experts or config.moe_layers is not None:
        rows.append(("dense FFN", f"{config.intermediate_size} ({config.activation})"))
    rows += [("total parameters", _human(total)), ("active per token", _human(active))]
    if virtual != total:
        rows.append(("virtual parameters", _human(virtual)))
    quant = config.quantization_config
    if quant:
        groups = "per row" if quant["group_size"] == -1 else f"groups of {quant['group_size']}"
        order = ", act order" if quant.get("desc_act") else ""
        rows.append(("quantization", f"GPTQ {quant['bits']}-bit, {groups}{order}, {'sym' if quant['sym'] else 'asym'}"))
    if sizes:
        rows.append(("weights on disk", f"{sizes['disk_bytes'] / 2**20:,.1f} MiB"))
        rows.append(("in memory (fp32 on CPU)", f"{sizes['memory_bytes'] / 2**20:,.1f} MiB"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _position(config) -> str:
    if config.position != "rope":
        return config.position
    partial = f", {config.partial_rotary_factor:g} of head dim" if config.partial_rotary_factor < 1 else ""
    return f"rope (theta {config.rope_theta:g}{partial})"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.1f}{unit})"
    return f"{n:,}"


def init(
    out_dir: Path,
    /,
    *overrides: str,
    preset: str,
    seed: int = 0,
    tokenizer: Path | None = None,
    force: bool = False,
) -> None:
    """Write a randomly initialised model directory for a preset, with optional config changes, e.g.
      orionlm init runs/moe --preset tiny-moe --hidden_size=512 --num_experts=8 --max_seq_len=2048

    Without --tokenizer the model gets a byte-level tokenizer (256 bytes + special tokens).
    When the tokenizer has more tokens than the preset's vocab_size, the vocabulary grows to fit
    (rounded up to a multiple of 64).

    Args:
        out_dir: the directory to create
        preset: a preset name (`orionlm info --preset list` lists them)
        seed: the random seed of the initial weights
        tokenizer: a directory holding tokenizer.json (e.g. from `orionlm tokenizer train`)
        force: replace out_dir if it exists
        overrides: --field=value changes to the preset's config
    """
    import torch

    from ..checkpoint import refuse_existing, save_checkpoint
    from ..config import preset as get_preset
    from ..model import OrionLM
    from ..tokenizer import Tokenizer
    from ..train.recipe import apply_override, expand_overrides

    changes: dict[str, Any] = {}
    for override in expand_overrides(overrides):
        apply_override(changes, override)

    if out_dir.exists() and any(out_dir.iterdir()):
        refuse_existing(out_dir, force)
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else Tokenizer.byte_level()
    config = get_preset(preset, **changes)
    if tok.vocab_size > config.vocab_size:
        config = config.replace(vocab_size=-(-tok.vocab_size // 64) * 64)
        print(f"vocab_size raised to {config.vocab_size} to fit the tokenizer ({tok.vocab_size} tokens)")
    torch.manual_seed(seed)
    model = OrionLM(config)
    model.reset_parameters(seed)
    save_checkpoint(model, out_dir, tok)
    print(f"wrote {out_dir} ({preset}, {sum(p.numel() for p in model.parameters()):,} parameters)")
