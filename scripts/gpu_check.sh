#!/usr/bin/env bash
# Every GPU-only path in one command, in under ~10 minutes on one GPU, ending with a pass/fail
# table (scripts/gpu_check.py says what each check does):
#   scripts/gpu_check.sh --out gpu_check.md      # on a GPU machine; paste the table into BENCHMARKS.md
#   scripts/gpu_check.sh --cpu                   # the same steps with the CPU standing in (tests run this)
# Uses the project's .venv when there is one, else a python that has torch (a Docker image's),
# else makes .venv as scripts/run.sh does. Exit status 1 when a check fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
elif python3 -c "import torch" 2>/dev/null; then
    PY=python3
else
    source "$ROOT/scripts/_env.sh"
    PY="$VENV/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$PY" scripts/gpu_check.py "$@"
