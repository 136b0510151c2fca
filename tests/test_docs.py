"""Every example in README.md and in `orionlm VERB --help` runs, so that none can rot (issue 22).

The examples are read from the docs themselves: README.md's ```bash blocks (continuation lines joined, comments
dropped, bash's `$'...'` decoded, `> FILE` kept as where the output goes), the command lines of every verb's --help,
and README.md's ```python blocks. Each bash block, each verb's --help and each python block runs in order in a
sandbox of its own: `work/` is the working directory, `shared` beside it the real ../shared (so the recipes'
`../shared/data/...` resolve), `home` the home directory of `~/`, and `work/` holds the inputs the docs take as
given (see `inputs`), less those the block writes itself.

Commands run in-process on tiny models, with the placeholders of SUBSTITUTE replaced and the short settings of RUN
added; what a command prints with `--json` must be JSON. Those that cannot run here are parsed by the real parser
(PARSE_ONLY) or listed with a reason (NOT_RUN); optional `[...]` parts are left out of what runs, but parsed. A
documented command in none of these tables fails its test: classify it there.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from live_server import orionlm_server

from orionlm.checkpoint import save_checkpoint
from orionlm.cli import COMMANDS, main, make_parser
from orionlm.config import preset
from orionlm.errors import OrionError
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer
from orionlm.train.recipe import Recipe, load_recipe

# (not from conftest: the name `conftest` is also tests/cuda/conftest.py once the whole suite is collected)
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
README = REPO / "README.md"

# Placeholders of the docs -> what stands for them in the sandbox (whole words, also inside `--flag=WORD`).
SUBSTITUTE = {
    "RECIPE": "recipe.yaml",
    "RUN_DIR": "runs/tiny",  # recipe.yaml's run
    "FILE": "corpus.txt",
    "DIR": "runs/adapter",
    "KEY": "test-key",
}

# What makes a training run take seconds: 2 steps of 2 x 32 tokens (the recipe's warm-up is cut to fit), one
# validation batch at the end, no charts, a tokenizer (where one is trained) on 300 KB of the data.
TRAIN = (
    "--run.max_steps=2 --run.batch_size=2 --run.grad_accum=1 --data.seq_len=32 --run.eval_every=0 "
    "--run.eval_batches=1 --run.plot=false --run.progress=false --tokenizer.train_max_bytes=300000"
)

# The commands that run: command prefix -> the words added after the documented ones (argparse and the recipe
# overrides take the last value given). Every prefix that starts a command applies, shorter ones first.
RUN = {
    "orionlm quickstart": "--steps 2 --data.sources.0.glob=a*.py --data.seq_len=32 --run.batch_size=2 "
    "--run.eval_batches=1",
    "orionlm train": TRAIN,
    "orionlm train recipe:sft-lora": "--data.seq_len=512",  # a whole GSM8K conversation
    "orionlm train recipe:dpo-lora": "--data.seq_len=512",  # HH-RLHF pairs whose replies fit
    "orionlm recipes": "",
    "orionlm plot": "",
    "orionlm info": "",
    "orionlm init": "",
    "orionlm tokenizer train": "",
    "orionlm generate": "--max-tokens 4",
    "orionlm chat": "--max-tokens 4",
    "orionlm convert": "",
    "orionlm bench": "--concurrency 1,2 --input-lengths 8 --output-tokens 4 --requests-per-client 1",
    "orionlm eval": "--limit 2 --max-new-tokens 4",
    "orionlm leakage": "--limit 2",
    "orionlm merge-lora": "--force",  # its --help examples are alternatives that write the same directory
    "orionlm merge": "",
    "orionlm moe-merge": "",
    "orionlm quantize": "--nsamples 2 --seq-len 32",
    "orionlm completion": "",
}
STDIN = {"orionlm chat": "Hello\n"}  # what a command reads (else nothing)

# Commands that are only parsed (by argparse; torchrun's options by torchrun's own parser), and why.
PARSE_ONLY = {
    "orionlm serve": "it serves until stopped; the README's Python client example runs against it (see SERVERS)",
    "orionlm lm-eval": "lm-evaluation-harness downloads its tasks from the Hub; tests/eval/test_harness.py runs it",
    "torchrun": "two processes take too long here; tests/train/test_distributed.py trains under torchrun",
}
# Commands that are not orionlm's, and why they do not run (a `bash SCRIPT`'s script must exist).
NOT_RUN = {
    "bash": "set-up (a virtual environment, minutes of installs) and the whole test suite",
    "llama-cli": "llama.cpp's command line is not installed; tests/convert/test_gguf.py runs GGUF files in llama.cpp",
    "echo": "it appends to the user's ~/.zshrc; tests/test_cli.py runs the zsh completion in a real zsh",
}
# A Python example that talks to a server at this address gets one, started as documented (on a free port).
SERVERS = {"http://127.0.0.1:8000/v1": "orionlm serve runs/m --port 8000"}


@dataclass(frozen=True)
class Example:
    where: str  # "README.md:59" or "orionlm generate --help"
    text: str  # as documented (a python example: its first line)
    block: str  # the examples of one block run in order, in one sandbox
    run: tuple[str, ...] = ()  # the words that run: optional [...] parts left out
    full: tuple[str, ...] = ()  # every word, optional ones included, for the parse check
    stdout: str = ""  # the file its output goes to (`> FILE`; `~` is the sandbox's home)
    code: str = ""  # a python example's source


# ---- reading the examples


def split_words(text: str) -> list[list[str]]:
    """A command line's shell words, comments dropped, one list per `&&`-joined command. shlex does not know
    bash's ANSI-C quoting, so `$'...'` is decoded and quoted again first."""
    text = re.sub(r"\$'((?:[^'\\]|\\.)*)'", lambda m: shlex.quote(codecs.decode(m[1], "unicode_escape")), text)
    commands: list[list[str]] = [[]]
    for word in shlex.split(text, comments=True):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return [words for words in commands if words]


def optional_parts(words: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the required words, every word): `[...]` marks optional parts (nested too), `...` says 'and more'."""
    required, every, depth = [], [], 0
    for word in words:
        core = word.lstrip("[")
        depth += len(word) - len(core)
        optional = depth > 0
        closing = min(depth, len(core) - len(core.rstrip("]")))
        core, depth = core[: len(core) - closing], depth - closing
        if not optional:
            required.append(core)
        if core and core != "...":
            every.append(core)
    return tuple(required), tuple(every)


def command_lines(body: str, first_line: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of each command of a bash block, its continuation lines joined."""
    start, parts = 0, []
    for number, line in enumerate(body.splitlines(), first_line):
        start, stripped = start or number, line.strip()
        parts.append(stripped.removesuffix("\\"))
        if not stripped.endswith("\\"):
            yield start, " ".join(parts)
            start, parts = 0, []


def fenced_blocks(language: str) -> Iterator[tuple[int, str]]:
    """(number of the first line, text) of README.md's ```LANGUAGE blocks."""
    text = README.read_text()
    for match in re.finditer(rf"^```{language}\n(.*?)^```", text, re.M | re.S):
        yield text.count("\n", 0, match.start(1)) + 1, match[1]


def commands(text: str, where: str, block: str) -> Iterator[Example]:
    for words in split_words(text):
        end = words.index(">") if ">" in words else len(words)
        yield Example(where, " ".join(words), block, *optional_parts(words[:end]), stdout=" ".join(words[end + 1 :]))


def readme_examples() -> Iterator[Example]:
    for first, body in fenced_blocks("bash"):
        for number, text in command_lines(body, first):
            yield from commands(text, f"README.md:{number}", f"README.md:{first}")
    for first, body in fenced_blocks("python"):
        where = f"README.md:{first}"
        yield Example(where, body.splitlines()[0], where, code=body)


def verbs(table: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every verb of the command table, as the words that name it (`convert`, `to-hf`)."""
    for name, entry in table.items():
        yield from verbs(entry, (*path, name)) if isinstance(entry, dict) else [(*path, name)]


def help_examples() -> Iterator[Example]:
    """The command lines of each verb's --help (in its description, above the options)."""
    for verb in verbs(COMMANDS):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            main([*verb, "--help"])
        description = re.split(r"\n(?:positional arguments|options):\n", text.getvalue())[0]
        where = f"orionlm {' '.join(verb)} --help"
        for line in description.splitlines():
            if line.strip().startswith(("orionlm ", "torchrun ")):
                yield from commands(line, where, where)


EXAMPLES = [*readme_examples(), *help_examples()]
BLOCKS: dict[str, list[Example]] = {}
for _example in EXAMPLES:
    BLOCKS.setdefault(_example.block, []).append(_example)


# ---- what a command is, needs and writes


def table_entries(table: dict[str, Any], words: Sequence[str]) -> list[str]:
    """The keys of `table` that start the command, shortest first."""
    text = " ".join(words)
    return sorted((key for key in table if text == key or text.startswith(key + " ")), key=len)


def placeholder(name: str) -> re.Pattern[str]:
    """A placeholder as a whole word (`--flag=FILE` included, `FILES` or `a/FILE` not)."""
    return re.compile(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])")


def substitute(text: str) -> str:
    for name, value in SUBSTITUTE.items():
        text = placeholder(name).sub(value, text)
    return text


def runnable(words: Sequence[str]) -> list[str]:
    """The documented words with the placeholders replaced and the short settings added."""
    return [substitute(w) for w in words] + [w for key in table_entries(RUN, words) for w in shlex.split(RUN[key])]


def parsed(words: Sequence[str]) -> tuple[Any, list[str]] | str:
    """The real parser's namespace and leftover words for `orionlm WORDS...`, or why it refuses them. torchrun's
    options are checked by torchrun's own parser, and the module it runs must be orionlm."""
    error = io.StringIO()
    try:
        with contextlib.redirect_stderr(error):
            if words[0] == "torchrun":
                from torch.distributed.run import get_args_parser

                options = get_args_parser().parse_args(words[1:])
                if not (options.module and options.training_script == "orionlm"):
                    return f"`{shlex.join(words)}` does not run `-m orionlm`"
                words = ["orionlm", *options.training_script_args]
            namespace, rest = make_parser(words[1:]).parse_known_args(words[1:])
    except SystemExit:
        return f"the parser refuses `{shlex.join(words)}`: {error.getvalue().strip()}"
    if rest and getattr(namespace, "_rest", None) is None:
        return f"the parser does not know {rest} in `{shlex.join(words)}`"
    return namespace, rest


def training_recipe(words: Sequence[str]) -> Recipe | None:
    """The resolved recipe of an `orionlm train` command (None for other commands, or a recipe that is refused)."""
    result = parsed(words)
    if isinstance(result, str) or result[0]._fn.__name__ != "train_model":
        return None
    with contextlib.suppress(OrionError):
        return load_recipe(result[0].recipe, result[1])
    return None


def written(words: Sequence[str]) -> list[str]:
    """The paths a command writes: its out_dir, dst or out, and a training run's directory."""
    result = parsed(words)
    if isinstance(result, str):
        return []
    paths = [getattr(result[0], name, None) for name in ("out_dir", "dst", "out")]
    if recipe := training_recipe(words):
        paths.append(recipe.run.out_dir)
    return [str(path) for path in paths if path is not None]


def needs_shared(example: Example) -> bool:
    """Whether the example reads ../shared: itself, through a YAML file it names or through its recipe."""
    words = runnable(example.run)
    recipe = training_recipe(words)
    texts = [example.code, *words, json.dumps(recipe.to_dict()) if recipe else ""]
    texts += [Path(w).read_text() for w in words if w.endswith(".yaml") and Path(w).is_file()]
    return any("../shared/" in text for text in texts)


# ---- the inputs the docs take as given


def call(argv: list[str]) -> str | None:
    """Run `orionlm ARGV` in-process: None when it succeeds (exit status 0), else what went wrong."""
    try:
        main(argv)
    except SystemExit as stop:
        return f"exited with status {stop.code}" if stop.code else None
    except Exception:
        return f"raised:\n{traceback.format_exc()}"
    return None


def tiny_model(name: str, tokenizer: Tokenizer, path: Path, **overrides: Any) -> Path:
    model = OrionLM(preset(name, vocab_size=tokenizer.vocab_size, **overrides))
    model.reset_parameters(seed=0)
    save_checkpoint(model, path, tokenizer)
    return path


TINY_RUN = """\
run: {{out_dir: {}, max_steps: 2, batch_size: 2, eval_every: 0, eval_batches: 1, plot: false, progress: false}}
"""
TINY_RECIPE = """\
# What RECIPE stands for: a tiny MoE on corpus.txt, 2 steps.
model: {preset: tiny-moe, overrides: {max_seq_len: 64}}
tokenizer: {train_vocab_size: 320}
data: {sources: [{path: corpus.txt}], seq_len: 32, val_fraction: 0.1}
schedule: {kind: cosine, warmup_steps: 1}
""" + TINY_RUN.format("runs/tiny")
LORA_RECIPE = """\
mode: lora
model: {path: runs/m}
data: {sources: [{path: ../build/chat.jsonl}], seq_len: 64, val_fraction: 0.25}
lora: {r: 2, target_modules: [q_proj, v_proj]}
schedule: {kind: cosine, warmup_steps: 1}
""" + TINY_RUN.format("runs/sft-lora")

QUESTIONS = {"What do bees make?": ["honey", "iron", "glass", "salt"], "Which is a colour?": ["seven", "blue", "cold"]}


def write_data(root: Path) -> None:
    """corpus.txt (the standard library's json package), recipe.yaml, the README's merge.yaml, and outside the
    sandbox the data of the LoRA run: a few chat conversations, and multiple-choice items."""
    texts = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))]
    (root / "corpus.txt").write_text("\n".join(texts))
    (root / "recipe.yaml").write_text(TINY_RECIPE)
    (root / "merge.yaml").write_text(next(body for _, body in fenced_blocks("yaml")))
    build = root.parent / "build"
    build.mkdir()
    (build / "lora.yaml").write_text(LORA_RECIPE)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": c[0]}] for q, c in QUESTIONS.items()]
    (build / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats * 4))
    items = [{"id": str(i), "question": q, "choices": c, "answer": 0} for i, (q, c) in enumerate(QUESTIONS.items())]
    (build / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))


def build_models(root: Path) -> None:
    """runs/m (a tiny MoE: the docs' model) and its copy runs/pretrain-mixture (the base recipe:sft-lora names),
    runs/m's Hugging Face export, a dense model as GGUF and as the sources of recipe:moe-merge and the README's
    merge.yaml, and a Chimera in Auron's layout."""
    tokenizer = Tokenizer.train_bpe((root / "corpus.txt",), vocab_size=400)
    model = tiny_model("tiny-moe", tokenizer, root / "runs/m", max_seq_len=512)
    shutil.copytree(model, root / "runs/pretrain-mixture")
    dense = tiny_model("tiny-dense", tokenizer, root.parent / "build/dense")
    for name in ("chat", "code", *(f"frankenmoe/{e}" for e in ("base", "english", "python", "portuguese", "finnish"))):
        shutil.copytree(dense, root / "runs" / name)
    chimera = tiny_model("tiny-chimera", tokenizer, root.parent / "build/chimera")
    for argv in (
        ["convert", "to-hf", "runs/m", "path/to/hf-model"],
        ["convert", "to-gguf", str(dense), "model.gguf"],
        ["convert", "to-auron", str(chimera), "path/to/auron"],
        ["convert", "to-auron", str(chimera), "path/to/Auron-510M"],
    ):
        assert call(argv) is None, argv


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and where the cores are busy torch's threads wait for each
    other: on a shared 2-core machine this file took 4 minutes with two threads, 37 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs the docs take as given, built once: the files of write_data, the models of build_models, a LoRA
    run on runs/m (runs/sft-lora) and its adapter (runs/adapter), a finished run of recipe.yaml as runs/quickstart
    (what quickstart leaves), and the eval results runs/a.json and runs/b.json."""
    root = tmp_path_factory.mktemp("docs") / "inputs"
    root.mkdir()
    write_data(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("ORIONLM_CACHE", str(root.parent / "cache"))
        build_models(root)
        for argv in (
            ["train", "../build/lora.yaml"],
            ["train", "recipe.yaml", "--run.out_dir=runs/quickstart"],
            [
                "eval",
                "runs/m",
                "--tasks",
                "arc_easy",
                "--task-file",
                "arc_easy=../build/items.jsonl",
                "--out",
                "runs/a.json",
            ],
        ):
            assert call(argv) is None, argv
    shutil.copytree(root / "runs/sft-lora/model", root / "runs/adapter")
    shutil.copyfile(root / "runs/a.json", root / "runs/b.json")
    return root


# ---- running the examples


@dataclass
class Sandbox:
    """A block's working directory, and the outcomes of its first examples, in order: None (ran), a reason (not
    run, by design), or the failure (which stops the rest of the block) or skip (which stops the examples that name
    what it would have written)."""

    work: Path
    outcomes: list[BaseException | str | None] = field(default_factory=list)

    def outcome(self, example: Example, execute: Callable[[Example], str | None]) -> str | None:
        """Run the block's examples up to this one (those not run yet) in order; this one's failure is raised."""
        __tracebackhide__ = True
        block = BLOCKS[example.block]
        index = block.index(example)
        for current in block[len(self.outcomes) : index + 1]:
            stop = next((block[i] for i, o in enumerate(self.outcomes) if stops(o, block[i], current)), None)
            if stop is not None:
                self.outcomes.append(pytest.skip.Exception(f"needs {stop.where} `{stop.text}`, which did not run"))
                continue
            try:
                self.outcomes.append(execute(current))
            except (Exception, pytest.skip.Exception, pytest.fail.Exception) as error:
                self.outcomes.append(error)
        result = self.outcomes[index]
        if isinstance(result, BaseException):
            raise result
        return result


def stops(outcome: BaseException | str | None, earlier: Example, later: Example) -> bool:
    """Whether the outcome of an earlier example of the block keeps a later one from running."""
    if isinstance(outcome, pytest.skip.Exception):
        return any(path in " ".join(runnable(later.run)) for path in written(runnable(earlier.run)))
    return isinstance(outcome, BaseException)


def make_sandbox(block: str, inputs: Path, box: Path) -> Sandbox:
    """box/work: the inputs (hard links; no command writes into an input file) less those the block writes itself,
    with ../shared beside it."""
    work = box / "work"
    shutil.copytree(inputs, work, symlinks=True, copy_function=os.link)
    if SHARED_DATA.is_dir():
        (box / "shared").symlink_to(SHARED_DATA.parent)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(inputs)  # where the recipes that name the runs' directories are found
        outputs = {p for e in BLOCKS[block] if table_entries(RUN, e.run) for p in written(runnable(e.run))}
    for path in map(work.joinpath, outputs):
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
    return Sandbox(work)


def execute(example: Example, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Run one example in the working directory; None when it ran, the reason when it is not run by design."""
    __tracebackhide__ = True
    if example.code:
        return run_python(example)
    if not_run := table_entries(NOT_RUN, example.run):
        if example.run[0] == "bash":
            assert (REPO / example.run[1]).is_file(), f"{example.where}: {example.run[1]} does not exist"
        return f"not run: {NOT_RUN[not_run[-1]]}"
    if not table_entries(RUN, example.run) and not table_entries(PARSE_ONLY, example.run):
        pytest.fail(f"{example.where}: `{example.text}` is in the docs but in none of RUN, PARSE_ONLY and NOT_RUN "
                    "of tests/test_docs.py: add it to RUN (with the settings that make it short) or say why not",
                    pytrace=False)  # fmt: skip
    if isinstance(refusal := parsed([substitute(word) for word in example.full]), str):  # the optional parts too
        pytest.fail(f"{example.where}: {refusal}", pytrace=False)
    if not table_entries(RUN, example.run):
        return None
    if needs_shared(example) and not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data is absent ({SHARED_DATA}); it only exists beside the project checkout")
    run_command(example, capsys, monkeypatch)
    return None


def run_command(example: Example, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a command in-process: it must exit with status 0, and print JSON with --json; `> FILE` gets its output."""
    __tracebackhide__ = True
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(STDIN[key] for key in table_entries(STDIN, example.run))))
    words = runnable(example.run)
    ran = f"{example.where}: `{example.text}` (run as `{shlex.join(words)}`)"
    capsys.readouterr()
    failure = call(words[1:])
    out, err = capsys.readouterr()
    if failure:
        pytest.fail(f"{ran} {failure}\n{out[-2000:]}{err[-3000:]}", pytrace=False)
    if "--json" in words and (error := json_error(out)):
        pytest.fail(f"{ran} printed no JSON ({error}):\n{out[-2000:]}", pytrace=False)
    if example.stdout:
        target = Path(re.sub("^~/", "../home/", example.stdout))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(out)


def json_error(text: str) -> str | None:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return str(e)
    return None


def run_python(example: Example) -> None:
    """A python example as a script, against a server started as documented where it talks to one."""
    __tracebackhide__ = True
    code, failure = substitute(example.code), None
    with contextlib.ExitStack() as stack:
        for url, command in SERVERS.items():
            if url in code:
                arguments = [*runnable(split_words(command)[0])[1:], "--port", "0"]
                address = stack.enter_context(orionlm_server(arguments, cwd=Path.cwd()))
                code = code.replace(url, f"{address}/v1")
        try:
            exec(compile(code, example.where, "exec"), {"__name__": "__main__"})
        except Exception:
            failure = traceback.format_exc()
    if failure:
        pytest.fail(f"{example.where} raised:\n{failure}", pytrace=False)


@pytest.fixture(scope="module")
def sandbox(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Sandbox]:
    boxes: dict[str, Sandbox] = {}

    def get(block: str) -> Sandbox:
        if block not in boxes:
            boxes[block] = make_sandbox(block, inputs, tmp_path_factory.mktemp("box"))
        return boxes[block]

    return get


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.where} {e.text}"[:100])
def test_example(example: Example, inputs: Path, sandbox: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch):
    box = sandbox(example.block)
    monkeypatch.chdir(box.work)
    monkeypatch.setenv("ORIONLM_CACHE", str(inputs.parent / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server's process: as one_thread
    monkeypatch.delenv("ORIONLM_API_KEY", raising=False)
    reason = box.outcome(example, lambda current: execute(current, capsys, monkeypatch))
    if reason:
        pytest.skip(reason)


# ---- the harness itself


def test_reading_commands():
    """Continuation lines join, comments and `&&` split, `$'...'` decodes, optional parts (nested) drop out of
    what runs but stay for the parse check; every command line of README.md's bash blocks becomes an example."""
    body = "orionlm a $'x\\ny' \\\n    [--b [C]] [D ...]  # note\nllama-cli -m f && orionlm e\n"
    lines = list(command_lines(body, 10))
    assert lines == [(10, "orionlm a $'x\\ny'  [--b [C]] [D ...]  # note"), (12, "llama-cli -m f && orionlm e")]
    assert split_words(lines[0][1]) == [["orionlm", "a", "x\ny", "[--b", "[C]]", "[D", "...]"]]
    assert optional_parts(split_words(lines[0][1])[0]) == (
        ("orionlm", "a", "x\ny"),
        ("orionlm", "a", "x\ny", "--b", "C", "D"),
    )
    assert split_words(lines[1][1]) == [["llama-cli", "-m", "f"], ["orionlm", "e"]]
    documented = sum(
        bool(line) and not line[0].isspace() and not line.startswith("#")  # a command's first line
        for _, body in fenced_blocks("bash")
        for line in body.splitlines()
    )
    assert sum(e.block.startswith("README.md") and not e.code for e in EXAMPLES) == documented


def test_unknown_commands_and_flags_fail(capsys, monkeypatch):
    """A command in none of the tables fails its test; the parse check refuses a flag that is not (or no longer)
    there, torchrun's included."""
    words = ("orionlm", "frobnicate")
    with pytest.raises(pytest.fail.Exception, match="in none of RUN, PARSE_ONLY and NOT_RUN"):
        execute(Example("README.md:1", "orionlm frobnicate", "README.md:1", words, words), capsys, monkeypatch)
    refusal = parsed(["orionlm", "generate", "hi", "--model", "m", "--temperature", "0"])
    assert (
        refusal == "the parser does not know ['--temperature', '0'] in `orionlm generate hi --model m --temperature 0`"
    )
    assert "unrecognized arguments: --nproc-per-nodes" in parsed(["torchrun", "--nproc-per-nodes", "2", "x.py"])


def test_every_table_entry_is_used():
    """A table entry that no example uses is stale (the docs changed): remove it."""
    texts = [" ".join(e.full) + e.code for e in EXAMPLES]
    unused = [name for name in SUBSTITUTE if not any(placeholder(name).search(text) for text in texts)]
    for table in (RUN, STDIN, PARSE_ONLY, NOT_RUN):
        unused += [key for key in table if not any(key in table_entries(table, e.run) for e in EXAMPLES)]
    unused += [url for url in SERVERS if not any(url in e.code for e in EXAMPLES)]
    assert not unused, f"entries of the tables in tests/test_docs.py that no example uses: {unused}"
