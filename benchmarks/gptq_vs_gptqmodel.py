"""orionlm's GPTQ against GPTQModel's (github.com/ModelCloud/GPTQModel), an independent implementation, on the same
base, calibration samples and settings: does GPTQModel reproduce orionlm's GPTQ-vs-RTN result at --bits and
--group-size on WikiText-2?

The base (--model, an orionlm model directory; default the MoE of benchmarks/quant_quality.py) is
temperature-calibrated exactly as quant_quality.py does it (fit on unscored WikiText-2 documents, folded into the
final norm), saved, and exported with `orionlm convert to-hf` (a Mixtral directory for the default MoE). Then, for
every calibration seed in --seeds (the offsets of the --nsamples windows of --seq-len tokens drawn from
--calibration by orionlm.quant.calibration_samples):

- orionlm GPTQ: orionlm.quant.quantize_model on the calibrated base;
- GPTQModel GPTQ: GPTQModel.load(export, QuantizeConfig(...)).quantize(the same token windows).save(dir), with
  orionlm's settings spelled in GPTQModel's terms: symmetric, damp_percent 0.01 (GPTQModel's default is 0.05),
  true-sequential, no act order and act_group_aware False (GPTQModel's default turns its group-aware reordering
  on), and an expert with fewer than 16 calibration tokens rounded to nearest (orionlm's MIN_EXPERT_TOKENS;
  GPTQModel's default is 0.5% of the tokens). --gptqmodel-defaults adds a row with GPTQModel's own defaults.

RTN (no data) and FP32 are measured once. GPTQModel runs its float32 model on the CPU through bfloat16 kernels, so
its checkpoint is scored here through orionlm's float32 forward: every GPTQ tensor of GPTQModel's directory is
dequantized (orionlm.quant.pack.dequantize: scale * (q - zero), exact in float32) into a float copy of the export,
which orionlm loads. The rows then differ only in the integers and scales each quantizer chose. Scoring is
quant_quality.py's: token-level perplexity on WikiText-2's first documents (--eval-tokens) and on the last
--c4-docs documents of the C4 sample, and the KL divergence from FP32 and top-1 agreement on the first --kl-tokens.

Needs `pip install gptqmodel` (7.6 is tested; it compiles a small C++ packing extension on its first
quantization, a few minutes on 2 cores). On a 2-core machine GPTQModel needs GPTQMODEL_CPU_WORKERS >= 2 (set here).

    python benchmarks/gptq_vs_gptqmodel.py [--model DIR] [--bits 4] [--group-size 128] [--seeds 0 1]
        [--nsamples 128] [--seq-len 512] [--gptqmodel-defaults] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel 7.6 fails on 2 cores with its default of 1

import torch
from common import machine_line
from quant_quality import DATA, divergence, fit_temperature, fold_temperature, leading_documents, log_probs
from safetensors.torch import load_file, save_file

import orionlm
from orionlm.checkpoint import save_checkpoint
from orionlm.cli.convert import convert_to_hf
from orionlm.data.sources import SourceConfig, iter_documents
from orionlm.eval.scoring import perplexity
from orionlm.eval.tasks import load_documents
from orionlm.loading import load_model
from orionlm.quant import QuantConfig, calibration_samples, dequantize, quantize_model, save_quantized
from orionlm.quant.model import MIN_EXPERT_TOKENS
from orionlm.tokenizer import Tokenizer

# GPTQModel writes a Mixtral's experts and router under transformers 5's module names; the Hub layout orionlm's
# export (and reader) uses spells them block_sparse_moe.experts.{e}.w1/w3/w2 and block_sparse_moe.gate
MIXTRAL_NAMES = {".mlp.gate.": ".block_sparse_moe.gate.", ".mlp.experts.": ".block_sparse_moe.experts.",
                 ".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}  # fmt: skip
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def gptqmodel_quantize(export: Path, samples: torch.Tensor, out: Path, bits: int, group_size: int,
                       own_defaults: bool) -> float:  # fmt: skip
    """GPTQModel's quantization of the exported base on `samples` (n, T), written to `out`; the seconds it took."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import Fallback

    matched = dict(damp_percent=0.01, act_group_aware=False, fallback=Fallback(threshold=MIN_EXPERT_TOKENS))
    config = QuantizeConfig(bits=bits, group_size=group_size, sym=True, desc_act=False, true_sequential=True,
                            **({} if own_defaults else matched))  # fmt: skip
    calibration = [{"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]} for ids in samples]
    start = time.perf_counter()
    model = GPTQModel.load(str(export), config, device="cpu", dtype=torch.float32)
    here = Path.cwd()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.chdir(out.parent)  # GPTQModel writes logs/ into the working directory
    try:
        model.quantize(calibration, batch_size=8)
    finally:
        os.chdir(here)
    model.save(str(out))
    return time.perf_counter() - start


def dequantized_copy(quantized: Path, export: Path, out: Path) -> None:
    """A float32 copy of `export` whose weights are GPTQModel's quantized ones from `quantized`, dequantized."""
    settings = json.loads((quantized / "config.json").read_text())["quantization_config"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(quantized.glob("*.safetensors")):
        tensors.update(load_file(file))
    weights = {}
    for name, tensor in tensors.items():
        prefix, _, part = name.rpartition(".")
        if part == "qweight":
            gptq = {p: tensors[f"{prefix}.{p}"] for p in GPTQ_PARTS}
            weights[f"{prefix}.weight"] = dequantize(gptq, settings["bits"], settings["checkpoint_format"])
        elif part not in GPTQ_PARTS:
            weights[name] = tensor.float()
    for old, new in MIXTRAL_NAMES.items():
        weights = {name.replace(old, new): tensor for name, tensor in weights.items()}
    shutil.copytree(export, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file({n: t.contiguous() for n, t in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})


def orionlm_quantize(base: Path, samples: torch.Tensor | None, bits: int, group_size: int, method: str,
                     directory: Path) -> float:  # fmt: skip
    """orionlm's quantization of the model in `base`, saved to `directory`; the seconds it took."""
    model, tokenizer, _ = load_model(base, device="cpu", dtype=torch.float32)
    start = time.perf_counter()
    quantize_model(model.eval(), samples, QuantConfig(bits, group_size), method, progress=False)
    seconds = time.perf_counter() - start
    save_quantized(model, directory, tokenizer)
    return seconds


def score(directory: Path, tokenizer: Tokenizer, texts: dict[str, list[str]],
          reference: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:  # fmt: skip
    """Perplexity on each text, KL divergence from FP32 and top-1 agreement of the model in `directory`."""
    model, _, _ = load_model(directory, device="cpu", dtype=torch.float32)
    model.eval()
    row = {name: perplexity(model, tokenizer, docs, progress=False).token_perplexity for name, docs in texts.items()}
    row["kl"], row["top1"] = divergence(reference[1], model, reference[0])
    return row


def print_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    print("\n| quantizer | seed | WikiText-2 ppl | C4 ppl | KL to FP32 | top-1 agrees | quantize s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, seed, r in rows:
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
        print(f"| {label} | {seed} | {r['wikitext']:.2f} | {r['c4']:.2f} | {r['kl']:.4f} | {r['top1']:.1%} "
              f"| {seconds} |")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/proof/base"), help="an orionlm model directory")
    parser.add_argument("--calibration", type=Path, default=DATA / "pretrain" / "en_wikipedia_sample.txt.gz")
    parser.add_argument("--c4", type=Path, default=DATA / "pretrain" / "en_c4_sample.jsonl.gz")
    parser.add_argument("--c4-docs", type=int, default=2)
    parser.add_argument("--wikitext", type=Path, default=DATA / "perplexity" / "wikitext2_test.tokens.txt.gz")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=40_000)
    parser.add_argument("--kl-tokens", type=int, default=8192)
    parser.add_argument("--temperature-tokens", type=int, default=30_000)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration window seeds")
    parser.add_argument("--gptqmodel-defaults", action="store_true",
                        help="also with GPTQModel's own defaults (damp 0.05, group-aware reordering)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import gptqmodel

    begin = time.perf_counter()
    print(f"# orionlm GPTQ vs GPTQModel: orionlm {orionlm.__version__}, gptqmodel {gptqmodel.__version__}")
    print(machine_line())
    base, tokenizer, _ = load_model(args.model, device="cpu", dtype=torch.float32)
    c = base.eval().config
    print(f"model: {args.model} ({c.name}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
          f"{c.num_experts} experts top-{c.experts_per_token}); {args.bits}-bit, group size {args.group_size}, "
          f"symmetric, damp 0.01, true-sequential, no act order")  # fmt: skip

    documents = load_documents(args.wikitext)
    wikitext, wikitext_tokens = leading_documents(documents, tokenizer, args.eval_tokens)
    texts = {"wikitext": wikitext, "c4": list(iter_documents(SourceConfig(path=str(args.c4))))[-args.c4_docs :]}
    fit_docs, _ = leading_documents(documents[len(wikitext) :], tokenizer, args.temperature_tokens)
    fit = torch.tensor([t for d in fit_docs for t in tokenizer.encode(d, add_special_tokens=False)])
    span = c.max_seq_len + 1
    temperature = fit_temperature(base, fit[: len(fit) // span * span].view(-1, span))
    fold_temperature(base, temperature)
    stream = torch.tensor([t for d in wikitext for t in tokenizer.encode(d, add_special_tokens=False)])
    windows = stream[: min(args.kl_tokens, len(stream)) // c.max_seq_len * c.max_seq_len].view(-1, c.max_seq_len)
    reference = (windows, log_probs(base, windows))
    print(f"temperature {temperature:.3f}; WikiText-2: {len(wikitext)} documents, {wikitext_tokens:,} tokens")
    print(f"calibration: {args.nsamples} x {args.seq_len} tokens of {args.calibration.name}; seeds {args.seeds}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_checkpoint(base, work / "base", tokenizer)
        convert_to_hf(str(work / "base"), work / "hf")
        rows = [("FP32", "", score(work / "base", tokenizer, texts, reference))]
        rows.append(("FP32, exported and read back", "", score(work / "hf", tokenizer, texts, reference)))
        seconds = orionlm_quantize(work / "base", None, args.bits, args.group_size, "rtn", work / "rtn")
        rows.append(("RTN (orionlm)", "", score(work / "rtn", tokenizer, texts, reference) | {"seconds": seconds}))
        print(f"{rows[-1][0]}: WikiText-2 {rows[-1][2]['wikitext']:.2f}", flush=True)
        for seed in args.seeds:
            samples = calibration_samples(tokenizer, str(args.calibration), args.nsamples, args.seq_len, seed)
            runs = [("GPTQ (orionlm)", None), ("GPTQ (GPTQModel, orionlm's settings)", False)]
            runs += [("GPTQ (GPTQModel, its defaults)", True)] if args.gptqmodel_defaults else []
            for label, own_defaults in runs:
                out = work / f"q{seed}-{len(rows)}"
                if own_defaults is None:
                    seconds = orionlm_quantize(work / "base", samples, args.bits, args.group_size, "gptq", out)
                else:
                    seconds = gptqmodel_quantize(work / "hf", samples, out / "gptq", args.bits, args.group_size,
                                                 own_defaults)  # fmt: skip
                    dequantized_copy(out / "gptq", work / "hf", out / "float")
                    out = out / "float"
                rows.append((label, str(seed), score(out, tokenizer, texts, reference) | {"seconds": seconds}))
                print(f"{label}, seed {seed}: WikiText-2 {rows[-1][2]['wikitext']:.2f}", flush=True)
    print_table(rows)
    print(f"total {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
