"""Eval reports (what `evaluate` returns and `orionlm eval --out` writes) as tables and charts: one
report like a model card, or several side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import require
from .tasks import EvalError

HEADLINE = {
    "lambada": ("acc", "perplexity"),
    "wikitext": ("word_perplexity", "bits_per_byte"),
    "gsm8k": ("exact_match", "exact_match_flexible"),
}


def _headline(task: str) -> tuple[str, ...]:
    """The metrics a table shows for a task (a multiple-choice task: acc, acc_norm; MMLU also acc_macro)."""
    return HEADLINE.get(task, ("acc", "acc_norm") + (("acc_macro",) if task == "mmlu" else ()))


def format_table(report: dict[str, Any]) -> str:
    """A markdown table: each task's headline metrics with standard errors, as model cards show them."""
    lines = ["| task | n | metric | value | stderr |", "|---|---:|---|---:|---:|"]
    for task, metrics in report["results"].items():
        for name in _headline(task):
            stderr = metrics.get(f"{name}_stderr")
            shown = "" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}"
            lines.append(f"| {task} | {metrics['n']} | {name} | {metrics[name]:.4f} | {shown} |")
    return "\n".join(lines)


def read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"cannot read {path} as an `orionlm eval --out` report: {e}") from None
    if not isinstance(report, dict) or "results" not in report:
        raise EvalError(f"{path} is not an `orionlm eval --out` report (no 'results')")
    return report


def compare_table(reports: dict[str, dict[str, Any]]) -> str:
    """Side by side: each task's headline metrics (rows) for every report (columns); - where one lacks it."""
    names = list(reports)
    lines = [f"| task | metric | {' | '.join(names)} |", "|---|---|" + "---:|" * len(names)]
    tasks = list(dict.fromkeys(t for r in reports.values() for t in r["results"]))
    for task in tasks:
        for metric in _headline(task):
            cells = []
            for name in names:
                value = reports[name]["results"].get(task, {}).get(metric)
                cells.append("-" if value is None else f"{value:.4f}")
            lines.append(f"| {task} | {metric} | {' | '.join(cells)} |")
    return "\n".join(lines)


def compare_chart(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars of every accuracy-like metric (0..1) of the reports."""
    matplotlib = require("matplotlib", "plot", "eval compare --chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(task, metric) for task in dict.fromkeys(t for r in reports.values() for t in r["results"])
            for metric in _headline(task) if metric.startswith(("acc", "exact_match"))]  # fmt: skip
    width = 0.8 / len(reports)
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    for k, (name, report) in enumerate(reports.items()):
        values = [report["results"].get(task, {}).get(metric, float("nan")) for task, metric in rows]
        axes.bar([i + k * width for i in range(len(rows))], values, width, label=name)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [f"{t}\n{m}" for t, m in rows], fontsize=8)
    axes.set_ylabel("score")
    axes.set_ylim(0, 1)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
