"""Data sources: where documents come from (text files, directories, globs, JSONL, Parquet, HF datasets)."""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import OrionError, first_line, hub_advice, require, split_revision, unknown_names

KINDS = ("auto", "text", "jsonl", "parquet", "hf")
_GLOB_CHARS = set("*?[")
# Plain text is read in pieces of this many characters, so a separator-split file never sits whole in memory.
_READ_CHARS = 1 << 20


class DataError(OrionError):
    pass


@dataclass
class SourceConfig:
    """One entry of a data mixture."""

    path: str  # a file, a directory, a glob pattern, or "hf:NAME" (a Hugging Face dataset; hf:NAME@REV: a revision)
    weight: float = 1.0  # mixture weight (normalised over the sources)
    kind: str = "auto"  # "text" | "jsonl" | "parquet" | "hf" | "auto" (from the extension; .gz for text/jsonl)
    field: str = "text"  # the JSONL / Parquet / datasets column holding the document
    glob: str = "**/*"  # the files taken from a directory, e.g. "**/*.py" (hidden ones never)
    name: str | None = None  # display name; default: derived from path
    split: str = "train"  # for HF datasets
    doc_separator: str | None = None  # plain text: split a file into documents on this string; None = one per file
    template: str | None = None  # JSONL: each document made of several fields, "Question: {question}\nAnswer: {answer}"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(
                f"source {self.path!r}: unknown kind {unknown_names([self.kind], KINDS)}; use one of {KINDS}"
            )
        if not self.weight > 0:
            raise DataError(f"source {self.path!r}: weight must be positive, got {self.weight}")
        if self.doc_separator == "":
            raise DataError(f"source {self.path!r}: doc_separator must be a non-empty string or None")
        if self.doc_separator is not None and self.kind not in ("auto", "text"):
            raise DataError(f"source {self.path!r}: doc_separator applies to plain text only, not kind {self.kind!r}")
        if self.template is not None and self.kind not in ("auto", "jsonl"):
            raise DataError(f"source {self.path!r}: template applies to JSONL only, not kind {self.kind!r}")
        if self.name is None:
            self.name = _default_name(self.path)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SourceConfig:
        """A source from a recipe mapping; unknown keys are rejected with the closest valid names."""
        known = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            raise DataError(f"unknown data source keys: {unknown_names(unknown, known)}")
        if "path" not in values:
            raise DataError(f"a data source needs a `path`, got {values!r}")
        return cls(**values)

    @property
    def is_hf(self) -> bool:
        return self.kind == "hf" or self.path.startswith("hf:")

    @property
    def hf_name(self) -> str:
        return self.path.removeprefix("hf:")


def _default_name(path: str) -> str:
    if path.startswith("hf:"):
        return path[3:]
    if _GLOB_CHARS & set(path):
        return path
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".ndjson", ".parquet", ".txt"):
        name = name.removesuffix(suffix)
    return name or path


def source_files(source: SourceConfig) -> list[Path]:
    """The files of a file-based source, sorted so that every run reads them in the same order."""
    path = Path(source.path).expanduser()
    if _GLOB_CHARS & set(source.path):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"source {source.name!r}: the pattern {source.path!r} matches no files; check the path")
        return files
    if path.is_dir():
        # Hidden files and directories (.git, .cache, ...) are never training text.
        files = sorted(
            p
            for p in path.glob(source.glob)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"source {source.name!r}: no files in {path} match glob {source.glob!r}; change `glob`")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"source {source.name!r}: {path} does not exist; check the path")


def file_kind(source: SourceConfig, path: Path) -> str:
    """The reader for one file: the source's kind, or with kind="auto" its extension (anything else is text)."""
    if source.kind != "auto":
        return source.kind
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        if path.name.lower().endswith(".gz"):
            raise DataError(f"{path}: Parquet files are compressed inside; decompress the .gz")
        return "parquet"
    return "text"


def fingerprint(source: SourceConfig) -> dict[str, Any]:
    """What the tokens of a source depend on: its files (with sizes and modification times) and read settings."""
    reading = {"field": source.field, "doc_separator": source.doc_separator, "template": source.template}
    if source.is_hf:
        dataset = load_hf_dataset(source)
        # datasets' own fingerprint changes whenever the prepared data does.
        return {"hf": source.hf_name, "split": source.split, "data": getattr(dataset, "_fingerprint", None), **reading}
    files = []
    for path in source_files(source):
        stat = path.stat()
        files.append([str(path.resolve()), file_kind(source, path), stat.st_size, stat.st_mtime_ns])
    return {"files": files, **reading}


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """Every document of a source, in a fixed order (also what a tokenizer can be trained on).

    Documents that are empty or only whitespace are skipped: they would add nothing but an EOS."""
    return documents(source)


def documents(source: SourceConfig, on_progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """iter_documents, reporting progress in bytes read from disk (rows for HF datasets) to on_progress."""
    on_progress = on_progress or (lambda n: None)
    docs = _hf_documents(source, on_progress) if source.is_hf else _file_documents(source, on_progress)
    return (doc for doc in docs if doc.strip())


def _file_documents(source: SourceConfig, on_bytes: Callable[[int], None]) -> Iterator[str]:
    for path in source_files(source):
        try:
            yield from _path_documents(source, path, on_bytes)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} is invalid there); re-encode "
                            "it, e.g. iconv -f latin1 -t utf-8") from None  # fmt: skip


def _path_documents(source: SourceConfig, path: Path, on_bytes: Callable[[int], None]) -> Iterator[str]:
    kind = file_kind(source, path)
    if kind == "text":
        yield from _text_documents(path, source.doc_separator, on_bytes)
    elif kind == "jsonl":
        if source.doc_separator is not None:
            raise DataError(f"{path}: doc_separator applies to plain text only; a JSONL line is one document")
        yield from _jsonl_documents(path, source.field, source.template, on_bytes)
    elif kind == "parquet":
        yield from _parquet_documents(path, source.field, on_bytes)
    else:
        raise DataError(f"{path}: kind {kind!r} needs a dataset name such as 'hf:NAME', not a file")


def progress_total(source: SourceConfig) -> tuple[int, str]:
    """The total for a progress bar over `documents`: bytes on disk, or rows of an HF dataset."""
    if source.is_hf:
        return len(load_hf_dataset(source)), "doc"
    return sum(path.stat().st_size for path in source_files(source)), "B"


class _CountingReader(io.RawIOBase):
    """A binary file that reports the bytes read, so progress is measured on disk (compressed or not)."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None]) -> None:
        self._file = open(path, "rb", buffering=0)
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._file.readinto(buffer)
        if n:
            self._on_bytes(n)
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_text(path: Path, on_bytes: Callable[[int], None]) -> io.TextIOWrapper:
    binary: Any = io.BufferedReader(_CountingReader(path, on_bytes), buffer_size=1 << 20)
    if path.name.lower().endswith(".gz"):
        binary = gzip.GzipFile(fileobj=binary)
    # newline="": documents keep their line endings exactly. Invalid UTF-8 is an error (training on U+FFFD in
    # place of another encoding's letters would go unnoticed).
    return io.TextIOWrapper(binary, encoding="utf-8", newline="")


def _text_documents(path: Path, separator: str | None, on_bytes: Callable[[int], None]) -> Iterator[str]:
    with _open_text(path, on_bytes) as f:
        if separator is None:
            yield f.read()
            return
        # Pieces of the current document, joined only when a separator arrives (linear time even when the
        # separator is rare); `tail` holds its last len(separator)-1 characters to catch a separator split by a read.
        pieces: list[str] = []
        tail, keep = "", len(separator) - 1
        while chunk := f.read(_READ_CHARS):
            if separator not in tail + chunk:
                pieces.append(chunk)
                tail = _last(tail + chunk, keep)
                continue
            *docs, rest = ("".join(pieces) + chunk).split(separator)
            yield from docs
            pieces, tail = [rest], _last(rest, keep)
        yield "".join(pieces)


def _last(text: str, n: int) -> str:
    return text[max(len(text) - n, 0) :]


def jsonl_records(
    lines: Iterable[str], path: Path, error: type[OrionError] = DataError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON object
    raises `error` naming the file and line (never skipped)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: not valid JSON ({e.msg}); JSONL needs one JSON object per line") from None
        if not isinstance(record, dict):
            raise error(f"{path}:{number}: a JSONL line must be a JSON object, got {type(record).__name__}")
        yield number, record


def _jsonl_documents(path: Path, field: str, template: str | None, on_bytes: Callable[[int], None]) -> Iterator[str]:
    with _open_text(path, on_bytes) as f:
        for number, record in jsonl_records(f, path):
            if template is not None:
                try:
                    yield template.format_map(record)
                except (KeyError, IndexError, ValueError) as e:
                    raise DataError(
                        f"{path}:{number}: the source's template {template!r} cannot be filled ({e!r}); "
                        f"its {{names}} must be fields of every line: {sorted(record)}"
                    ) from None
                continue
            if field not in record:
                raise DataError(
                    f"{path}:{number}: no field {unknown_names([field], record)}; "
                    f"set the source's `field` to one of {sorted(record)}"
                )
            yield _text_value(record[field], f"{path}:{number}", field)


def _text_value(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text; choose a text `field`")
    return value


def _parquet_documents(path: Path, field: str, on_bytes: Callable[[int], None]) -> Iterator[str]:
    pa = require("pyarrow", "parquet", f"{path}: reading Parquet")
    pq = require("pyarrow.parquet", "parquet", f"{path}: reading Parquet")
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no column {unknown_names([field], columns)}; set the source's `field`")
    rows, size, reported = max(parquet.metadata.num_rows, 1), path.stat().st_size, 0
    done = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _text_value(value, str(path), field)
        # pyarrow reads the file itself: report the share of rows done as a share of the file's bytes.
        done += batch.num_rows
        now = size * done // rows
        on_bytes(now - reported)
        reported = now


def load_hf_dataset(source: SourceConfig) -> Any:
    """The source's dataset (hf:NAME, or hf:NAME@REV for a branch, tag or commit of a Hub dataset)."""
    datasets = require("datasets", "hf", f"source {source.path!r} (a Hugging Face dataset)")
    name, revision = split_revision(source.hf_name)
    try:
        return datasets.load_dataset(name, split=source.split, revision=revision)
    except (OSError, ValueError) as e:  # not found (locally or on the Hub), offline, gated, no such revision or split
        reason = hub_advice(e, revision) or first_line(e)
        raise DataError(
            f"source {source.path!r}: could not load the dataset (split {source.split!r}): {reason}"
        ) from None


def _hf_documents(source: SourceConfig, on_rows: Callable[[int], None]) -> Iterator[str]:
    dataset = load_hf_dataset(source)
    if source.field not in dataset.column_names:
        raise DataError(
            f"dataset {source.hf_name!r}: no column {unknown_names([source.field], dataset.column_names)}; "
            "set the source's `field`"
        )
    for batch in dataset.select_columns([source.field]).iter(batch_size=1000):
        values = batch[source.field]
        for value in values:
            yield _text_value(value, f"dataset {source.hf_name!r}", source.field)
        on_rows(len(values))
