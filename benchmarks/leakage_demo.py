"""Benchmark-leakage detection, demonstrated: leak half of an eval set into training and look for it.

A small model (tiny-dense grown to hidden 128, 4 layers, context 512; byte-level tokenizer, so an item's
option block fits the window whole) is trained from scratch
through the real trainer on TinyStories plus a deliberate leak: the first half of the chosen ARC-Easy items,
each written as question + options in their published order (orionlm.eval.leakage.leak_text), as one
source weighted to --leak-weight of the mixture. orionlm.eval.leakage then scores all 24 orderings of every
item's options. On the leaked half the published order should win far above chance (1/24 = 0.042); on
the held-back half it should not.

    .venv/bin/python benchmarks/leakage_demo.py [--items 100] [--steps 600] [--leak-weight 0.2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml
from common import ROOT, SEPARATOR, TINYSTORIES

from orionlm.eval.leakage import CHANCE, detect, leak_text, load_items
from orionlm.loading import MODEL_DIR, load_model
from orionlm.train.recipe import load_recipe
from orionlm.train.trainer import train

ARC = ROOT.parent / "shared" / "data" / "eval" / "arc_easy_test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100, help="ARC-Easy items: the first half leaked, the rest not")
    parser.add_argument("--steps", type=int, default=600, help="training steps of 8 x 512 tokens")
    parser.add_argument("--leak-weight", type=float, default=0.2, help="the leaked items' share of the mixture")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "leakage_demo", help="the run directory")
    args = parser.parse_args()
    if not ARC.is_file() or not TINYSTORIES.is_file():
        raise SystemExit(f"needs ../shared/data ({ARC.name}, {TINYSTORIES.name})")

    items, _ = load_items(ARC)
    items = items[: args.items]
    leaked, clean = items[: len(items) // 2], items[len(items) // 2 :]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaked.txt").write_text(SEPARATOR.join(leak_text(item) for item in leaked))
    for name, part in (("leaked", leaked), ("clean", clean)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in part))
    sources = [
        {"path": str(TINYSTORIES), "doc_separator": SEPARATOR, "weight": 1 - args.leak_weight},
        {"path": str(out / "leaked.txt"), "doc_separator": SEPARATOR, "weight": args.leak_weight},
    ]
    recipe = {
        "model": {"preset": "tiny-dense", "overrides": {"hidden_size": 128, "num_layers": 4, "intermediate_size": 384,
                                                         "max_seq_len": 512}},
        "data": {"sources": sources, "seq_len": 512, "val_fraction": 0.02, "cache_dir": str(out / "token-cache")},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"kind": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1},
        "run": {"out_dir": str(out / "run"), "max_steps": args.steps, "batch_size": 8, "eval_every": 200,
                "progress": False, "plot": False, "tensorboard": False, "device": "cpu"},
    }  # fmt: skip
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.rmtree(out / "run", ignore_errors=True)  # a fresh run each time
    start = time.perf_counter()
    run = train(load_recipe(out / "recipe.yaml"))
    seconds = time.perf_counter() - start
    model, tokenizer, _ = load_model(run / MODEL_DIR)

    print(f"# leakage demo: {len(leaked)} ARC-Easy items leaked into training at weight {args.leak_weight}, "
          f"{len(clean)} held back; {args.steps} steps ({seconds:.0f} s)")  # fmt: skip
    reports = {name: detect(model, tokenizer, out / f"{name}.jsonl", progress=False) for name in ("leaked", "clean")}
    methods = list(reports["leaked"]["methods"])
    print(f"\nflagged fraction (chance by max_original: {CHANCE:.3f})\n")
    print("| method | leaked items | held-back items |")
    print("|---|---:|---:|")
    for method in methods:
        rates = [reports[name]["methods"][method]["rate"] for name in ("leaked", "clean")]
        print(f"| {method} | {rates[0]:.3f} | {rates[1]:.3f} |")


if __name__ == "__main__":
    main()
