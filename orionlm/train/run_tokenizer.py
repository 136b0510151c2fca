"""A training run's tokenizer: the checkpoint's when resuming, a given one, the base model's, or a byte-level BPE
trained on the recipe's data and kept in the run directory (reused by a rerun that asks for the same size)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import atomic_directory
from ..data import iter_documents
from ..errors import read_json_object
from ..tokenizer import Tokenizer
from .distributed import Dist
from .recipe import Recipe, RecipeError


def prepare_tokenizer(
    recipe: Recipe, out_dir: Path, d: Dist, resume_dir: Path | None, base_tokenizer: Tokenizer | None
) -> Tokenizer:
    """The run's tokenizer: the checkpoint's when resuming, a given one, the base model's, one trained on
    the data (by rank 0, saved in the run directory), or byte-level."""
    section = recipe.tokenizer
    if resume_dir is not None:
        return Tokenizer.load(resume_dir)
    if section.path is not None:
        return Tokenizer.load(section.path)
    if recipe.model.path is not None:
        if base_tokenizer is None:
            raise RecipeError(f"model.path {recipe.model.path} has no tokenizer: give tokenizer.path")
        return base_tokenizer
    if section.train_vocab_size is None:
        return Tokenizer.byte_level()
    target = out_dir / "tokenizer"
    if d.main and not reusable_tokenizer(target, section.train_vocab_size):
        total = sum(s.weight for s in recipe.data.sources)
        texts = []
        for source in recipe.data.sources:
            budget = int(section.train_max_bytes * source.weight / total)
            for document in iter_documents(source):
                texts.append(document)
                budget -= len(document.encode("utf-8", errors="replace"))
                if budget <= 0:
                    break
        print(f"training a {section.train_vocab_size}-token BPE tokenizer on {sum(map(len, texts)):,} characters")
        tokenizer = Tokenizer.train_bpe_from_texts(texts, section.train_vocab_size)
        with atomic_directory(target) as tmp:
            tokenizer.save(tmp)
            (tmp / TRAINED_FOR).write_text(json.dumps({"train_vocab_size": section.train_vocab_size}) + "\n")
    d.barrier()
    return Tokenizer.load(target)


TRAINED_FOR = "trained_for.json"  # in a run's tokenizer/: the train_vocab_size it was trained for


def reusable_tokenizer(target: Path, vocab_size: int) -> bool:
    """Whether the run directory holds a tokenizer trained for `vocab_size` (a run that stopped before its first
    record trained it; reused, not trained again). False when it holds none; RecipeError when it holds another:
    one trained for another size (BPE on little text may stop short of it, so the size asked is what is kept), or
    one that no run trained."""
    if not (target / "tokenizer.json").is_file():
        return False
    marker = target / TRAINED_FOR
    trained_for = read_json_object(marker, RecipeError).get("train_vocab_size") if marker.is_file() else None
    if trained_for == vocab_size:
        return True
    has = f"a {Tokenizer.load(target).vocab_size}-token tokenizer"
    has += f" trained for train_vocab_size {trained_for}" if trained_for is not None else " that no run trained"
    raise RecipeError(f"{target} holds {has}, the recipe asks for tokenizer.train_vocab_size {vocab_size}: delete "
                      f"{target} to train a new one, or choose another --run.out_dir")  # fmt: skip
