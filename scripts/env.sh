# Sourced by the set-up commands: creates .venv on first use (CPU torch 2.13.0 first, so no
# dependency pulls a CUDA build), reinstalls when pyproject.toml changes, then activates it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.orionlm-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "torch==2.13.0"
    .venv/bin/pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
