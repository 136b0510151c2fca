"""Evaluation tasks: where their items come from, how a prompt is written, and their metrics.

Multiple-choice tasks are scored as lm-evaluation-harness scores them (same prompts, same continuations):
each choice's log-likelihood after the prompt; `acc` picks the highest, `acc_norm` the highest per
character of the choice's text (the delimiting space not counted). Files are the normalised JSONL of
../shared/data/eval (one item per line: {"id", "question" or "context", "choices", "answer"}) under the
names below, in `--data-dir` or given per task; LAMBADA is {"context", "continuation"} (optionally
gzipped) and WikiText a plain text file.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import random
import re
import statistics
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.sources import jsonl_records
from ..errors import OrionError

FILES = {
    "hellaswag": "hellaswag_val.jsonl",
    "arc_easy": "arc_easy_test.jsonl",
    "arc_challenge": "arc_challenge_test.jsonl",
    "piqa": "piqa_val.jsonl",
    "mmlu": "mmlu_test_subset.jsonl",
    "lambada": "lambada_openai.jsonl.gz",
    "wikitext": "wikitext2_test.tokens.txt.gz",
    "gsm8k": "gsm8k_test.jsonl",
}
GSM8K_STOP = ["Question:", "</s>", "<|im_end|>", "\n\n"]  # lm-evaluation-harness's gsm8k stop strings
MMLU_SHOTS = "mmlu_dev.jsonl"


class EvalError(OrionError):
    """An evaluation input that cannot be used; the message names the file and line."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file (gzipped if it ends in .gz) as a dict; a malformed line is an error that
    names the file and line, never skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [record | {"_line": number} for number, record in jsonl_records(f, path, EvalError)]
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or e}") from None


@dataclass
class MultipleChoiceItem:
    """A multiple-choice item as prompts: the text before the choices, and the choices, each scored as
    " " + choice after it (lm-evaluation-harness's target delimiter)."""

    id: str
    prompt: str
    choices: list[str]
    answer: int
    subject: str | None = None
    shots: list[MultipleChoiceItem] = field(default_factory=list)  # filled by the runner for k-shot

    @property
    def continuations(self) -> list[str]:
        return [f" {choice}" for choice in self.choices]

    def gold(self) -> str:
        return self.prompt + self.continuations[self.answer]


def _require(record: dict[str, Any], path: Path, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise EvalError(f"{path}:{record['_line']}: missing {', '.join(missing)}")
    choices, answer = record.get("choices"), record.get("answer")
    if "choices" in keys and (not isinstance(choices, list) or len(choices) < 2):
        raise EvalError(f"{path}:{record['_line']}: 'choices' must be a list of at least 2 strings")
    if "choices" in keys and not (isinstance(answer, int) and 0 <= answer < len(choices)):
        raise EvalError(f"{path}:{record['_line']}: 'answer' must be an index into 'choices', got {answer!r}")


def _question_answer(record: dict[str, Any]) -> tuple[str, list[str]]:
    """ARC and PIQA as lm-evaluation-harness writes them."""
    return f"Question: {record['question']}\nAnswer:", list(record["choices"])


def _hellaswag(record: dict[str, Any]) -> tuple[str, list[str]]:
    return record["context"], list(record["choices"])


def _mmlu(record: dict[str, Any]) -> tuple[str, list[str]]:
    letters = "ABCD"[: len(record["choices"])]
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(letters, record["choices"], strict=True))
    return f"{record['question'].strip()}{options}\nAnswer:", list(letters)


FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], tuple[str, list[str]]]]] = {
    "hellaswag": (("context", "choices", "answer"), _hellaswag),
    "arc_easy": (("question", "choices", "answer"), _question_answer),
    "arc_challenge": (("question", "choices", "answer"), _question_answer),
    "piqa": (("question", "choices", "answer"), _question_answer),
    "mmlu": (("question", "choices", "answer", "subject"), _mmlu),
}


def _hellaswag_text_records(path: Path) -> list[dict[str, Any]]:
    """HellaSwag's published text format: 6 lines per item (context, gold index, 4 endings)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().rstrip("\n").split("\n")
    if len(lines) % 6:
        raise EvalError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per item)")
    records = []
    for start in range(0, len(lines), 6):
        context, label, *endings = lines[start : start + 6]
        if not label.strip().isdigit():
            raise EvalError(f"{path}:{start + 2}: expected the gold ending's index, got {label!r}")
        records.append({"context": context, "choices": endings, "answer": int(label), "_line": start + 1})
    return records


def _mmlu_csv_records(path: Path, split: str) -> list[dict[str, Any]]:
    """MMLU's published CSVs (question, A, B, C, D, answer letter; no header): one subject's file, or the
    whole zip's `split` folder."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if n.startswith(f"data/{split}/") and n.endswith(".csv"))
            files = [(n, archive.read(n).decode("utf-8")) for n in names]
    else:
        files = [(path.name, path.read_text(encoding="utf-8"))]
    records = []
    for name, text in files:
        subject = Path(name).stem.removesuffix(f"_{split}").removesuffix("_test").removesuffix("_dev")
        for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if len(row) != 6 or row[5] not in "ABCD":
                raise EvalError(f"{path}:{name}:{number}: expected question, 4 options and an answer letter")
            records.append({"id": f"mmlu-{subject}-{number:03d}", "subject": subject, "question": row[0],
                            "choices": row[1:5], "answer": "ABCD".index(row[5]), "_line": number})  # fmt: skip
    return records


def read_records(task: str, path: Path, split: str = "test") -> list[dict[str, Any]]:
    """A task's records from the normalised JSONL or a published format: llm-foundry's JSONL ({"query",
    "choices", "gold"}), HellaSwag's 6-line text (.txt, .txt.bz2), MMLU's CSVs (.csv, or the .zip)."""
    if path.suffix in (".zip", ".csv"):
        return _mmlu_csv_records(path, split)
    if path.name.endswith((".txt", ".txt.bz2")):
        return _hellaswag_text_records(path)
    records = read_jsonl(path)
    for record in records:
        if "query" in record and "gold" in record:
            record["question"] = str(record.pop("query")).removeprefix("Question:").strip()
            record["answer"] = record.pop("gold")
    return records


def load_choices(task: str, path: Path, split: str = "test") -> list[MultipleChoiceItem]:
    keys, render = FORMATS[task]
    items = []
    for record in read_records(task, path, split):
        _require(record, path, keys)
        prompt, choices = render(record)
        item_id = str(record.get("id", f"{task}-{record['_line']}"))
        items.append(MultipleChoiceItem(item_id, prompt, choices, record["answer"], record.get("subject")))
    if not items:
        raise EvalError(f"{path} holds no items")
    return items


def mmlu_description(subject: str | None) -> str:
    return f"The following are multiple choice questions (with answers) about {(subject or '').replace('_', ' ')}.\n\n"


def add_shots(items: list[MultipleChoiceItem], pool: list[MultipleChoiceItem], k: int, seed: int) -> None:
    """k examples per item from `pool` (never the item itself; MMLU: the same subject), drawn with a
    generator seeded per item, so an item's shots do not depend on --limit or on the other items."""
    by_subject: dict[str | None, list[MultipleChoiceItem]] = {}
    for shot in pool:
        by_subject.setdefault(shot.subject, []).append(shot)
    for item in items:
        candidates = [s for s in by_subject.get(item.subject, pool) if s.id != item.id]
        if len(candidates) < k:
            raise EvalError(f"{item.id}: {k} shots asked for, only {len(candidates)} examples to draw from")
        item.shots = random.Random(f"{seed}:{item.id}").sample(candidates, k)


def prompt_with_shots(task: str, item: MultipleChoiceItem) -> str:
    text = "".join(shot.gold() + "\n\n" for shot in item.shots) + item.prompt
    return mmlu_description(item.subject) + text if task == "mmlu" else text


def load_lambada(path: Path) -> list[tuple[str, str]]:
    """(context, continuation) pairs; the continuation gets its leading space as lm-evaluation-harness's
    lambada_openai writes it."""
    pairs = []
    for record in read_jsonl(path):
        if "text" in record:  # the original format: the last word is the target
            head, _, last = record["text"].rpartition(" ")
            pairs.append((head, f" {last}"))
            continue
        _require(record, path, ("context", "continuation"))
        pairs.append((record["context"].rstrip(), " " + record["continuation"].strip()))
    if not pairs:
        raise EvalError(f"{path} holds no items")
    return pairs


def load_documents(path: Path) -> list[str]:
    """A text file's documents: WikiText's top-level " = Title = " headings start new ones; any other file is
    one document."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {path} as UTF-8 text: {e}") from None
    documents, current = [], []
    for line in lines:
        heading = line.startswith(" = ") and not line.startswith(" = = ") and line.rstrip().endswith(" =")
        if heading and any(x.strip() for x in current):
            documents.append("\n".join(current).strip("\n"))
            current = []
        current.append(line)
    if any(x.strip() for x in current):
        documents.append("\n".join(current).strip("\n"))
    if not documents:
        raise EvalError(f"{path} is empty")
    return documents


@dataclass
class Problem:
    """A GSM8K-style problem: the question and the number its worked answer ends with ("#### 18")."""

    id: str
    question: str
    solution: str  # the worked answer, for few-shot examples
    answer: str

    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"


NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalise_number(text: str) -> str:
    """ "1,234.50" -> "1234.5": the form two answers are compared in."""
    value = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def load_problems(path: Path) -> list[Problem]:
    problems = []
    for record in read_jsonl(path):
        _require(record, path, ("question", "answer"))
        marker = str(record["answer"]).rpartition("####")
        if not marker[1]:
            raise EvalError(f"{path}:{record['_line']}: the answer has no '#### <number>' line")
        problems.append(Problem(str(record.get("id", f"gsm8k-{record['_line']}")), str(record["question"]),
                                str(record["answer"]), normalise_number(marker[2])))  # fmt: skip
    if not problems:
        raise EvalError(f"{path} holds no items")
    return problems


def extract_answers(text: str) -> tuple[str | None, str | None]:
    """(strict, flexible) answers of a generated solution: the number after "#### ", and the last number."""
    strict = re.search(r"#### (-?[\d,]*\.?\d+)", text)
    numbers = NUMBER.findall(text)
    return (normalise_number(strict.group(1)) if strict else None,
            normalise_number(numbers[-1]) if numbers else None)  # fmt: skip


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)), as lm-evaluation-harness."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan"))
