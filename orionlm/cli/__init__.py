"""The `orionlm` command line: one verb = one typed function; its docstring is its --help (see parser.py).

Each verb's function lives in the module of its group below, named so that it shadows no library function
it calls (`orionlm train` runs `train_model`, which calls the trainer's `train`).
"""

from __future__ import annotations

import sys

from ..errors import OrionError
from .convert import (
    convert_from_auron,
    convert_from_gguf,
    convert_from_hf,
    convert_to_auron,
    convert_to_gguf,
    convert_to_hf,
)
from .eval import eval_model, leakage, lm_eval
from .generate import bench_serving, chat, generate_text
from .merge import assemble_moe, merge_adapter, merge_checkpoints
from .model import info, init
from .parser import build_parser, run
from .quantize import quantize_checkpoint
from .serve import serve_model
from .train import list_recipes, plot, quickstart, tokenizer_train, train_model

COMMANDS = {
    "info": info,
    "init": init,
    "generate": generate_text,
    "chat": chat,
    "quickstart": quickstart,
    "train": train_model,
    "recipes": list_recipes,
    "plot": plot,
    "serve": serve_model,
    "bench": bench_serving,
    "eval": eval_model,
    "leakage": leakage,
    "lm-eval": lm_eval,
    "merge-lora": merge_adapter,
    "merge": merge_checkpoints,
    "moe-merge": assemble_moe,
    "quantize": quantize_checkpoint,
    "convert": {
        "from-hf": convert_from_hf,
        "to-hf": convert_to_hf,
        "from-gguf": convert_from_gguf,
        "to-gguf": convert_to_gguf,
        "from-auron": convert_from_auron,
        "to-auron": convert_to_auron,
    },
    "tokenizer": {"train": tokenizer_train},
}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(
        "orionlm", "orionlm: define, train, convert, generate with MoE and hybrid language models.", COMMANDS
    )
    try:
        run(parser, argv)
    except OrionError as e:
        sys.stderr.write(f"orionlm: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
