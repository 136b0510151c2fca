"""What the benchmark scripts share (run as `python benchmarks/NAME.py`, this folder is on sys.path).

The loss comparisons (moe_vs_dense.py, chimera_vs_dense.py) train two models through the real trainer on
the same data, tokenizer, seed, batch and token budget; the helpers below are that shared part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import orionlm
from orionlm.data.sources import SourceConfig, iter_documents
from orionlm.tokenizer import Tokenizer
from orionlm.train.recipe import apply_override, load_recipe
from orionlm.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TINYSTORIES = ROOT.parent / "shared" / "data" / "pretrain" / "tinystories_sample.txt.gz"
SEPARATOR = "<|endoftext|>"
SEQ_LEN, BATCH, EVAL_BATCHES = 256, 8, 15


def cpu_name() -> str:
    """The CPU's model name, for the setup line at the top of every benchmark table."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """The line every benchmark prints under its title: versions, CPU, cores and torch's threads."""
    return (f"torch {torch.__version__}, python {platform.python_version()}, {cpu_name()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def read_bandwidth(data: torch.Tensor, sums: int = 3) -> float:
    """Bytes per second of the fastest of `sums` sums over `data` (too large for any cache)."""
    fastest = float("inf")
    for _ in range(sums):
        start = time.perf_counter()
        data.sum()
        fastest = min(fastest, time.perf_counter() - start)
    return data.numel() * data.element_size() / fastest


def train_tokenizer(data: Path, target: Path, vocab_size: int) -> Tokenizer:
    """A BPE tokenizer trained on the documents of `data`, kept in `target` so a later run reuses it."""
    if not (target / "tokenizer.json").is_file():
        texts = list(iter_documents(SourceConfig(path=str(data), doc_separator=SEPARATOR)))
        target.mkdir(parents=True, exist_ok=True)
        Tokenizer.train_bpe_from_texts(texts, vocab_size).save(target)
    return Tokenizer.load(target)


def comparison_recipe(
    model: dict[str, Any], optim: dict[str, Any], schedule: dict[str, Any], out: Path, name: str, data: Path, steps: int
) -> dict[str, Any]:
    """One run of a comparison: the tokenizer from out/tokenizer, the last 5% of the data's windows held
    out, seed 0, BATCH x SEQ_LEN tokens a step, validation every 100 steps and at the end; the run in out/name."""
    return {
        "model": model,
        "tokenizer": {"path": str(out / "tokenizer")},
        "data": {
            "sources": [{"path": str(data), "doc_separator": SEPARATOR}],
            "seq_len": SEQ_LEN,
            "val_fraction": 0.05,
            "cache_dir": str(out / "token-cache"),
        },
        "optim": optim,
        "schedule": schedule,
        "run": {
            "out_dir": str(out / name),
            "max_steps": steps,
            "batch_size": BATCH,
            "seed": 0,
            "log_every": 10,
            "eval_every": 100,
            "eval_batches": EVAL_BATCHES,
            "device": "cpu",
            "tensorboard": False,
            "progress": False,
            "plot": False,
        },
    }


def comparison_args(doc: str, name: str, steps: int, example_set: str) -> argparse.Namespace:
    """The command line the loss comparisons share (--data, --steps, --out, --plot, --set)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=TINYSTORIES, help="a text file of stories separated by " + SEPARATOR
    )
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps of 8 x 256 tokens, for both runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / name, help="run directories")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "results" / f"{name}.png")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"change both recipes, e.g. --set {example_set}")  # fmt: skip
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} is missing: pass --data with a text file of {SEPARATOR}-separated stories")
    return args


def run_comparison(
    args: argparse.Namespace, title: str, architectures: dict[str, dict[str, Any]], optim: dict, schedule: dict,
    vocab: int,
) -> tuple[Tokenizer, dict[str, Path], dict[str, float], dict[str, dict[str, Any]]]:  # fmt: skip
    """Print the header, train the shared `vocab`-token tokenizer and every architecture's run. Returns the
    tokenizer, each run's directory, wall-clock seconds and run.json."""
    print(f"# {title}: orionlm {orionlm.__version__}")
    print(machine_line())
    tokenizer = train_tokenizer(args.data, args.out / "tokenizer", vocab)
    recipes = {
        name: comparison_recipe(model, optim, schedule, args.out, name, args.data, args.steps)
        for name, model in architectures.items()
    }
    runs, wall = train_runs(recipes, args.out, args.set)
    info = {name: json.loads((run_dir / "run.json").read_text()) for name, run_dir in runs.items()}
    return tokenizer, runs, wall, info


def train_runs(
    recipes: dict[str, dict[str, Any]], out: Path, overrides: list[str]
) -> tuple[dict[str, Path], dict[str, float]]:
    """Trains each recipe from scratch, after the command line's SECTION.KEY=VALUE overrides, and keeps
    it as out/NAME.yaml. Returns each run's directory and its wall-clock seconds."""
    runs, wall = {}, {}
    for name, data in recipes.items():
        run_dir = Path(data["run"]["out_dir"])
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
        run_dir.mkdir(parents=True)
        for override in overrides:
            apply_override(data, override)
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        start = time.perf_counter()
        runs[name] = train(load_recipe(path))
        wall[name] = time.perf_counter() - start
    return runs, wall


def data_line(run_dir: Path, data: Path, tokenizer: Tokenizer) -> str:
    """The setup line describing the data, from a run's run.json."""
    (stats,) = json.loads((run_dir / "run.json").read_text())["data"]
    return (
        f"data: {data.name}, {stats['documents']:,} stories, {stats['tokens']:,} tokens with a "
        f"{tokenizer.vocab_size}-token BPE trained on it; {stats['train_windows']:,} training and "
        f"{stats['val_windows']:,} validation windows of {SEQ_LEN} tokens, "
        f"{min(stats['val_windows'], BATCH * EVAL_BATCHES):,} of them evaluated"
    )


def print_val_table(
    base: str, base_records: list[dict[str, Any]], other: str, other_records: list[dict[str, Any]]
) -> None:
    """Both runs' validation losses at the base run's evaluation points, and their difference."""
    evals = [{r["tokens"]: r["val_loss"] for r in recs if "val_loss" in r} for recs in (base_records, other_records)]
    print(f"| tokens | {base} val loss | {other} val loss | {other} - {base} |")
    print("|---:|---:|---:|---:|")
    for tokens in sorted(evals[0]):
        first, second = evals[0][tokens], evals[1].get(tokens, float("nan"))
        print(f"| {tokens:,} | {first:.4f} | {second:.4f} | {second - first:+.4f} |")
