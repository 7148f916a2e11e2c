"""Sink: rows -> Parquet files through storage, each row exactly once.

Each bundle writes its rows to ``_temporary/`` and only the bundles that committed are
renamed into place, so a retried bundle never leaves a duplicate row. A bundle closes a file
every ``rows_per_file`` rows: a runner may hand one worker a long bundle (the DirectRunner gives
each worker its whole share), and closed files are what ``--resume`` can keep after a kill.
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindows

from models.dataset import MANIFEST, join
from transforms.storage import bucket_refusal, entries, makedirs, move, open_file, remove

TEMP_DIR = "_temporary"
# The marker of the job that holds the output (``transforms.lock``); not part of its contents.
LOCK = "_lock.json"
# Tables with one row per face close a file every 128 faces: the most a kill can lose per writer.
FACE_ROWS_PER_FILE = 128


class OutputError(ValueError):
    """The output location cannot be used as asked; raised before any work."""


def prepare_output(root: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse a non-empty output unless ``overwrite`` (clear it, manifest first) or ``resume`` (keep it).

    The job's lock marker, taken before, is neither content nor cleared.
    """
    try:
        refusal = bucket_refusal(root, "output")
        if refusal:
            raise OutputError(refusal)
        existing = [e for e in entries(root) if e.rsplit("/", 1)[-1] != LOCK]
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
            for entry in existing:
                remove(entry)
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
    """Rows -> temporary Parquet files, a new one every ``rows_per_file`` rows; yields a bundle's files
    once it commits."""

    def __init__(self, root: str, subdir: str, schema: pa.Schema, rows_per_group: int, compression: str,
                 rows_per_file: int):
        self._root, self._subdir, self._schema = root, subdir, schema
        self._rows_per_group = rows_per_group
        self._compression = compression
        self._rows_per_file = rows_per_file

    def start_bundle(self) -> None:
        self._closed: list[str] = []
        self._open_file()

    def _open_file(self) -> None:
        path = join(self._root, TEMP_DIR, self._subdir, f"{uuid.uuid4().hex}.parquet")
        self._sink = RowGroupWriter(path, self._schema, self._rows_per_group, self._compression)
        self._rows = 0

    def _close_file(self) -> None:
        if self._sink.close():
            self._closed.append(self._sink.path)

    def process(self, row: Mapping[str, Any]) -> None:
        self._sink.add([row])
        self._rows += 1
        if self._rows >= self._rows_per_file:
            self._close_file()
            self._open_file()

    def finish_bundle(self) -> Iterator[Any]:
        self._close_file()
        for path in self._closed:
            yield GlobalWindows.windowed_value(path)


def _commit(temp_paths: Sequence[str], root: str, subdir: str, run: int, name: str) -> list[str]:
    """Rename the committed temporary files to ``part-rRR[-NAME]-XXXXX-of-YYYYY.parquet``: run RR's files
    (NAME tells apart the writers that share a table)."""
    makedirs(join(root, subdir))
    final = []
    stem = f"part-r{run:02d}" + (f"-{name}" if name else "")
    for i, temp in enumerate(sorted(temp_paths)):
        target = join(root, subdir, f"{stem}-{i:05d}-of-{len(temp_paths):05d}.parquet")
        move(temp, target)
        final.append(target)
    return final


class WriteParquet(beam.PTransform):
    """Dict rows -> Parquet files under ``root/subdir`` with ``schema``, named for the ``run`` that wrote them."""

    def __init__(self, root: str, subdir: str, schema: pa.Schema, rows_per_group: int = 256, compression: str = "zstd",
                 run: int = 1, rows_per_file: int = FACE_ROWS_PER_FILE, name: str = ""):
        super().__init__()
        self._root, self._subdir, self._run, self._name = root, subdir, run, name
        self._fn = _WriteBundles(root, subdir, schema, rows_per_group, compression, rows_per_file)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        root, subdir, run, name = self._root, self._subdir, self._run, self._name
        return (
            rows
            | "WriteBundles" >> beam.ParDo(self._fn)
            | "CollectFiles" >> beam.combiners.ToList()
            | "Commit" >> beam.Map(_commit, root, subdir, run, name)
        )
