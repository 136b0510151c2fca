"""The `orionlm` command, run as a real process."""

import gzip
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def orionlm(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "orionlm", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    result = orionlm("init", path, "--preset", "tiny-moe", "--seed", "3")
    assert result.returncode == 0, result.stderr
    return path


def test_help_explains_every_verb():
    result = orionlm("--help")
    assert result.returncode == 0
    for verb in ("info", "init", "generate", "chat", "convert", "tokenizer"):
        assert verb in result.stdout
    result = orionlm("generate", "--help")
    assert "--presence-pen" in result.stdout and "nucleus sampling" in result.stdout
    assert "--vocab-size" in orionlm("tokenizer", "train", "--help").stdout


def test_info_json_counts():
    result = orionlm("info", "--preset", "mixtral-8x7b", "--json")
    data = json.loads(result.stdout)
    assert data["total_params"] == 46_702_792_704
    assert data["active_params"] == 12_879_925_248


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--prest", "x"], "unrecognized arguments: --prest"),
        (["info", "--preset", "mixtrl-8x7b"], "unknown preset 'mixtrl-8x7b' (did you mean mixtral-8x7b"),
        (["info"], "give either a model path or --preset NAME"),
        (["generate", "hi"], "the following arguments are required: --model"),
        (["generate", "hi", "--model", "/nonexistent/dir"], "/nonexistent/dir does not exist"),
        (["generate", "hi", "--model", "m", "--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, message):
    result = orionlm(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_hub_id_offline_is_a_clear_error():
    result = orionlm("generate", "hi", "--model", "nobody/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    said = "nobody/no-such-model: not found locally, and as a Hub id it could not be downloaded (offline mode is on)"
    assert said in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_init_refuses_to_overwrite(tiny_model):
    result = orionlm("init", tiny_model, "--preset", "tiny-dense")
    assert result.returncode == 2 and "pass --force" in result.stderr
    info = json.loads(orionlm("info", tiny_model, "--json").stdout)
    assert info["config"]["num_experts"] == 4 and info["total_params"] == 238_400


def test_force_replaces_a_model_directory(tiny_model, tmp_path):
    """--force replaces what orionlm wrote (what it refuses to replace: tests/test_bad_files.py)."""
    assert orionlm("convert", "to-hf", tiny_model, tmp_path / "hf").returncode == 0
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert orionlm("convert", "to-hf", tiny_model, tmp_path / "hf", "--force").returncode == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_local_experts"] == 4


def test_generate_streams_and_is_reproducible(tiny_model):
    args = ["generate", "Once upon", "--model", tiny_model, "--max-tokens", "12", "--temp", "0.8", "--seed", "7"]
    first, second = orionlm(*args), orionlm(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    greedy = orionlm("generate", "Once upon", "--model", tiny_model, "--max-tokens", "12", "--temp", "0")
    assert greedy.returncode == 0, greedy.stderr
    both = orionlm("generate", "Once upon", "A cat", "--model", tiny_model, "--max-tokens", "12", "--temp", "0")
    other = orionlm("generate", "A cat", "--model", tiny_model, "--max-tokens", "12", "--temp", "0")
    # several prompts run as one batch, each printed under its header, each as it comes alone
    assert both.stdout == f"--- 0\n{greedy.stdout}--- 1\n{other.stdout}"
    half = orionlm("generate", "Once upon", "--model", tiny_model, "--max-tokens", "12", "--temp", "0", "--dtype",
                   "bfloat16", "--device", "cpu")  # fmt: skip
    assert half.returncode == 0 and half.stdout.strip()
    assert half.stderr.count("note: bfloat16 on the CPU") == 1 and "note:" not in greedy.stderr
    one_thread = orionlm("generate", "Once upon", "--model", tiny_model, "--max-tokens", "12", "--temp", "0",
                         "--threads", "1")  # fmt: skip
    assert one_thread.stdout == greedy.stdout


# The verbs that run torch on the CPU (and so take --threads); the others print, plot or read text only.
COMPUTING = {"init", "generate", "chat", "quickstart", "train", "serve", "bench", "eval", "leakage", "lm-eval",
             "merge-lora", "merge", "moe-merge", "quantize", "convert from-hf", "convert to-hf", "convert from-gguf",
             "convert to-gguf", "convert from-auron", "convert to-auron"}  # fmt: skip


def test_every_verb_that_computes_takes_threads():
    from orionlm.cli import make_parser
    from orionlm.cli.completion import _commands

    verbs = {path: parser for path, parser in _commands(make_parser()) if parser.get_default("_fn")}
    assert COMPUTING < set(verbs) and {"info", "plot", "recipes", "tokenizer train", "completion"} <= set(verbs)
    for path, parser in verbs.items():
        takes = any("--threads" in action.option_strings for action in parser._actions)
        assert takes == (path in COMPUTING), path


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core allows only one thread count")
def test_threads_sets_torchs_threads(tiny_model):
    """Under OMP_NUM_THREADS=1 torch's default is 1; --threads replaces it. bench reports the count it ran with."""
    cores = len(os.sched_getaffinity(0))
    args = ["bench", tiny_model, "--concurrency", "1", "--input-lengths", "4", "--output-tokens", "2",
            "--requests-per-client", "1", "--json"]  # fmt: skip
    default = orionlm(*args, env={"OMP_NUM_THREADS": "1"})
    every_core = orionlm(*args, "--threads", cores, env={"OMP_NUM_THREADS": "1"})
    assert default.returncode == 0 and every_core.returncode == 0, default.stderr + every_core.stderr
    assert json.loads(default.stdout)["threads"] == 1 and json.loads(every_core.stdout)["threads"] == cores


@pytest.mark.parametrize("threads", [0, -1, len(os.sched_getaffinity(0)) + 1])
def test_threads_out_of_range_is_one_line(threads, tmp_path):
    cores = len(os.sched_getaffinity(0))
    result = orionlm("init", tmp_path / "m", "--preset", "tiny-dense", "--threads", threads)
    assert result.returncode == 2 and not (tmp_path / "m").exists()
    assert result.stderr == f"orionlm: error: --threads must be from 1 to {cores} (the cores this process may run " \
                            f"on), got {threads}\n"  # fmt: skip


def test_chat_reads_turns_from_stdin(tiny_model):
    result = orionlm("chat", "--model", tiny_model, "--max-tokens", "5", "--temp", "0", stdin="hello\n/reset\nagain\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2  # one reply line per user turn


def test_tokenizer_train_then_init_with_it(tmp_path, shared_data):
    tok_dir = tmp_path / "tok"
    result = orionlm("tokenizer", "train", shared_data / "pretrain" / "fi_kalevala.txt.gz", "--vocab-size", "700",
                     "--out", tok_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = orionlm("init", tmp_path / "m", "--preset", "tiny-dense", "--tokenizer", tok_dir)
    assert "vocab_size raised to 704" in result.stdout
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vocab_size"] == 704


def test_convert_round_trip_and_generate(tmp_path, shared_data):
    gguf = tmp_path / "stories.gguf"
    gguf.write_bytes(gzip.open(shared_data / "models" / "stories260K" / "stories260K.gguf.gz").read())
    steps = [
        ("convert", "from-gguf", gguf, tmp_path / "orion"),
        ("convert", "to-hf", tmp_path / "orion", tmp_path / "hf"),
        ("convert", "from-hf", tmp_path / "hf", tmp_path / "back"),
    ]
    for step in steps:
        result = orionlm(*step)
        assert result.returncode == 0, result.stderr
    result = orionlm("generate", "Once upon a time", "--model", tmp_path / "back", "--temp", "0", "--max-tokens", "12")
    assert result.stdout.startswith(", there was a little girl named Lily.")
    again = orionlm("convert", "to-hf", tmp_path / "orion", tmp_path / "hf")
    assert again.returncode == 2 and "pass --force" in again.stderr


@pytest.fixture(scope="module")
def thinking_model(tiny_model):
    from orionlm.checkpoint import save_checkpoint
    from orionlm.loading import load_model
    from orionlm.model import add_thought_tokens

    model, tokenizer, _ = load_model(tiny_model)
    model = add_thought_tokens(model, tokenizer, n_ahead=5)
    return save_checkpoint(model, tiny_model.parent / "thinking", tokenizer)


def test_generate_shows_a_thinking_models_thoughts(tiny_model, thinking_model):
    args = ["generate", "Once upon", "--model", thinking_model, "--max-tokens", "6", "--temp", "0"]
    shown, plain = orionlm(*args, "--show-thoughts"), orionlm(*args)
    assert shown.returncode == 0, shown.stderr
    thoughts = re.findall(r"<\|startthought\|>(.*?)<\|endthought\|>", shown.stdout, flags=re.S)
    assert len(thoughts) == 6 and all(thoughts)  # one thought of 2 tokens before each token
    # a new thinking model's mixing head is zero: its text is its base model's, thinking or not
    base = orionlm("generate", "Once upon", "--model", tiny_model, "--max-tokens", "6", "--temp", "0")
    assert re.sub(r"<\|startthought\|>.*?<\|endthought\|>", "", shown.stdout, flags=re.S) == plain.stdout
    assert plain.stdout == base.stdout == orionlm(*args, "--no-think").stdout
    refused = orionlm("generate", "Once upon", "--model", tiny_model, "--show-thoughts")
    assert refused.returncode == 2 and "is not a thinking model" in refused.stderr


def test_thoughts_in_json_and_in_chat(thinking_model, capsys, monkeypatch):
    from orionlm.cli import main

    args = [
        "generate",
        "Once upon",
        "--model",
        str(thinking_model),
        "--max-tokens",
        "6",
        "--temp",
        "0",
        "--show-thoughts",
    ]
    main(args)
    shown = capsys.readouterr().out
    main([*args, "--json"])
    [choice] = json.loads(capsys.readouterr().out)["choices"]
    rebuilt, end = "", 0
    for thought in choice["thoughts"]:
        rebuilt += choice["text"][end : thought["before"]] + f"<|startthought|>{thought['thought']}<|endthought|>"
        end = thought["before"]
    assert len(choice["thoughts"]) == 6 and rebuilt + choice["text"][end:] + "\n" == shown
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon\n"))
    main(["chat", *args[2:]])
    replied = capsys.readouterr().out
    main([*args, "--chat"])
    assert replied == capsys.readouterr().out and "<|startthought|>" in replied


def test_version_and_help_of_a_command_without_its_verb():
    from orionlm._version import __version__

    result = orionlm("--version")
    assert result.returncode == 0 and result.stdout == f"orionlm {__version__}\n"
    bare, helped = orionlm(), orionlm("--help")
    assert bare.returncode == 2 and bare.stdout == helped.stdout and "completion" in bare.stdout
    group = orionlm("convert")
    assert group.returncode == 2 and "to-gguf" in group.stdout and "Export a model as a GGUF file" in group.stdout


@pytest.mark.parametrize(
    "args", [["--help"], [], ["--version"], ["completion", "bash"], ["convert", "to-hf", "--help"]]
)
def test_help_version_and_completion_do_not_import_torch(args):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "orionlm", *args], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")
    }
    assert "orionlm.cli.parser" in imported and result.stdout
    assert "torch" not in imported and "orionlm.model" not in imported


def _verbs(table, path=()):
    for name, entry in table.items():
        yield from _verbs(entry, (*path, name)) if isinstance(entry, dict) else [((*path, name), entry)]


def test_each_verbs_summary_opens_its_docstring():
    """The top-level --help shows the table's summaries (so it imports no verb): they must not drift from the
    docstrings that `VERB --help` shows."""
    import inspect

    from orionlm.cli import COMMANDS

    verbs = dict(_verbs(COMMANDS))
    assert ("convert", "to-gguf") in verbs and ("completion",) in verbs
    for path, verb in verbs.items():
        doc = " ".join(inspect.getdoc(verb.load()).split())
        assert doc.startswith(verb.summary) and not doc[len(verb.summary) : len(verb.summary) + 1].isalnum(), path


def _complete(script, *words):
    """What the bash completion function offers for a command line whose last word is under the cursor."""
    code = 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _orionlm; ' \
           'printf "%s\\n" "${COMPREPLY[@]}"'  # fmt: skip
    result = subprocess.run(["bash", "-c", code, "bash", script, *words], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout.split()


def test_bash_completion_completes_verbs_sub_verbs_options_and_choices(tmp_path):
    script = tmp_path / "orionlm.bash"
    script.write_text(orionlm("completion", "bash").stdout)
    assert _complete(script, "orionlm", "conv") == ["convert"]
    assert _complete(script, "orionlm", "convert", "to-") == ["to-hf", "to-gguf", "to-auron"]
    spelled = re.findall(r"(?<![\w-])--[a-z][a-z_-]+", orionlm("generate", "--help").stdout)
    options = {option for option in spelled if "_" not in option}  # --top_k is --top-k's other spelling
    assert set(_complete(script, "orionlm", "generate", "--")) == options and "--show-thoughts" in options
    assert _complete(script, "orionlm", "chat", "--model", "m", "--pres") == ["--presence-pen"]
    assert _complete(script, "orionlm", "generate", "hi", "--dtype", "b") == ["bfloat16"]
    assert _complete(script, "orionlm", "convert", "to-gguf", "m", "m.gguf", "--dtype", "q5") == [
        "q5_k_m", "q5_0", "q5_1"
    ]  # fmt: skip
    assert _complete(script, "orionlm", "generate", "runs/") == []  # not an option: bash completes a file name
    assert _complete(script, "orionlm", "completion", "") == ["bash", "zsh", "-h", "--help"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_in_a_real_zsh(tmp_path):
    """zsh runs the bash function through bashcompinit: type `orionlm conv<Tab>` in an interactive zsh."""
    (tmp_path / "orionlm.zsh").write_text(orionlm("completion", "zsh").stdout)
    (tmp_path / ".zshrc").write_text(
        f"PS1='> '\nautoload -U compinit && compinit -u\nsource {tmp_path / 'orionlm.zsh'}\n"
    )
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("zsh", ["zsh", "-i"], {**os.environ, "ZDOTDIR": str(tmp_path), "TERM": "dumb"})
    try:
        os.write(fd, b"orionlm convert to-g\t")
        screen, deadline = b"", time.monotonic() + 20
        while b"to-gguf " not in screen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                screen += os.read(fd, 4096)
        assert b"orionlm convert to-gguf " in screen, screen
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.parametrize(
    "verb", [["info", "--preset", "mixtral-8x7b"], ["generate", "Once upon", "--max-tokens", "30"]]
)
def test_a_reader_that_leaves_early_ends_the_command_quietly(verb, tiny_model):
    """`orionlm info X | head`: the reader closes the pipe before the first write (here, before the command has
    even started): no BrokenPipeError traceback, the exit status a shell gives a command a closed pipe stopped."""
    args = [*verb, "--model", tiny_model] if verb[0] == "generate" else verb
    process = subprocess.Popen([sys.executable, "-m", "orionlm", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141 and stderr == b""


def test_generate_json_holds_the_printed_texts(tiny_model, capsys):
    from orionlm.cli import main

    args = ["generate", "Once upon", "A cat", "--model", str(tiny_model), "--max-tokens", "12", "--temp", "0"]
    main(args)
    printed = capsys.readouterr().out
    main([*args, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == str(tiny_model) and [c["prompt"] for c in data["choices"]] == ["Once upon", "A cat"]
    assert (
        printed == "".join(f"--- {c['index']}\n{c['text']}\n" for c in data["choices"]) and data["choices"][0]["text"]
    )


def test_bench_json_rows(tiny_model, capsys):
    from orionlm.cli import main

    main(["bench", str(tiny_model), "--concurrency", "1,2", "--input-lengths", "8", "--output-tokens", "4",
          "--requests-per-client", "1", "--threads", "1", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert err.startswith(f"# orionlm bench: {tiny_model} on cpu, 1 threads; 4 output tokens per request")
    assert data["device"] == "cpu" and data["threads"] == 1 and data["output_tokens"] == 4
    assert [(r["input_tokens"], r["concurrency"]) for r in data["rows"]] == [(8, 1), (8, 2)]
    for row in data["rows"]:
        assert row["aggregate_tokens_per_s"] > 0 and row["tokens_per_s_per_client"] > 0
        assert 0 < row["ttft_s"]["median"] <= row["ttft_s"]["p90"] and 0 < row["itl_s"]["median"] <= row["itl_s"]["p90"]


def test_quantize_json_holds_the_printed_report(tiny_model, tmp_path, capsys):
    from orionlm.cli import main

    text = tmp_path / "calibration.txt"
    text.write_text(Path(json.__file__).read_text())  # real text: the json package's source
    options = ["--dataset", str(text), "--nsamples", "4", "--seq-len", "32", "--group-size", "32", "--threads", "1"]
    main(["quantize", str(tiny_model), str(tmp_path / "a"), *options])
    printed = capsys.readouterr().out.splitlines()
    main(["quantize", str(tiny_model), str(tmp_path / "b"), *options, "--json"])
    out, err = capsys.readouterr()
    data = json.loads(out)
    layers = data["layers"]
    assert {layer["method"].split()[0] for layer in layers} == {"gptq"}  # experts: "gptq (N tokens)"
    assert printed[:-1] == [f"{x['name']}: {x['method']}, output error {x['output_error']:.4g}" for x in layers]
    assert all(line in err for line in printed[:-1]) and f"wrote {tmp_path / 'b'}: " in err  # the report: stderr
    assert printed[-1] == (f"wrote {tmp_path / 'a'}: {len(layers)} linear layers at 4 bits, "
                           f"{data['weight_bytes'] / 2**20:.1f} MiB of weights")  # fmt: skip
    assert data["out"] == str(tmp_path / "b") and data["bits"] == 4 and data["group_size"] == 32


def test_eval_json_holds_the_table(tiny_model, tmp_path, capsys):
    from orionlm.cli import main

    items = [{"id": "a", "question": "What sat on the mat?", "choices": ["The cat", "A car", "Nothing"], "answer": 0},
             {"id": "b", "question": "What barked?", "choices": ["the moon", "the dog"], "answer": 1},
             {"id": "c", "question": "Was it sunny?", "choices": ["yes", "no"], "answer": 0}]  # fmt: skip
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    args = ["eval", str(tiny_model), "--tasks", "piqa", "--task-file", f"piqa={tmp_path / 'piqa.jsonl'}"]
    main(args)
    table = capsys.readouterr().out
    main([*args, "--json", "--out", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data == json.loads((tmp_path / "r.json").read_text()) and err == f"wrote {tmp_path / 'r.json'}\n"
    piqa = data["results"]["piqa"]
    assert piqa["n"] == 3
    for metric in ("acc", "acc_norm"):
        assert f"| piqa | 3 | {metric} | {piqa[metric]:.4f} | {piqa[metric + '_stderr']:.4f} |" in table
    main(["eval", "compare", str(tmp_path / "r.json"), "--json"])
    assert json.loads(capsys.readouterr().out) == {"r": data["results"]}


def test_chat_takes_generates_options(tiny_model, capsys, monkeypatch):
    from orionlm.cli import main
    from orionlm.cli.generate import GenerationOptions

    for verb in ("chat", "generate"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        shown = capsys.readouterr().out
        listed = set(re.findall(r"--[a-z-]+(?=[ ,\n])", shown))
        assert {f"--{name.replace('_', '-')}" for name in GenerationOptions.__annotations__} <= listed, verb

    def chat(*flags):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
        main(["chat", "--model", str(tiny_model), "--max-tokens", "8", "--temp", "0", *flags])
        return capsys.readouterr().out

    penalized = ["--rep-pen", "1.5", "--presence-pen", "0.5", "--top-k", "3", "--stop", "zz"]
    reply = chat(*penalized)
    # a chat's first reply is `generate --chat` of the message, with the same options
    main(["generate", "hello", "--chat", "--model", str(tiny_model), "--max-tokens", "8", "--temp", "0", *penalized])
    assert reply == capsys.readouterr().out and reply.strip()
    assert chat() != reply  # the penalties changed the reply


def test_compute_setup_sets_threads():
    import torch

    from orionlm.cli.common import compute_setup, usable_cores
    from orionlm.errors import OrionError

    assert usable_cores() == len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        compute_setup(threads=1)
        assert torch.get_num_threads() == 1
        compute_setup(threads=None)  # torch's default stays
        assert torch.get_num_threads() == 1
        with pytest.raises(OrionError, match="--threads must be from 1 to"):
            compute_setup(threads=usable_cores() + 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
