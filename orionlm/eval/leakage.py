"""Benchmark-leakage detection by shuffling the options of multiple-choice items (arXiv 2409.01790).

A model that never saw an item has no reason to prefer the order its options were published in; one
trained on the benchmark does. For each 4-option item, every one of the 24 orderings of its options is
written as an option block ("A. ...\\nB. ...") after the question, and scored as the log-probability of
the block given the question (ordering 0 is the original). Two rules flag an item:

- `max_original`: the original ordering scores highest (chance: 1/24 for a model with no leak);
- `iforest`: additionally, that highest score is an outlier among the 24: an isolation forest (100 trees,
  contamination "auto", seed 42) fit on the item's 24 scores gives it a decision value below the threshold
  (the paper's -0.2, -0.17 and -0.15; lower is stricter). A best ordering that is not the original says
  nothing about a leak, so only the original can be flagged.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OrionError, require
from ..model import OrionLM
from ..tokenizer import Tokenizer
from .scoring import loglikelihood
from .tasks import read_jsonl

IsolationForest = require("sklearn.ensemble", "eval", "leakage detection (its isolation forest)").IsolationForest

ORDERINGS = list(itertools.permutations(range(4)))  # 24; ORDERINGS[0] is the published order
THRESHOLDS = (-0.2, -0.17, -0.15)
CHANCE = 1 / len(ORDERINGS)


def option_block(choices: list[str], order: tuple[int, ...]) -> str:
    return "\n".join(f"{letter}. {choices[i]}" for letter, i in zip("ABCD", order, strict=True))


def leak_text(item: dict[str, Any]) -> str:
    """An item as it would appear in training data: question, then its options in the published order."""
    return f"{_question(item)}\n{option_block(item['choices'], ORDERINGS[0])}"


def _question(item: dict[str, Any]) -> str:
    return str(item.get("question", item.get("context", ""))).strip()


def load_items(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The 4-option items of a multiple-choice JSONL file, and how many others were left out."""
    records = read_jsonl(path)
    items = [r for r in records if isinstance(r.get("choices"), list) and len(r["choices"]) == 4 and _question(r)]
    return items, len(records) - len(items)


def ordering_scores(
    model: OrionLM, tokenizer: Tokenizer, items: list[dict[str, Any]], batch_size: int = 16, progress: bool = True
) -> np.ndarray:
    """(items, 24) log-probabilities of each ordering's option block given the question."""
    requests = [(f"{_question(item)}\n", option_block(item["choices"], order)) for item in items for order in ORDERINGS]
    scored = loglikelihood(model, tokenizer, requests, batch_size, progress)
    return np.array([s.logprob for s in scored]).reshape(len(items), len(ORDERINGS))


def flag(scores: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS, seed: int = 42) -> dict[str, np.ndarray]:
    """Boolean flags per item: "max_original", and "iforest@T" for each threshold T."""
    original_best = scores.argmax(axis=1) == 0
    decisions = np.full(len(scores), np.inf)
    for i, row in enumerate(scores):
        if original_best[i]:
            forest = IsolationForest(n_estimators=100, contamination="auto", random_state=seed).fit(row[:, None])
            decisions[i] = forest.decision_function(row[:1, None])[0]
    flags = {"max_original": original_best}
    for threshold in thresholds:
        flags[f"iforest@{threshold:g}"] = original_best & (decisions < threshold)
    return flags


def detect(
    model: OrionLM,
    tokenizer: Tokenizer,
    path: Path,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Score and flag the first `limit` 4-option items of a file; a JSON-ready report."""
    items, skipped = load_items(path)
    items = items[:limit]
    if not items:
        raise OrionError(f"{path} has no 4-option items to test")
    scores = ordering_scores(model, tokenizer, items, batch_size, progress)
    ids = [str(item.get("id", f"line-{item['_line']}")) for item in items]
    methods = {
        name: {"rate": float(flags.mean()), "flagged": [i for i, f in zip(ids, flags, strict=True) if f]}
        for name, flags in flag(scores).items()
    }
    return {"file": str(path), "items": len(items), "skipped": skipped, "chance": CHANCE, "methods": methods}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['items']} items ({report['skipped']} without 4 options left out); a model with no leak "
             f"flags about {report['chance']:.3f} of them by max_original", "",
             "| method | flagged | rate |", "|---|---:|---:|"]  # fmt: skip
    for name, result in report["methods"].items():
        lines.append(f"| {name} | {len(result['flagged'])} | {result['rate']:.3f} |")
    return "\n".join(lines)
