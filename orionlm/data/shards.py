"""Token shards: each source tokenized once into a flat file of token ids on disk, cached and memory-mapped."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..tokenizer import Tokenizer
from .sources import DataError, SourceConfig, documents, fingerprint, progress_total

# Bump when the shard layout or the way documents become tokens changes: old cache entries are then ignored.
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
# Documents are encoded in batches (the tokenizer spreads a batch over the cores) of about this many characters.
_BATCH_CHARS = 1 << 22
_BATCH_DOCS = 4096


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and memory of a shard when every id fits; uint32 otherwise."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def default_cache_dir() -> Path:
    """$ORIONLM_CACHE/tokens, or ~/.cache/orionlm/tokens."""
    return Path(os.environ.get("ORIONLM_CACHE", "~/.cache/orionlm")).expanduser() / "tokens"


@dataclass
class TokenizedSource:
    """One source as a stream of token ids: its documents in order, each followed by EOS."""

    config: SourceConfig
    directory: Path  # the cache entry
    tokens: np.ndarray  # (num_tokens,) uint16 or uint32, memory-mapped
    num_documents: int

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def cache_key(source: SourceConfig, tokenizer: Tokenizer) -> str:
    """A hash of everything the tokens depend on: the tokenizer, the source's files and how they are read."""
    eos_id = tokenizer.eos_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; training data needs one to separate documents")
    content = {
        "format": FORMAT_VERSION,
        "tokenizer": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
        "eos_id": eos_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "kind": source.kind,
        "source": fingerprint(source),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def tokenize_source(
    source: SourceConfig, tokenizer: Tokenizer, cache_dir: str | Path | None = None, progress: bool = True
) -> TokenizedSource:
    """The source's token shard from the cache, tokenizing it first when it is not there yet."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, tokenizer)
    directory = cache_dir / key[:32]
    # Several processes (torchrun ranks) may ask for the same source: one tokenizes, the others wait and reuse it.
    with _exclusive(cache_dir / f".{directory.name}.lock"):
        if not (directory / META_FILE).is_file():
            # Temporary directories of a tokenization that was killed (no one else can be writing: we hold the lock).
            for stale in cache_dir.glob(f".{directory.name}.*"):
                if stale.is_dir():
                    shutil.rmtree(stale)
            _write_shard(source, tokenizer, directory, progress)
    return _open_shard(source, directory)


def _write_shard(source: SourceConfig, tokenizer: Tokenizer, directory: Path, progress: bool) -> None:
    """Tokenize into a temporary directory and rename it into place: a killed run leaves no partial entry."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos_id = tokenizer.eos_id
    assert eos_id is not None  # cache_key checked it
    temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        total, unit = progress_total(source)
        bar = tqdm(
            total=total,
            unit=unit,
            unit_scale=True,
            desc=f"tokenizing {source.name}",
            file=sys.stderr,
            disable=not progress,
        )
        num_tokens = num_documents = 0
        with bar, open(temp / TOKENS_FILE, "wb") as f:
            for batch in _batches(documents(source, bar.update)):
                encodings = tokenizer.backend.encode_batch(batch, add_special_tokens=False)
                ids: list[int] = []
                for encoding in encodings:
                    ids.extend(encoding.ids)
                    ids.append(eos_id)
                np.asarray(ids, dtype=dtype).tofile(f)
                num_tokens += len(ids)
                num_documents += len(batch)
                bar.set_postfix(tokens=f"{num_tokens:,}", docs=f"{num_documents:,}", refresh=False)
            # On disk before the rename publishes the entry, so that a power loss cannot publish a hole.
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "format": FORMAT_VERSION,
            "source": asdict(source),
            "dtype": dtype.name,
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "eos_id": eos_id,
            "vocab_size": tokenizer.vocab_size,
        }
        (temp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():  # only an entry without meta.json, left by hand: never a complete one
            shutil.rmtree(directory)
        os.replace(temp, directory)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _open_shard(source: SourceConfig, directory: Path) -> TokenizedSource:
    meta: dict[str, Any] = json.loads((directory / META_FILE).read_text())
    path = directory / TOKENS_FILE
    dtype = np.dtype(meta["dtype"])
    expected = meta["num_tokens"] * dtype.itemsize
    size = path.stat().st_size if path.is_file() else 0
    if size != expected:
        raise DataError(f"{path} has {size} bytes, not {expected}; delete {directory} to re-tokenize")
    # np.memmap cannot map an empty file; a source without tokens is reported by the caller.
    tokens = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
    return TokenizedSource(config=source, directory=directory, tokens=tokens, num_documents=meta["num_documents"])


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock, released by the OS when the holder dies (so a killed run never leaves it held)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps every entry whole
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
