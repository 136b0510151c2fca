"""The `orionlm` command line: one verb = one typed function; its docstring is its --help (see parser.py).

Each verb's function lives in the module of its group (named below as "module:function"), named so that it
shadows no library function it calls (`orionlm train` runs `train_model`, which calls the trainer's `train`).
The table imports no verb module: `orionlm --help` lists the summaries given here, and a command imports
only its own verb's module, whose heavy imports (torch and the rest) happen when the verb runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from ..errors import OrionError
from .common import compute_setup
from .parser import Commands, Verb, build_parser, run

COMMANDS: Commands = {
    "info": Verb("model:info", "Print a model's architecture and parameter counts"),
    "init": Verb("model:init", "Write a randomly initialised model directory for a preset", computes=True),
    "generate": Verb(
        "generate:generate_text", "Generate a continuation of PROMPT and stream it to stdout", computes=True
    ),
    "chat": Verb("generate:chat", "Chat with a model in the terminal, using its chat template", computes=True),
    "quickstart": Verb("train:quickstart", "Train a tiny MoE on the Python standard library's sources", computes=True),
    "train": Verb("train:train_model", "Train a model from a recipe", computes=True),
    "recipes": Verb("train:list_recipes", "List the recipes that ship with orionlm"),
    "plot": Verb("train:plot", "Write charts of a training run"),
    "serve": Verb("serve:serve_model", "Serve a model over an OpenAI-compatible HTTP API", computes=True),
    "bench": Verb("generate:bench_serving", "Measure serving speed", computes=True),
    "eval": Verb("eval:eval_model", "Evaluate a model", computes=True),
    "leakage": Verb("eval:leakage", "Detect benchmark leakage by shuffling options", computes=True),
    "lm-eval": Verb(
        "eval:lm_eval", "Run lm-evaluation-harness's command line with orionlm registered as a model", computes=True
    ),
    "merge-lora": Verb(
        "merge:merge_adapter",
        "Fold a LoRA adapter (PEFT files, written by orionlm or by peft) into its base model",
        computes=True,
    ),
    "merge": Verb("merge:merge_checkpoints", "Merge models of one architecture into one", computes=True),
    "moe-merge": Verb(
        "merge:assemble_moe", 'Assemble a Mixtral-style MoE ("frankenMoE") from dense models', computes=True
    ),
    "quantize": Verb(
        "quantize:quantize_checkpoint", "Quantize a model's linear layers to GPTQ checkpoints", computes=True
    ),
    "convert": {
        "from-hf": Verb(
            "convert:convert_from_hf",
            "Convert a Hugging Face model directory (or Hub id) into an orionlm model directory",
            computes=True,
        ),
        "to-hf": Verb(
            "convert:convert_to_hf", "Export a model as a Hugging Face directory that transformers loads", computes=True
        ),
        "from-gguf": Verb(
            "convert:convert_from_gguf", "Import a llama- or bloom-architecture GGUF file", computes=True
        ),
        "to-gguf": Verb("convert:convert_to_gguf", "Export a model as a GGUF file for llama.cpp", computes=True),
        "from-auron": Verb(
            "convert:convert_from_auron",
            "Convert an Auron checkpoint directory (or Hub id) into an orionlm model directory",
            computes=True,
        ),
        "to-auron": Verb(
            "convert:convert_to_auron", "Export a chimera-family model in Auron's checkpoint layout", computes=True
        ),
    },
    "tokenizer": {"train": Verb("train:tokenizer_train", "Train a byte-level BPE tokenizer on text files")},
    "completion": Verb("completion:completion", "Print a shell completion script (bash or zsh) for orionlm"),
}


def make_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for the verb that argv names (None: for every verb); the verbs that compute take --threads."""
    description = "orionlm: define, train, convert, generate with MoE and hybrid language models."
    return build_parser("orionlm", description, COMMANDS, __version__, argv, compute_setup)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(make_parser(argv), argv)
        sys.stdout.flush()  # a reader that left shows here, inside the handler below, not at exit
    except OrionError as e:
        sys.stderr.write(f"orionlm: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader of stdout went away (`orionlm info X | head`): stop quietly, as `cat` does. Whatever is still
        # buffered goes to /dev/null, or Python's own flush at exit would fail again, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a command a closed pipe stopped
