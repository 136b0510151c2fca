"""frankenMoE proof: four dense models, each trained further on one domain, merged by `orionlm moe-merge`
with prompt-set (hidden) routers into a Mixtral-style MoE. Does a token go to the expert of its domain, and
does the merged model keep each expert's loss on its domain?

1. A base dense model (hidden 128, 4 layers, SwiGLU 512, a 4096-token BPE) is pretrained on four domains at
   once: English (the C4 and Wikipedia samples), Python (the standard library's modules), Portuguese
   (Machado de Assis) and Finnish (Kalevala, Kanteletar and UD Finnish sentences), from ../shared/data.
2. Four experts: the base trained further on one domain each, with LoRA (rank 64) on its MLPs only, so
   that everything but the MLPs stays the base's, which is what the MoE takes from the base (moe-merge
   folds the adapters in).
3. `orionlm moe-merge` (the real CLI) with hidden gates, top-2, each expert's positive prompts --prompts
   200-character excerpts of its domain's training text (recipe:moe-merge has the same layout with
   hand-written prompts; a few hand-written prompts route less well than many excerpts).
4. On each domain's held-out documents (the last 5% of its documents, never trained on): which expert the
   router ranks first for each token (per layer, and averaged over layers: the routing table, also drawn as
   a heatmap PNG), and the loss per token of the base, of every expert and of the MoE at top-1 and top-2.

    .venv/bin/python benchmarks/frankenmoe_routing.py [--out runs/frankenmoe] [--base-steps 400]
        [--expert-steps 150] [--prompts 48] [--plot benchmarks/results/frankenmoe_routing.png]

The defaults take about 8 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sysconfig
from pathlib import Path

import torch
import yaml
from common import ROOT, cpu_name, train_runs

import orionlm
from orionlm.cli import main as orionlm_main
from orionlm.data.sources import SourceConfig, iter_documents
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

DATA = ROOT.parent / "shared" / "data" / "pretrain"
DOMAINS = {
    "english": [SourceConfig(path=str(DATA / "en_c4_sample.jsonl.gz"), field="text"),
                SourceConfig(path=str(DATA / "en_wikipedia_sample.txt.gz"), doc_separator="\n")],
    "python": [SourceConfig(path=sysconfig.get_paths()["stdlib"], glob="*.py")],
    "portuguese": [SourceConfig(path=str(DATA / "pt_machado_de_assis_novels.jsonl.gz"), field="text")],
    "finnish": [SourceConfig(path=str(DATA / "fi_kalevala.txt.gz"), doc_separator="\n\n"),
                SourceConfig(path=str(DATA / "fi_kanteletar.txt.gz"), doc_separator="\n\n"),
                SourceConfig(path=str(DATA / "fi_ud_tdt_devtest_sentences.txt.gz"), doc_separator="\n\n")],
}  # fmt: skip
SEQ_LEN, BATCH, HELD_OUT = 256, 16, 0.05
MLP = ("gate_proj", "up_proj", "down_proj")


def split_domains(out: Path) -> dict[str, list[str]]:
    """Write each domain's training documents to out/data/DOMAIN.jsonl.gz; return its held-out documents."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    held_out = {}
    for domain, sources in DOMAINS.items():
        documents = [d for source in sources for d in iter_documents(source) if d.strip()]
        cut = len(documents) - max(1, int(len(documents) * HELD_OUT))
        with gzip.open(out / "data" / f"{domain}.jsonl.gz", "wt", encoding="utf-8") as f:
            for document in documents[:cut]:
                f.write(json.dumps({"text": document}) + "\n")
        held_out[domain] = documents[cut:]
    return held_out


def recipe(out: Path, name: str, domains: list[str], steps: int, model: dict, lr: float) -> dict:
    return {
        "model": model,
        "tokenizer": {"path": str(out / "tokenizer")},
        "data": {
            "sources": [{"name": d, "path": str(out / "data" / f"{d}.jsonl.gz"), "field": "text"} for d in domains],
            "seq_len": SEQ_LEN,
            "val_fraction": 0.02,
            "cache_dir": str(out / "token-cache"),
        },
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.1},
        "run": {"out_dir": str(out / name), "max_steps": steps, "batch_size": BATCH, "log_every": 20,
                "eval_every": 0, "eval_batches": 8, "device": "cpu", "keep_last": 1, "tensorboard": False,
                "progress": False, "plot": False},
    }  # fmt: skip


def excerpts(out: Path, domain: str, count: int) -> list[str]:
    """`count` router prompts: 200-character excerpts of the domain's training documents at random places."""
    rng = random.Random(0)
    documents = [json.loads(line)["text"] for line in gzip.open(out / "data" / f"{domain}.jsonl.gz", "rt")]
    chosen = [rng.choice(documents) for _ in range(count)]
    return [d[start : start + 200] for d in chosen for start in [rng.randrange(max(1, len(d) - 200))]]


def windows(tokenizer: Tokenizer, documents: list[str], count: int) -> torch.Tensor:
    """(count, SEQ_LEN + 1) token windows from the start of the documents joined by EOS."""
    ids: list[int] = []
    for document in documents:
        ids += tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_id]
        if len(ids) >= count * (SEQ_LEN + 1):
            break
    n = min(count, len(ids) // (SEQ_LEN + 1))
    return torch.tensor(ids[: n * (SEQ_LEN + 1)]).view(n, SEQ_LEN + 1)


@torch.inference_mode()
def loss(model: OrionLM, batch: torch.Tensor) -> float:
    logits = model(batch[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))


@torch.inference_mode()
def first_choices(model: OrionLM, batch: torch.Tensor) -> torch.Tensor:
    """(layers, tokens): the expert each layer's router ranks first for each token."""
    choices = []
    hooks = [layer.mlp.register_forward_hook(lambda _, __, out: choices.append(out[1].argmax(-1)))
             for layer in model.model.layers]  # fmt: skip
    model(batch[:, :-1])
    for hook in hooks:
        hook.remove()
    return torch.stack(choices)


def set_top_k(model: OrionLM, k: int) -> None:
    model.config.experts_per_token = k
    for layer in model.model.layers:
        layer.mlp.top_k = k


def heatmap(table: torch.Tensor, domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(table.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(domains)), [f"{d}\nexpert" for d in domains], fontsize=8)
    ax.set_yticks(range(len(domains)), [f"{d} text" for d in domains], fontsize=8)
    for i in range(len(domains)):
        for j in range(len(domains)):
            ax.text(j, i, f"{table[i, j]:.0%}", ha="center", va="center", color="w" if table[i, j] < 0.6 else "k")
    ax.set_title("frankenMoE: tokens the router sends first to each expert\n(held-out text, mean over layers)",
                 fontsize=9)  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "frankenmoe")
    parser.add_argument("--base-steps", type=int, default=400, help=f"base steps of {BATCH} x {SEQ_LEN} tokens")
    parser.add_argument("--expert-steps", type=int, default=150, help="steps of each expert on its domain")
    parser.add_argument("--prompts", type=int, default=48, help="router prompts per expert (training excerpts)")
    parser.add_argument("--eval-windows", type=int, default=16, help=f"held-out windows of {SEQ_LEN} per domain")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "results" / "frankenmoe_routing.png")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: this proof trains on ../shared/data")
    print(f"# frankenMoE routing: orionlm {orionlm.__version__}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {cpu_name()}, {os.cpu_count()} cores")
    out, domains = args.out, list(DOMAINS)
    held_out = split_domains(out)
    texts = [json.loads(line)["text"] for d in domains for line in gzip.open(out / "data" / f"{d}.jsonl.gz", "rt")]
    Tokenizer.train_bpe_from_texts(texts, 4096).save(out / "tokenizer")
    dense = {"preset": "tiny-dense", "overrides": {"hidden_size": 128, "num_layers": 4, "num_heads": 4,
             "num_kv_heads": 2, "intermediate_size": 512, "max_seq_len": SEQ_LEN, "vocab_size": 4096}}  # fmt: skip
    train_runs({"base": recipe(out, "base", domains, args.base_steps, dense, 3e-3)}, out, [])
    experts = {d: recipe(out, d, [d], args.expert_steps, {"path": str(out / "base")}, 3e-3) for d in domains}
    for expert in experts.values():  # LoRA on the MLPs only: what a frankenMoE takes from an expert
        expert |= {"mode": "lora", "lora": {"r": 64, "alpha": 64, "target_modules": list(MLP)}}
        expert["data"]["format"] = "text"
    train_runs(experts, out, [])

    config = {
        "base_model": str(out / "base"),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(out / d), "positive_prompts": excerpts(out, d, args.prompts)} for d in domains
        ],
    }
    (out / "moe-merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    orionlm_main(["moe-merge", str(out / "moe-merge.yaml"), str(out / "moe"), "--force"])

    moe, tokenizer, _ = load_model(out / "moe", device="cpu")
    assert tokenizer is not None
    batches = {d: windows(tokenizer, held_out[d], args.eval_windows) for d in domains}
    choices = {d: first_choices(moe, batches[d]) for d in domains}
    E = moe.config.num_experts
    table = torch.stack([torch.bincount(choices[d].flatten(), minlength=E).float() / choices[d].numel()
                         for d in domains])  # fmt: skip
    print(f"\nheld-out tokens per domain: {', '.join(f'{d} {b[:, 1:].numel():,}' for d, b in batches.items())}")
    print("\nRouting (fraction of tokens whose first-ranked expert is each column, mean over layers):\n")
    print("| text \\ expert | " + " | ".join(domains) + " |\n|---|" + "---:|" * E)
    for d, row in zip(domains, table, strict=True):
        print(f"| {d} | " + " | ".join(f"{v:.1%}" for v in row) + " |")
    layers = moe.config.num_layers
    print("\nTo its own expert, per layer:\n\n| text | " + " | ".join(f"layer {i}" for i in range(layers))
          + " |\n|---|" + "---:|" * layers)  # fmt: skip
    for e, d in enumerate(domains):
        print(f"| {d} | " + " | ".join(f"{float((layer == e).float().mean()):.1%}" for layer in choices[d]) + " |")

    print("\nLoss per token on held-out text (nats):\n")
    models = {"base": load_model(out / "base", device="cpu")[0]}
    models |= {f"{d} expert": load_model(out / d, device="cpu")[0] for d in domains}
    rows = {name: {d: loss(m, batches[d]) for d in domains} for name, m in models.items()}
    for k in (1, 2):
        set_top_k(moe, k)
        rows[f"MoE top-{k}"] = {d: loss(moe, batches[d]) for d in domains}
    print("| model | " + " | ".join(domains) + " |\n|---|" + "---:|" * E)
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[d]:.3f}" for d in domains) + " |")
    heatmap(table, domains, args.plot)


if __name__ == "__main__":
    main()
