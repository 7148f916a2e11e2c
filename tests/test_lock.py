"""One job per output: a second job refuses a held output, a killed job's marker is reported or taken over."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from models.dataset import read_manifest
from pipelines import build_dataset
from pipelines.common import JobConfigError
from tests.scale_fixtures import (  # noqa: F401  (pytest fixtures)
    JOB_FLAGS,
    ROOT,
    checkpoints,
    image_files,
    kill_midway,
    python,
    venv_env,
    wait_for,
    write_folder,
)
from transforms.lock import release, take
from transforms.sink import LOCK, OutputError


def _argv(inputs: Path, output: Path, segmenter: str) -> list[str]:
    return ["--input", str(inputs), "--output", str(output), "--segmenter-checkpoint", segmenter, *JOB_FLAGS]


def test_a_second_job_on_a_running_jobs_output_refuses_even_with_overwrite(
    checkpoints: tuple[str, str], tmp_path: Path
) -> None:
    inputs = write_folder(tmp_path / "in", image_files(24, broken=1))
    output = tmp_path / "out"
    argv = _argv(inputs, output, checkpoints[0])
    first = subprocess.Popen([python(), "-m", "pipelines.build_dataset", *argv], cwd=ROOT, env=venv_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (output / LOCK).exists() or first.poll() is not None, 120, "the first job to take the output")
        with pytest.raises(JobConfigError, match="is in use by another job .* which is still running"):
            build_dataset.run(argv + ["--overwrite"])
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stderr[-3000:]
    books = read_manifest(str(output))["accounting"]
    assert books["ok"] and books["inputs"] == 25
    assert not (output / LOCK).exists()


def test_a_killed_jobs_marker_is_reported_with_how_to_clear_it_and_resume_takes_it_over(
    checkpoints: tuple[str, str], tmp_path: Path
) -> None:
    inputs = write_folder(tmp_path / "in", image_files(8, broken=0))
    output = tmp_path / "out"
    argv = _argv(inputs, output, checkpoints[0])
    kill_midway(["pipelines.build_dataset", *argv], lambda: (output / "_run.json").exists())
    assert (output / LOCK).exists()

    with pytest.raises(JobConfigError) as refused:
        build_dataset.run(argv)
    assert "was left by a job that is no longer running" in str(refused.value)
    assert f"pass --resume to finish its work, --overwrite to replace it, or delete {output / LOCK}" in str(refused.value)

    manifest = build_dataset.run(argv + ["--resume"])
    assert manifest["accounting"]["ok"] and manifest["accounting"]["inputs"] == 8
    assert not (output / LOCK).exists()


def test_a_marker_from_another_machine_is_never_taken_over(checkpoints: tuple[str, str], tmp_path: Path) -> None:
    inputs = write_folder(tmp_path / "in", image_files(2, broken=0))
    output = tmp_path / "out"
    output.mkdir()
    marker = {"token": "t", "host": "worker-7", "pid": 4242, "pid_namespace": None, "started_at": "2026-01-01T00:00:00Z"}
    (output / LOCK).write_text(json.dumps(marker))
    argv = _argv(inputs, output, checkpoints[0])

    with pytest.raises(JobConfigError, match="pid 4242 on worker-7.*cannot tell which. If no job is writing it, delete"):
        build_dataset.run(argv + ["--overwrite"])
    assert (output / LOCK).exists()

    (output / LOCK).unlink()
    assert build_dataset.run(argv)["accounting"]["ok"]


def test_of_many_jobs_taking_one_output_at_once_exactly_one_gets_it(tmp_path: Path) -> None:
    def attempt(_: int) -> bool:
        try:
            take(str(tmp_path / "out"), takeover=True)
            return True
        except OutputError:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(attempt, range(16))) == [False] * 15 + [True]


def test_a_job_releases_only_its_own_marker(tmp_path: Path) -> None:
    mine = take(str(tmp_path), takeover=False)
    (tmp_path / LOCK).unlink()  # cleared by hand, and another job took the output
    theirs = take(str(tmp_path), takeover=False)
    release(mine)
    assert json.loads((tmp_path / LOCK).read_text())["token"] == theirs.token
