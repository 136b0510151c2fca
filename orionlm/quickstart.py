"""`orionlm quickstart`: the whole pipeline in a few CPU minutes, on a corpus every machine has.

It trains a byte-level BPE tokenizer and then a tiny MoE (8 experts, top-2, balanced by a routing bias
rather than a loss: DeepSeek-V3's auxiliary-loss-free balancing) on the Python standard library's own source
files, and shows that the model learned: validation loss against the unigram entropy of the data (what a model
that ignores context can reach; the trainer records it in run.json), the loss table, the charts (expert_load.png:
every expert in use), and a continuation of "def fibonacci(n):". The model is in OUT/model.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

from .train.recipe import load_recipe

PROMPT = "def fibonacci(n):"


def quickstart_recipe(out_dir: Path, steps: int) -> dict[str, Any]:
    """The recipe as plain data; `orionlm quickstart --print-recipe` shows it as YAML."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return {
        "model": {
            "preset": "tiny-moe",
            "overrides": {
                "hidden_size": 128,
                "num_layers": 4,
                "num_heads": 4,
                "num_kv_heads": 2,
                "num_experts": 8,
                "experts_per_token": 2,
                "expert_intermediate_size": 192,
                "max_seq_len": 256,
                # Auxiliary-loss-free balancing (README: Balancing the experts): with Mixtral's loss alone the
                # last layer sent 48% of the slots to one expert and layers 1-2 left 5 experts idle
                "router_bias_update_rate": 1e-3,
                "router_aux_loss_coef": 0.0,
            },
        },
        "tokenizer": {"train_vocab_size": 2048, "train_max_bytes": 3_000_000},
        # The top-level modules of the standard library: ~170 files, ~5 MB, on every Python install.
        "data": {"sources": [{"name": "stdlib", "path": stdlib, "glob": "*.py"}], "seq_len": 256, "val_fraction": 0.02},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_fraction": 0.08, "min_lr_ratio": 0.1},
        "run": {
            "out_dir": str(out_dir),
            "max_steps": steps,
            "batch_size": 16,
            "log_every": 10,
            "eval_every": max(steps // 6, 1),
            "eval_batches": 16,
            "keep_last": 1,
        },
    }


def run_quickstart(out_dir: Path, steps: int, overrides: list[str]) -> None:
    import yaml

    from .checkpoint import load_checkpoint
    from .generation import generate
    from .loading import MODEL_DIR
    from .model import count_parameters
    from .train.plot import read_run_info
    from .train.trainer import train

    recipe_path = out_dir.parent / f".{out_dir.name}.recipe.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(quickstart_recipe(out_dir, steps), sort_keys=False))
    recipe = load_recipe(recipe_path, overrides)
    recipe_path.unlink()
    train(recipe)

    model, tokenizer = load_checkpoint(out_dir / MODEL_DIR, device="cpu")
    total, active = count_parameters(model.config)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    entropy = read_run_info(out_dir)["unigram_entropy"]
    print(f"\nparameters: {total:,} total, {active:,} active per token ({model.config.num_experts} experts, top-2)")
    print("\n| step | tokens | train loss | val loss |\n|---:|---:|---:|---:|")
    for r in records:
        if "val_loss" in r:
            print(f"| {r['step']} | {r['tokens']:,} | {r['loss']:.3f} | {r['val_loss']:.3f} |")
    final = records[-1]["val_loss"]
    print(f"\nunigram entropy of the data: {entropy:.3f} nats/token; final validation loss: {final:.3f} "
          f"({'learned from context' if final < entropy else 'NOT below the unigram entropy'})")  # fmt: skip
    text = generate(model, tokenizer, "cpu", PROMPT, max_new_tokens=80, temperature=0.7, top_k=40, seed=0)
    print(f"\n{PROMPT}{text}\n")
    print(f"run directory: {out_dir} (model/, loss.png, lr.png, expert_load.png, metrics.jsonl, checkpoints/)")
