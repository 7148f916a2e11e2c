"""Progress on local runners: images done of the planned total, the rate and an ETA, from every worker."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from pipelines import build_dataset
from transforms.progress import DONE, PLANNED, ProgressBar, ProgressCounter

MULTI_PROCESS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


class Clock:
    """Seconds that a test moves on by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _workers(folder: Path, clock: Clock, n: int = 2) -> list[dict[str, ProgressCounter]]:
    return [{kind: ProgressCounter(str(folder), kind, clock) for kind in (PLANNED, DONE)} for _ in range(n)]


def test_the_bar_sums_every_worker_and_gives_the_rate_and_eta(tmp_path: Path) -> None:
    clock = Clock()
    workers = _workers(tmp_path, clock)
    bar = ProgressBar(str(tmp_path), every_s=5, started=0.0)
    assert bar.line(0.0) == "planning the inputs..."
    for w in workers:
        w[PLANNED].inc(50)
    clock.now = 10.0
    for w in workers:
        w[DONE].inc(10)
    assert bar.line(10.0).startswith("images 20/100 [#####...................]  20%")
    clock.now = 20.0
    for w in workers:
        w[DONE].inc(10)
    line = bar.line(20.0)
    assert "images 40/100" in line and "40%" in line
    assert "2.00 images/s" in line and "ETA 0:30" in line, line  # 20 images in the last 10 s, 60 to go


def test_images_an_earlier_run_finished_are_not_in_the_total(tmp_path: Path) -> None:
    clock = Clock()
    [worker] = _workers(tmp_path, clock, 1)
    worker[PLANNED].inc(100)
    worker[DONE].inc(70)
    line = ProgressBar(str(tmp_path), every_s=5, started=0.0, skipped=30).line(35.0)
    assert line.startswith("images 70/70 [########################] 100%") and "took 0:35" in line


def test_lines_come_every_few_seconds_and_stop_once_all_is_done(tmp_path: Path) -> None:
    clock = Clock()
    [worker] = _workers(tmp_path, clock, 1)
    worker[PLANNED].inc(4)
    bar = ProgressBar(str(tmp_path), every_s=5, started=0.0)
    shown = {}
    for t in range(0, 30):
        clock.now = float(t)
        if t in (7, 12):
            worker[DONE].inc(2)
        line = bar.poll(float(t))
        if line is not None:
            shown[t] = line
    assert list(shown) == [0, 5, 10, 15], "one line every 5 s, none after the one that says all is done"
    assert shown[15].startswith("images 4/4")


def test_a_counter_writes_at_most_twice_a_second_and_always_when_flushed(tmp_path: Path) -> None:
    clock = Clock()
    counter = ProgressCounter(str(tmp_path), DONE, clock)
    counter.inc()
    counter.inc()
    [path] = tmp_path.iterdir()
    assert path.read_text() == "1"
    counter.flush()
    assert path.read_text() == "2"


def test_a_multi_process_run_shows_progress_in_the_launcher(
        sample_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A temporary folder of the test's own: other jobs on the machine come and go in the shared one.
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    manifest = build_dataset.run(["--input", str(sample_dir), "--output", str(tmp_path / "out"), *MULTI_PROCESS])
    err = capfd.readouterr().err
    inputs = manifest["accounting"]["inputs"]
    lines = [line for line in err.splitlines() if line.startswith("images ")]
    assert lines and lines[-1].startswith(f"images {inputs}/{inputs} [") and "100%" in lines[-1], err[-2000:]
    assert list(temp.glob("acne-progress-*")) == [], "the counters are cleared away"


def test_a_counter_whose_folder_is_gone_never_fails_the_work(tmp_path: Path) -> None:
    counter = ProgressCounter(str(tmp_path / "gone"), DONE, Clock())
    counter.inc()
    counter.flush()
