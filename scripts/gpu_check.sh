#!/usr/bin/env bash
# GPU readiness check: the CUDA-marked tests, then a short GPU benchmark, then a report (JSON + markdown).
#
#   bash scripts/gpu_check.sh [--out DIR] [--cpu-dry-run]
#
# On a GPU machine with no network: wheels carried in .whl/ (packages the machine lacks: fla, fastapi, uvicorn,
# openai and their dependencies) are installed into a folder on PYTHONPATH first, with no index and no
# dependency resolution; the repository is used from here (PYTHONPATH), not installed. Every step has its own
# time limit and a failing step is recorded and the next one runs; on an H100 the whole check takes under
# 5 minutes. --cpu-dry-run hides any GPU, so the CUDA tests are skipped (and counted) and the benchmark runs its
# tiny shapes on the CPU: the same code paths in seconds, which CI runs (tests/test_gpu_check.py).
#
# Writes DIR (default runs/gpu-check/): gpu_check.log, cuda_tests.xml, gpu_benchmark.json, gpu_report.json,
# gpu_report.md. Exits 0 when no test failed and no step broke.
# Environment: PYTHON (default python3), GPU_CHECK_TESTS_S (150), GPU_CHECK_BENCH_S (100), GPU_CHECK_SITE.
set -u -o pipefail
cd "$(dirname "$0")/.."

out=runs/gpu-check
mode=gpu
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --cpu-dry-run) mode=cpu-dry-run; shift ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (use --out DIR, --cpu-dry-run)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out" && out=$(cd "$out" && pwd)
rm -f "$out"/cuda_tests.xml "$out"/gpu_benchmark.json "$out"/gpu_report.json "$out"/gpu_report.md
exec > >(tee "$out/gpu_check.log") 2>&1

python=${PYTHON:-python3}
tests_limit=${GPU_CHECK_TESTS_S:-150}
bench_limit=${GPU_CHECK_BENCH_S:-100}
steps=()
started=$SECONDS

# run NAME LIMIT COMMAND...: the command under a time limit (SIGINT first, so pytest still writes its XML);
# its status and seconds go into the report
run() {
    local name=$1 limit=$2 begin=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout -s INT -k 15 "$limit" "$@"
    rc=$?
    echo "== $name: status $rc after $((SECONDS - begin)) s"
    steps+=(--step "$name=$rc:$((SECONDS - begin))")
}

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$mode" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then
    site=${GPU_CHECK_SITE:-/tmp/orionlm-gpu-site}
    run install 60 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
else
    steps+=(--step "install=skipped:0")
fi
if [ "$mode" = cpu-dry-run ]; then
    export CUDA_VISIBLE_DEVICES=""  # no GPU, even on a machine that has one
    unset ORIONLM_TEST_DEVICE
fi

run versions 30 "$python" -c '
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for name in ("triton", "fla", "fastapi", "uvicorn", "openai", "transformers"):
    print(name, "importable" if importlib.util.find_spec(name) else "MISSING")
'

# Quick and broad first, torch.compile-heavy last: a time limit then cuts the fewest checks.
test_files=()
for name in families kernels serve generation training; do
    [ -f "tests/cuda/test_cuda_$name.py" ] && test_files+=("tests/cuda/test_cuda_$name.py")
done
for file in tests/cuda/test_*.py; do
    [[ " ${test_files[*]} " == *" $file "* ]] || test_files+=("$file")
done
per_test=()
if "$python" -c 'import pytest_timeout' 2>/dev/null; then
    per_test=(--timeout 90)  # one hung kernel must not take the whole step's time
fi
run tests "$tests_limit" "$python" -m pytest -m cuda "${test_files[@]}" -p no:cacheprovider -q -rfEs \
    --durations 10 --junitxml "$out/cuda_tests.xml" "${per_test[@]}"

bench=()
if [ "$mode" = cpu-dry-run ]; then
    bench=(--tiny)
fi
run benchmark "$bench_limit" "$python" benchmarks/gpu.py --json "$out/gpu_benchmark.json" \
    --budget $((bench_limit - 25)) "${bench[@]}"

echo "== report after $((SECONDS - started)) s"
"$python" scripts/gpu_report.py --out "$out" --mode "$mode" "${steps[@]}"
