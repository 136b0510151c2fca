import gzip
import json
from pathlib import Path

import pytest

from orionlm.data import DataConfig, DataError, SourceConfig, iter_documents
from orionlm.data import sources as sources_module


def test_plain_text_is_one_document_per_file_read_as_is(tmp_path: Path) -> None:
    text = "first line\r\nsecond line\n\nthird\n"
    (tmp_path / "a.txt").write_bytes(text.encode())
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("compressed ünïcode\n")
    assert list(iter_documents(SourceConfig(path=str(tmp_path / "a.txt")))) == [text]  # CRLF kept
    assert list(iter_documents(SourceConfig(path=str(tmp_path / "b.txt.gz")))) == ["compressed ünïcode\n"]


@pytest.mark.parametrize("read_chars", [1, 5, 12, 13, 1 << 20])
def test_separator_split_equals_str_split_whatever_the_read_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_chars: int
) -> None:
    # Reads of 1..13 characters cut the 13-character separator at every possible place.
    separator = "<|endoftext|>"
    docs = ["Once upon a time", "", "  \n", "a<|endoftext", "|>b", "The end.\n", "x" * 40]
    text = separator.join(docs)
    (tmp_path / "stories.txt").write_text(text)
    monkeypatch.setattr(sources_module, "_READ_CHARS", read_chars)
    got = list(iter_documents(SourceConfig(path=str(tmp_path / "stories.txt"), doc_separator=separator)))
    expected = [d for d in text.split(separator) if d.strip()]  # blank documents are skipped
    assert got == expected
    assert got == ["Once upon a time", "a<|endoftext", "|>b", "The end.\n", "x" * 40]


def test_directory_glob_reads_matching_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "z.py").write_text("z = 1\n")
    (tmp_path / "pkg" / "sub" / "a.py").write_text("a = 2\n")
    (tmp_path / "pkg" / "notes.md").write_text("# not code\n")
    (tmp_path / "pkg" / ".git").mkdir()
    (tmp_path / "pkg" / ".git" / "hook.py").write_text("hidden = True\n")
    (tmp_path / "pkg" / ".hidden.py").write_text("hidden = True\n")
    source = SourceConfig(path=str(tmp_path / "pkg"), glob="**/*.py")
    assert source.name == "pkg"
    assert list(iter_documents(source)) == ["a = 2\n", "z = 1\n"]  # pkg/sub/a.py sorts before pkg/z.py


def test_glob_pattern_path(tmp_path: Path) -> None:
    for name, text in [("b.txt", "bee"), ("a.txt", "ay"), ("c.md", "sea")]:
        (tmp_path / name).write_text(text)
    source = SourceConfig(path=str(tmp_path / "*.txt"))
    assert list(iter_documents(source)) == ["ay", "bee"]


def test_jsonl_field_and_gzip(tmp_path: Path) -> None:
    records = [
        {"id": 1, "body": "one"},
        {"id": 2, "body": "two\nlines"},
        {"id": 3, "body": ""},
        {"id": 4, "body": None},
    ]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write("\n")  # a trailing blank line is not a record
    assert list(iter_documents(SourceConfig(path=str(tmp_path / "d.jsonl.gz"), field="body"))) == ["one", "two\nlines"]


def test_jsonl_template_joins_fields(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2", "id": 7}\n{"question": "2+2?", "answer": "#### 4"}\n')
    template = "Question: {question}\nAnswer: {answer}"
    got = list(iter_documents(SourceConfig(path=str(path), template=template)))
    assert got == ["Question: 1+1?\nAnswer: #### 2", "Question: 2+2?\nAnswer: #### 4"]
    with pytest.raises(DataError, match=r"qa\.jsonl:2: the source's template .* cannot be filled \(KeyError\('id'\)\)"):
        list(iter_documents(SourceConfig(path=str(path), template="{id}: {question}")))
    with pytest.raises(DataError, match="template applies to JSONL only"):
        SourceConfig(path=str(path), kind="text", template=template)


def test_text_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("Hyvää päivää\n".encode("latin-1"))  # Finnish in Latin-1
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "olá"}\n'.encode("latin-1"))
    message = r"is not UTF-8 text \(byte 0x(e4|e1) is invalid there\); re-encode it, e.g. iconv"
    for name in ("latin1.txt", "latin1.jsonl"):
        with pytest.raises(DataError, match=rf"{name} {message}"):
            list(iter_documents(SourceConfig(path=str(tmp_path / name))))


def test_jsonl_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: no field 'text' \(did you mean 'txt'\?\)"):
        list(iter_documents(SourceConfig(path=str(path))))
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        list(iter_documents(SourceConfig(path=str(path))))
    path.write_text('{"text": ["a", "list"]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text' holds list, not text"):
        list(iter_documents(SourceConfig(path=str(path))))
    with pytest.raises(DataError, match="doc_separator applies to plain text only"):
        list(iter_documents(SourceConfig(path=str(path), doc_separator="\n")))


def test_parquet_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"document number {i}" for i in range(2500)]  # more than one read batch
    pq.write_table(pa.table({"content": texts, "n": list(range(2500))}), tmp_path / "d.parquet", row_group_size=700)
    assert list(iter_documents(SourceConfig(path=str(tmp_path / "d.parquet"), field="content"))) == texts
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text'"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "d.parquet"))))
    with pytest.raises(DataError, match="holds int, not text"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "d.parquet"), field="n")))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "broken.parquet"))))


def test_hf_dataset_without_datasets_says_install_it() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed")
    with pytest.raises(DataError, match="install datasets"):
        list(iter_documents(SourceConfig(path="hf:roneneldan/TinyStories")))


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    cases = [
        (lambda: list(iter_documents(SourceConfig(path=str(tmp_path / "nope.txt")))), "does not exist"),
        (lambda: list(iter_documents(SourceConfig(path=str(tmp_path / "*.nothing")))), "matches no files"),
        (lambda: list(iter_documents(SourceConfig(path=str(tmp_path), glob="*.rs"))), "match glob '\\*.rs'"),
        (lambda: SourceConfig(path="x.txt", kind="jsonll"), "unknown kind 'jsonll' \\(did you mean 'jsonl'\\?\\)"),
        (lambda: SourceConfig(path="x.txt", weight=0), "weight must be positive"),
        (lambda: SourceConfig.from_dict({"path": "x", "wieght": 2}), "'wieght' \\(did you mean 'weight'\\?\\)"),
        (lambda: DataConfig(sources=[]), "at least one source"),
        (lambda: DataConfig(sources=["a/data", "b/data"]), "named \\['data'\\]; give each a distinct `name`"),
        (lambda: DataConfig(sources=["x.txt"], val_fraction=1.0), "val_fraction must be in"),
    ]
    for make, message in cases:
        with pytest.raises(DataError, match=message) as info:
            make()
        assert "\n" not in str(info.value)


def test_data_config_accepts_recipe_mappings() -> None:
    config = DataConfig(sources=[{"path": "web.jsonl.gz", "weight": 3}, "code/"], seq_len=32)
    assert [(s.name, s.weight) for s in config.sources] == [("web", 3.0), ("code", 1.0)]


def test_shared_jsonl_sources(shared_data: Path) -> None:
    c4 = shared_data / "pretrain" / "en_c4_sample.jsonl.gz"
    with gzip.open(c4, "rt", encoding="utf-8") as f:
        expected = [json.loads(line)["text"] for line in f]
    assert list(iter_documents(SourceConfig(path=str(c4)))) == expected
    assert len(expected) == 300
    machado = list(
        iter_documents(SourceConfig(path=str(shared_data / "pretrain" / "pt_machado_de_assis_novels.jsonl.gz")))
    )
    assert len(machado) == 10
    assert machado[0].startswith("Dom Casmurro")
    assert sum(map(len, machado)) == 3053422  # the README's character count
