"""Read an existing patch dataset (a ``build_dataset`` output) back as faces with their patches.

This lets ``score`` re-score a dataset without decoding and segmenting the originals again:
the patches were cut and filtered when the dataset was built.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import apache_beam as beam
import cv2
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from models.dataset import MANIFEST, PATCHES_DIR, join
from transforms.records import ImageRecord, Outcome, Patch
from transforms.storage import find_files, is_dir, is_file, open_file

STAGE = "read"
COLUMNS = ["image_id", "label", "x", "y", "size", "skin_fraction", "image", "source_uri", "split"]


def is_patch_dataset(uri: str) -> bool:
    """Whether ``uri`` is a finished build_dataset output."""
    return is_file(join(uri, MANIFEST)) and is_dir(join(uri, PATCHES_DIR))


def patch_files(uri: str) -> list[str]:
    return find_files(join(uri, PATCHES_DIR), ".parquet")


def _rows(uri: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_file(uri) as f:
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            for row in pf.read_row_group(rg, columns=COLUMNS).to_pylist():
                yield row["image_id"], row


class _AssembleFace(beam.DoFn):
    """All patch rows of one face -> an ImageRecord with decoded patches, or a failed Outcome."""

    def __init__(self) -> None:
        self.inputs = Metrics.counter("acne", "inputs")

    def process(self, element: tuple[str, Iterable[dict[str, Any]]]) -> Iterator[Any]:
        image_id, rows = element
        rows = sorted(rows, key=lambda r: (r["y"], r["x"]))
        self.inputs.inc()
        first = rows[0]
        try:
            patches = tuple(_patch(r) for r in rows)
        except ValueError as exc:
            yield beam.pvalue.TaggedOutput("outcome", Outcome.failed(image_id, first["source_uri"], STAGE, exc))
            return
        yield ImageRecord(
            image_id, first["source_uri"], label=first["label"], split=first["split"], patches=patches
        )


def _patch(row: dict[str, Any]) -> Patch:
    pixels = cv2.imdecode(np.frombuffer(row["image"]["bytes"] or b"", np.uint8), cv2.IMREAD_COLOR_RGB)
    if pixels is None:
        raise ValueError(f"patch at x={row['x']} y={row['y']} could not be decoded")
    return Patch(row["x"], row["y"], row["size"], row["skin_fraction"], pixels, None)


class ReadPatchDataset(beam.PTransform):
    """A build_dataset output -> (faces with patches, failed Outcomes, the number of faces read)."""

    def __init__(self, uri: str):
        super().__init__()
        self._uri = uri

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[beam.PCollection, beam.PCollection]:
        faces = (
            pbegin
            | "PatchFiles" >> beam.Create(patch_files(self._uri))
            | "SpreadFiles" >> beam.Reshuffle()
            | "Rows" >> beam.FlatMap(_rows)
            | "GroupByFace" >> beam.GroupByKey()
            | "AssembleFaces" >> beam.ParDo(_AssembleFace()).with_outputs("outcome", main="faces")
        )
        inputs = faces.faces | "CountFaces" >> beam.combiners.Count.Globally()
        failed_n = faces.outcome | "CountFailed" >> beam.combiners.Count.Globally()
        total = (inputs, failed_n) | "BothCounts" >> beam.Flatten() | "CountInputs" >> beam.CombineGlobally(sum)
        return faces.faces, faces.outcome, total
