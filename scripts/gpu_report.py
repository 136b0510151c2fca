"""The report of scripts/gpu_check.sh: DIR/gpu_report.json and DIR/gpu_report.md from the CUDA tests' JUnit XML
(DIR/cuda_tests.xml), the benchmark's DIR/gpu_benchmark.json, the exit status and seconds of each step, and the
machine's versions. Exits 1 when a test failed or a step broke, so the check's status is the report's.

    python scripts/gpu_report.py --out DIR --mode gpu|cpu-dry-run --step NAME=RC:SECONDS ...
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "transformers", "flash-linear-attention", "fla-core", "fastapi", "uvicorn", "openai")
TIMED_OUT = (124, 137)  # timeout(1)'s status, and a kill after its grace period


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_tests(path: Path) -> dict[str, Any]:
    """Every test case of the JUnit XML: name, outcome, seconds, and the message of a failure or skip."""
    if not path.is_file():
        return {"error": f"{path.name} is missing: pytest did not finish (see gpu_check.log)", "cases": []}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):  # the test a time limit interrupted
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (node.get("message") or node.text or "").strip()
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".replace("tests.cuda.", "")
        cases.append(
            {"name": name, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message[:800]}
        )
    counts = {key: sum(c["outcome"] == key for c in cases) for key in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def parse_steps(values: list[str]) -> dict[str, dict[str, Any]]:
    steps = {}
    for value in values:
        name, _, rest = value.partition("=")
        rc, _, seconds = rest.partition(":")
        status = int(rc) if rc.lstrip("-").isdigit() else rc
        steps[name] = {"rc": status, "seconds": int(seconds) if seconds.isdigit() else None}
        if status in TIMED_OUT:
            steps[name]["timed_out"] = True
    return steps


def problems(report: dict[str, Any]) -> list[str]:
    """What went wrong, one line each: the report is good when this is empty."""
    found = []
    for name, step in report["steps"].items():
        if step["rc"] not in (0, "skipped") and not (name == "tests" and step["rc"] == 1):  # 1: failures, below
            found.append(
                f"step {name} ended with status {step['rc']}" + (" (time limit)" if step.get("timed_out") else "")
            )
    tests = report["tests"]
    if "error" in tests:
        found.append(tests["error"])
    found += [f"test {c['outcome']}: {c['name']}" for c in tests["cases"] if c["outcome"] in ("failed", "error")]
    if not tests["cases"]:
        found.append("no CUDA test was collected")
    benchmark = report["benchmark"]
    if "error" in benchmark:
        found.append(f"benchmark: {benchmark['error']}")
    for row in benchmark.get("results", []):
        if "error" in row and not row["error"].startswith("skipped"):
            found.append(f"benchmark row failed: {row['task']} {row['model']} {row['engine']}: {row['error']}")
    return found


def markdown(report: dict[str, Any]) -> str:
    tests, benchmark = report["tests"], report["benchmark"]
    counts = tests.get("counts", {})
    lines = [f"# GPU check ({report['mode']})", "", f"GPU: {report['gpu'] or 'none'}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "| step | status | seconds |", "|---|---|---:|"]  # fmt: skip
    lines += [f"| {name} | {s['rc']} | {s['seconds'] if s['seconds'] is not None else '-'} |"
              for name, s in report["steps"].items()]  # fmt: skip
    lines += ["", "## CUDA tests", "", ", ".join(f"{v} {k}" for k, v in counts.items()) or tests.get("error", ""), ""]
    lines += ["| test | outcome | s | message |", "|---|---|---:|---|"]
    for case in tests["cases"]:
        message = case["message"].splitlines()[0][:200].replace("|", "\\|") if case["message"] else ""
        lines.append(f"| {case['name']} | {case['outcome']} | {case['seconds']:.1f} | {message} |")
    lines += ["", "## Benchmark", ""]
    setup = benchmark.get("setup", {})
    if setup:
        lines += [f"{setup.get('device_name')} ({setup.get('mode')} shapes); MFU against "
                  f"{setup.get('peak_flops', 0) / 1e12:.1f} TFLOP/s ({setup.get('peak_source')})", ""]  # fmt: skip
    lines += ["| task | model | engine | tokens/s | MFU | first loss | note |", "|---|---|---|---:|---:|---:|---|"]
    for row in benchmark.get("results", []):
        speed = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "-"
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        loss = f"{row['first_loss']:.4f}" if "first_loss" in row else "-"
        lines.append(f"| {row['task']} | {row['model']} | {row['engine']} | {speed} | {mfu} | {loss} | "
                     f"{row.get('error', '')} |")  # fmt: skip
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in report["problems"]] or ["none"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--step", action="append", default=[], help="NAME=RC:SECONDS, RC 'skipped' for a step left out")
    args = parser.parse_args()
    bench_path = args.out / "gpu_benchmark.json"
    benchmark = (
        json.loads(bench_path.read_text()) if bench_path.is_file() else {"error": "gpu_benchmark.json is missing"}
    )
    report = {
        "mode": args.mode,
        "gpu": gpu(),
        "versions": versions(),
        "steps": parse_steps(args.step),
        "tests": read_tests(args.out / "cuda_tests.xml"),
        "benchmark": benchmark,
    }
    report["problems"] = problems(report)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "gpu_report.md").write_text(text)
    print(text)
    raise SystemExit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
