import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from orionlm.data import DataConfig, DataError, SourceConfig, build_dataset, token_dtype, tokenize_source
from orionlm.data import shards as shards_module
from orionlm.tokenizer import Tokenizer


def direct_tokens(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """The reference: every document encoded on its own, each followed by EOS."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_id]
    return np.array(ids)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(
        "the quick brown fox jumps over the lazy dog. " * 200 + "pack my box with five dozen jugs.\n" * 50
    )
    return Tokenizer.train_bpe([corpus], vocab_size=320)


def test_tokens_equal_direct_tokenization_with_eos_after_each_document(tmp_path: Path, bpe: Tokenizer) -> None:
    docs = ["the quick brown fox", "jumps over\nthe lazy dog", "pack my box", "ünïcödé and 日本語 bytes"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shard = tokenize_source(SourceConfig(path=str(tmp_path / "d.jsonl")), bpe, tmp_path / "cache", progress=False)
    expected = direct_tokens(bpe, docs)
    assert np.array_equal(shard.tokens, expected)
    assert shard.num_documents == 4 and shard.tokens.dtype == np.uint16
    # EOS exactly at the end of each document and nowhere else
    ends = np.cumsum([len(bpe.encode(d, add_special_tokens=False)) + 1 for d in docs]) - 1
    assert np.flatnonzero(np.asarray(shard.tokens) == bpe.eos_id).tolist() == ends.tolist()
    assert isinstance(shard.tokens, np.memmap)


def test_large_batches_equal_direct_tokenization(
    tmp_path: Path, bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches cut by both limits (characters and documents) must not change a token.
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "pack", "jugs", "\n"]
    docs = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(500)]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    monkeypatch.setattr(shards_module, "_BATCH_CHARS", 3000)
    monkeypatch.setattr(shards_module, "_BATCH_DOCS", 37)
    source = SourceConfig(path=str(tmp_path / "d.txt"), doc_separator="\n\n")
    shard = tokenize_source(source, bpe, tmp_path / "cache", progress=False)
    expected_docs = [d for d in "\n\n".join(docs).split("\n\n") if d.strip()]
    assert shard.num_documents == len(expected_docs)
    assert np.array_equal(shard.tokens, direct_tokens(bpe, expected_docs))


def test_second_build_reuses_the_cache_and_changes_invalidate_it(
    tmp_path: Path, bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.txt"
    path.write_text("the quick brown fox")
    source = SourceConfig(path=str(path))
    first = tokenize_source(source, bpe, tmp_path / "cache", progress=False)
    mtime = (first.directory / "tokens.bin").stat().st_mtime_ns

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(shards_module, "documents", no_tokenizing)
    again = tokenize_source(SourceConfig(path=str(path)), bpe, tmp_path / "cache", progress=False)
    assert again.directory == first.directory and np.array_equal(again.tokens, first.tokens)
    assert (again.directory / "tokens.bin").stat().st_mtime_ns == mtime
    # a build from another working directory (relative path) finds the same entry
    monkeypatch.chdir(tmp_path)
    assert (
        tokenize_source(SourceConfig(path="d.txt"), bpe, tmp_path / "cache", progress=False).directory
        == first.directory
    )
    # seq_len and val_fraction only change the packing, not the tokens
    build_dataset(
        DataConfig([SourceConfig(path="d.txt")], seq_len=1, val_fraction=0.3, cache_dir=str(tmp_path / "cache")), bpe
    )
    monkeypatch.undo()

    # new content, another tokenizer, another separator: new entries with the right tokens
    path.write_text("pack my box with five dozen jugs")
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    changed = tokenize_source(source, bpe, tmp_path / "cache", progress=False)
    assert changed.directory != first.directory
    assert np.array_equal(changed.tokens, direct_tokens(bpe, ["pack my box with five dozen jugs"]))
    byte = tokenize_source(source, Tokenizer.byte_level(), tmp_path / "cache", progress=False)
    assert byte.directory not in (first.directory, changed.directory)
    split = tokenize_source(SourceConfig(path=str(path), doc_separator=" "), bpe, tmp_path / "cache", progress=False)
    assert split.num_documents == 7 and split.directory not in (first.directory, changed.directory)
    assert len(list((tmp_path / "cache").iterdir())) == 4 + 4  # four entries, each with its lock file


def test_killed_tokenization_leaves_no_cache_entry(
    tmp_path: Path, bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d.txt").write_text("the quick\n\nbrown fox\n\njumps")
    source = SourceConfig(path=str(tmp_path / "d.txt"), doc_separator="\n\n")
    real_documents = shards_module.documents
    monkeypatch.setattr(shards_module, "_BATCH_DOCS", 1)  # so that tokens are written before the "kill"

    def killed_midway(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        documents = real_documents(*args, **kwargs)
        yield next(documents)
        yield next(documents)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "documents", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        tokenize_source(source, bpe, tmp_path / "cache", progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    # a SIGKILL gives no chance to clean up: the temporary directory stays until the next build of that entry
    key = shards_module.cache_key(source, bpe)[:32]
    (tmp_path / "cache" / f".{key}.killed").mkdir()
    (tmp_path / "cache" / f".{key}.killed" / "tokens.bin").write_bytes(b"\x01\x02\x03")
    shard = tokenize_source(source, bpe, tmp_path / "cache", progress=False)
    assert np.array_equal(shard.tokens, direct_tokens(bpe, ["the quick", "brown fox", "jumps"]))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{key}.lock", key]


def test_uint16_or_uint32_by_vocabulary_size(tmp_path: Path) -> None:
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    big = Tokenizer.byte_level()
    big.backend.add_tokens([f"<x{i}>" for i in range(65536)])
    assert big.vocab_size == 65796
    (tmp_path / "d.txt").write_text("hi <x65535> there <x0>")
    shard = tokenize_source(SourceConfig(path=str(tmp_path / "d.txt")), big, tmp_path / "cache", progress=False)
    assert shard.tokens.dtype == np.uint32
    assert (tmp_path / "cache" / shard.directory.name / "tokens.bin").stat().st_size == 4 * shard.num_tokens
    expected = direct_tokens(big, ["hi <x65535> there <x0>"])
    assert expected.max() == 65795 and np.array_equal(shard.tokens, expected)  # an id above 65535 survives


def test_progress_bar_goes_to_stderr(tmp_path: Path, bpe: Tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.txt").write_text("the lazy dog")
    tokenize_source(SourceConfig(path=str(tmp_path / "d.txt")), bpe, tmp_path / "cache", progress=True)
    captured = capsys.readouterr()
    assert "tokenizing d" in captured.err and "tokens=4" in captured.err and captured.out == ""


def test_source_too_small_for_a_window(tmp_path: Path, bpe: Tokenizer) -> None:
    (tmp_path / "tiny.txt").write_text("the dog")
    config = DataConfig([SourceConfig(path=str(tmp_path / "tiny.txt"))], seq_len=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"source 'tiny' .* has 3 tokens, too few for one training window .*65"):
        build_dataset(config, bpe, progress=False)


def test_shared_corpora_equal_direct_tokenization(shared_data: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.byte_level()
    pretrain = shared_data / "pretrain"
    with gzip.open(pretrain / "tinyshakespeare.txt.gz", "rt", encoding="utf-8", newline="") as f:
        shakespeare = f.read()
    with gzip.open(pretrain / "en_c4_sample.jsonl.gz", "rt", encoding="utf-8") as f:
        c4 = [json.loads(line)["text"] for line in f]
    config = DataConfig(
        sources=[
            SourceConfig(path=str(pretrain / "tinyshakespeare.txt.gz")),
            SourceConfig(path=str(pretrain / "en_c4_sample.jsonl.gz"), field="text"),
        ],
        cache_dir=str(tmp_path),
    )
    dataset = build_dataset(config, tokenizer, progress=False)
    stats = {s["name"]: s for s in dataset.stats()}
    # byte-level: one token per UTF-8 byte, plus EOS per document
    assert stats["tinyshakespeare"]["tokens"] == 1_115_394 + 1 and stats["tinyshakespeare"]["documents"] == 1
    assert stats["en_c4_sample"]["documents"] == 300
    assert stats["en_c4_sample"]["tokens"] == sum(len(d.encode()) for d in c4) + 300
    assert np.array_equal(dataset.shards[0].tokens, direct_tokens(tokenizer, [shakespeare]))
    assert np.array_equal(dataset.shards[1].tokens, direct_tokens(tokenizer, c4))


def test_a_damaged_entry_is_reported_and_the_cache_dir_follows_the_environment(
    tmp_path: Path, bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORIONLM_CACHE", str(tmp_path / "home"))
    assert shards_module.default_cache_dir() == tmp_path / "home" / "tokens"
    (tmp_path / "d.txt").write_text("the quick brown fox")
    shard = tokenize_source(SourceConfig(path=str(tmp_path / "d.txt")), bpe, progress=False)
    assert shard.directory.parent == tmp_path / "home" / "tokens"
    with open(shard.directory / "tokens.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DataError, match=r"tokens\.bin has 4 bytes, not \d+; delete .* to re-tokenize"):
        tokenize_source(SourceConfig(path=str(tmp_path / "d.txt")), bpe, progress=False)
