#!/usr/bin/env bash
# Set everything up (first call only), lint (ruff, configured in pyproject.toml), then run the
# test suite. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
ruff check .
exec python -m pytest "$@"
