"""Leave a finished SDK worker process without Python's teardown.

Tearing down torch and the modules it pulls in takes Python about 2 s at exit (bench/RESULTS.md).
The multi-process DirectRunner stops its workers one after another and waits for each to exit,
so a local job on K workers idled some 2K s at its end. By then nothing is left to write: every
bundle is committed and the logs are flushed, so the process can end at once.

Only workers: the launcher keeps its normal exit, so that profilers and coverage wrapped around
a job (``python -m cProfile -m pipelines.score``) still write their results at exit. In a worker,
exit handlers registered before the model loaded are skipped.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any, NoReturn

# The module Beam runs as ``__main__`` in every SDK worker process (multi-process DirectRunner, Dataflow).
SDK_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"

_armed = False


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
