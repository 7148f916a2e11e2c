#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test extra into it.
# Sourced by run_local.sh and run_tests.sh; afterwards the venv is first on PATH,
# which Beam's worker pools need (they start workers with the `python` on PATH).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ACNE_VENV:-$ROOT/.venv}"
STAMP="$VENV/.installed-$(sha1sum "$ROOT/setup.py" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing into $VENV (first run: a few minutes, about 7 GB with torch)" >&2
  # A full disk otherwise surfaces minutes later as pip's bare "No space left on device"; a fresh
  # install peaked at 7.1 GB, so ask for 8 up front and say where the room is needed.
  if [ ! -d "$VENV" ]; then
    free_kb=$(df --output=avail -k "$(dirname "$VENV")" 2>/dev/null | tail -1 || true)
    if [[ "$free_kb" =~ ^[0-9]+$ ]] && [ "$free_kb" -lt $((8 * 1048576)) ]; then
      echo "[setup] error: the install needs about 8 GB free under $(dirname "$VENV"), and only $((free_kb / 1048576)) GB is;" \
           "free some space or set ACNE_VENV to a folder on a disk with room" >&2
      exit 1
    fi
  fi
  python3 -m venv "$VENV"
  # A pip config that names local indexes lacking most packages (as on our CI machines) makes pip warn once per
  # package; the filter drops those lines and keeps real errors (pipefail keeps pip's status).
  quiet() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; } >&2; }
  quiet "$VENV/bin/pip" install --quiet --upgrade pip setuptools wheel
  quiet "$VENV/bin/pip" install --quiet -e "$ROOT[test]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
