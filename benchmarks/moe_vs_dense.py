"""Quality at equal compute: an 8-expert top-2 MoE against a dense model with the same active parameters.

The claim the MoE model cards make (Switch Transformer, Mixtral): at the same training tokens and the same
FLOPs per token, routing each token through 2 of 8 experts reaches a lower loss than one dense FFN as wide
as the two experts together, because the MoE holds ~4x the FFN parameters while computing with a quarter.

Both models run through the real trainer (orionlm.train.trainer.train) from recipes written here, which
differ only in what defines the architecture: the dense FFN is `expert width x top-k` wide, so the active
parameter counts match (the MoE adds its router: 8 x hidden per layer). Everything else is shared: one BPE
tokenizer trained first on the data, the data and its validation split, seed, AdamW, learning-rate schedule,
batch and token budget. The MoE keeps the trainer's default router losses (load balancing 0.01, no z-loss).

Data: the TinyStories sample in ../shared/data (2.1 MB, 572K tokens, stories separated by <|endoftext|>),
the last 5% of its windows held out. The default budget, 1500 steps of 8 x 256 tokens (3.1M tokens, about
5.6 passes over the 545K training tokens: the sample is small), takes about 8 minutes on a 2-core CPU. The
MoE trails early (its router is still learning and each expert sees a quarter of the tokens) and overtakes
the dense model after about 0.7M tokens; at 600 steps the two are within a few hundredths of a nat either way.
Prints the setup, a table of validation losses over the evaluation points and the final numbers, and
saves the two loss curves (orionlm.train.plot.plot_comparison).

    .venv/bin/python benchmarks/moe_vs_dense.py [--steps 1500] [--out runs/moe_vs_dense] [--set optim.lr=0.004]
"""

from __future__ import annotations

import statistics

import yaml
from common import (
    comparison_args,
    data_line,
    print_val_table,
    run_comparison,
)

from orionlm.errors import OrionError
from orionlm.train.plot import plot_comparison, read_metrics
from orionlm.train.recipe import load_recipe

VOCAB = 2048
SHARED = dict(vocab_size=VOCAB, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=256)
EXPERTS, TOP_K, EXPERT_WIDTH = 8, 2, 256
ARCHITECTURES = {
    "dense": {"preset": "tiny-dense", "overrides": SHARED | {"intermediate_size": EXPERT_WIDTH * TOP_K}},
    "moe": {
        "preset": "tiny-moe",
        "overrides": SHARED
        | {"num_experts": EXPERTS, "experts_per_token": TOP_K, "expert_intermediate_size": EXPERT_WIDTH},
    },
}


OPTIM = {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0}
SCHEDULE = {"kind": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.1}


def main() -> None:
    args = comparison_args(__doc__, "moe_vs_dense", 1500, "optim.lr=0.001")
    tokenizer, runs, wall, info = run_comparison(
        args, "MoE vs dense at equal active parameters", ARCHITECTURES, OPTIM, SCHEDULE, VOCAB
    )
    print(data_line(runs["dense"], args.data, tokenizer))
    shared = yaml.safe_load((args.out / "dense.yaml").read_text())
    moe = load_recipe(args.out / "moe.yaml").model.build()
    print(
        f"shared: {SHARED}; optim {shared['optim']}; schedule {shared['schedule']}; {args.steps} steps x "
        f"{info['dense']['tokens_per_step']:,} tokens; changed from the defaults: {args.set or 'nothing'}"
    )
    print(
        f"dense FFN {EXPERT_WIDTH * TOP_K}; MoE {EXPERTS} experts of {EXPERT_WIDTH}, top-{TOP_K}, load-balancing "
        f"loss x {moe.router_aux_loss_coef}, z-loss x {moe.router_z_loss_coef}\n"
    )

    records = {name: read_metrics(run_dir) for name, run_dir in runs.items()}
    print_val_table("dense", records["dense"], "MoE", records["moe"])

    print("\n| model | total params | active params | final train loss | final val loss | tokens/s | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in runs:
        total, active = info[name]["total_params"], info[name]["active_params"]
        final = records[name][-1]
        tps = statistics.median(r["tokens_per_s"] for r in records[name])
        print(f"| {name} | {total:,} | {active:,} | {final['loss']:.4f} | {final['val_loss']:.4f} | {tps:,.0f} "
              f"| {wall[name]:.0f} |")  # fmt: skip
    dense_final, moe_final = records["dense"][-1]["val_loss"], records["moe"][-1]["val_loss"]
    verdict = "lower" if moe_final < dense_final else "NOT lower"
    print(f"\nMoE final validation loss {moe_final:.4f} vs dense {dense_final:.4f}: {verdict} "
          f"(difference {moe_final - dense_final:+.4f} nats/token)")  # fmt: skip
    try:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        labels = {"dense": runs["dense"], f"MoE {EXPERTS}x top-{TOP_K}": runs["moe"]}
        print(f"wrote {plot_comparison(labels, args.plot)}")
    except OrionError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
