"""Decode, fuzzed: mutated real PNG, JPEG and WebP bytes decode to RGB or fail with a DecodeError, never worse.

A CI-sized run of ``bench.fuzz_decode`` (a few seconds), in its own process so that a crash in a
native decoder fails this test instead of ending the test run. ``python -m bench.fuzz_decode``
runs the larger loop.
"""
from __future__ import annotations

import json
import subprocess

from tests.scale_fixtures import ROOT, python, venv_env

CASES = 5000
SEED = 0


def test_mutated_images_decode_to_rgb_or_raise_decode_error_without_crash_hang_or_blowup() -> None:
    run = subprocess.run([python(), "-m", "bench.fuzz_decode", "--cases", str(CASES), "--seed", str(SEED)],
                         cwd=ROOT, env=venv_env(), capture_output=True, text=True, timeout=120)
    replay = f"replay: python -m bench.fuzz_decode --cases {CASES} --seed {SEED} --trace"
    assert run.returncode == 0, f"exit status {run.returncode} ({replay}):\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == CASES and outcomes["decoded"] > 0 and outcomes["DecodeError"] > 0
    assert result["slowest_case"]["seconds"] < 10, result
    assert result["peak_rss_mb"] < 1000, result
