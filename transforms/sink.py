"""Sink: rows -> Parquet files through storage, each row exactly once.

Each bundle writes its rows to ``_temporary/`` and only the bundles that committed are
renamed into place, so a retried bundle never leaves a duplicate row.
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindows

from models.dataset import MANIFEST, join
from transforms.storage import bucket_refusal, has_entries, makedirs, move, open_file, remove

TEMP_DIR = "_temporary"


class OutputError(ValueError):
    """The output location cannot be used as asked; raised before any work."""


def prepare_output(root: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse a non-empty output unless ``overwrite`` (clear it, manifest first) or ``resume`` (keep it)."""
    try:
        refusal = bucket_refusal(root, "output")
        if refusal:
            raise OutputError(refusal)
        existing = has_entries(root)
        if existing and resume:
            return
        if existing and not overwrite:
            raise OutputError(
                f"output {root} is not empty: pass --resume to finish or extend the run that wrote it, --overwrite "
                "to replace it, or choose another --output"
            )
        if existing:
            # The manifest goes first: a rerun killed halfway must never look complete.
            remove(join(root, MANIFEST))
            remove(root)
        makedirs(root)
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
            self._file = open_file(self.path, "wb", auto_mkdir=True).open()
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


def _commit(temp_paths: Sequence[str], root: str, subdir: str, run: int) -> list[str]:
    """Rename the committed temporary files to ``part-rRR-XXXXX-of-YYYYY.parquet``: run RR's files."""
    makedirs(join(root, subdir))
    final = []
    for i, temp in enumerate(sorted(temp_paths)):
        target = join(root, subdir, f"part-r{run:02d}-{i:05d}-of-{len(temp_paths):05d}.parquet")
        move(temp, target)
        final.append(target)
    return final


class WriteParquet(beam.PTransform):
    """Dict rows -> Parquet files under ``root/subdir`` with ``schema``, named for the ``run`` that wrote them."""

    def __init__(self, root: str, subdir: str, schema: pa.Schema, rows_per_group: int = 256, compression: str = "zstd",
                 run: int = 1):
        super().__init__()
        self._root, self._subdir, self._run = root, subdir, run
        self._fn = _WriteBundles(root, subdir, schema, rows_per_group, compression)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        root, subdir, run = self._root, self._subdir, self._run
        return (
            rows
            | "WriteBundles" >> beam.ParDo(self._fn)
            | "CollectFiles" >> beam.combiners.ToList()
            | "Commit" >> beam.Map(_commit, root, subdir, run)
        )
