"""`orionlm train`, `orionlm plot`, `orionlm quickstart` and `orionlm tokenizer train`."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import OrionError


def train_model(recipe: Path, /, *overrides: str, print_config: bool = False) -> None:
    """Train a model from a recipe: data mixture, tokenizer, model, optimizer, schedule, run options.

    RECIPE is a YAML file or one of the recipes that ship with orionlm, recipe:NAME (`orionlm recipes` lists
    them). `mode: pretrain` (the default) trains from scratch on text; `mode: sft` fine-tunes a trained model
    (model.path) on chat data (see recipe:sft-lora); `mode: quietstar` teaches a trained model to think before
    every token, on text (recipe:quietstar). Both train every parameter, or with a `lora:` section LoRA adapters
    on the frozen base (`mode: lora` is sft with adapters).
    Every recipe key can be overridden after the recipe, e.g.
      orionlm train recipe:tinyshakespeare-moe --run.max_steps=200 --optim.lr=1e-3
      orionlm train recipe:sft-lora --model.path=runs/m --lora.r=32
      orionlm train recipe:sft-lora --lora.r=32 --print-config > my-recipe.yaml   # a copy to edit
    A length given so (--run.max_steps, --run.max_tokens or --run.max_epochs) replaces the recipe's, and a
    warm-up longer than the run is cut to fit. The run ends with its final model in RUN/model (run.out_dir/model;
    for LoRA the adapter directory, which --model loads onto its base), e.g.
      orionlm generate "ROMEO:" --model runs/tinyshakespeare-moe/model
    One process at a time writes a run directory (it holds RUN/run.lock).
    `--resume` continues the run in run.out_dir from its latest checkpoint; `--resume DIR` from DIR.
    Under torchrun the same command trains with DDP (or FSDP2 with --run.fsdp=true):
      torchrun --nproc-per-node 2 -m orionlm train RECIPE

    Args:
        recipe: the recipe YAML file, or recipe:NAME
        overrides: --section.key=value changes to the recipe, and --resume [DIR]
        print_config: print the resolved recipe (the overrides applied, every default written out) as YAML
            and stop
    """
    from ..train.recipe import load_recipe
    from ..train.trainer import train

    loaded = load_recipe(recipe, overrides)
    if print_config:
        print(loaded.to_yaml(), end="")
        return
    train(loaded)


def list_recipes() -> None:
    """List the recipes that ship with orionlm: name, the verb that runs it, and its one-line description.

    Give one as recipe:NAME wherever a recipe file goes:
      orionlm train recipe:tinyshakespeare-moe --run.max_steps=200
      orionlm train recipe:sft-lora --print-config      # the whole recipe, resolved, as YAML
      orionlm moe-merge recipe:moe-merge runs/franken
    """
    from ..train.recipe import read_yaml_mapping, recipe_summary, shipped_recipes

    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        # a moe-merge config (mergekit-moe's format) lists experts; every other shipped recipe is a training one
        verb = "moe-merge" if "experts" in read_yaml_mapping(path, "recipe", "keys") else "train"
        print(f"{name:<{width}}  {verb:<9}  {recipe_summary(path)}")


def plot(run_dir: Path, /, *, compare: list[Path] | None = None, out: Path | None = None) -> None:
    """Write charts of a training run: loss.png, lr.png, expert_load.png (MoE runs).

    With --compare, one loss chart over several runs (e.g. MoE against dense) goes to --out. Needs `pip install
    'orionlm[plot]'` (matplotlib).

    Args:
        run_dir: a run directory (it holds metrics.jsonl)
        compare: other run directories to draw beside it
        out: the comparison chart's path (default: RUN_DIR/compare.png)
    """
    from ..train.plot import plot_comparison, plot_run

    if compare:
        runs = {p.name: p for p in [run_dir, *compare]}
        print(f"wrote {plot_comparison(runs, out or run_dir / 'compare.png')}")
        return
    for path in plot_run(run_dir):
        print(f"wrote {path}")


def quickstart(
    *overrides: str, out: Path = Path("runs/quickstart"), steps: int = 400, print_recipe: bool = False
) -> None:
    """Train a tiny MoE on the Python standard library's sources in a few CPU minutes, then show it works.

    Trains a BPE tokenizer and a ~3M-parameter MoE (8 experts, top-2) on the top-level modules of the
    standard library, then prints the parameter counts, the loss table against the unigram entropy of
    the data, and a continuation of "def fibonacci(n):"; writes the model to OUT/model, and loss.png, lr.png
    and expert_load.png. Then, e.g.:
      orionlm generate "def main():" --model runs/quickstart/model

    Args:
        out: the run directory (a finished run there is replaced; a run in progress or anything else is refused)
        steps: optimizer steps (16 sequences of 256 tokens each)
        print_recipe: print the recipe as YAML (to copy into a file for `orionlm train`) and stop
        overrides: --section.key=value changes to the recipe
    """
    import yaml

    from ..quickstart import quickstart_recipe, run_quickstart
    from ..train.lock import LOCK_FILE, RunLock

    if print_recipe:
        print(yaml.safe_dump(quickstart_recipe(out, steps), sort_keys=False), end="")
        return
    # The lock first: a run another process is writing is refused as such (it may have no metrics.jsonl yet), and
    # nothing of it is looked at or deleted.
    with RunLock(out):
        files = [p for p in out.iterdir() if p.name != LOCK_FILE]
        if files and not (out / "metrics.jsonl").is_file():
            raise OrionError(f"{out} is not a training run directory (no metrics.jsonl); quickstart replaces only "
                             "its own runs: give another --out")  # fmt: skip
        for path in files:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        run_quickstart(out, steps, list(overrides))


def tokenizer_train(files: list[Path], /, *, vocab_size: int, out: Path, force: bool = False) -> None:
    """Train a byte-level BPE tokenizer on text files (.gz files are read too).

    Args:
        files: the training text files
        vocab_size: the vocabulary size, special tokens included
        out: the directory to write tokenizer.json, tokenizer_config.json and chat_template.jinja to
        force: replace a tokenizer already in out (a model directory's model only works with its own)
    """
    from ..tokenizer import Tokenizer

    if (out / "tokenizer.json").exists() and not force:
        raise OrionError(f"{out} already holds a tokenizer.json; pass --force to replace it")
    tok = Tokenizer.train_bpe(files, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"wrote {out} ({tok.vocab_size} tokens)")
