"""`orionlm merge`, `orionlm moe-merge` and `orionlm merge-lora`: new models from trained ones."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint import refuse_existing
from ..errors import OrionError


def merge_checkpoints(config: Path, out: Path, /, *, seed: int = 0, force: bool = False) -> None:
    """Merge models of one architecture into one, from a mergekit merge config: linear (weighted average),
    slerp, task_arithmetic, ties, dare_linear or dare_ties.

      merge_method: ties                 # or linear, slerp, task_arithmetic, dare_linear, dare_ties
      base_model: runs/base              # the task vectors' origin (slerp: the t = 0 end; linear: none)
      models:
        - model: runs/code
          parameters: {weight: 0.6, density: 0.5}
        - model: runs/chat
          parameters: {weight: 0.4, density: 0.5}
      parameters: {normalize: true}      # slerp: {t: 0.5}; dare_*: rescale; all but linear/slerp: lambda
      dtype: bfloat16                    # default: the base (else first) model's

    A parameter is a number; a list of numbers, interpolated over the layers (a gradient); or a list of
    {filter: TEXT, value: ...} entries, the first whose TEXT is in the tensor's name applying, e.g.
      t: [{filter: self_attn, value: [0, 0.5, 1]}, {filter: mlp, value: 0.7}, {value: 0.5}]

    Example:
      orionlm merge merge.yaml runs/merged

    Args:
        config: the merge YAML file
        out: the merged model directory to write
        seed: seeds DARE's random drops (each tensor's from the seed and the tensor's name)
        force: replace out if it exists
    """
    from ..merge.weights import load_merge_config, merge_models

    merge_config = load_merge_config(config)
    refuse_existing(out, force)
    merged = merge_models(merge_config, seed=seed)
    merged.save(out, write_extra=lambda tmp: shutil.copyfile(config, tmp / "merge.yaml"))
    print(f"wrote {out}: {merge_config.merge_method} merge of {len(merge_config.sources())} models")


def assemble_moe(config: Path, out: Path, /, *, seed: int = 0, force: bool = False) -> None:
    """Assemble a Mixtral-style MoE ("frankenMoE") from dense models of one architecture, with routers set
    from prompts instead of trained: everything but the MLPs comes from base_model, expert e's MLPs from its
    source_model. CONFIG is mergekit-moe's YAML format:

      base_model: runs/english            # a model directory, a .gguf file or a Hub id
      gate_mode: hidden                   # hidden, cheap_embed or random
      dtype: bfloat16                     # default: the base model's
      experts_per_token: 2
      experts:
        - source_model: runs/python
          positive_prompts: ["def main():", "import numpy as np"]
          negative_prompts: ["Once upon a time"]     # optional
          noise_scale: 0.01                          # optional: Gaussian noise on its MLP weights
          residual_scale: 0.5                        # optional: scales its down_proj
        - source_model: runs/portuguese
          positive_prompts: ["Era uma vez"]
      shared_experts:                     # optional: one, for a Qwen2-MoE with a gated shared expert
        - source_model: runs/english
          positive_prompts: ["The"]

    hidden: expert e's router row at layer i is the base model's hidden state entering layer i at the last
    token of each positive prompt, averaged, minus the same for the negative prompts, L2-normalised.
    cheap_embed: the normalised sum of the prompts' token embeddings, the same for every layer.

    Example:
      orionlm moe-merge configs/moe-merge.yaml runs/franken-moe

    Args:
        config: the moe-merge YAML file
        out: the MoE model directory to write (loads with orionlm; convert to-hf exports it for transformers)
        seed: seeds random gates and noise_scale
        force: replace out if it exists
    """
    from ..merge.moe import load_moe_merge_config, moe_merge
    from ..model import count_parameters

    merge_config = load_moe_merge_config(config)
    refuse_existing(out, force)
    merged = moe_merge(merge_config, seed=seed)
    merged.save(out, write_extra=lambda tmp: shutil.copyfile(config, tmp / "moe_merge.yaml"))
    c = merged.config
    shared = " + 1 shared expert" if c.shared_expert_intermediate_size else ""
    print(
        f"wrote {out}: {c.num_experts} experts{shared}, top-{c.experts_per_token}, {merge_config.gate_mode} gates, "
        f"{count_parameters(c)[0] / 1e6:.1f}M parameters ({c.hf_model_type} layout)"
    )


def merge_adapter(
    recipe: Path | None = None,
    /,
    *,
    adapter: Path | None = None,
    base: str | None = None,
    out: Path | None = None,
    force: bool = False,
) -> None:
    """Fold a LoRA adapter (PEFT files, written by orionlm or by peft) into its base model and write the
    result as an orionlm model directory.

    The base model comes from the recipe the adapter was trained with (its model.path; every LoRA
    checkpoint holds its resolved recipe.yaml), or from --base.

    Examples:
      orionlm merge-lora configs/sft-lora.yaml --lora_model_dir=runs/sft-lora/checkpoints/checkpoint-300
      orionlm merge-lora --base runs/m --adapter runs/adapter --out runs/m-merged

    Args:
        recipe: the training recipe (mode: lora) whose model.path is the base model
        adapter: the adapter directory (adapter_config.json, adapter_model.safetensors)
        base: the base model (a model directory, a .gguf file or a Hub id) instead of the recipe's
        out: the merged model directory to write (default: RECIPE's run.out_dir/merged)
        force: replace out if it exists
    """
    from ..checkpoint import save_checkpoint
    from ..convert.peft import load_adapter
    from ..loading import load_model
    from ..nn.lora import merge_lora

    if adapter is None:
        raise OrionError("give the adapter directory: --lora_model_dir=DIR (or --adapter DIR)")
    if (recipe is None) == (base is None):
        raise OrionError("give either the recipe the adapter was trained with or --base MODEL")
    if recipe is not None:
        from ..train.recipe import load_recipe

        loaded = load_recipe(recipe)
        if loaded.model.path is None:
            raise OrionError(f"{recipe} has no model.path: it did not train an adapter on a base model")
        base, out = loaded.model.path, out or Path(loaded.run.out_dir) / "merged"
    if out is None:
        raise OrionError("give the output directory: --out DIR (or --output_dir DIR)")
    refuse_existing(out, force)
    model, tokenizer, _ = load_model(base, device="cpu")
    config = load_adapter(model, adapter)
    merge_lora(model)
    save_checkpoint(model, out, tokenizer, getattr(model, "generation_defaults", None) or None)
    targets = ", ".join(config.target_modules + config.target_parameters)
    print(f"wrote {out} ({base} + {adapter}: rank {config.r} on {targets})")


merge_adapter.aliases = {"adapter": ["--lora-model-dir", "--lora_model_dir"], "out": ["--output-dir", "--output_dir"]}
