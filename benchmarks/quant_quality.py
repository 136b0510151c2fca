"""Perplexity, size and speed of a model quantized with GPTQ and with round-to-nearest (RTN): the GPTQ paper's
table (Frantar et al. 2022, arXiv 2210.17323) for orionlm.quant.

The model is any orionlm model directory (--model; a training run directory loads its newest checkpoint), e.g.
one trained with `orionlm train recipe:pretrain-mixture`; the default is a 14.8M-parameter MoE (8 experts
top-2, hidden 256, 6 layers, 8192-token BPE) trained on ../shared/data. It is quantized once per row, always
from the same full-precision weights, with orionlm.quant.quantize_model: RTN and GPTQ at --bits and
--group-sizes (-1: one group per output row), and GPTQ also with act order (desc_act) and with act order and
static groups (which with one group per row changes nothing, so it is left out there). Settings not in the
table are orionlm's defaults: symmetric, damp 0.01, true-sequential; the embedding, norms, routers and LM head
stay in full precision.

GPTQ calibrates on --nsamples random windows of --seq-len tokens from --calibration (the Wikipedia sample in
../shared/data: WikiText-2 is Wikipedia, and GPTQ releases commonly calibrate on Wikipedia text). Perplexity is
per token of the model's tokenizer, exp(mean NLL), with orionlm.eval.scoring.perplexity as `orionlm eval
--tasks wikitext` runs it: each document in non-overlapping windows of the model's context. WikiText-2 is its
test set (as the paper), whole documents from the start until --eval-tokens tokens; held-out C4 is the last
--c4-docs documents of the C4 sample (for the default model they lie in its training run's validation windows).

The base is temperature-calibrated first (Guo et al. 2017): its logits are divided by the temperature that
minimises its NLL on the next --temperature-tokens tokens of WikiText-2 (whole documents after the scored
ones, never scored), folded into its final norm. A model this small is overconfident on WikiText-2 (its best
temperature there is about 1.1), and then any change that flattens its predictions lowers perplexity,
RTN's larger error more than GPTQ's, which hides how far quantization moved the model; calibrated, the first-
order effect of flattening is zero and perplexity measures the damage. --temperature-tokens 0 skips it.
Perplexity moves little for a model this small, so two closer measures of how far quantization moved the
model are shown too, on the first --kl-tokens of the scored WikiText-2 tokens (windows of the model's
context): the mean KL divergence of the quantized model's next-token distribution from the FP32 model's,
and how often their top-1 tokens agree.

Every quantized model is written with save_quantized and read back with load_model, and the copy read back is
what gets measured: size is the *.safetensors on disk, "projections" the part of it that quantization touches
(the attention and expert projections). Speed is batch-1 greedy generation through generate_ids, --new-tokens
after a 32-token prompt (prefill included; best of --repeats after a warm-up) in float32 and in bfloat16. In
float32 a QuantLinear rebuilds its float weight on every call, so quantized rows are slower than FP32; in
bfloat16 2-, 3- and 4-bit layers (group size 32-256) run torch's CPU int4 kernel on the packed codes.

Prints the setup, a line per row as it finishes, the table, and for each measure how many GPTQ rows beat the
RTN row of the same bits and group size, listing every one that does not. The defaults (22 quantized rows, 14
of them GPTQ at about 30 s each) take about 17 minutes on a 2-core CPU.

    .venv/bin/python benchmarks/quant_quality.py [--model DIR] [--bits 4 3] [--group-sizes -1 128 32]
        [--nsamples 128] [--seq-len 512] [--eval-tokens 40000] [--kl-tokens 8192] [--temperature-tokens 30000]
        [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import ROOT, machine_line

import orionlm
from orionlm.checkpoint import save_checkpoint
from orionlm.data.sources import SourceConfig, iter_documents
from orionlm.eval.scoring import perplexity
from orionlm.eval.tasks import load_documents
from orionlm.generation import GenerationConfig, generate_ids
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.quant import QuantConfig, calibration_samples, quantize_model, save_quantized
from orionlm.tokenizer import Tokenizer

DATA = ROOT.parent / "shared" / "data"
PROMPT_TOKENS = 32
MIB = 2**20


@dataclass
class Setting:
    """One row's quantization: method "fp32" (none), "rtn" or "gptq"."""

    method: str
    bits: int = 0
    group_size: int = 0
    desc_act: bool = False
    static_groups: bool = False

    @property
    def act_order(self) -> str:
        if self.method != "gptq":
            return ""
        return "yes + static groups" if self.static_groups else "yes" if self.desc_act else "no"

    @property
    def label(self) -> str:
        if self.method == "fp32":
            return "FP32"
        act = ", act order + static groups" if self.static_groups else ", act order" if self.desc_act else ""
        return f"{self.method.upper()} {self.bits}-bit g{self.group_size}{act}"


@dataclass
class Row:
    setting: Setting
    wikitext: float
    c4: float
    kl: float
    top1: float
    size_mib: float
    projections_mib: float
    fp32_tps: float
    bf16_tps: float
    quantize_s: float


def settings(bits: list[int], group_sizes: list[int]) -> list[Setting]:
    """FP32, then per bits and group size: RTN, GPTQ, GPTQ with act order, and with act order + static groups."""
    rows = [Setting("fp32")]
    for b in bits:
        for g in group_sizes:
            rows += [Setting("rtn", b, g), Setting("gptq", b, g), Setting("gptq", b, g, desc_act=True)]
            if g != -1:
                rows.append(Setting("gptq", b, g, desc_act=True, static_groups=True))
    return rows


def quantize(base: OrionLM, setting: Setting, samples: torch.Tensor) -> tuple[OrionLM, float, str]:
    """A quantized copy of base, the seconds quantizing took, and a note on what was not quantized as asked."""
    model = copy.deepcopy(base)
    config = QuantConfig(setting.bits, setting.group_size, desc_act=setting.desc_act,
                         static_groups=setting.static_groups)  # fmt: skip
    start = time.perf_counter()
    reports = quantize_model(model, samples if setting.method == "gptq" else None, config, setting.method,
                             progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    notes = []
    fallback = [r for r in reports if setting.method == "gptq" and r.method.startswith("rtn")]
    if fallback:
        notes.append(f"{len(fallback)} of {len(reports)} layers rounded to nearest for lack of calibration tokens")
    kept = [r for r in reports if r.method.startswith("kept")]
    if kept:
        notes.append(f"{len(kept)} layers kept in full precision (shape)")
    return model, seconds, "; ".join(notes)


def save_and_reload(model: OrionLM, tokenizer: Tokenizer, directory: Path) -> tuple[OrionLM, float, float]:
    """The model as load_model reads it back from `directory`, the MiB of its *.safetensors files and the MiB of
    the projection tensors among them."""
    if model.config.quantization_config:
        save_quantized(model, directory, tokenizer)
    else:
        save_checkpoint(model, directory, tokenizer)
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / MIB
    loaded, _, _ = load_model(directory, device="cpu", dtype=torch.float32)
    projections = sum(t.nbytes for name, t in loaded.state_dict().items() if "_proj" in name) / MIB
    return loaded.eval(), size, projections


@torch.inference_mode()
def log_probs(model: OrionLM, windows: torch.Tensor) -> torch.Tensor:
    """(n, T, V) float32 next-token log-probabilities for windows (n, T)."""
    return torch.cat([torch.log_softmax(model(w).logits.float(), dim=-1) for w in windows.split(4)])


def divergence(reference: torch.Tensor, model: OrionLM, windows: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || model) per token in nats, and the fraction of tokens whose top-1 agrees."""
    ours = log_probs(model, windows)
    kl = (reference.exp() * (reference - ours)).sum(-1).mean()
    return float(kl), float((ours.argmax(-1) == reference.argmax(-1)).float().mean())


def tokens_per_second(model: OrionLM, prompt: list[int], new_tokens: int, repeats: int) -> float:
    greedy = GenerationConfig(max_new_tokens=new_tokens, do_sample=False)
    generate_ids(model, [prompt], config=greedy)  # warm-up: first-call allocations and the int4 layouts
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        (output,) = generate_ids(model, [prompt], config=greedy)
        best = min(best, time.perf_counter() - start)
        assert len(output) == new_tokens, "no stop tokens are set: every run generates exactly new_tokens"
    return new_tokens / best


def measure(
    base: OrionLM, setting: Setting, samples: torch.Tensor, tokenizer: Tokenizer, texts: dict[str, list[str]],
    reference: tuple[torch.Tensor, torch.Tensor], prompt: list[int], args: argparse.Namespace,
) -> Row:  # fmt: skip
    model, seconds, note = quantize(base, setting, samples) if setting.method != "fp32" else (base, 0.0, "")
    with tempfile.TemporaryDirectory() as tmp:
        model, size, projections = save_and_reload(model, tokenizer, Path(tmp) / "model")
    ppl = {name: perplexity(model, tokenizer, docs, progress=False).token_perplexity for name, docs in texts.items()}
    kl, top1 = divergence(reference[1], model, reference[0])
    fp32_tps = tokens_per_second(model, prompt, args.new_tokens, args.repeats)
    bf16_tps = tokens_per_second(model.to(torch.bfloat16), prompt, args.new_tokens, args.repeats)
    done = f"quantized in {seconds:.1f} s, " if setting.method != "fp32" else ""
    print(f"{setting.label}: {done}WikiText-2 {ppl['wikitext']:.2f}, C4 {ppl['c4']:.2f}"
          + (f" ({note})" if note else ""), flush=True)  # fmt: skip
    return Row(setting, ppl["wikitext"], ppl["c4"], kl, top1, size, projections, fp32_tps, bf16_tps, seconds)


def leading_documents(documents: list[str], tokenizer: Tokenizer, cap: int) -> tuple[list[str], int]:
    """Whole documents from the start until `cap` tokens (at least one), and their token count."""
    chosen, tokens = [], 0
    for document in documents:
        if chosen and tokens >= cap:
            break
        chosen.append(document)
        tokens += len(tokenizer.encode(document, add_special_tokens=False))
    return chosen, tokens


def fit_temperature(model: OrionLM, windows: torch.Tensor) -> float:
    """The temperature T that minimises the mean NLL of logits / T on windows (n, T + 1): the NLL is convex in
    1/T (a log-sum-exp of terms linear in it), so a golden-section search over 1/T finds the minimum."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.inference_mode():
        logits = torch.cat([model(w).logits.float() for w in inputs.split(4)])
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def nll(beta: float) -> float:
        return float((torch.logsumexp(logits * beta, dim=-1) - target_logits * beta).mean())

    lo, hi = 0.25, 4.0
    ratio = (5**0.5 - 1) / 2
    for _ in range(25):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return 2 / (lo + hi)


def fold_temperature(model: OrionLM, temperature: float) -> None:
    """Divide the model's logits by `temperature` for good: its final norm's scale (and shift) feed only the
    LM head, which has no bias."""
    norm = model.model.norm
    with torch.no_grad():
        norm.weight /= temperature
        if getattr(norm, "bias", None) is not None:
            norm.bias /= temperature


def print_check(rows: list[Row]) -> None:
    """How many GPTQ rows beat the RTN row of the same bits and group size on each measure, and every miss."""
    rtn_rows = {(r.setting.bits, r.setting.group_size): r for r in rows if r.setting.method == "rtn"}
    gptq_rows = [r for r in rows if r.setting.method == "gptq"]
    measures = {"WikiText-2 ppl": lambda r: r.wikitext, "C4 ppl": lambda r: r.c4, "KL to FP32": lambda r: r.kl}
    counts, misses = [], []
    for name, value in measures.items():
        pairs = [(r, value(r), value(rtn_rows[r.setting.bits, r.setting.group_size])) for r in gptq_rows]
        worse = [
            f"{r.setting.label}: {name} {ours:.4g} vs RTN {theirs:.4g}" for r, ours, theirs in pairs if ours >= theirs
        ]
        counts.append(f"{len(gptq_rows) - len(worse)}/{len(gptq_rows)} on {name}")
        misses += worse
    print(f"GPTQ rows that beat RTN at the same bits and group size: {', '.join(counts)}")
    if misses:
        print("GPTQ does NOT beat RTN at:\n" + "\n".join(f"- {m}" for m in misses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/proof/base"), help="an orionlm model directory")
    parser.add_argument("--calibration", type=Path, default=DATA / "pretrain" / "en_wikipedia_sample.txt.gz",
                        help="GPTQ's calibration text (a data source)")  # fmt: skip
    parser.add_argument("--c4", type=Path, default=DATA / "pretrain" / "en_c4_sample.jsonl.gz")
    parser.add_argument("--c4-docs", type=int, default=2, help="documents at the end of --c4 scored as held-out C4")
    parser.add_argument("--wikitext", type=Path, default=DATA / "perplexity" / "wikitext2_test.tokens.txt.gz")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-tokens", type=int, default=40_000, help="WikiText-2 tokens scored (whole documents)")
    parser.add_argument("--kl-tokens", type=int, default=8192, help="WikiText-2 tokens compared with FP32")
    parser.add_argument("--temperature-tokens", type=int, default=30_000,
                        help="WikiText-2 tokens after the scored ones the temperature is fit on")  # fmt: skip
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[-1, 128, 32])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per speed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed generation runs (the best is kept)")
    parser.add_argument("--seed", type=int, default=0, help="of the calibration windows' offsets")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    begin = time.perf_counter()

    print(f"# GPTQ vs RTN quality, size and speed: orionlm {orionlm.__version__}")
    print(machine_line())
    base, tokenizer, _ = load_model(args.model, device="cpu", dtype=torch.float32)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer; perplexity and calibration need one")
    base.eval()
    c = base.config
    moe = f", {c.num_experts} experts top-{c.experts_per_token}" if c.num_experts else ""
    params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"model: {args.model} ({c.name}, {params:.1f}M parameters, hidden {c.hidden_size}, {c.num_layers} layers"
          f"{moe}, vocabulary {c.vocab_size}, context {c.max_seq_len})")  # fmt: skip

    samples = calibration_samples(tokenizer, str(args.calibration), args.nsamples, args.seq_len, args.seed)
    documents = load_documents(args.wikitext)
    wikitext, wikitext_tokens = leading_documents(documents, tokenizer, args.eval_tokens)
    c4_docs = list(iter_documents(SourceConfig(path=str(args.c4))))[-args.c4_docs :]
    c4_tokens = sum(len(tokenizer.encode(d, add_special_tokens=False)) for d in c4_docs)
    prompt = tokenizer.encode(wikitext[0], add_special_tokens=False)[:PROMPT_TOKENS]
    stream = torch.tensor([t for d in wikitext for t in tokenizer.encode(d, add_special_tokens=False)])
    windows = stream[: min(args.kl_tokens, len(stream)) // c.max_seq_len * c.max_seq_len].view(-1, c.max_seq_len)
    print(f"calibration: {args.nsamples} x {args.seq_len} tokens from {args.calibration.name} (seed {args.seed})")
    print(f"evaluation: {args.wikitext.name}, first {len(wikitext)} documents ({wikitext_tokens:,} tokens); "
          f"held-out C4: {len(c4_docs)} documents ({c4_tokens:,} tokens); windows of {c.max_seq_len} tokens, "
          f"token-level perplexity; KL and top-1 agreement with FP32 on the first {windows.numel():,} WikiText-2 "
          "tokens")  # fmt: skip
    print(f"speed: batch 1, greedy, {args.new_tokens} new tokens after a {len(prompt)}-token prompt, best of "
          f"{args.repeats}; quantization: symmetric, damp 0.01, true-sequential")  # fmt: skip
    if args.temperature_tokens:
        fit_docs, fit_tokens = leading_documents(documents[len(wikitext) :], tokenizer, args.temperature_tokens)
        fit = torch.tensor([t for d in fit_docs for t in tokenizer.encode(d, add_special_tokens=False)])
        span = c.max_seq_len + 1
        if len(fit) < span:
            raise SystemExit(f"{args.wikitext} has {len(fit)} tokens after the scored ones; fitting needs {span}")
        before = perplexity(base, tokenizer, wikitext, progress=False).token_perplexity
        temperature = fit_temperature(base, fit[: len(fit) // span * span].view(-1, span))
        fold_temperature(base, temperature)
        print(f"temperature: {temperature:.3f}, fit on the next {len(fit_docs)} WikiText-2 documents "
              f"({fit_tokens:,} tokens); the FP32 model's WikiText-2 perplexity is {before:.2f} before it")  # fmt: skip
    print()

    reference = (windows, log_probs(base, windows))
    texts = {"wikitext": wikitext, "c4": c4_docs}
    rows = [
        measure(base, s, samples, tokenizer, texts, reference, prompt, args)
        for s in settings(args.bits, args.group_sizes)
    ]

    print("\n| method | bits | group size | act order | WikiText-2 ppl | C4 ppl | KL to FP32 | top-1 agree | size MiB "
          "| projections MiB | fp32 tok/s | bf16 tok/s | quantize s |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r.setting
        bits, group = (str(s.bits), str(s.group_size)) if s.method != "fp32" else ("32", "")
        seconds = f"{r.quantize_s:.1f}" if s.method != "fp32" else ""
        print(f"| {s.method.upper()} | {bits} | {group} | {s.act_order} | {r.wikitext:.2f} | {r.c4:.2f} "
              f"| {r.kl:.4f} | {r.top1:.1%} | {r.size_mib:.2f} | {r.projections_mib:.2f} | {r.fp32_tps:.1f} "
              f"| {r.bf16_tps:.1f} | {seconds} |")  # fmt: skip
    print()
    print_check(rows)
    print(f"total {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
