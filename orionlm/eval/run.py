"""Running eval tasks: find each task's items, score them (log-likelihoods, perplexity, greedy answers)
and collect the metrics into a JSON-ready report (config, versions, per-task metrics with standard errors,
timing); orionlm.eval.report prints and compares such reports."""

from __future__ import annotations

import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import MissingExtra
from ..generation import generate
from ..model import OrionLM
from ..tokenizer import Tokenizer
from .hub import fetch
from .scoring import loglikelihood, perplexity
from .tasks import (
    FILES,
    FORMATS,
    GSM8K_STOP,
    MMLU_SHOTS,
    EvalError,
    add_shots,
    extract_answers,
    load_choices,
    load_documents,
    load_lambada,
    load_problems,
    mean_stderr,
    prompt_with_shots,
)

TASKS = list(FILES)


def task_path(task: str, data_dir: Path | None, task_files: dict[str, Path]) -> Path:
    """Where a task's items are: --task-file TASK=PATH, else its file in --data-dir (WikiText also in the
    perplexity/ folder beside it, as ../shared/data has it), else the Hub (orionlm.eval.hub)."""
    if task in task_files:
        path = task_files[task]
        if not path.is_file():
            raise EvalError(f"--task-file {task}={path}: no such file")
        return path
    if data_dir is not None:
        for folder in (data_dir, data_dir.parent / "perplexity"):
            if (folder / FILES[task]).is_file():
                return folder / FILES[task]
    try:
        return fetch(task)
    except (EvalError, MissingExtra) as e:
        raise EvalError(
            f"no items for {task}: pass --data-dir DIR holding {FILES[task]} (../shared/data/eval has them), "
            f"or --task-file {task}=PATH ({e})"
        ) from None


def _multiple_choice(
    model: OrionLM, tokenizer: Tokenizer, task: str, path: Path, shots_path: Path, limit: int | None,
    num_fewshot: int, seed: int, batch_size: int, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    items = load_choices(task, path)
    if num_fewshot:
        add_shots(items[:limit], load_choices(task, shots_path, split="dev"), num_fewshot, seed)
    items = items[:limit]
    requests = [(prompt_with_shots(task, item), c) for item in items for c in item.continuations]
    scores = iter(loglikelihood(model, tokenizer, requests, batch_size, progress))
    acc, acc_norm, by_subject = [], [], {}
    for item in items:
        lls = [next(scores).logprob for _ in item.continuations]
        per_char = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]
        hit = float(max(range(len(lls)), key=lls.__getitem__) == item.answer)
        acc.append(hit)
        acc_norm.append(float(max(range(len(lls)), key=per_char.__getitem__) == item.answer))
        by_subject.setdefault(item.subject, []).append(hit)
    metrics: dict[str, Any] = {"n": len(items)}
    metrics["acc"], metrics["acc_stderr"] = mean_stderr(acc)
    metrics["acc_norm"], metrics["acc_norm_stderr"] = mean_stderr(acc_norm)
    if task == "mmlu":
        subjects = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
        metrics["acc_macro"] = sum(subjects.values()) / len(subjects)
        metrics["subjects"] = subjects
    return metrics


def _gsm8k(
    model: OrionLM, tokenizer: Tokenizer, path: Path, limit: int | None, num_fewshot: int, seed: int,
    max_new_tokens: int, think: bool,
) -> dict[str, Any]:  # fmt: skip
    """Greedy worked answers, cut at lm-evaluation-harness's stop strings, all problems as one continuous
    batch; exact match of the "#### N" answer (strict) and of the last number (flexible). A thinking model
    thinks before each token unless `think` is False."""
    problems = load_problems(path)
    items = problems[:limit]
    prompts = []
    for item in items:
        pool = [p for p in problems if p.id != item.id]
        if len(pool) < num_fewshot:
            raise EvalError(f"{num_fewshot} shots asked for, only {len(pool)} other problems in {path}")
        shots = random.Random(f"{seed}:{item.id}").sample(pool, num_fewshot)
        prompt = "".join(f"{s.prompt()} {s.solution}\n\n" for s in shots) + item.prompt()
        ids = tokenizer.encode(prompt)
        room = model.config.max_seq_len - max_new_tokens
        if len(ids) > room:  # keep the end: the question itself and the nearest shots
            prompt = tokenizer.decode(ids[-room:], skip_special_tokens=False)
        prompts.append(prompt)
    texts = generate(model, tokenizer, None, prompts, max_new_tokens=max_new_tokens, do_sample=False,
                     stop=GSM8K_STOP, think=think)  # fmt: skip
    strict, flexible = [], []
    for item, text in zip(items, texts, strict=True):
        got_strict, got_flexible = extract_answers(text)
        strict.append(float(got_strict == item.answer))
        flexible.append(float(got_flexible == item.answer))
    metrics: dict[str, Any] = {"n": len(items)}
    metrics["exact_match"], metrics["exact_match_stderr"] = mean_stderr(strict)
    metrics["exact_match_flexible"], metrics["exact_match_flexible_stderr"] = mean_stderr(flexible)
    return metrics


def evaluate(
    model: OrionLM,
    tokenizer: Tokenizer,
    tasks: list[str],
    data_dir: Path | None = None,
    task_files: dict[str, Path] | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    batch_size: int = 16,
    context: int | None = None,
    stride: int | None = None,
    progress: bool = True,
    max_new_tokens: int = 256,
    think: bool = True,
) -> dict[str, Any]:
    """Run the tasks (names from TASKS) on the first `limit` items of each; see the module docstring.
    `think`: whether a thinking model thinks while it generates (gsm8k); the scored tasks read its base
    predictions."""
    task_files = task_files or {}
    unknown = [t for t in tasks if t not in FILES]
    if unknown:
        raise EvalError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    paths = {task: task_path(task, data_dir, task_files) for task in tasks}  # every file is found before any run
    results: dict[str, Any] = {}
    timing: dict[str, float] = {}
    model.eval()
    for task in tasks:
        start = time.perf_counter()
        if task in FORMATS:
            shots = paths[task]
            if task == "mmlu" and num_fewshot:
                shots = task_files.get("mmlu_dev") or paths[task].with_name(MMLU_SHOTS)
                if paths[task].suffix == ".zip":  # the published zip holds the dev split too
                    shots = paths[task]
                if not shots.is_file():
                    shots = fetch("mmlu_dev")
            results[task] = _multiple_choice(
                model, tokenizer, task, paths[task], shots, limit, num_fewshot, seed, batch_size, progress
            )
        elif task == "gsm8k":
            results[task] = _gsm8k(model, tokenizer, paths[task], limit, num_fewshot, seed, max_new_tokens, think)
        elif task == "lambada":
            pairs = load_lambada(paths[task])[:limit]
            scores = loglikelihood(model, tokenizer, pairs, batch_size, progress)
            acc, acc_stderr = mean_stderr([float(s.greedy) for s in scores])
            results[task] = {"n": len(pairs), "acc": acc, "acc_stderr": acc_stderr,
                             "perplexity": math.exp(-sum(s.logprob for s in scores) / len(scores))}  # fmt: skip
        else:
            documents = load_documents(paths[task])[:limit]
            ppl = perplexity(model, tokenizer, documents, context, stride, progress)
            results[task] = {"n": len(documents), "word_perplexity": ppl.word_perplexity,
                             "byte_perplexity": ppl.byte_perplexity, "bits_per_byte": ppl.bits_per_byte,
                             "token_perplexity": ppl.token_perplexity, "tokens": ppl.tokens}  # fmt: skip
        timing[task] = time.perf_counter() - start
    config = {"tasks": tasks, "files": {t: str(p) for t, p in paths.items()}, "limit": limit,
              "num_fewshot": num_fewshot, "seed": seed, "batch_size": batch_size, "context": context,
              "stride": stride, "think": think and model.config.thinks, "model": model.config.to_dict()}  # fmt: skip
    versions = {"orionlm": __version__, "torch": torch.__version__, "python": platform.python_version()}
    return {"results": results, "config": config, "versions": versions, "timing_s": timing}
