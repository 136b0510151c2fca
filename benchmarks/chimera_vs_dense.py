"""Quality at equal unique parameters: a looped Chimera against a dense Llama-style model.

A Chimera (Auron's hybrid: Gated DeltaNet layers with attention as every 4th block of each zone, the top
blocks shared and run twice) spends more compute per token than its parameter count suggests. This
measures what the loop buys: at the same unique parameters and training tokens, does it reach a lower
validation loss than a dense model?

The Chimera is recipe:tinystories-chimera's model: hidden 128, 6 unique blocks (2 bottom + 4 shared,
looped twice: 10 virtual layers), attn_interval 4 (so one attention block, the last shared one: 2 of the
10 virtual layers), GDN with 4 heads of 32, FFN 341. The dense model (preset tiny-dense: RMSNorm, SwiGLU,
RoPE, GQA with 4 q / 2 kv heads) has hidden 128 and 8 layers of FFN 362, which matches the Chimera's
unique parameter count to within a few hundred. The Chimera ties its LM head to its embedding, so the
dense model does too: untied, it would hold 262K more parameters, all in the head. Both runs go through
the real trainer (orionlm.train.trainer.train) from recipes written here and share everything else: one
BPE tokenizer trained first on the data, the data and its validation split, seed, batch, token budget and
the Chimera recipe's optimizer, Muon on the hidden matrices with AdamW for the embedding and the scalars
(lr 3e-3, embedding 1e-2, scalars 5e-3, no weight decay), under a WSD schedule (30 warmup steps, cosine
decay over the last 10%).

Data: the TinyStories sample in ../shared/data (2.1 MB, 572K tokens, stories separated by <|endoftext|>),
the last 5% of its windows held out. The default budget, 800 steps of 8 x 256 tokens (1.6M tokens, three
passes over the 545K training tokens: the sample is small), takes about 10 minutes on a quiet 2-core CPU,
two thirds of it the Chimera's. The Chimera leads by 0.3 nats over the first 400K tokens; the dense model
closes the gap, and after 800 steps the two end within 0.01 nats (2.797 vs 2.803). The loop costs 1.3x the
training FLOPs per token and, on this CPU, 2.3x the time per step (it reaches half the dense model's FLOP
rate), so the edge is one at equal tokens: at equal time the dense model would see 2.3x the data. A dense
run at twice the lr (6e-3) ended worse (2.852): the shared optimizer settings do not hold it back.
Prints the setup (with each model's unique and virtual parameters and training FLOPs per token), a table
of validation losses over the evaluation points, the final numbers with each model's speed, and saves the
two loss curves (orionlm.train.plot.plot_comparison).

    .venv/bin/python benchmarks/chimera_vs_dense.py [--steps 800] [--out runs/chimera_vs_dense] [--set optim.lr=0.002]
"""

from __future__ import annotations

import statistics

import yaml
from common import (
    SEQ_LEN,
    comparison_args,
    data_line,
    print_val_table,
    run_comparison,
)

from orionlm.config import ModelConfig
from orionlm.errors import OrionError
from orionlm.model import count_parameters, virtual_parameters
from orionlm.train.metrics import flops_per_token
from orionlm.train.plot import plot_comparison, read_metrics
from orionlm.train.recipe import load_recipe

VOCAB = 2048
SHARED = dict(vocab_size=VOCAB, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, max_seq_len=SEQ_LEN)
ARCHITECTURES = {
    # 8 layers of FFN 362 (2.8x hidden, near Llama's 8/3) hold 1,769,600 parameters, the Chimera 1,769,726
    "dense": {
        "preset": "tiny-dense",
        "overrides": SHARED | {"num_layers": 8, "intermediate_size": 362, "tie_embeddings": True},
    },
    "chimera": {
        "preset": "tiny-chimera",
        "overrides": SHARED
        | {"num_layers": 6, "shared_layers": 4, "loops": 2, "attn_interval": 4, "intermediate_size": 341}
        | {"gdn_num_heads": 4, "gdn_head_dim": 32},
    },
}
OPTIM = {"name": "muon", "lr": 3e-3, "embed_lr": 1e-2, "scalar_lr": 5e-3, "weight_decay": 0.0}
SCHEDULE = {"kind": "wsd", "warmup_steps": 30, "decay_fraction": 0.1, "decay_shape": "cosine", "min_lr_ratio": 0.0}


def describe(config: ModelConfig) -> str:
    """The model's shape, unique and virtual parameters and training FLOPs per token, for the setup lines."""
    total, _ = count_parameters(config)
    shape = f"{config.name}: hidden {config.hidden_size}, "
    if config.architecture == "chimera":
        bottom = config.num_layers - config.shared_layers
        attention = [config.is_attention_layer(i) for i in range(config.num_layers)]
        shape += (
            f"{config.num_layers} unique blocks ({bottom} bottom + {config.shared_layers} shared looped "
            f"{config.loops}x = {bottom + config.shared_layers * config.loops} virtual layers), of which "
            f"{sum(attention)} attention ({sum(attention[:bottom]) + config.loops * sum(attention[bottom:])} "
            f"virtual) and the rest GDN with {config.gdn_num_heads} heads x {config.gdn_head_dim}"
        )
    else:
        shape += f"{config.num_layers} layers, attention {config.num_heads} q / {config.num_kv_heads} kv heads"
    return (
        f"{shape}, FFN {config.intermediate_size}, tied embeddings {config.tie_embeddings}: {total:,} unique and "
        f"{virtual_parameters(config):,} virtual parameters, {flops_per_token(config, SEQ_LEN) / 1e6:.1f} "
        f"training MFLOPs/token"
    )


def main() -> None:
    args = comparison_args(__doc__, "chimera_vs_dense", 800, "optim.lr=0.002")
    tokenizer, runs, wall, info = run_comparison(
        args, "Chimera (looped) vs dense at equal unique parameters", ARCHITECTURES, OPTIM, SCHEDULE, VOCAB
    )
    configs = {name: load_recipe(args.out / f"{name}.yaml").model.build() for name in runs}
    print(data_line(runs["dense"], args.data, tokenizer))
    shared = yaml.safe_load((args.out / "dense.yaml").read_text())
    print(
        f"shared: optim {shared['optim']}; schedule {shared['schedule']}; {args.steps} steps x "
        f"{info['dense']['tokens_per_step']:,} tokens; changed from the defaults: {args.set or 'nothing'}"
    )
    for name in runs:
        print(describe(configs[name]))
    print()

    records = {name: read_metrics(run_dir) for name, run_dir in runs.items()}
    print_val_table("dense", records["dense"], "Chimera", records["chimera"])

    print(
        "\n| model | unique params | virtual params | final train loss | final val loss | tokens/s | s/step "
        "| wall (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in runs:
        final = records[name][-1]
        tps = statistics.median(r["tokens_per_s"] for r in records[name])
        print(f"| {name} | {info[name]['total_params']:,} | {virtual_parameters(configs[name]):,} "
              f"| {final['loss']:.4f} | {final['val_loss']:.4f} | {tps:,.0f} "
              f"| {info[name]['tokens_per_step'] / tps:.3f} | {wall[name]:.0f} |")  # fmt: skip
    dense_final, chimera_final = records["dense"][-1]["val_loss"], records["chimera"][-1]["val_loss"]
    verdict = "lower" if chimera_final < dense_final else "NOT lower"
    print(f"\nChimera final validation loss {chimera_final:.4f} vs dense {dense_final:.4f}: {verdict} "
          f"(difference {chimera_final - dense_final:+.4f} nats/token)")  # fmt: skip
    try:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        labels = {"dense (8 layers)": runs["dense"], "Chimera (6 blocks, 10 virtual layers)": runs["chimera"]}
        print(f"wrote {plot_comparison(labels, args.plot)}")
    except OrionError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
