"""`orionlm eval`, `orionlm leakage` and `orionlm lm-eval`: benchmark scores and leakage checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import OrionError, require, with_revision
from .common import DType, load_with_tokenizer, logs_to_stderr, print_json


def eval_model(
    target: list[str],
    /,
    *,
    revision: str | None = None,
    tasks: str = "hellaswag,arc_easy,arc_challenge,piqa,mmlu,lambada,wikitext",
    data_dir: Path | None = None,
    task_file: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    batch_size: int = 16,
    context: int | None = None,
    stride: int | None = None,
    max_new_tokens: int = 256,
    no_think: bool = False,
    out: Path | None = None,
    chart: Path | None = None,
    json: bool = False,
    device: str | None = None,
    dtype: DType | None = None,
) -> None:
    """Evaluate a model: multiple-choice accuracy (hellaswag, arc_easy, arc_challenge, piqa, mmlu), LAMBADA,
    WikiText perplexity and GSM8K exact match (gsm8k: generation, not in the default list), scored as
    lm-evaluation-harness does. Prints a table; --out writes JSON. `orionlm eval compare A.json B.json`
    prints saved results side by side (--chart: and as grouped bars).

    Example:
      orionlm eval runs/m --tasks hellaswag,arc_easy,wikitext --data-dir ../shared/data/eval --limit 200
      orionlm eval compare runs/a.json runs/b.json --chart runs/compare.png

    Args:
        target: a model directory, a .gguf file or a Hub id; or `compare` and --out JSON files
        revision: a branch, tag or commit of the Hub id TARGET (the same as TARGET@REV)
        tasks: comma-separated task names
        data_dir: a folder with the task files named as in ../shared/data/eval (hellaswag_val.jsonl, ...)
        task_file: TASK=PATH for a task's own file (repeatable; mmlu_dev=PATH for MMLU's shots)
        limit: evaluate only the first N items (documents for wikitext) of each task
        num_fewshot: examples before each question, drawn with --seed (MMLU: from mmlu_dev.jsonl)
        seed: the seed of the few-shot draws
        batch_size: sequences per forward pass
        context: wikitext: the sliding window in tokens (default: the model's context)
        stride: wikitext: how far the window moves (default: the whole window)
        max_new_tokens: gsm8k: the longest worked answer generated
        no_think: gsm8k: a thinking (Quiet-STaR) model answers without thoughts
        out: write the full results (config, versions, metrics, timing) to this JSON file
        chart: compare: also draw the accuracies as grouped bars in this PNG
        json: print the results as one JSON document (what --out writes; compare: each file's results) instead
            of the table
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
    """
    from ..eval.report import format_table
    from ..eval.run import evaluate

    if target[0] == "compare":
        _compare(target[1:], chart, json)
        return
    if len(target) != 1:
        raise OrionError(f"give one model to evaluate (or `compare` and result files), got {' '.join(target)}")
    model = with_revision(target[0], revision)

    files = {}
    for item in task_file or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise OrionError(f"--task-file takes TASK=PATH, got {item!r}")
        files[name] = Path(path)
    lm, tokenizer = load_with_tokenizer(model, "evaluation", device, dtype)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    progress = sys.stderr.isatty()  # progress bars on a terminal; in a log they are noise
    report = evaluate(
        lm,
        tokenizer,
        names,
        data_dir=data_dir,
        task_files=files,
        limit=limit,
        num_fewshot=num_fewshot,
        seed=seed,
        batch_size=batch_size,
        context=context,
        stride=stride,
        progress=progress,
        max_new_tokens=max_new_tokens,
        think=not no_think,
    )
    report["config"]["model_path"] = str(model)
    if json:
        print_json(report)
    else:
        print(format_table(report))
    if out is not None:
        with logs_to_stderr(json):
            _write_json(out, report)


def _compare(files: list[str], chart: Path | None, json: bool) -> None:
    """`orionlm eval compare`: saved reports side by side (--json: each file's results, by its name)."""
    from ..eval.report import compare_chart, compare_table, read_report

    if not files:
        raise OrionError("compare needs at least one results file: orionlm eval compare A.json B.json")
    reports = {Path(p).stem: read_report(Path(p)) for p in files}
    if json:
        print_json({name: report["results"] for name, report in reports.items()})
    else:
        print(compare_table(reports))
    if chart is not None:
        compare_chart(reports, chart)
        with logs_to_stderr(json):
            print(f"wrote {chart}")


def leakage(
    model: str,
    items: Path,
    /,
    *,
    revision: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    out: Path | None = None,
    device: str | None = None,
    dtype: DType | None = None,
) -> None:
    """Detect benchmark leakage by shuffling options (arXiv 2409.01790): for each 4-option item, score all
    24 orderings of its options; flag the items whose published ordering scores highest (max_original,
    chance 1/24) and, among those, the ones whose score is an isolation-forest outlier (iforest@T). Needs
    `pip install 'orionlm[eval]'` (scikit-learn).

    Example:
      orionlm leakage runs/m ../shared/data/eval/mmlu_test_subset.jsonl --limit 200 --out leak.json

    Args:
        model: a model directory, a .gguf file or a Hub id
        revision: a branch, tag or commit of the Hub id MODEL (the same as MODEL@REV)
        items: a multiple-choice JSONL file ({"id", "question" or "context", "choices", "answer"} per line)
        limit: test only the first N 4-option items
        batch_size: sequences per forward pass
        out: write the report (rates and the flagged item ids) to this JSON file
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
    """
    from ..eval.leakage import detect, format_report

    lm, tokenizer = load_with_tokenizer(with_revision(model, revision), "scoring", device, dtype)
    report = detect(lm, tokenizer, items, limit=limit, batch_size=batch_size, progress=sys.stderr.isatty())
    print(format_report(report))
    if out is not None:
        _write_json(out, report)


def lm_eval(*args: str) -> None:
    """Run lm-evaluation-harness's command line with orionlm registered as a model, e.g.
      orionlm lm-eval --model orionlm --model_args pretrained=runs/m --tasks hellaswag --limit 100
    Needs `pip install 'orionlm[harness]'`; its own options: `orionlm lm-eval -- --help`. Without --device the
    model runs where orionlm would put it (CUDA when available, else the CPU); a --device this machine lacks is
    a one-line error before anything loads.

    Args:
        args: lm_eval's arguments, passed on unchanged
    """
    from ..checkpoint import check_device, resolve_device

    args = [a for a in args if a != "--"]
    device = _option_value(args, "--device")
    if device is None:  # lm_eval asks for CUDA when no device is named, which fails on a CPU-only machine
        args += ["--device", str(resolve_device()[0])]
    else:
        check_device(device)
    cli_evaluate = require("lm_eval.__main__", "harness", "orionlm lm-eval").cli_evaluate
    from ..eval import harness  # noqa: F401  registers "orionlm"

    sys.argv = ["lm_eval", *args]
    cli_evaluate()


def _option_value(args: list[str], option: str) -> str | None:
    """The value of `option` in a command line (`--opt VALUE` or `--opt=VALUE`), or None when it is absent."""
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.removeprefix(option + "=")
    return None


def _write_json(path: Path, data: Any) -> None:
    """Write a results file atomically (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
