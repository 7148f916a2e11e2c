"""Read an existing patch dataset (a ``build_dataset`` output) back as faces with their patches.

This lets ``score`` re-score a dataset without decoding and segmenting the originals again:
the patches were cut and filtered when the dataset was built.

The patch images never go through a shuffle. Planning reads only the ``image_id`` column and
emits where each face's rows lie (file, row group, row numbers); those small refs are grouped
by face, then by the row group they start in, and only then are the image bytes read: each
row group once for all the faces that start in it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from models.dataset import MANIFEST, PATCHES_DIR, join
from transforms.records import OUTCOME, ImageRecord, Outcome, Patch
from transforms.resume import SkipDone
from transforms.storage import find_files, is_dir, is_file, open_exact

STAGE = "read"
COLUMNS = ["image_id", "label", "x", "y", "size", "skin_fraction", "image", "source_uri", "split"]
# All that planning reads: the id of every row, never its image or mask.
PLAN_COLUMNS = ["image_id"]


@dataclass(frozen=True, order=True)
class PatchRows:
    """Where some of one face's patch rows lie: row numbers within one row group of one file."""

    uri: str
    row_group: int
    rows: tuple[int, ...]

    @property
    def unit(self) -> tuple[str, int]:
        return self.uri, self.row_group


FaceRows = tuple[str, tuple[PatchRows, ...]]
# What each shuffle carries, declared so that Beam picks deterministic coders for the keys.
PLANNED = tuple[str, PatchRows]
KEYED_FACES = tuple[tuple[str, int], FaceRows]


def is_patch_dataset(uri: str) -> bool:
    """Whether ``uri`` is a finished build_dataset output."""
    return is_file(join(uri, MANIFEST)) and is_dir(join(uri, PATCHES_DIR))


def patch_files(uri: str) -> list[str]:
    return find_files(join(uri, PATCHES_DIR), ".parquet")


def plan_faces(uri: str) -> Iterator[tuple[str, PatchRows]]:
    """One patch file -> (image_id, where its rows lie) per face and row group, from the id column alone."""
    with open_exact(uri) as f:
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            rows: dict[str, list[int]] = defaultdict(list)
            for i, image_id in enumerate(pf.read_row_group(rg, columns=PLAN_COLUMNS).column(0).to_pylist()):
                rows[image_id].append(i)
            for image_id, numbers in rows.items():
                yield image_id, PatchRows(uri, rg, tuple(numbers))


def by_first_unit(image_id: str, parts: Iterable[PatchRows]) -> tuple[tuple[str, int], FaceRows]:
    """Key a face's refs by the row group its first rows lie in, so that group is read once for all its faces."""
    ordered = tuple(sorted(parts))
    return ordered[0].unit, (image_id, ordered)


class _ReadFaces(beam.DoFn):
    """(row group, the faces that start in it) -> ImageRecords with decoded patches, or failed Outcomes."""

    def setup(self) -> None:
        self._inputs = Metrics.counter("acne", "inputs")

    def process(self, element: tuple[tuple[str, int], Iterable[FaceRows]]) -> Iterator[Any]:
        faces = list(element[1])
        # A face cut by a row-group boundary also needs the next group; each group is read once here.
        tables = read_units({part.unit for _, parts in faces for part in parts})
        for image_id, parts in faces:
            self._inputs.inc()
            face = assemble_face(image_id, [r for part in parts for r in tables[part.unit].take(part.rows).to_pylist()])
            yield beam.pvalue.TaggedOutput(OUTCOME, face) if isinstance(face, Outcome) else face


def read_units(units: Iterable[tuple[str, int]]) -> dict[tuple[str, int], pa.Table]:
    """The ``COLUMNS`` of each (file, row group), opening each file once."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for uri, rg in units:
        by_file[uri].append(rg)
    tables = {}
    for uri, row_groups in by_file.items():
        with open_exact(uri) as f:
            pf = pq.ParquetFile(f)
            for rg in row_groups:
                tables[uri, rg] = pf.read_row_group(rg, columns=COLUMNS)
    return tables


def assemble_face(image_id: str, rows: list[dict[str, Any]]) -> ImageRecord | Outcome:
    """All patch rows of one face -> an ImageRecord with decoded patches, or a failed Outcome."""
    rows = sorted(rows, key=lambda r: (r["y"], r["x"]))
    first = rows[0]
    try:
        patches = tuple(_patch(r) for r in rows)
    except ValueError as exc:
        return Outcome.failed(image_id, first["source_uri"], STAGE, exc, first["split"])
    return ImageRecord(image_id, first["source_uri"], label=first["label"], split=first["split"], patches=patches)


def _patch(row: dict[str, Any]) -> Patch:
    pixels = cv2.imdecode(np.frombuffer(row["image"]["bytes"] or b"", np.uint8), cv2.IMREAD_COLOR_RGB)
    if pixels is None:
        raise ValueError(f"patch at x={row['x']} y={row['y']} could not be decoded")
    return Patch(row["x"], row["y"], row["size"], row["skin_fraction"], pixels, None)


class ReadPatchDataset(beam.PTransform):
    """A build_dataset output -> (faces with patches, failed Outcomes, the number of faces read)."""

    def __init__(self, uri: str, done_list: Optional[str] = None):
        super().__init__()
        self._uri, self._done_list = uri, done_list

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
        planned = (
            pbegin
            | "PatchFiles" >> beam.Create(patch_files(self._uri))
            | "SpreadFiles" >> beam.Reshuffle()
            | "PlanRows" >> beam.FlatMap(plan_faces).with_output_types(PLANNED)
            | "GroupByFace" >> beam.GroupByKey()
        )
        inputs = planned | "CountInputs" >> beam.combiners.Count.Globally()
        if self._done_list:
            planned = planned | "SkipDone" >> beam.ParDo(SkipDone(self._done_list))
        faces = (
            planned
            | "KeyByRowGroup" >> beam.MapTuple(by_first_unit).with_output_types(KEYED_FACES)
            | "GroupByRowGroup" >> beam.GroupByKey()
            | "ReadFaces" >> beam.ParDo(_ReadFaces()).with_outputs(OUTCOME, main="faces")
        )
        return faces.faces, faces[OUTCOME], inputs
