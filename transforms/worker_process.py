"""How a process that runs the models is set up: its allocator, and its exit.

**Allocator.** glibc gives every allocation above 128 kB fresh pages from the kernel and hands
the top of its heaps back as soon as 128 kB are free there. A forward pass allocates and frees
activations of megabytes each time, so every batch paid page faults again: some 10,000 per
image, and 10 to 30 % slower convolutions and batch norms in the jobs than in the same calls
in a plain loop (bench/RESULTS.md). ``keep_freed_memory`` keeps allocations up to 32 MB on the
heap and freed memory up to 256 MB for reuse; the peak RSS is unchanged. Memory kept for reuse
is reused only by batches of the same few shapes: batches of a new shape each would fragment
the heap, so the classifier pads its batches (``models.classifier.model.BATCH_MULTIPLE``).

**Exit.** Tearing down torch and the modules it pulls in takes Python about 2 s at exit (bench/RESULTS.md).
The multi-process DirectRunner stops its workers one after another and waits for each to exit,
so a local job on K workers idled some 2K s at its end. By then nothing is left to write: every
bundle is committed and the logs are flushed, so the process can end at once.

Only workers: the launcher keeps its normal exit, so that profilers and coverage wrapped around
a job (``python -m cProfile -m pipelines.score``) still write their results at exit. In a worker,
exit handlers registered before the model loaded are skipped.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any, NoReturn

# The module Beam runs as ``__main__`` in every SDK worker process (multi-process DirectRunner, Dataflow).
SDK_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"

# mallopt parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's own upper bound for its dynamic threshold
TRIM_THRESHOLD_BYTES = 256 * 2**20

_armed = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module says; False where the C library has no ``mallopt`` (macOS, musl)."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def exit_now(code: int = 0) -> NoReturn:
    """Flush the logs and standard streams, then end the process with ``code``, skipping the teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def in_sdk_worker() -> bool:
    """Whether this process is a Beam SDK worker (its main module is Beam's worker entry point)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == SDK_WORKER_MAIN


def exit_fast_at_exit() -> None:
    """From now on, end this process at exit without the teardown; an uncaught error still exits 1.

    Only for processes whose main never calls ``sys.exit`` with a code (Beam's worker main does not),
    since a ``SystemExit`` code cannot be read at exit.
    """
    global _armed
    if _armed:
        return
    _armed = True
    failed: list[bool] = []
    previous = sys.excepthook

    def record_failure(*exc_info: Any) -> None:
        failed.append(True)
        previous(*exc_info)

    sys.excepthook = record_failure
    # Registered late, so it runs first among the exit handlers: the ones it skips only tear down.
    atexit.register(lambda: exit_now(1 if failed else 0))


def exit_fast_if_sdk_worker() -> None:
    """``exit_fast_at_exit`` in a Beam SDK worker process; nothing anywhere else (a launcher, a test run)."""
    if in_sdk_worker():
        exit_fast_at_exit()
