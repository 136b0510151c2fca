"""Task items from the Hugging Face Hub, for when no local file is given: the dataset lm-evaluation-harness
uses for the task, read with `datasets`, written once as the normalised JSONL the loaders read (cached under
~/.cache/orionlm/eval). Offline, or without `datasets`, a clear error says how to pass a local file."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import first_line, hub_advice, not_here_nor_on_hub, require, split_revision
from .tasks import EvalError

CACHE = Path(os.environ.get("ORIONLM_CACHE", Path.home() / ".cache" / "orionlm")) / "eval"


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up: WikiHow markers out, double spaces in."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> dict[str, Any]:
    context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return {"context": _hellaswag_text(context), "choices": [_hellaswag_text(e) for e in row["endings"]],
            "answer": int(row["label"])}  # fmt: skip


def _arc(row: dict[str, Any]) -> dict[str, Any]:
    labels = list(row["choices"]["label"])
    return {
        "question": row["question"],
        "choices": list(row["choices"]["text"]),
        "answer": labels.index(row["answerKey"]),
    }


def _piqa(row: dict[str, Any]) -> dict[str, Any]:
    return {"question": row["goal"].strip(), "choices": [row["sol1"], row["sol2"]], "answer": int(row["label"])}


def _mmlu(row: dict[str, Any]) -> dict[str, Any]:
    return {"subject": row["subject"], "question": row["question"], "choices": list(row["choices"]),
            "answer": int(row["answer"])}  # fmt: skip


def _lambada(row: dict[str, Any]) -> dict[str, Any]:
    head, _, last = row["text"].rpartition(" ")
    return {"context": head, "continuation": last}


def _gsm8k(row: dict[str, Any]) -> dict[str, Any]:
    return {"question": row["question"], "answer": row["answer"]}


# task: (hub dataset, configuration, split, row -> normalised record); wikitext is plain text (see fetch)
SOURCES: dict[str, tuple[str, str | None, str, Callable[[dict[str, Any]], dict[str, Any]] | None]] = {
    "hellaswag": ("Rowan/hellaswag", None, "validation", _hellaswag),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    "piqa": ("baber/piqa", None, "validation", _piqa),
    "mmlu": ("cais/mmlu", "all", "test", _mmlu),
    "mmlu_dev": ("cais/mmlu", "all", "dev", _mmlu),
    "lambada": ("EleutherAI/lambada_openai", "default", "test", _lambada),
    "gsm8k": ("openai/gsm8k", "main", "test", _gsm8k),
    "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", None),
}


def _rows(dataset: str, config: str | None, split: str) -> Iterable[dict[str, Any]]:
    datasets = require("datasets", "hf", "reading tasks from the Hub")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its offline retries print a line each
    name, revision = split_revision(dataset)
    try:
        return datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # offline, unknown name, gated: datasets raises many kinds
        local = Path(dataset).exists()
        if not local and name not in {source[0] for source in SOURCES.values()}:  # a mistyped path or a Hub name
            raise EvalError(not_here_nor_on_hub(dataset, f"dataset ({split})", e)) from None
        where = "" if local else " from the Hub"
        raise EvalError(
            f"could not load {dataset} ({split}){where}: {hub_advice(e, revision) or first_line(e)}"
        ) from None


def fetch(task: str, dataset: str | None = None) -> Path:
    """The task's items from the Hub (or `dataset`: another Hub name, NAME@REV for a branch, tag or commit of one,
    or a local dataset directory in the same schema) as a normalised file in the cache; later calls reuse the
    file."""
    name, config, split, convert = SOURCES[task]
    dataset = dataset or name
    tag = re.sub(r"[^\w.-]+", "_", f"{dataset}-{config}-{split}")
    path = CACHE / f"{task}-{tag}{'.txt' if convert is None else '.jsonl'}"
    if path.is_file():
        return path
    rows = _rows(dataset, config if split_revision(dataset)[0] == name else None, split)
    if convert is None:  # each page starts with its " = Title = " line: load_documents splits there
        text = "\n".join(row["page"] for row in rows)
    else:
        text = "".join(json.dumps({"id": f"{task}-{i:05d}"} | convert(row)) + "\n" for i, row in enumerate(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
