"""--resume: a killed job finishes where it stopped, a grown input is processed incrementally, and a
changed run is refused. The resumed output must equal a one-shot run's, row for row."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq
import pytest

from models.dataset import read_table
from pipelines import build_dataset
from pipelines.common import JobConfigError
from tests.scale_fixtures import (  # noqa: F401  (pytest fixtures)
    JOB_FLAGS,
    checkpoints,
    image_files,
    kill_midway,
    write_folder,
)

FACE_ORDER = ["image_id", "source_uri"]


def _rows(output: Path, table: str, order: list[str]) -> list[dict[str, Any]]:
    """A finished table's rows, in a fixed order so that two outputs compare row for row."""
    rows = read_table(str(output), table).to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in order))


def _patch_rows(output: Path) -> list[dict[str, Any]]:
    return sorted(
        (row for split in ("train", "validation", "test") for row in _rows(output, f"patches/{split}", ["patch_id"])),
        key=lambda r: r["patch_id"],
    )


def _complete_face_file(output: Path) -> Optional[Path]:
    """A faces/ file a bundle finished writing: the point where a kill leaves work to carry over."""
    for path in (output / "_temporary" / "faces").glob("*.parquet"):
        try:
            pq.ParquetFile(path)
            return path
        except Exception:
            continue
    return None


def test_a_killed_job_resumes_to_the_output_of_an_uninterrupted_run(
    checkpoints: tuple[str, str], tmp_path: Path
) -> None:
    inputs = write_folder(tmp_path / "in", image_files(24, broken=1))
    output, one_shot = tmp_path / "out", tmp_path / "one_shot"
    job_flags = ["--segmenter-checkpoint", checkpoints[0], *JOB_FLAGS]
    argv = ["--input", str(inputs), "--output", str(output), *job_flags]
    # Worker processes finish bundles as they go, so a kill leaves some of them committed.
    workers = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    kill_midway(["pipelines.build_dataset", *argv, *workers], lambda: _complete_face_file(output))
    assert not (output / "manifest.json").exists()

    resumed = build_dataset.run(argv + ["--resume"])
    build_dataset.run(["--input", str(inputs), "--output", str(one_shot), *job_flags])

    first, second = resumed["runs"]
    assert first == {**first, "run": 1, "finished": False}
    assert second["run"] == 2 and second["carried_images"] > 0
    assert second["carried_images"] + sum(second["processed"][s] for s in ("kept", "filtered", "failed")) == 25
    books = resumed["accounting"]
    assert books["ok"] and (books["inputs"], books["kept"], books["failed"]) == (25, 24, 1)
    assert _rows(output, "faces", FACE_ORDER) == _rows(one_shot, "faces", FACE_ORDER)
    assert _rows(output, "errors", FACE_ORDER) == _rows(one_shot, "errors", FACE_ORDER)
    assert _patch_rows(output) == _patch_rows(one_shot)
    assert not (output / "_temporary").exists()


def test_resume_on_a_grown_input_processes_only_the_new_images(checkpoints: tuple[str, str], tmp_path: Path) -> None:
    files = image_files(5, broken=0)
    inputs = write_folder(tmp_path / "in", dict(list(files.items())[:3]))
    output = tmp_path / "out"
    argv = ["--input", str(inputs), "--output", str(output), "--segmenter-checkpoint", checkpoints[0], *JOB_FLAGS]
    build_dataset.run(argv)
    first_files = sorted(p.relative_to(output) for p in output.rglob("part-*.parquet"))

    write_folder(inputs, dict(list(files.items())[3:]))
    manifest = build_dataset.run(argv + ["--resume"])

    runs = manifest["runs"]
    assert [r["run"] for r in runs] == [1, 2] and all(r["finished"] for r in runs)
    assert runs[1]["carried_images"] == 3 and runs[1]["processed"]["kept"] == 2
    assert set(first_files) <= {p.relative_to(output) for p in output.rglob("part-*.parquet")}
    assert all(name.split("/")[-1].startswith("part-r02-") for name in runs[1]["files"])
    faces = read_table(str(output), "faces", ["image_id"]).column(0).to_pylist()
    assert sorted(faces) == [f"{i:05d}" for i in range(5)]
    assert manifest["accounting"]["ok"] and manifest["accounting"]["inputs"] == 5

    again = build_dataset.run(argv + ["--resume"])
    assert [r["run"] for r in again["runs"]] == [1, 2, 3] and again["runs"][:2] == runs
    assert again["runs"][2]["carried_images"] == 5 and again["runs"][2]["files"] == []


def test_resume_refuses_a_run_that_differs_from_the_first(checkpoints: tuple[str, str], tmp_path: Path) -> None:
    inputs = write_folder(tmp_path / "in", image_files(2, broken=0))
    output = tmp_path / "out"
    argv = ["--input", str(inputs), "--output", str(output), "--segmenter-checkpoint", checkpoints[0], *JOB_FLAGS]
    build_dataset.run(argv)
    changed = [a if a != JOB_FLAGS[1] else "64" for a in argv]
    with pytest.raises(JobConfigError, match=r"patch_size 64 \(was 32\)"):
        build_dataset.run(changed + ["--resume"])
    with pytest.raises(JobConfigError, match="--resume keeps .* --overwrite deletes"):
        build_dataset.run(argv + ["--resume", "--overwrite"])
    with pytest.raises(JobConfigError, match="pass --resume"):
        build_dataset.run(argv)
    assert json.loads((output / "manifest.json").read_text())["accounting"]["ok"]
