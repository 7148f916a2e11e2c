"""A model-running process keeps freed memory for reuse; a finished worker leaves without
Python's teardown, and still says how it ended.

That the multi-process jobs write every row with it is checked in tests/test_runners.py; its
effect on a job's wall time is measured in bench/ (RESULTS.md).
"""
from __future__ import annotations

import subprocess
import sys

from transforms.worker_process import in_sdk_worker, keep_freed_memory

ARMED = "from transforms.worker_process import exit_fast_at_exit; exit_fast_at_exit(); "


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_process_that_ends_well_exits_0_with_its_output_flushed() -> None:
    done = _python(ARMED + "import sys; print('rows written'); sys.stderr.write('last log line')")

    assert done.returncode == 0
    assert done.stdout == "rows written\n"
    assert done.stderr == "last log line"


def test_an_uncaught_error_still_exits_1_with_its_traceback() -> None:
    done = _python(ARMED + "raise RuntimeError('the harness failed')")

    assert done.returncode == 1
    assert "RuntimeError: the harness failed" in done.stderr


def test_only_beam_sdk_workers_are_armed() -> None:
    # pytest is not a worker: arming it would end the test run with exit code 0 whatever failed.
    assert not in_sdk_worker()
    done = _python(
        "from transforms.worker_process import exit_fast_if_sdk_worker; exit_fast_if_sdk_worker(); raise SystemExit(3)"
    )
    assert done.returncode == 3


def test_the_allocator_is_tuned_where_the_c_library_can_be() -> None:
    # glibc (Linux, where the jobs' workers run) has mallopt; elsewhere the jobs run untuned.
    assert keep_freed_memory() == (sys.platform == "linux")
