"""Read: planned ImageRefs -> image records, bytes read next to the stages that use them.

The refs, not the image bytes, are shuffled by image id (see ``transforms.plan``). That one
shuffle removes duplicate ids and spreads a single huge shard over every worker, so memory
stays flat whatever the input size.

Every ref read from a pattern counts as one input image; a member that cannot be read
becomes a failed ``Outcome`` instead of vanishing.

The plan refused every image whose container declares more than ``--max-image-bytes``; declared
sizes can lie, so each read also stops one byte past the limit, and an image that reaches it fails.
"""
from __future__ import annotations

import zipfile
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.utils.shared import Shared

from transforms.plan import DEFAULT_MAX_IMAGE_BYTES, STAGE, BytesOverLimit, PlanShards, input_files
from transforms.progress import PLANNED, CountProgress
from transforms.records import ImageRecord, ImageRef, Outcome
from transforms.resume import SkipDone
from transforms.sidefiles import (
    AnnotationError, LabelFiles, load_ffhq_categories, load_labels, voc_boxes,
)
from transforms.storage import open_exact, read_range, with_retries
from transforms.tfrecord import example_pixels, unframe


def _at_most(data: bytes, limit: int, what: str) -> bytes:
    """``data`` (read with one byte to spare), or an error when it reached past ``limit``."""
    if len(data) > limit:
        raise BytesOverLimit(
            f"{what} holds more than the limit of {limit:,} bytes (--max-image-bytes), more than its container "
            "declared; reading stopped there"
        )
    return data


class _ShardReader:
    """Reads image bytes for refs: loose images, tar members and TFRecord records by exact byte
    range, zip members and Parquet row groups through a few unbuffered shard handles kept open
    between calls. No read goes more than one byte past ``limit``, whatever a header says.

    Each read is retried on transient errors, on a freshly opened handle.
    """

    def __init__(self, limit: int = DEFAULT_MAX_IMAGE_BYTES, max_open: int = 4, attempts: int = 3,
                 base_delay: float = 0.2):
        self._limit = limit
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max_open
        self._attempts = attempts
        self._base_delay = base_delay

    def _handle(self, uri: str, kind: str) -> Any:
        if uri in self._open:
            self._open.move_to_end(uri)
            return self._open[uri]
        f = open_exact(uri)
        handle = zipfile.ZipFile(f) if kind == "zip" else f
        self._open[uri] = handle
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)[1].close()
        return handle

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def _forget(self, uri: str) -> None:
        handle = self._open.pop(uri, None)
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass  # the handle is already broken; a new one replaces it

    def read(self, ref: ImageRef) -> bytes:
        return with_retries(
            lambda: self._read_once(ref), self._attempts, self._base_delay, ref.source_uri,
            lambda: self._forget(ref.shard_uri),
        )

    def _read_once(self, ref: ImageRef) -> bytes:
        if ref.kind == "image":
            # The file may have grown since it was listed.
            return _at_most(read_range(ref.shard_uri, 0, self._limit + 1), self._limit, "the file")
        if ref.kind == "zip":
            with self._handle(ref.shard_uri, "zip").open(ref.member) as member:
                return _at_most(member.read(self._limit + 1), self._limit, f"zip member {ref.member}")
        # The plan checked the declared size: the exact range is within the limit.
        data = read_range(ref.shard_uri, ref.offset, ref.size)
        if len(data) != ref.size:
            what = f"record {ref.row}" if ref.kind == "tfrecord" else f"tar member {ref.member}"
            raise EOFError(f"{what} is truncated: {len(data)} of {ref.size} bytes present")
        return unframe(data, ref.offset) if ref.kind == "tfrecord" else data

    def read_row_group(
        self, refs: Sequence[ImageRef]
    ) -> Iterator[tuple[ImageRef, bytes | BytesOverLimit | None]]:
        """Each ref's cell, a cell at a time; the row group itself is read (and may fail) first."""
        first = refs[0]

        def read() -> pa.ChunkedArray:
            # As a dictionary: a value that many rows repeat is held once, not once per row.
            pf = pq.ParquetFile(self._handle(first.shard_uri, "parquet"), read_dictionary=[first.member])
            column = pf.read_row_group(first.row_group, columns=[first.member]).column(0)
            return pc.struct_field(column, "bytes") if pa.types.is_struct(column.type) else column

        cells = with_retries(
            read, self._attempts, self._base_delay, f"{first.shard_uri}#rg{first.row_group}",
            lambda: self._forget(first.shard_uri),
        )
        # Sizes first: an oversized cell is never copied out of Arrow's buffers.
        sizes = [n for chunk in cells.chunks
                 for n in pc.binary_length(chunk.dictionary).take(chunk.indices).to_pylist()]
        return ((ref, self._cell(cells, sizes[ref.row], ref)) for ref in refs)

    def _cell(self, cells: pa.ChunkedArray, size: Optional[int], ref: ImageRef) -> bytes | BytesOverLimit | None:
        if size is not None and size > self._limit:
            return BytesOverLimit(
                f"Parquet cell {ref.source_uri} holds {size:,} bytes, over the limit of {self._limit:,} "
                "(--max-image-bytes)"
            )
        return cells[ref.row].as_py()


def pick_unique(image_id: str, refs: Iterable[ImageRef]) -> Iterator[Any]:
    """Keep one ref per id, deterministically (smallest source URI); the rest fail as duplicates."""
    ordered = sorted(refs, key=lambda r: r.source_uri)
    yield ordered[0]
    for dup in ordered[1:]:
        yield beam.pvalue.TaggedOutput(
            "outcome",
            Outcome.failed(image_id, dup.source_uri, STAGE, f"duplicate image id {image_id!r}; kept {ordered[0].source_uri}"),
        )


class _JoinData:
    """The id -> label and id -> FFHQ category maps one worker process shares across its threads."""

    def __init__(self, labels: LabelFiles | None, ffhq_metadata: str | None):
        self.labels = load_labels(labels) if labels is not None else None
        self.ffhq = load_ffhq_categories(ffhq_metadata) if ffhq_metadata is not None else None


class ReadBytes(beam.DoFn):
    """ImageRef(s) -> ImageRecord with bytes, label and metadata attached.

    Labels and FFHQ metadata come as URIs and are loaded in ``setup``, once per worker process
    (``Shared``); ``transforms.sidefiles`` says why.
    """

    def __init__(
        self,
        labels: LabelFiles | None,
        ffhq_metadata: str | None,
        voc_annotations: bool,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        attempts: int = 3,
        base_delay: float = 0.2,
    ):
        self._labels_files = labels
        self._ffhq_uri = ffhq_metadata
        self._voc = voc_annotations
        self._max_image_bytes = max_image_bytes
        self._retry = (attempts, base_delay)
        self._shared = Shared()

    def setup(self) -> None:
        self._reader = _ShardReader(self._max_image_bytes, attempts=self._retry[0], base_delay=self._retry[1])
        self._join = self._shared.acquire(lambda: _JoinData(self._labels_files, self._ffhq_uri))
        self._labels, self._ffhq = self._join.labels, self._join.ffhq

    def teardown(self) -> None:
        self._reader.close()

    def process(self, element: ImageRef | tuple[Any, Iterable[ImageRef]]) -> Iterator[Any]:
        if isinstance(element, ImageRef):
            pairs = self._read_one(element)
        else:
            refs = sorted(element[1], key=lambda r: r.row)
            try:
                pairs = self._reader.read_row_group(refs)
            except Exception as exc:
                pairs = ((ref, exc) for ref in refs)
        for ref, data in pairs:
            if isinstance(data, BaseException):
                yield beam.pvalue.TaggedOutput("outcome", Outcome.failed(ref.image_id, ref.source_uri, STAGE, data))
                continue
            record = self._record(ref, data)
            if isinstance(record, Outcome):
                yield beam.pvalue.TaggedOutput("outcome", record)
            else:
                yield record

    def _read_one(self, ref: ImageRef) -> list[tuple[ImageRef, Any]]:
        try:
            return [(ref, self._reader.read(ref))]
        except Exception as exc:
            return [(ref, exc)]

    def _record(self, ref: ImageRef, data: bytes | None) -> ImageRecord | Outcome:
        meta: dict[str, Any] = {}
        if self._ffhq is not None and ref.image_id in self._ffhq:
            meta["category"] = self._ffhq[ref.image_id]
        if self._voc and ref.kind == "image":
            try:
                meta["lesions"] = voc_boxes(ref.shard_uri)
            except AnnotationError as exc:
                return Outcome.failed(ref.image_id, ref.source_uri, STAGE, f"unreadable VOC annotation: {exc}")
        shape = None
        if ref.kind == "tfrecord":
            try:
                data, shape = example_pixels(data or b"")
            except ValueError as exc:
                return Outcome.failed(ref.image_id, ref.source_uri, STAGE, exc)
        label = None
        if self._labels is not None:
            label = self._labels.get(ref.image_id)
            if label is None:
                return Outcome.failed(
                    ref.image_id, ref.source_uri, "label", f"no label for image id {ref.image_id!r} in --labels-csv"
                )
        return ImageRecord(ref.image_id, ref.source_uri, data=data or b"", label=label, meta=meta, raw_shape=shape)


def _read_unit(ref: ImageRef) -> tuple[str, int]:
    return ref.shard_uri, ref.row_group


class ReadImages(beam.PTransform):
    """Patterns -> (ImageRecords, failed Outcomes, the number of input images as a singleton).

    Every planned image, and every shard part that could not be planned, is one input.

    Label files and FFHQ metadata are passed by URI and loaded by the workers, so the job graph
    stays the same size whatever theirs.
    """

    def __init__(
        self,
        patterns: Sequence[str],
        labels: LabelFiles | None = None,
        ffhq_metadata: str | None = None,
        voc_annotations: bool = False,
        done_list: Optional[str] = None,
        progress: Optional[str] = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ):
        super().__init__()
        self._patterns = list(patterns)
        self._done_list = done_list
        self._progress = progress
        self._max_image_bytes = max_image_bytes
        self._read = ReadBytes(labels, ffhq_metadata, voc_annotations, max_image_bytes)

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[beam.PCollection, beam.PCollection]:
        planned = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "ExpandPatterns" >> beam.FlatMap(input_files)
            | "SpreadShards" >> beam.Reshuffle()
            | "PlanShards" >> beam.ParDo(PlanShards(self._max_image_bytes)).with_outputs("outcome", main="refs")
        )
        if self._progress:
            for name, found in (("Refs", planned.refs), ("Unplannable", planned.outcome)):
                found | f"CountPlanned{name}" >> beam.ParDo(CountProgress(self._progress, PLANNED))
        unique = (
            planned.refs
            | "KeyById" >> beam.Map(lambda ref: (ref.image_id, ref))
            | "GroupById" >> beam.GroupByKey()
            | "DropDuplicates" >> beam.FlatMapTuple(pick_unique).with_outputs("outcome", main="refs")
        )
        refs, outcomes = unique.refs, (planned.outcome, unique.outcome)
        if self._done_list:
            # After the duplicates are settled, so that a resumed run keeps the same image of each id.
            refs = refs | "SkipDone" >> beam.ParDo(SkipDone(self._done_list))
            outcomes = tuple(o | f"SkipDone{i}" >> beam.ParDo(SkipDone(self._done_list)) for i, o in enumerate(outcomes))
        by_kind = refs | "ByKind" >> beam.Partition(lambda ref, n: int(ref.kind == "parquet"), 2)
        row_groups = (
            by_kind[1]
            | "KeyByRowGroup" >> beam.Map(lambda ref: (_read_unit(ref), ref))
            | "GroupByRowGroup" >> beam.GroupByKey()
        )
        # Flatten the small refs, not the records: a runner may materialise a Flatten's inputs
        # (the DirectRunner always does), and records carry every image's bytes.
        units = (by_kind[0], row_groups) | "ReadUnits" >> beam.Flatten()
        read = units | "ReadFiles" >> beam.ParDo(self._read).with_outputs("outcome", main="records")
        failed = (*outcomes, read.outcome) | "ReadFailures" >> beam.Flatten()
        inputs = (
            (planned.refs | "CountRefs" >> beam.combiners.Count.Globally(),
             planned.outcome | "CountUnplannable" >> beam.combiners.Count.Globally())
            | "BothCounts" >> beam.Flatten()
            | "CountInputs" >> beam.CombineGlobally(sum)
        )
        return read.records, failed, inputs
