#!/usr/bin/env bash
# Set everything up (first call only) and run the test suite. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
exec python -m pytest "$@"
