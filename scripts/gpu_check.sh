#!/usr/bin/env bash
# Every GPU-only path in one command, in under ~10 minutes on one GPU, ending with a pass/fail
# table (scripts/gpu_check.py says what each check does):
#   scripts/gpu_check.sh --budget 540 --out gpu_check.md   # on a GPU machine; paste the table into BENCHMARKS.md
#   scripts/gpu_check.sh --cpu                             # the same steps with the CPU standing in (tests run this)
# Uses GPU_CHECK_PYTHON when set, else the project's .venv when there is one, else a python3 that
# has torch (a Docker image's), else makes .venv as scripts/run.sh does. The chosen Python must
# import torch, torchvision, pytest, hypothesis and graft (with its dependencies): when it cannot,
# one line says what is missing and how to install it. Exit status 1 when a check fails, 2 when
# the checks cannot start (missing packages, no CUDA device, a wrong option).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY="$GPU_CHECK_PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
elif python3 -c "import torch" 2>/dev/null; then
    PY=python3
else
    source "$ROOT/scripts/_env.sh"
    PY="$VENV/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

# What the checks import, before any of them starts (a python3 found on the machine may have
# torch and lack the test tools). Prints nothing when all is there.
missing="$("$PY" - <<'PY' 2>&1
import importlib

missing = []
for name in ("torch", "torchvision", "pytest", "hypothesis", "graft.train"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        if e.name not in missing:
            missing.append(name if e.name in (None, name) else f"{name.partition('.')[0]} (needs {e.name})")
    except Exception as e:  # a broken install: say how it broke
        missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
if "torch" not in missing:
    import torch

    if tuple(int(n) for n in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        missing.append(f"torch>=2.6 (this is torch {torch.__version__})")
print(", ".join(missing))
PY
)" || { echo "scripts/gpu_check.sh: $PY does not run: ${missing:-no output}" >&2; exit 2; }
if [ -n "$missing" ]; then
    if [[ "$missing" =~ ^(pytest|hypothesis)(,\ (pytest|hypothesis))?$ ]]; then
        how="$PY -m pip install 'pytest>=7' 'hypothesis>=6'"
    else
        how="$PY -m pip install -e '.[test]' (the project with its test tools)"
    fi
    echo "scripts/gpu_check.sh: $PY lacks $missing; install with: $how, or point GPU_CHECK_PYTHON at a Python that has them" >&2
    exit 2
fi
exec "$PY" scripts/gpu_check.py "$@"
