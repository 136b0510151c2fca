"""Optional dependencies: a verb whose extra is not installed says which one in one line (exit 2); a training run
without TensorBoard or matplotlib says once what it leaves out and finishes. The packages are blocked for real, in a
fresh process whose import system refuses them (a meta-path finder), whatever this environment has installed. One
process runs every case (starting torch once), each case refusing its own packages, checked to be unimported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orionlm.checkpoint import save_checkpoint
from orionlm.config import preset
from orionlm.errors import MissingExtra, require
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

# argv: a JSON list of [name, blocked packages, orionlm arguments]; prints {name: [exit code, stderr]}
RUN_BLOCKED = """
import contextlib, io, json, sys
from importlib.abc import MetaPathFinder

blocked = set()

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocked())
from orionlm.cli import main

results = {}
for name, packages, args in json.loads(sys.argv[1]):
    blocked.clear()
    blocked.update(packages)
    assert not blocked & {module.split(".")[0] for module in sys.modules}, f"{name}: a blocked package is loaded"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code
    results[name] = [code, stderr.getvalue()]
print(json.dumps(results))
"""

# extra: (blocked packages, the command, what needs the package, the package named), in the order they run
CASES = {
    "gguf-export": ({"gguf"}, ["convert", "to-gguf", "m", "m.gguf"], "reading or writing GGUF files", "gguf"),
    "gguf-import": ({"gguf"}, ["generate", "hi", "--model", "x.gguf"], "reading or writing GGUF files", "gguf"),
    "llamacpp": ({"llama_cpp"}, ["convert", "to-gguf", "m", "m.gguf", "--dtype", "q4_k_m"],
                 "writing llama.cpp's quantized GGUF types (q4_k_m, ...)", "llama_cpp"),
    "serve-uvicorn": ({"uvicorn"}, ["serve", "m"], "orionlm serve", "uvicorn"),
    "serve": ({"fastapi"}, ["serve", "m"], "the server", "fastapi"),
    "eval": ({"sklearn"}, ["leakage", "m", "items.jsonl"], "leakage detection (its isolation forest)", "sklearn"),
    "harness": ({"lm_eval"}, ["lm-eval", "--model", "orionlm", "--tasks", "x"], "orionlm lm-eval", "lm_eval"),
    "parquet": ({"pyarrow"}, ["quantize", "m", "q", "--dataset", "x.parquet"], "x.parquet: reading Parquet", "pyarrow"),
    "hf": ({"datasets"}, ["quantize", "m", "q", "--dataset", "hf:x/y"], "source 'hf:x/y' (a Hugging Face dataset)",
           "datasets"),
    "plot": ({"matplotlib"}, ["plot", "run"], "drawing charts", "matplotlib"),
}  # fmt: skip
RECIPE = {  # 2 steps of a tiny model, charts and TensorBoard asked for
    "model": {"preset": "tiny-dense", "overrides": {"max_seq_len": 32}},
    "data": {"sources": [{"path": str(Path(json.__file__).parent / "scanner.py")}], "seq_len": 16, "val_fraction": 0.1},
    "schedule": {"warmup_steps": 1},
    "run": {"out_dir": "trained", "max_steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1,
            "progress": False, "plot": True, "tensorboard": True},
}  # fmt: skip
TRAIN = ("train", {"matplotlib", "tensorboard"}, ["train", "recipe.yaml"])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, str]]]:
    """The directory the cases ran in, and each case's exit code and stderr."""
    root = tmp_path_factory.mktemp("extras")
    save_checkpoint(OrionLM(preset("tiny-dense", vocab_size=320)), root / "m", Tokenizer.byte_level())
    (root / "x.gguf").write_bytes(b"")
    (root / "x.parquet").write_bytes(b"")
    item = {"question": "2 + 2?", "choices": ["1", "2", "3", "4"], "answer": 3}
    (root / "items.jsonl").write_text(json.dumps(item) + "\n")
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 64, "loss": 5.0, "lr": 1e-3}) + "\n")
    (root / "recipe.yaml").write_text(json.dumps(RECIPE))
    cases = [[name, sorted(blocked), args] for name, (blocked, args, _, _) in CASES.items()]
    cases.append([TRAIN[0], sorted(TRAIN[1]), TRAIN[2]])
    done = subprocess.run(
        [sys.executable, "-c", RUN_BLOCKED, json.dumps(cases)],
        capture_output=True, text=True, cwd=root, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root, json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_a_missing_extra_is_one_line_naming_it(case, results):
    root, outcomes = results
    _, _, purpose, package = CASES[case]
    code, stderr = outcomes[case]
    extra = case.split("-")[0]
    assert code == 2, stderr
    install = f"pip install 'orionlm[{extra}]'"
    assert stderr == f"orionlm: error: {purpose} needs {package}, which is not installed: {install}\n"
    assert not (root / "m.gguf").exists() and not (root / "q").exists()


def test_a_run_without_tensorboard_and_matplotlib_says_so_once_and_finishes(results):
    root, outcomes = results
    code, stderr = outcomes["train"]
    assert code == 0, stderr
    assert stderr.splitlines() == [
        "note: TensorBoard logging (run.tensorboard) needs tensorboard, which is not installed: "
        "pip install 'orionlm[tensorboard]'; logging to metrics.jsonl only (--run.tensorboard=false hides this note)",
        "no charts: drawing charts needs matplotlib, which is not installed: pip install 'orionlm[plot]'",
    ]
    run = root / "trained"
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2  # the run finished
    assert not list(run.glob("*.png")) and not (run / "tensorboard").exists()


def test_every_extra_named_exists_in_pyproject_and_plot_stays_in_dev():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {case.split("-")[0] for case in CASES} | {"tensorboard"} <= set(extras)
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert extras["plot"][0] in extras["dev"]


def test_require_returns_the_module_or_names_the_extra():
    assert require("json", "plot", "x").dumps([]) == "[]"
    with pytest.raises(MissingExtra) as info:
        require("no_such_module_xyz", "plot", "x")
    assert str(info.value) == "x needs no_such_module_xyz, which is not installed: pip install 'orionlm[plot]'"
