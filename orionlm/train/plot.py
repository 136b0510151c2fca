"""Charts of a run from its metrics.jsonl (with run.json and recipe.yaml when present): the losses against the
data's unigram entropy, the learning rate at every step of the schedule, and expert load for MoE runs. Token axes
read in K, M and B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import OrionError, read_json_object, require
from .metrics import read_records
from .schedule import ScheduleConfig, lr_factor


def human_tokens(n: int) -> str:
    """An exact short name for a token count: 100000000000 -> '100B', 1638400 -> '1.6384M', 512 -> '512'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            digits = len(str(scale)) - 1
            return f"{n / scale:.{digits}f}".rstrip("0").rstrip(".") + unit
    return str(n)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise OrionError(f"{path} is missing; is {run_dir} a training run directory?")
    records = [record for _, record in read_records(path)]
    if not records:
        raise OrionError(f"{path} has no records yet")
    return records


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json (sizes, schedule length, the data's unigram entropy); {} for a run directory without one."""
    path = run_dir / "run.json"
    return read_json_object(path) if path.is_file() else {}


def pyplot():
    matplotlib = require("matplotlib", "plot", "drawing charts")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, label: str | None = None) -> list[Path]:
    """Write loss.png, lr.png and (for MoE runs) expert_load.png into the run directory."""
    run_dir = Path(run_dir)
    plt = pyplot()
    return [_save(plt, figure, run_dir / name) for name, figure in run_figures(plt, run_dir, label).items()]


def run_figures(plt, run_dir: Path, label: str | None = None) -> dict[str, Any]:
    """The charts of a run by file name: loss.png, lr.png and (for MoE runs) expert_load.png."""
    records = read_metrics(run_dir)
    info = read_run_info(run_dir)
    ylabel = DPO_LOSS if info.get("mode") == "dpo" else CROSS_ENTROPY
    figures = {
        "loss.png": loss_figure(plt, {label or run_dir.name: records}, info.get("unigram_entropy"), ylabel),
        "lr.png": lr_figure(plt, records, _schedule_curve(run_dir, info)),
    }
    moe = [r for r in records if "expert_fractions" in r]
    if moe:
        figures["expert_load.png"] = expert_figure(plt, moe)
    return figures


def _save(plt, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _token_axis(ax) -> None:
    """Token counts on the x axis as 200K, 1.5M, 3B."""
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: ("-" if x < 0 else "") + human_tokens(abs(round(x)))))


def _schedule_curve(run_dir: Path, info: dict[str, Any]) -> tuple[list[int], list[float]] | None:
    """(tokens after each step, its learning rate) from the saved recipe's schedule and run.json: every step of
    the warm-up and up to 2000 points in all. None for a run directory without them (one from before run.json
    held peak_lr)."""
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file() or "peak_lr" not in info:
        return None
    import numpy as np
    import yaml

    schedule = ScheduleConfig(**yaml.safe_load(recipe.read_text())["schedule"])
    total = info["total_steps"]
    warmup, _ = schedule.phases(total)
    steps = sorted({*np.linspace(0, total - 1, min(total, 2000)).round().astype(int).tolist(), *range(warmup + 1)})
    steps = [s for s in steps if s < total]
    # a record's lr is that of the step just taken, logged with the tokens seen after it
    tokens = [(s + 1) * info["tokens_per_step"] for s in steps]
    return tokens, [info["peak_lr"] * lr_factor(s, total, schedule) for s in steps]


def lr_figure(plt, records: list[dict[str, Any]], schedule: tuple[list[int], list[float]] | None) -> Any:
    """The first parameter group's learning rate: the schedule at every step, so that a warm-up of a few steps
    shows however seldom the run logs, and the values logged."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if schedule is not None:
        ax.plot(*schedule, label="schedule")
    stepped = [r for r in records if "lr" in r]  # a fine-tuning run's step 0 holds the starting val_loss only
    ax.plot([r["tokens"] for r in stepped], [r["lr"] for r in stepped], "o", markersize=3, label="logged")
    ax.set(xlabel="tokens", ylabel="learning rate", title="learning rate (first parameter group)")
    _token_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


CROSS_ENTROPY, DPO_LOSS = "cross-entropy (nats/token)", "DPO loss (mean per pair)"


def loss_figure(
    plt, runs: dict[str, list[dict[str, Any]]], unigram_entropy: float | None = None, ylabel: str = CROSS_ENTROPY
) -> Any:
    """Training and validation loss against tokens, one pair of curves per run, and the unigram entropy of the
    data when known: the loss of the best model that ignores context."""
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
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="gray", linestyle="--",
                   label=f"unigram entropy of the data ({unigram_entropy:.3f})")  # fmt: skip
    ax.set(xlabel="tokens", ylabel=ylabel, title="loss")
    _token_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_comparison(runs: dict[str, str | Path], path: str | Path) -> Path:
    """Loss curves of several runs in one chart (e.g. MoE against dense)."""
    plt = pyplot()
    return _save(plt, loss_figure(plt, {name: read_metrics(d) for name, d in runs.items()}), Path(path))


def expert_figure(plt, records: list[dict[str, Any]]) -> Any:
    """Left: the share of routed tokens per expert and layer over the last logging interval, its steps in the title
    (1/E everywhere is perfect balance). Right: each layer's busiest expert's share over training."""
    import numpy as np

    last = np.array(records[-1]["expert_fractions"])  # (layers, experts)
    layers, experts = last.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    image = left.imshow(last, aspect="auto", cmap="viridis", vmin=0)
    first, last_step = (records[-2]["step"] + 1 if len(records) > 1 else 1), records[-1]["step"]
    steps = f"step {last_step}" if first == last_step else f"steps {first}-{last_step}"
    title = f"token share per expert, {steps} (balanced = {1 / experts:.3f})"
    left.set(xlabel="expert", ylabel="MoE layer", title=title)
    left.set_xticks(range(experts))
    left.set_yticks(range(layers))
    fig.colorbar(image, ax=left)
    tokens = [r["tokens"] for r in records]
    busiest = np.array([np.max(r["expert_fractions"], axis=1) for r in records])  # (records, layers)
    for layer in range(layers):
        right.plot(tokens, busiest[:, layer], label=f"layer {layer}")
    right.axhline(1 / experts, color="gray", linestyle="--", label="balanced")
    right.set(xlabel="tokens", ylabel="busiest expert's share", title="load imbalance over training")
    _token_axis(right)
    right.grid(alpha=0.3)
    right.legend(fontsize="small")
    return fig
