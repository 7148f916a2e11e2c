"""Write: Parquet tables through fsspec, outcome accounting, progress, and the manifest.

Each bundle writes its rows to ``_temporary/`` and only the bundles that committed are
renamed into place, so a retried bundle never leaves a duplicate row. The job's last step,
``Finish``, waits for every table, checks that every input was counted exactly once, and
writes ``manifest.json``: inside the pipeline, so a job launched and left (a Flex Template,
a detached Dataflow run) still ends with a checked manifest.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict
from importlib import metadata
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from models.dataset import ERROR_SCHEMA, ERRORS_DIR, FACES_DIR, MANIFEST, OUTCOME_SCHEMA, join, write_manifest
from transforms.read import missing_bucket
from transforms.records import FAILED, FILTERED, KEPT, Outcome
from transforms.report import write_report

NAMESPACE = "acne"
TEMP_DIR = "_temporary"
PACKAGES = ("apache-beam", "torch", "segmentation-models-pytorch", "timm", "pyarrow", "fsspec", "opencv-python-headless")

log = logging.getLogger("acne")


class OutputError(ValueError):
    """The output location cannot be used as asked; raised before any work."""


def prepare_output(root: str, overwrite: bool) -> None:
    """Refuse a non-empty output unless ``overwrite``; then clear it, manifest first."""
    try:
        fs, path = fsspec.core.url_to_fs(root)
        # Object stores would create a mistyped bucket on the first write; refuse instead.
        gone = missing_bucket(root)
        if gone:
            raise OutputError(
                f"output bucket {gone} does not exist, or these credentials cannot see it: create it first "
                "(jobs never create buckets) or fix --output"
            )
        existing = fs.exists(path) and bool(fs.ls(path))
        if existing and not overwrite:
            raise OutputError(f"output {root} is not empty: pass --overwrite to replace it, or choose another --output")
        if existing:
            # The manifest goes first: a rerun killed halfway must never look complete.
            if fs.exists(join(path, MANIFEST)):
                fs.rm(join(path, MANIFEST))
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"cannot prepare output {root}: {type(exc).__name__}: {exc}") from exc


class RowGroupWriter:
    """Rows -> one Parquet file at an fsspec URL, a row group at a time so memory stays flat."""

    def __init__(self, path: str, schema: pa.Schema, rows_per_group: int, compression: str):
        self.path = path
        self._schema, self._rows_per_group, self._compression = schema, rows_per_group, compression
        self._rows: list[Mapping[str, Any]] = []
        self._file = self._writer = None

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self._rows.extend(rows)
        if len(self._rows) >= self._rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._file = fsspec.open(self.path, "wb", auto_mkdir=True).open()
            self._writer = pq.ParquetWriter(self._file, self._schema, compression=self._compression)
        self._writer.write_table(pa.Table.from_pylist(self._rows, self._schema))
        self._rows = []

    def close(self) -> bool:
        """Flush and close; whether the file holds any rows (no file is made for none)."""
        self._flush()
        if self._writer is None:
            return False
        self._writer.close()
        self._file.close()
        return True


class _WriteBundles(beam.DoFn):
    """Rows -> one temporary Parquet file per bundle; yields the files it committed."""

    def __init__(self, root: str, subdir: str, schema: pa.Schema, rows_per_group: int, compression: str):
        self._root, self._subdir, self._schema = root, subdir, schema
        self._rows_per_group = rows_per_group
        self._compression = compression

    def start_bundle(self) -> None:
        path = join(self._root, TEMP_DIR, self._subdir, f"{uuid.uuid4().hex}.parquet")
        self._sink = RowGroupWriter(path, self._schema, self._rows_per_group, self._compression)

    def process(self, row: Mapping[str, Any]) -> None:
        self._sink.add([row])

    def finish_bundle(self) -> Iterator[Any]:
        if self._sink.close():
            yield GlobalWindows.windowed_value(self._sink.path)


def _commit(temp_paths: Sequence[str], root: str, subdir: str) -> list[str]:
    """Rename the committed temporary files to ``part-XXXXX-of-YYYYY.parquet``."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(join(path, subdir), exist_ok=True)
    final = []
    for i, temp in enumerate(sorted(temp_paths)):
        target = join(root, subdir, f"part-{i:05d}-of-{len(temp_paths):05d}.parquet")
        fs.mv(fsspec.core.url_to_fs(temp)[1], fsspec.core.url_to_fs(target)[1])
        final.append(target)
    return final


class WriteParquet(beam.PTransform):
    """Dict rows -> Parquet files under ``root/subdir`` with ``schema``."""

    def __init__(self, root: str, subdir: str, schema: pa.Schema, rows_per_group: int = 256, compression: str = "zstd"):
        super().__init__()
        self._root, self._subdir = root, subdir
        self._fn = _WriteBundles(root, subdir, schema, rows_per_group, compression)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        root, subdir = self._root, self._subdir
        return (
            rows
            | "WriteBundles" >> beam.ParDo(self._fn)
            | "CollectFiles" >> beam.combiners.ToList()
            | "Commit" >> beam.Map(_commit, root, subdir)
        )


def outcome_row(outcome: Outcome) -> dict[str, Any]:
    return asdict(outcome)


def error_row(outcome: Outcome) -> dict[str, Any]:
    return {
        "image_id": outcome.image_id,
        "source_uri": outcome.source_uri,
        "stage": outcome.stage,
        "error_type": outcome.error_type,
        "message": outcome.reason,
    }


class CountOutcomes(beam.DoFn):
    """Counts every outcome once, and logs progress (counts and rate) as the job runs."""

    def __init__(self, every_s: float = 10.0):
        self._every_s = every_s
        self.counters = {s: Metrics.counter(NAMESPACE, f"outcome_{s}") for s in (KEPT, FILTERED, FAILED)}

    def setup(self) -> None:
        self._start = self._last = time.monotonic()
        self._seen = {KEPT: 0, FILTERED: 0, FAILED: 0}

    def process(self, outcome: Outcome) -> Iterator[Outcome]:
        self.counters[outcome.status].inc()
        self._seen[outcome.status] += 1
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            done = sum(self._seen.values())
            log.info(
                "progress: %d images (kept %d, filtered %d, failed %d), %.2f images/s in this worker",
                done, self._seen[KEPT], self._seen[FILTERED], self._seen[FAILED], done / (now - self._start),
            )
        yield outcome


class WriteOutcomes(beam.PTransform):
    """Outcomes -> ``faces/`` (every input) and ``errors/`` (the failed ones), counted once each."""

    def __init__(self, root: str):
        super().__init__()
        self._root = root

    def expand(self, outcomes: beam.PCollection) -> beam.PCollection:
        counted = outcomes | "Count" >> beam.ParDo(CountOutcomes())
        faces = counted | "FaceRows" >> beam.Map(outcome_row) | "WriteFaces" >> WriteParquet(
            self._root, FACES_DIR, OUTCOME_SCHEMA
        )
        errors = (
            counted
            | "OnlyFailed" >> beam.Filter(lambda o: o.status == FAILED)
            | "ErrorRows" >> beam.Map(error_row)
            | "WriteErrors" >> WriteParquet(self._root, ERRORS_DIR, ERROR_SCHEMA)
        )
        return (faces, errors) | "OutcomeFiles" >> beam.Flatten()


def row_counts(root: str, subdirs: Iterable[str]) -> dict[str, int]:
    """Rows per table, from Parquet footers alone."""
    fs, path = fsspec.core.url_to_fs(root)
    counts = {}
    for subdir in subdirs:
        files = fs.glob(join(path, subdir) + "/*.parquet")
        counts[subdir] = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    return counts


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class TallyOutcomes(beam.CombineFn):
    """Outcomes -> {kept, filtered, failed, patches}."""

    def create_accumulator(self) -> dict[str, int]:
        return {KEPT: 0, FILTERED: 0, FAILED: 0, "patches": 0}

    def add_input(self, acc: dict[str, int], outcome: Outcome) -> dict[str, int]:
        acc[outcome.status] += 1
        acc["patches"] += outcome.patch_count
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, int]]) -> dict[str, int]:
        merged = self.create_accumulator()
        for acc in accs:
            for key, value in acc.items():
                merged[key] += value
        return merged

    def extract_output(self, acc: dict[str, int]) -> dict[str, int]:
        return acc


def accounting(inputs: int, tally: Mapping[str, int], face_rows: int) -> dict[str, Any]:
    """inputs = kept + filtered + failed, by the outcomes counted and by the rows actually written."""
    kept, filtered, failed = (tally.get(s, 0) for s in (KEPT, FILTERED, FAILED))
    return {
        "inputs": inputs,
        "kept": kept,
        "filtered": filtered,
        "failed": failed,
        "patches": tally.get("patches", 0),
        "outcome_rows": face_rows,
        "ok": inputs == kept + filtered + failed == face_rows,
    }


def finish(root: str, manifest: dict[str, Any]) -> None:
    """Remove temporary files, then write the manifest: the commit marker, always last."""
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(join(path, TEMP_DIR)):
        fs.rm(join(path, TEMP_DIR), recursive=True)
    write_manifest(root, manifest)


def _write_manifest(
    _: None, root: str, base: Mapping[str, Any], tables: Sequence[str], min_face_skin: float, launched_at: float,
    inputs: int, tally: Mapping[str, int], committed: Sequence[Sequence[str]],
) -> dict[str, Any]:
    rows = row_counts(root, [FACES_DIR, ERRORS_DIR, *tables])
    books = accounting(inputs, tally, rows[FACES_DIR])
    elapsed = time.time() - launched_at
    manifest = {
        **base,
        "accounting": books,
        "rows": rows,
        "files": sum(len(files) for files in committed),
        "run": {"seconds": round(elapsed, 2), "images_per_second": round(inputs / max(elapsed, 1e-9), 3)},
        "report": write_report(root, base["job"], min_face_skin),
    }
    finish(root, manifest)
    return manifest


class Finish(beam.PTransform):
    """(input count, outcomes, committed file lists) -> the manifest, written once everything else is."""

    def __init__(self, root: str, base: Mapping[str, Any], tables: Sequence[str], min_face_skin: float):
        super().__init__()
        self._args = (root, dict(base), list(tables), min_face_skin, time.time())

    def expand(self, pcolls: tuple[beam.PCollection, beam.PCollection, beam.PCollection]) -> beam.PCollection:
        inputs, outcomes, committed = pcolls
        tally = outcomes | "Tally" >> beam.CombineGlobally(TallyOutcomes())
        return (
            inputs.pipeline
            | "Once" >> beam.Create([None])
            | "WriteManifest" >> beam.Map(
                _write_manifest, *self._args, inputs=beam.pvalue.AsSingleton(inputs),
                tally=beam.pvalue.AsSingleton(tally), committed=beam.pvalue.AsList(committed),
            )
        )
