"""The bad-file corpus (issue 21): files a careless user hands orionlm, each through the real command line
(orionlm.cli.main, in this process). Every one must end with exit code 2 and one line on stderr that says what is
wrong (an uncaught exception, a traceback's cause, fails the test), and leave every file as it was: nothing
written, changed or deleted.

Cases whose refusal needs a failure the command line cannot cause (a disk that fills during a save) are tested
where the failure can be injected: tests/train/test_trainer.py.
"""

import argparse
import hashlib
import json
import re
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from orionlm.cli import main
from orionlm.convert.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from orionlm.loading import load_model
from orionlm.nn.lora import LoRAConfig, apply_lora
from orionlm.train.trainer import find_checkpoints

STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"


def _cli(*args: object) -> int:
    """Exit code of `orionlm ARGS` (0 when it returns)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def _recipe(root: Path, out: str = "run", **changes: dict) -> Path:
    """A pretraining recipe for a tiny model on a small file of the standard library, into root/out."""
    recipe = {
        "model": {"preset": "tiny-dense", "overrides": {"max_seq_len": 32}},
        "data": {"sources": [{"path": str(STDLIB_JSON / "scanner.py")}], "seq_len": 16, "val_fraction": 0.1,
                 "cache_dir": str(root / "cache")},
        "schedule": {"warmup_steps": 1},
        "run": {"out_dir": str(root / out), "max_steps": 2, "batch_size": 2, "log_every": 1, "eval_every": 2,
                "eval_batches": 1, "save_every_steps": 2, "progress": False, "plot": False, "tensorboard": False},
    }  # fmt: skip
    for section, values in changes.items():
        recipe.setdefault(section, {}).update(values)
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Good files to spoil: a model directory (m), a GGUF file (of a model with a trained BPE tokenizer: llama.cpp
    needs merges), a LoRA adapter on m, a chimera model, and a run trained for 2 steps with one checkpoint (run, its
    recipe run.yaml)."""
    root = tmp_path_factory.mktemp("corpus")
    assert _cli("init", root / "m", "--preset", "tiny-dense", "--seed", "1") == 0
    assert _cli("init", root / "chimera", "--preset", "tiny-chimera", "--seed", "1") == 0
    (root / "text.txt").write_text("some text to train a tokenizer on " * 50)
    assert _cli("tokenizer", "train", root / "text.txt", "--vocab-size", "300", "--out", root / "tok") == 0
    assert _cli("init", root / "bpe", "--preset", "tiny-dense", "--tokenizer", root / "tok") == 0
    assert _cli("convert", "to-gguf", root / "bpe", root / "m.gguf") == 0
    model, _, _ = load_model(root / "m", device="cpu")
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, root / "adapter", base_model=str(root / "m"))
    assert _cli("train", _recipe(root)) == 0
    shutil.rmtree(root / "cache")
    return root


def _checkpoint(root: Path) -> Path:
    return find_checkpoints(root / "run")[-1][1]


def _merge_config(root: Path, density: float) -> Path:
    shutil.copytree(root / "m", root / "m2")
    config = {"merge_method": "ties", "base_model": str(root / "m"),
              "models": [{"model": str(root / "m2"), "parameters": {"weight": 1.0, "density": density}}]}  # fmt: skip
    (root / "merge.yaml").write_text(yaml.safe_dump(config))
    return root / "merge.yaml"


def _other_run(root: Path) -> None:
    (root / "runs" / "other_run").mkdir(parents=True)
    (root / "runs" / "other_run" / "metrics.jsonl").write_text('{"step": 1}\n')


def _foreign_state(root: Path) -> None:
    # a pickled object that weights-only loading refuses to build
    torch.save({"step": argparse.Namespace(step=2)}, _checkpoint(root) / "trainer_state.pt")


def _metrics_with_a_bad_line(root: Path) -> None:
    lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
    (root / "run" / "metrics.jsonl").write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")


def _write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        path = root / relative
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return write


def _change_json(relative: str, change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        path = root / relative
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return write


def _cut(relative: str, keep: float = 0.5) -> Callable[[Path], None]:
    def cut(root: Path) -> None:
        path = _checkpoint(root) / relative if relative == "trainer_state.pt" else root / relative
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return cut


class Case(NamedTuple):
    args: str  # the command line; {r} is the corpus's copy
    message: str  # a piece of the one line on stderr
    spoil: Callable[[Path], object] = lambda root: None


GENERATE = "generate x --model {r}/m"
ADAPTER = "generate x --model {r}/adapter"
RESUME = "train {r}/run.yaml --resume"
OBJECT = "must hold a JSON object ({...}), not a"
CASES = {
    # model directories
    "config.json is a list": Case("info {r}/m", f"config.json {OBJECT} list", _write("m/config.json", "[1, 2]")),
    "config.json is a string": Case(GENERATE, f"config.json {OBJECT} str", _write("m/config.json", '"tiny"')),
    "config.json is junk, for info": Case("info {r}/m", "config.json is not valid JSON", _write("m/config.json", "{x")),
    "hidden_size is a float": Case(
        "info {r}/m",
        "hidden_size must be a positive integer, got 64.5",
        _change_json("m/config.json", lambda c: c | {"hidden_size": 64.5}),
    ),  # fmt: skip
    "num_heads is 0": Case(
        "info {r}/m",
        "num_heads must be a positive integer, got 0",
        _change_json("m/config.json", lambda c: c | {"num_heads": 0}),
    ),  # fmt: skip
    "num_kv_heads is 0": Case(
        GENERATE,
        "num_kv_heads must be a positive integer, got 0",
        _change_json("m/config.json", lambda c: c | {"num_kv_heads": 0}),
    ),  # fmt: skip
    "generation_config.json is a list": Case(
        GENERATE, f"generation_config.json {OBJECT} list", _write("m/generation_config.json", "[]")
    ),
    "tokenizer_config.json is a string": Case(
        GENERATE, f"tokenizer_config.json {OBJECT} str", _write("m/tokenizer_config.json", '"x"')
    ),
    "tokenizer.json is junk": Case(GENERATE, "tokenizer.json", _write("m/tokenizer.json", "{x")),
    "model.safetensors is truncated": Case(GENERATE, "model.safetensors", _cut("m/model.safetensors")),
    "model.safetensors is missing": Case(GENERATE, "safetensors", lambda r: (r / "m/model.safetensors").unlink()),
    # GGUF
    "a .gguf file of junk": Case(
        "info {r}/junk.gguf",
        "is not a readable GGUF file (truncated or corrupt?)",
        _write("junk.gguf", b"GGUF" + bytes(range(256)) * 4),
    ),  # fmt: skip
    "a truncated .gguf file": Case(
        "convert from-gguf {r}/m.gguf {r}/out", "is not a readable GGUF file (truncated or corrupt?)", _cut("m.gguf")
    ),
    "to-gguf of a model GGUF cannot express": Case(
        "convert to-gguf {r}/chimera {r}/chimera.gguf", "GGUF export cannot express"
    ),
    "to-gguf of a model without a tokenizer": Case(
        "convert to-gguf {r}/m {r}/m2.gguf", "the model has no tokenizer", lambda r: (r / "m/tokenizer.json").unlink()
    ),
    "to-gguf of a byte-level tokenizer without merges": Case(
        "convert to-gguf {r}/m {r}/m2.gguf", "the tokenizer is a byte-level BPE without merges"
    ),
    "to-gguf --force onto a directory": Case(
        "convert to-gguf {r}/m {r}/runs --force", "runs is a directory; give the path of the .gguf file", _other_run
    ),
    # adapters
    "adapter_config.json is junk": Case(
        ADAPTER, "adapter_config.json is not valid JSON", _write(f"adapter/{ADAPTER_CONFIG}", "{r: 4")
    ),
    "adapter_config.json is a list": Case(
        ADAPTER, f"adapter_config.json {OBJECT} list", _write(f"adapter/{ADAPTER_CONFIG}", "[1, 2]")
    ),
    "adapter_config.json has no r": Case(
        ADAPTER,
        "adapter_config.json lacks r;",
        _change_json(f"adapter/{ADAPTER_CONFIG}", lambda c: {k: v for k, v in c.items() if k != "r"}),
    ),  # fmt: skip
    "adapter weights are truncated": Case(
        ADAPTER, "adapter_model.safetensors is corrupt", _cut(f"adapter/{ADAPTER_WEIGHTS}", 0.9)
    ),
    "an adapter whose base is itself": Case(
        ADAPTER,
        "is another adapter",
        lambda r: _change_json(
            f"adapter/{ADAPTER_CONFIG}", lambda c: c | {"base_model_name_or_path": str(r / "adapter")}
        )(r),
    ),  # fmt: skip
    # runs
    "trainer_state.pt is a foreign pickle": Case(RESUME, "trainer_state.pt cannot be resumed from", _foreign_state),
    "trainer_state.pt is truncated": Case(RESUME, "trainer_state.pt cannot be resumed from", _cut("trainer_state.pt")),
    "metrics.jsonl has a bad line before its last": Case(
        RESUME, "metrics.jsonl line 1 is not JSON; mend or delete that line", _metrics_with_a_bad_line
    ),
    "train into a run with checkpoints, without --resume": Case(
        "train {r}/run.yaml", "already has checkpoints; pass --resume"
    ),
    "train into a run that saved nothing but metrics.jsonl": Case(
        "train {r}/run.yaml",
        "already holds a run (metrics.jsonl); choose another --run.out_dir",
        lambda r: shutil.rmtree(r / "run" / "checkpoints"),
    ),  # fmt: skip
    "train onto a stale tokenizer/": Case(
        "train {r}/fresh.yaml",
        "tokenizer that no run trained, the recipe asks for tokenizer.train_vocab_size 300",
        lambda r: (
            shutil.copytree(r / "m", r / "fresh" / "tokenizer"),
            _recipe(r, "fresh", tokenizer={"train_vocab_size": 300}),
        ),
    ),  # fmt: skip
    "num_kv_heads 0 through a recipe override": Case(
        "train {r}/new.yaml --model.overrides.num_kv_heads=0",
        "num_kv_heads must be a positive integer, got 0",
        lambda r: _recipe(r, "new"),
    ),  # fmt: skip
    "a data file that is not UTF-8": Case(
        "train {r}/new.yaml",
        "latin1.txt is not UTF-8 text (byte 0xe4 is invalid there); re-encode it",
        lambda r: (
            _write("latin1.txt", "Hyvää päivää, maailma\n".encode("latin-1") * 20)(r),
            _recipe(r, "new", data={"sources": [{"path": str(r / "latin1.txt")}]}),
        ),
    ),  # fmt: skip
    "a recipe that is a list": Case("train {r}/list.yaml", "list.yaml", _write("list.yaml", "- 1\n- 2\n")),
    # merges
    "a TIES density of 5": Case(
        "merge {r}/merge.yaml {r}/merged",
        "parameters.density is 5: a density is the fraction",
        lambda r: _merge_config(r, 5),
    ),  # fmt: skip
    "a merge config of junk YAML": Case(
        "merge {r}/merge.yaml {r}/merged", "merge.yaml", _write("merge.yaml", "merge_method: [ties\n")
    ),
    # what --force and tokenizer train may replace
    "convert to-hf --force onto a folder of runs": Case(
        "convert to-hf {r}/m {r}/runs --force", "runs is not a", _other_run
    ),
    "init --force onto a folder of runs": Case(
        "init {r}/runs --preset tiny-dense --force", "runs is not a", _other_run
    ),
    "quickstart onto a folder of runs": Case("quickstart --out {r}/runs", "runs is not a", _other_run),
    "tokenizer train into a model directory": Case(
        "tokenizer train {r}/text.txt --vocab-size 300 --out {r}/m", "already holds a tokenizer.json; pass --force"
    ),
}


def _tree(root: Path) -> dict[str, str | None]:
    """Every path under root but the token cache (its lock files stay, as after any run): a file's SHA-256, None
    for a directory."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.relative_to(root).parts[0] != "cache"
    }


@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_is_one_line_exit_2_and_writes_nothing(case, corpus, tmp_path, capsys):
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    for path in [*root.rglob("*.yaml"), *root.rglob("*.json")]:  # the copy's recipes and adapter name the copy
        path.write_text(path.read_text().replace(str(corpus), str(root)))
    CASES[case].spoil(root)
    before = _tree(root)
    capsys.readouterr()
    code = _cli(*CASES[case].args.format(r=root).split())
    err = re.sub(r"(\r[^\r\n]*)+\n", "", capsys.readouterr().err)  # a progress bar the refusal ended, if any
    assert code == 2, err
    assert err.startswith("orionlm: error: ") and err.count("\n") == 1 and CASES[case].message in err, err
    assert _tree(root) == before
