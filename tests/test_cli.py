"""The `orionlm` command, run as a real process."""

import gzip
import json
import os
import re
import subprocess
import sys

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
    zero = orionlm("generate", "Once upon", "--model", tiny_model, "--threads", "0")
    assert zero.returncode == 2 and zero.stderr == "orionlm: error: --threads must be at least 1, got 0\n"


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


def test_generate_shows_a_thinking_models_thoughts(tiny_model, tmp_path):
    from orionlm.checkpoint import save_checkpoint
    from orionlm.loading import load_model
    from orionlm.train.quietstar import add_thought_tokens

    model, tokenizer, _ = load_model(tiny_model)
    model = add_thought_tokens(model, tokenizer, n_ahead=5)
    save_checkpoint(model, tmp_path / "thinking", tokenizer)
    args = ["generate", "Once upon", "--model", tmp_path / "thinking", "--max-tokens", "6", "--temp", "0"]
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
