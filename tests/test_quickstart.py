"""`orionlm quickstart`, made tiny: it replaces its own older run, ends with OUT/model (which every --model verb
loads), and draws the unigram entropy it prints."""

import json
import re
import socket
import subprocess
import sysconfig
from pathlib import Path

from orionlm.cli import main
from orionlm.generation import generate
from orionlm.loading import load_model
from orionlm.train.plot import pyplot, run_figures

STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"
TINY = ["--steps", "3", "--tokenizer.train_vocab_size=300", "--tokenizer.train_max_bytes=30000",
        f"--data.sources.0.path={STDLIB_JSON}", "--data.seq_len=32", "--model.overrides.hidden_size=32",
        "--model.overrides.max_seq_len=128", "--run.batch_size=2", "--run.eval_batches=1", "--run.progress=false",
        "--run.tensorboard=false", "--run.plot=false"]  # fmt: skip


def test_quickstart_replaces_its_older_run_and_ends_with_its_model(tmp_path, capsys):
    out = tmp_path / "runs" / "quickstart"
    (out / "model").mkdir(parents=True)  # an older quickstart run, whose process was killed
    (out / "model" / "old.txt").write_text("from the older run")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    ended = subprocess.Popen(["true"])
    ended.wait()
    (out / "run.lock").write_text(json.dumps({"pid": ended.pid, "host": socket.gethostname()}))

    main(["quickstart", "--out", str(out), f"--data.cache_dir={tmp_path / 'cache'}", *TINY])
    captured = capsys.readouterr()
    assert f"taking over {out / 'run.lock'}, left by process {ended.pid}" in captured.err
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "recipe.yaml",
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert not (out / "run.lock").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    entropy = json.loads((out / "run.json").read_text())["unigram_entropy"]
    assert re.search(rf"unigram entropy of the data: {entropy:.3f} nats/token", captured.out)
    assert f"run directory: {out} (model/, " in captured.out
    plt = pyplot()
    loss = run_figures(plt, out)["loss.png"]
    assert f"unigram entropy of the data ({entropy:.3f})" in [line.get_label() for line in loss.axes[0].get_lines()]
    plt.close("all")

    model, tokenizer, _ = load_model(out / "model", device="cpu")
    assert model.config.num_experts == 8 and tokenizer.vocab_size <= 300
    main(["generate", "def", "--model", str(out / "model"), "--max-tokens", "4", "--temp", "0"])
    assert capsys.readouterr().out == generate(model, tokenizer, "cpu", "def", max_new_tokens=4, temperature=0) + "\n"
