"""Write: every row lands once; the manifest, written last, is what makes an output readable."""
from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.dataset import IncompleteDatasetError, read_parquet_dir, read_table, write_manifest
from transforms.records import Outcome
from transforms.finish import Finish, WriteOutcomes, accounting, finish
from transforms.sink import OutputError, WriteParquet, prepare_output

SCHEMA = pa.schema([("image_id", pa.string()), ("n", pa.int32())])


def test_every_row_is_written_exactly_once_in_files_closed_as_they_fill(tmp_path: Path, pipeline) -> None:
    rows = [{"image_id": f"{i:05d}", "n": i} for i in range(300)]
    with pipeline() as p:
        p | beam.Create(rows) | WriteParquet(str(tmp_path), "faces", SCHEMA, rows_per_group=32, rows_per_file=100)
    finish(str(tmp_path), {"accounting": {"ok": True}})
    table = read_parquet_dir(str(tmp_path / "faces"), SCHEMA)
    assert sorted(table.to_pylist(), key=lambda r: r["n"]) == rows
    files = sorted((tmp_path / "faces").glob("*.parquet"))
    assert len(files) >= 3 and all(pq.ParquetFile(f).metadata.num_rows <= 100 for f in files)
    assert all(f.name.startswith("part-") for f in (tmp_path / "faces").iterdir())
    assert not (tmp_path / "_temporary").exists()


def test_non_empty_output_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        prepare_output(str(tmp_path), overwrite=False)
    assert (tmp_path / "old.txt").exists()
    prepare_output(str(tmp_path), overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_outputs_without_a_sound_manifest_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IncompleteDatasetError, match="has not finished"):
        read_table(str(tmp_path), "faces")
    write_manifest(str(tmp_path), {"accounting": accounting(3, {"kept": 2}, face_rows=2)})
    with pytest.raises(IncompleteDatasetError, match="do not add up"):
        read_table(str(tmp_path), "faces")


def test_accounting_checks_outcomes_and_rows_alike() -> None:
    tally = {"kept": 3, "filtered": 1, "failed": 1, "patches": 12}
    assert accounting(5, tally, face_rows=5)["ok"]
    assert not accounting(5, tally, face_rows=6)["ok"]
    assert not accounting(6, tally, face_rows=5)["ok"]


def test_finish_writes_a_manifest_that_flags_unbalanced_books(tmp_path: Path, pipeline) -> None:
    """One input went missing between reading and writing: the manifest says so, readers refuse it."""
    outcomes = [Outcome("a", "mem://a", "kept", patch_count=4), Outcome.failed("b", "mem://b", "decode", "broken")]
    with pipeline() as p:
        inputs = p | "Inputs" >> beam.Create([3])
        written = p | "Outcomes" >> beam.Create(outcomes)
        files, counted = (written,) | WriteOutcomes(str(tmp_path))
        base = {"job": "build_dataset", "arguments": {}, "checkpoints": {},
                "command": "python -m pipelines.build_dataset"}
        samples = p | "NoSamples" >> beam.Create([])
        (inputs, counted, files, samples) | Finish(str(tmp_path), base, [], min_face_skin=0.15)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["accounting"] == {
        "inputs": 3, "kept": 1, "filtered": 0, "failed": 1, "patches": 4, "outcome_rows": 2, "ok": False,
    }
    assert (tmp_path / "report.png").exists() and not (tmp_path / "_temporary").exists()
    with pytest.raises(IncompleteDatasetError, match="do not add up"):
        read_table(str(tmp_path), "faces")
