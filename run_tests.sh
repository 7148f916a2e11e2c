#!/usr/bin/env bash
# Sets up .venv (first run only), then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec python -m pytest -q tests "$@"
