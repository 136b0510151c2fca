"""`orionlm merge`, `orionlm moe-merge` and `orionlm merge-lora`: new models from trained ones."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

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
    from ..checkpoint import refuse_existing
    from ..merge.weights import load_merge_config, merge_models
    from ..train.recipe import recipe_file

    config = recipe_file(config)
    merge_config = load_merge_config(config)
    refuse_existing(out, force)
    merged = merge_models(merge_config, seed=seed)
    merged.save(out, write_extra=lambda tmp: shutil.copyfile(config, tmp / "merge.yaml"))
    print(f"wrote {out}: {merge_config.merge_method} merge of {len(merge_config.sources())} models")


def assemble_moe(config: Path, out: Path, /, *, seed: int = 0, force: bool = False) -> None:
    """Assemble a Mixtral-style MoE ("frankenMoE") from dense models of one architecture, with routers set
    from prompts instead of trained: everything but the MLPs comes from base_model, expert e's MLPs from its
    source_model. CONFIG is mergekit-moe's YAML format:

      base_model: runs/english            # a model directory, a .gguf file or a Hub id (ID@REV: a revision)
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
      orionlm moe-merge recipe:moe-merge runs/franken-moe      # the recipe that ships with orionlm

    Args:
        config: the moe-merge YAML file (or recipe:NAME)
        out: the MoE model directory to write (loads with orionlm; convert to-hf exports it for transformers)
        seed: seeds random gates and noise_scale
        force: replace out if it exists
    """
    from ..checkpoint import refuse_existing
    from ..merge.moe import load_moe_merge_config, moe_merge
    from ..model import count_parameters
    from ..train.recipe import recipe_file

    config = recipe_file(config)
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
    revision: str | None = None,
    out: Path | None = None,
    force: bool = False,
) -> None:
    """Fold a LoRA adapter (PEFT files, written by orionlm or by peft) into its base model and write the
    result as an orionlm model directory: whatever the run trained, so the adapter of a Quiet-STaR run with a lora
    section gives a whole thinking model (the base with the thought tokens, the adapters folded in, and the
    thinking head and meta embeddings it trained), and the tokenizer saved beside the adapter goes with it.

    The base model is the one the adapter was trained on, as its adapter_config.json names it
    (base_model_name_or_path), whatever a recipe says. --base gives the base of an adapter that names none or
    whose base has moved, and the full-precision model for an adapter trained on a quantized one (QLoRA); any
    other --base than the adapter's own base is refused. A RECIPE (the training recipe, a path or recipe:NAME)
    fills in what the adapter does not say.
    The output goes by default to run.out_dir/merged of the recipe saved beside the adapter (every orionlm
    LoRA checkpoint holds its resolved recipe.yaml), else of RECIPE.

    Examples:
      orionlm merge-lora --lora_model_dir=runs/sft-lora/model
      orionlm merge-lora recipe:sft-lora --lora_model_dir=runs/sft-lora/model
      orionlm merge-lora --base runs/m --adapter runs/adapter --out runs/m-merged

    Args:
        recipe: the training recipe (with adapters), for an adapter that names no base and has no recipe.yaml
        adapter: the adapter directory (adapter_config.json, adapter_model.safetensors)
        base: the base model (a model directory, a .gguf file or a Hub id), for an adapter that names none or
            whose base has moved
        revision: a branch, tag or commit of the Hub id BASE (the same as BASE@REV)
        out: the merged model directory to write (default: run.out_dir/merged of the adapter's recipe)
        force: replace out if it exists
    """
    from ..checkpoint import refuse_existing, save_model
    from ..convert.peft import attach_adapter, read_adapter, thinking_base
    from ..errors import with_revision
    from ..loading import load_model
    from ..nn.lora import merge_lora
    from ..tokenizer import Tokenizer
    from ..train.recipe import load_recipe

    if adapter is None:
        raise OrionError("give the adapter directory: --lora_model_dir=DIR (or --adapter DIR)")
    lora, factors = read_adapter(adapter)
    given = load_recipe(recipe) if recipe is not None else None
    base = _merge_base(adapter, with_revision(base, revision), given.model.path if given else None)
    if out is None:
        saved = adapter / "recipe.yaml"
        trained = load_recipe(saved) if saved.is_file() else given
        if trained is None:
            raise OrionError("give the output directory: --out DIR (or --output_dir DIR)")
        out = Path(trained.run.out_dir) / "merged"
    refuse_existing(out, force)
    model, tokenizer, _ = load_model(base, device="cpu")
    if (adapter / "tokenizer.json").is_file():  # the run's own (a Quiet-STaR run's holds the thought tokens)
        tokenizer = Tokenizer.load(adapter)
    model = thinking_base(model, tokenizer, adapter)
    attach_adapter(model, lora, factors, adapter)
    merge_lora(model)
    save_model(model, out, tokenizer)  # with the base's sampling defaults
    targets = ", ".join(lora.target_modules + lora.target_parameters)
    full = f", {', '.join(lora.modules_to_save)} trained fully" if lora.modules_to_save else ""
    print(f"wrote {out} ({base} + {adapter}: rank {lora.r} on {targets}{full})")


def _merge_base(adapter: Path, base: str | None, recipe_base: str | None) -> str:
    """The model to fold the adapter into: --base, checked against the base the adapter names; else that one
    (a recipe naming another gets a note); else the recipe's model.path."""
    from ..loading import adapter_base_name, read_model_config, same_model

    named = adapter_base_name(adapter)
    if base is not None:
        # Another base is refused only where the adapter's own is here to compare with, and is no quantized
        # model: a QLoRA adapter merges into the full-precision model that was quantized.
        other = named and Path(named).expanduser().exists() and not same_model(base, named)
        if other and not read_model_config(named).quantization_config:
            raise OrionError(f"adapter {adapter} was trained on {named}, not on --base {base}: leave out --base "
                             f"to merge it onto {named}")  # fmt: skip
        return base
    if named:
        if recipe_base and not same_model(recipe_base, named):
            sys.stderr.write(f"note: adapter {adapter} was trained on {named}, not on the recipe's model.path "
                             f"{recipe_base}; merging onto {named}\n")  # fmt: skip
        return named
    if recipe_base is None:
        raise OrionError(f"adapter {adapter} does not name its base model: give --base MODEL")
    return recipe_base


merge_adapter.aliases = {"adapter": ["--lora-model-dir", "--lora_model_dir"], "out": ["--output-dir", "--output_dir"]}
