"""orionlm and lm-evaluation-harness agree: lm-eval's own HF model on the exported weights, lm-eval through
orionlm's model class, and `orionlm eval` give the same accuracies on the same items."""

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

import orionlm.eval.harness  # noqa: E402, F401  (registers "orionlm")
from orionlm.checkpoint import save_checkpoint  # noqa: E402
from orionlm.config import preset  # noqa: E402
from orionlm.convert.hf import save_hf  # noqa: E402
from orionlm.eval.run import evaluate  # noqa: E402
from orionlm.model import OrionLM  # noqa: E402
from orionlm.tokenizer import Tokenizer  # noqa: E402

QUESTIONS = [
    ("What sat on the mat?", ["The cat", "A car", "Nothing at all", "The sea"], 0),
    ("What barked at the birds?", ["the moon", "the dog", "a tree", "rain"], 1),
    ("Where were the birds?", ["in the tree", "under water", "on Mars", "inside a box"], 0),
    ("Was it a sunny day?", ["yes", "no", "maybe", "never"], 0),
    ("What colour was the tree?", ["blue", "red", "green", "purple"], 2),
    ("Who sat on the mat?", ["a fish", "the king", "nobody", "the cat"], 3),
]
TASK = """task: arc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_agrees(tmp_path):
    tok = Tokenizer.byte_level()
    model = OrionLM(preset("tiny-dense", vocab_size=tok.vocab_size, max_seq_len=128, initializer_range=0.2))
    model.reset_parameters(seed=3)
    save_checkpoint(model, tmp_path / "ours", tok)
    save_hf(model.eval(), tok, tmp_path / "hf")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "choices": c, "answer": a}) + "\n"
                             for i, (q, c, a) in enumerate(QUESTIONS)))  # fmt: skip
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arc_local.yaml").write_text(TASK.format(path=items))
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)

    def run(name: str, args: str) -> tuple[float, float]:
        out = lm_eval.simple_evaluate(model=name, model_args=args, tasks=["arc_local"], task_manager=manager,
                                      batch_size=4, log_samples=False)  # fmt: skip
        metrics = out["results"]["arc_local"]
        return metrics["acc,none"], metrics["acc_norm,none"]

    theirs = run("hf", f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu")
    through_us = run("orionlm", f"pretrained={tmp_path / 'ours'}")
    ours = evaluate(model, tok, ["arc_easy"], task_files={"arc_easy": items}, progress=False)["results"]["arc_easy"]
    assert through_us == theirs
    assert (ours["acc"], ours["acc_norm"]) == pytest.approx(theirs)
    assert 0 < theirs[0] < 1 or 0 < theirs[1] < 1  # the items do not all go one way

    # the README's command line, without --device: on a machine without CUDA it must run on the CPU
    command = [sys.executable, "-m", "orionlm", "lm-eval", "--model", "orionlm", "--model_args",
               f"pretrained={tmp_path / 'ours'}", "--tasks", "arc_local", "--include_path", str(tmp_path / "tasks"),
               "--output_path", str(tmp_path / "results")]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run_cli = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run_cli.returncode == 0, run_cli.stderr[-2000:]
    (results,) = (tmp_path / "results").rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]["arc_local"]
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == through_us
