"""Peak memory of the model-surgery verbs at several model sizes: does memory stay flat as the model grows?

For each shape, two random Mistral-shaped bf16 checkpoints (benchmarks/checkpoints.py, Hugging Face layout,
sharded) are written; then each verb runs as its own `python -m orionlm` process under `/usr/bin/time -v`,
and its peak resident memory, wall time and output size are recorded. Outputs are deleted after each verb
and the sources at the end, so the disk holds two sources and one output at a time (7b: ~29 + ~26 GB).

    .venv/bin/python benchmarks/memory_scale.py                       # 0.28b and 0.84b, every verb
    .venv/bin/python benchmarks/memory_scale.py --shapes 7b --verbs to-gguf merge moe-merge-hidden \
        quantize-gptq --calibration 16x512                             # the seeds' size (~1.5 h here)

The targets (issue 20; S = one source's bytes on disk): converters, merge, moe-merge with random gates
<= 0.5 S + 0.7 GB; moe-merge with hidden gates, quantize and loading in the stored dtype <= 1.2 S + 0.7 GB.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from checkpoints import SHAPES, write_random_mistral
from common import ROOT, cpu_name

GB = 1e9
TARGETS = {"stream": (0.5, 0.7), "block": (1.2, 0.7)}  # peak <= a * S + b GB
VERBS = ("from-hf", "to-gguf", "merge", "merge-slerp", "merge-ties", "merge-dare-ties", "moe-merge-random",
         "moe-merge-hidden", "quantize-rtn", "quantize-gptq", "load-bf16")  # fmt: skip
PROMPTS = {"a": ["def main():", "import numpy as np"], "b": ["Once upon a time", "The history of"]}


def merge_config(a: Path, b: Path, method: str) -> dict:
    """A two-model merge: linear halves, SLERP halfway from a to b, TIES / DARE-TIES of b's task vector on a."""
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                     {"model": str(b), "parameters": {"weight": 0.5}}]}  # fmt: skip
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
                "parameters": {"t": 0.5}}  # fmt: skip
    return {"merge_method": method, "base_model": str(a),
            "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}]}  # fmt: skip


def moe_config(a: Path, b: Path, gates: str) -> dict:
    experts = [{"source_model": str(path), "positive_prompts": PROMPTS[key]} for key, path in (("a", a), ("b", b))]
    return {"base_model": str(a), "gate_mode": gates, "experts_per_token": 2, "experts": experts}


def verbs(a: Path, b: Path, work: Path, calibration: tuple[int, int]) -> dict[str, tuple[str, list[str], Path]]:
    """verb -> (target kind, orionlm arguments, output path)."""
    for method in ("linear", "slerp", "ties", "dare_ties"):
        (work / f"merge-{method}.yaml").write_text(yaml.safe_dump(merge_config(a, b, method)))
    for gates in ("random", "hidden"):
        (work / f"moe-{gates}.yaml").write_text(yaml.safe_dump(moe_config(a, b, gates)))
    nsamples, seq_len = calibration
    out = work / "out"
    gptq = ["--bits", "4", "--group-size", "128", "--dataset", str(ROOT / "README.md"),
            "--nsamples", str(nsamples), "--seq-len", str(seq_len)]  # fmt: skip
    return {
        "from-hf": ("stream", ["convert", "from-hf", str(a), str(out)], out),
        "to-gguf": ("stream", ["convert", "to-gguf", str(a), str(out) + ".gguf", "--dtype", "f16"],
                    Path(str(out) + ".gguf")),
        "merge": ("stream", ["merge", str(work / "merge-linear.yaml"), str(out)], out),
        "merge-slerp": ("stream", ["merge", str(work / "merge-slerp.yaml"), str(out)], out),
        "merge-ties": ("stream", ["merge", str(work / "merge-ties.yaml"), str(out)], out),
        "merge-dare-ties": ("stream", ["merge", str(work / "merge-dare_ties.yaml"), str(out)], out),
        "moe-merge-random": ("stream", ["moe-merge", str(work / "moe-random.yaml"), str(out)], out),
        "moe-merge-hidden": ("block", ["moe-merge", str(work / "moe-hidden.yaml"), str(out)], out),
        "quantize-rtn": ("block", ["quantize", str(a), str(out), "--method", "rtn", "--bits", "4"], out),
        "quantize-gptq": ("block", ["quantize", str(a), str(out), *gptq], out),
        "load-bf16": ("block", ["generate", "Hello", "--model", str(a), "--dtype", "bfloat16", "--max-tokens", "1",
                                "--temp", "0"], out),
    }  # fmt: skip


def measure(args: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of `python -m orionlm ARGS`, from GNU time."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "orionlm", *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"orionlm {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return rss, seconds


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_shape(shape: str, selected: list[str], work: Path, calibration: tuple[int, int]) -> dict[str, tuple]:
    """verb -> (S, peak RSS, seconds, output bytes, kind) for one shape. Sources already in WORK/SHAPE/a and
    WORK/SHAPE/b (written by checkpoints.py) are used and kept; otherwise they are written and then deleted."""
    work = work / shape
    a, b = work / "a", work / "b"
    fresh = not (a / "config.json").is_file()
    work.mkdir(parents=True, exist_ok=True)
    if fresh:
        print(f"{shape}: writing two random checkpoints in {work}", file=sys.stderr)
        write_random_mistral(a, shape, seed=1)
        write_random_mistral(b, shape, seed=2)
    source = size_of(a)
    rows = {}
    try:
        for verb, (kind, args, out) in verbs(a, b, work, calibration).items():
            if verb not in selected:
                continue
            rss, seconds = measure(args)
            rows[verb] = (source, rss, seconds, size_of(out), kind)
            print(f"{shape} {verb}: {rss / GB:.2f} GB peak, {seconds:.0f} s, output {size_of(out) / GB:.2f} GB",
                  file=sys.stderr)  # fmt: skip
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink(missing_ok=True)
    finally:
        if fresh:
            shutil.rmtree(a, ignore_errors=True)
            shutil.rmtree(b, ignore_errors=True)
    return rows


def table(results: dict[str, dict[str, tuple]]) -> str:
    shapes = list(results)
    header = "| verb | " + " | ".join(f"peak RSS, {s} (S = {next(iter(results[s].values()))[0] / GB:.2f} GB)"
                                       for s in shapes)  # fmt: skip
    header += " | target | wall time | output |\n|---|" + "---:|" * (len(shapes) + 3)
    lines = [header]
    for verb in results[shapes[0]]:
        cells, within = [], True
        for shape in shapes:
            source, rss, seconds, out, kind = results[shape][verb]
            a, b = TARGETS[kind]
            within &= rss <= a * source + b * GB
            cells.append(f"{rss / GB:.2f} GB")
        target = f"{a} S + {b} GB ({'met' if within else 'MISSED'})"
        last = results[shapes[-1]][verb]
        lines.append(f"| `{verb}` | {' | '.join(cells)} | {target} | {last[2]:.0f} s | {last[3] / GB:.2f} GB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["0.28b", "0.84b"], choices=SHAPES)
    parser.add_argument("--verbs", nargs="+", default=list(VERBS), choices=VERBS)
    parser.add_argument("--calibration", default="8x128", help="GPTQ calibration: NSAMPLESxSEQ_LEN")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the checkpoints go (default: a temp dir); sources already in "
                        "WORK/SHAPE/a and WORK/SHAPE/b are used")  # fmt: skip
    args = parser.parse_args()
    calibration = tuple(int(n) for n in args.calibration.split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="orionlm-memory-"))
    results = {shape: run_shape(shape, args.verbs, work, calibration) for shape in args.shapes}
    print(f"{cpu_name()}; peak RSS of each `python -m orionlm` process (GNU time); wall time and output of the "
          f"last shape\n")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
