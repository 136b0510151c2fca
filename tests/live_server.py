"""A live `orionlm serve` process on a free loopback port, for the CPU and CUDA server tests."""

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

KEY, NAME = "test-key", "tiny"


@contextlib.contextmanager
def serve_process(model_dir: Path, *options: str, output: list[str] | None = None) -> Iterator[str]:
    """`orionlm serve` on the model (port 0: the system picks a free one; key KEY, model name NAME, batches of 4,
    prefill chunks of 16, then `options`); yields its address once it says it is ready. With `output`, the lines
    it printed (stdout and stderr) up to its ready line are in it then, and all of them once it has stopped."""
    arguments = ["serve", str(model_dir), "--port", "0", "--api-key", KEY, "--served-model-name", NAME,
                 "--max-batch", "4", "--prefill-chunk", "16", *options]  # fmt: skip
    with orionlm_server(arguments, output=output) as address:
        yield address


@contextlib.contextmanager
def orionlm_server(arguments: list[str], cwd: Path | None = None, output: list[str] | None = None) -> Iterator[str]:
    """`orionlm ARGUMENTS` (a serve command, run in `cwd`); yields its address once it says it is ready, and stops
    it after. `output` as in serve_process."""
    command = [sys.executable, "-m", "orionlm", *arguments]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [] if output is None else output
    for line in process.stdout:
        lines.append(line)
        if ready := re.search(r"ready on (http://127\.0\.0\.1:\d+)/v1", line):
            break
    else:
        raise AssertionError("the server stopped before it was ready:\n" + "".join(lines))
    try:
        yield ready.group(1)
    finally:
        process.terminate()
        lines += process.communicate(timeout=20)[0].splitlines(keepends=True)


SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus' text format -> {(sample name, frozenset of (label, value) pairs): value}, checking that each
    sample belongs to a metric declared with # TYPE (a histogram's as name_bucket, name_sum, name_count)."""
    kinds: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            kinds[name] = kind
        elif not line.startswith("#"):
            name, labels, value = SAMPLE.fullmatch(line).groups()
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert kinds.get(name) in ("counter", "gauge") or kinds.get(base) == "histogram", line
            unescaped = {k: re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], v)
                         for k, v in LABEL.findall(labels or "")}  # fmt: skip
            samples[name, frozenset(unescaped.items())] = float(value)
    return samples


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a labelled counter appears with its first count)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
