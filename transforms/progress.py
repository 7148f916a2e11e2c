"""Progress on runners whose workers share this machine: images done of the planned total, rate, ETA.

Workers count what they plan and what they finish into a folder on this machine: one small
file per counter and worker, replaced whole at most every half second. The launching process
sums the files while the job runs and draws a bar (a line every few seconds when stderr is not
a terminal). Files, not Beam metrics: the DirectRunner reports a bundle's metrics only when the
bundle ends, and it hands each worker its whole share as one bundle; files also work across the
multi-process DirectRunner's worker processes. Remote runners (Dataflow) have the Beam counters,
which stay as they are.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Optional, TextIO

import apache_beam as beam

PLANNED = "planned"  # images found by planning the input shards
DONE = "done"  # images whose outcome has been written
FLUSH_EVERY_S = 0.5


class ProgressCounter:
    """One worker's count of one kind, in a file of its own under ``folder``."""

    def __init__(self, folder: str, kind: str, clock: Callable[[], float] = time.monotonic):
        self._path = os.path.join(folder, f"{uuid.uuid4().hex}.{kind}")
        self._clock = clock
        self._count = 0
        self._flushed = float("-inf")

    def inc(self, n: int = 1) -> None:
        self._count += n
        if self._clock() - self._flushed >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        # Written aside and renamed: a reader sees the old count or the new one, never half a number.
        temp = f"{self._path}.tmp"
        try:
            with open(temp, "w") as f:
                f.write(str(self._count))
            os.replace(temp, self._path)
        except OSError:
            pass  # progress is only shown: a full disk or a launcher gone must never fail the work
        self._flushed = self._clock()


def read_counts(folder: str) -> dict[str, int]:
    """Every worker's counts, summed by kind."""
    counts = {PLANNED: 0, DONE: 0}
    for name in os.listdir(folder):
        kind = name.rsplit(".", 1)[-1]
        if kind in counts:
            try:
                with open(os.path.join(folder, name)) as f:
                    counts[kind] += int(f.read() or 0)
            except FileNotFoundError:
                continue  # replaced between the listing and the read: the next poll sees it
    return counts


class CountProgress(beam.DoFn):
    """Counts the elements it sees as ``kind`` in ``folder``; outputs nothing."""

    def __init__(self, folder: str, kind: str):
        self._folder, self._kind = folder, kind

    def setup(self) -> None:
        self._counter = ProgressCounter(self._folder, self._kind)

    def process(self, element: Any) -> None:
        self._counter.inc()

    def finish_bundle(self) -> None:
        self._counter.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """Turns the counts in a folder into progress lines, at most one every ``every_s`` seconds.

    ``total`` is the number of images when the launcher knows it (a patch dataset says it in its
    manifest); otherwise it is what planning found. ``skipped`` images (finished by an earlier run,
    on ``--resume``) are planned but never done, so they are not counted in either.
    """

    WIDTH = 24
    RATE_WINDOW_S = 30.0

    def __init__(self, folder: str, every_s: float, started: float, total: Optional[int] = None, skipped: int = 0):
        self._folder, self._every_s, self._started = folder, every_s, started
        self._total, self._skipped = total, skipped
        self._last_line: Optional[float] = None
        self.complete = False  # whether a line has said every image is done
        self._seen: deque[tuple[float, int]] = deque()

    def line(self, now: float) -> str:
        """The progress as of ``now``."""
        counts = read_counts(self._folder)
        done = counts[DONE]
        total = self._total if self._total is not None else counts[PLANNED]
        total = max(total - self._skipped, done)
        if not total:
            return "planning the inputs..."
        self._seen.append((now, done))
        while now - self._seen[0][0] > self.RATE_WINDOW_S:
            self._seen.popleft()
        first_t, first_done = self._seen[0]
        rate = (done - first_done) / (now - first_t) if now > first_t else 0.0
        filled = round(self.WIDTH * done / total)
        text = f"images {done:,}/{total:,} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {100 * done / total:3.0f}%"
        self.complete = done == total
        if done == total:
            text += f"  {done / max(now - self._started, 1e-9):.2f} images/s  took {_duration(now - self._started)}"
        elif done and rate > 0:
            text += f"  {rate:.2f} images/s  ETA {_duration((total - done) / rate)}"
        return text

    def poll(self, now: float) -> Optional[str]:
        """The line to show at ``now``; None when the last one was under ``every_s`` ago or said all is done."""
        if self.complete or (self._last_line is not None and now - self._last_line < self._every_s):
            return None
        self._last_line = now
        return self.line(now)


class ShowProgress:
    """While the job runs, draw the bar on ``stream`` from a thread; remove the counters' folder afterwards.

    Only where the workers run on this machine (``local``); elsewhere ``folder`` is None and this does nothing.
    """

    TTY_EVERY_S = 0.5
    LOG_EVERY_S = 5.0

    def __init__(self, local: bool, total: Optional[int] = None, skipped: int = 0, stream: Optional[TextIO] = None):
        self.folder = tempfile.mkdtemp(prefix="acne-progress-") if local else None
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._stop = threading.Event()
        every_s = self.TTY_EVERY_S if self._tty else self.LOG_EVERY_S
        self._bar = ProgressBar(self.folder, every_s, time.monotonic(), total, skipped) if self.folder else None
        self._thread = threading.Thread(target=self._draw, name="progress", daemon=True)
        self._width = 0

    def _show(self, text: str, end: bool = False) -> None:
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width) + ("\n" if end else ""))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def _draw(self) -> None:
        while not self._stop.wait(self.TTY_EVERY_S):
            text = self._bar.poll(time.monotonic())
            if text is not None:
                self._show(text)

    def run(self, pipeline: beam.Pipeline) -> Any:
        """Run ``pipeline``; where the bar is drawn, also wait for it to end (a remote job is left to run)."""
        result = pipeline.run()
        if self._bar is not None:
            result.wait_until_finish()
        return result

    def __enter__(self) -> ShowProgress:
        if self._bar is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is None:
            return
        self._stop.set()
        self._thread.join()
        if exc[0] is None and not self._bar.complete:
            self._show(self._bar.line(time.monotonic()), end=True)
        elif self._tty:
            self._stream.write("\n")
        shutil.rmtree(self.folder, ignore_errors=True)
