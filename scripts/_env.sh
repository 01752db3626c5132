# Sourced by run.sh and test.sh: make .venv/ at the project root and install graft into it.
# A second call is fast: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[graft] creating $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.graft-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[graft] installing graft and its dependencies into $VENV (torch takes a minute)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,plot]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
