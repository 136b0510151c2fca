"""Charts of a run from its metrics.jsonl: losses, learning rate, and expert load for MoE runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import OrionError, require


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise OrionError(f"{path} is missing; is {run_dir} a training run directory?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise OrionError(f"{path} has no records yet")
    return records


def _pyplot():
    matplotlib = require("matplotlib", "plot", "drawing charts")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, label: str | None = None) -> list[Path]:
    """Write loss.png, lr.png and (for MoE runs) expert_load.png into the run directory."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    plt = _pyplot()
    written = [_plot_loss(plt, {label or run_dir.name: records}, run_dir / "loss.png")]

    fig, ax = plt.subplots(figsize=(7, 3.5))
    stepped = [r for r in records if "lr" in r]  # a fine-tuning run's step 0 holds the starting val_loss only
    ax.plot([r["tokens"] for r in stepped], [r["lr"] for r in stepped])
    ax.set(xlabel="tokens", ylabel="learning rate", title="learning rate (first parameter group)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "lr.png", dpi=120)
    plt.close(fig)
    written.append(run_dir / "lr.png")

    moe = [r for r in records if "expert_fractions" in r]
    if moe:
        written.append(_plot_expert_load(plt, moe, run_dir / "expert_load.png"))
    return written


def _plot_loss(plt, runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Training and validation loss against tokens, one pair of curves per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [r for r in records if "loss" in r]
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color, alpha=0.5,
                label=f"{name} train")  # fmt: skip
        val = [r for r in records if "val_loss" in r]
        if val:
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", color=color,
                    label=f"{name} validation ({val[-1]['val_loss']:.3f})")  # fmt: skip
    ax.set(xlabel="tokens", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_comparison(runs: dict[str, str | Path], path: str | Path) -> Path:
    """Loss curves of several runs in one chart (e.g. MoE against dense)."""
    return _plot_loss(_pyplot(), {name: read_metrics(d) for name, d in runs.items()}, Path(path))


def _plot_expert_load(plt, records: list[dict[str, Any]], path: Path) -> Path:
    """Left: the share of routed tokens per expert and layer over the last logging interval
    (1/E everywhere is perfect balance). Right: each layer's busiest expert's share over training."""
    import numpy as np

    last = np.array(records[-1]["expert_fractions"])  # (layers, experts)
    layers, experts = last.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    image = left.imshow(last, aspect="auto", cmap="viridis", vmin=0)
    left.set(xlabel="expert", ylabel="MoE layer", title=f"token share per expert (balanced = {1 / experts:.3f})")
    left.set_xticks(range(experts))
    left.set_yticks(range(layers))
    fig.colorbar(image, ax=left)
    tokens = [r["tokens"] for r in records]
    busiest = np.array([np.max(r["expert_fractions"], axis=1) for r in records])  # (records, layers)
    for layer in range(layers):
        right.plot(tokens, busiest[:, layer], label=f"layer {layer}")
    right.axhline(1 / experts, color="gray", linestyle="--", label="balanced")
    right.set(xlabel="tokens", ylabel="busiest expert's share", title="load imbalance over training")
    right.grid(alpha=0.3)
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
