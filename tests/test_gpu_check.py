"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's own code (CUDA test collection, the benchmark on tiny
shapes, the report) runs on every CI machine, so it still works the day a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_writes_a_clean_report(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["mode"] == "cpu-dry-run" and report["problems"] == []
    counts = report["tests"]["counts"]
    assert counts["skipped"] > 0 and counts["skipped"] == len(report["tests"]["cases"])
    assert counts["failed"] == counts["error"] == 0
    assert all(case["message"] == "needs a CUDA device" for case in report["tests"]["cases"])
    rows = report["benchmark"]["results"]
    assert report["benchmark"]["setup"]["mode"] == "tiny"
    assert {(r["task"], r["model"]) for r in rows if "tokens_per_s" in r} >= {
        ("train", "moe"),
        ("train", "chimera"),
        ("decode b1", "moe"),
        ("decode b2", "chimera"),
        ("prefill", "moe"),
    }
    orion, hf = (r for r in rows if r["task"] == "train" and r["model"] == "moe")
    assert abs(orion["first_loss"] - hf["first_loss"]) < 1e-4  # the same weights in both engines
    assert "## CUDA tests" in (tmp_path / "gpu_report.md").read_text()
