"""Read: input patterns -> image records, fanned out before any heavy work.

Shards are *planned* first: each loose file, tar member, zip member or Parquet row becomes
a small ``ImageRef``. The refs, not the image bytes, are shuffled by image id. That one
shuffle removes duplicate ids and spreads a single huge shard over every worker; the bytes
are then read next to the stages that use them, so memory stays flat whatever the input size.

Every ref read from a pattern counts as one input image; a shard that cannot be planned,
or a member that cannot be read, becomes a failed ``Outcome`` instead of vanishing.
"""
from __future__ import annotations

import csv
import json
import logging
import posixpath
import tarfile
import time
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar
from xml.etree import ElementTree

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from transforms.records import ImageRecord, ImageRef, Outcome

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
SHARD_KINDS = {".tar": "tar", ".zip": "zip", ".parquet": "parquet"}
ID_COLUMNS = ("image_id", "id", "key", "__key__")
STAGE = "read"
NAMESPACE = "acne"

log = logging.getLogger(__name__)

T = TypeVar("T")

# OSErrors that retrying cannot fix: the object is gone, or we may not read it.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts and other I/O hiccups are worth another try; the rest are not."""
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(exc, PERMANENT_OS_ERRORS)


def with_retries(
    fn: Callable[[], T],
    attempts: int = 3,
    base_delay: float = 0.2,
    what: str = "",
    on_retry: Optional[Callable[[], None]] = None,
) -> T:
    """Call ``fn``; on a transient error wait ``base_delay * 2**n`` and try again, ``attempts`` times in all.

    The last error propagates, so the caller can dead-letter the image it was reading.
    """
    for attempt in range(1, attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("transient error reading %s (attempt %d of %d), retrying: %s: %s",
                        what, attempt, attempts, type(exc).__name__, exc)
            if on_retry is not None:
                on_retry()
            time.sleep(base_delay * 2 ** (attempt - 1))
    return fn()


class InputError(ValueError):
    """An input pattern, label file or metadata file cannot be used; raised before any work."""


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def image_id_from_name(name: str) -> str:
    """A stable id from a file or member name: its stem (FFHQ ``00042.png`` -> ``00042``)."""
    base = posixpath.basename(name.rstrip("/"))
    return posixpath.splitext(base)[0]


def _webdataset_key(member: str) -> str:
    """webdataset groups ``dir/key.jpg`` and ``dir/key.cls`` by the part before the first dot."""
    return posixpath.basename(member).split(".", 1)[0]


def shard_kind(uri: str) -> str:
    ext = _ext(uri)
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return SHARD_KINDS.get(ext, "unsupported")


def expand_pattern(pattern: str) -> list[str]:
    """All files a pattern names, as full URLs, in sorted order.

    A folder means the images and shards below it: annotations, label files and READMEs beside
    the images are not inputs. A file named outright, or matched by a glob, always is.
    """
    fs, path = fsspec.core.url_to_fs(pattern)
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if shard_kind(p) != "unsupported"]
    else:
        paths = [path] if fs.exists(path) else []
    files = [p for p in paths if not fs.isdir(p)]
    return sorted(fs.unstrip_protocol(p) if "://" in pattern else p for p in files)


# Stores whose URLs start with a bucket that must exist before anything can be read or written.
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def missing_bucket(url: str) -> Optional[str]:
    """``scheme://bucket`` if ``url`` is on an object store and its bucket does not exist (or cannot be seen)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in BUCKET_PROTOCOLS:
        return None
    fs, path = fsspec.core.url_to_fs(url)
    bucket = path.split("/", 1)[0]
    return None if fs.exists(bucket) else f"{scheme}://{bucket}"


def _refuse_missing_bucket(pattern: str) -> None:
    """Say so plainly when a pattern's bucket does not exist (stores report it as a bare 404)."""
    try:
        gone = missing_bucket(pattern)
    except Exception:
        return  # the caller reports the listing error itself
    if gone:
        raise InputError(
            f"input {pattern!r}: bucket {gone} does not exist, or these credentials cannot see it. "
            "Check the bucket name (and the project or account it belongs to)."
        )


def check_patterns(patterns: Sequence[str]) -> int:
    """Fail fast on a pattern that matches nothing or cannot be listed; return the file count."""
    if not patterns:
        raise InputError("no --input given: pass one or more paths, globs or URLs (gs://, s3://, ...)")
    total = 0
    for pattern in patterns:
        try:
            files = expand_pattern(pattern)
        except Exception as exc:
            if not isinstance(exc, PermissionError):
                _refuse_missing_bucket(pattern)
            raise InputError(
                f"cannot list input {pattern!r}: {type(exc).__name__}: {exc}. Check the path, the bucket "
                "name and your credentials."
            ) from exc
        if not files:
            _refuse_missing_bucket(pattern)
            raise InputError(
                f"input {pattern!r} matches no files. Check the path; quote globs so the shell does not "
                "expand them, e.g. --input 'data/*/*.png'."
            )
        total += len(files)
    return total


def _normalise_id(value: str) -> str:
    return image_id_from_name(value.strip())


def load_labels(uris: Sequence[str], id_column: str, label_column: str) -> dict[str, str]:
    """Read label CSVs into {image id: label}; ids match by file stem (``a/b.jpg`` -> ``b``)."""
    labels: dict[str, str] = {}
    for uri in uris:
        try:
            with fsspec.open(uri, "rt", newline="") as f:
                reader = csv.DictReader(f)
                missing = {id_column, label_column} - set(reader.fieldnames or ())
                if missing:
                    raise InputError(
                        f"labels file {uri} has no column(s) {sorted(missing)}; its columns are "
                        f"{reader.fieldnames}. Set --id-column / --label-column."
                    )
                for row in reader:
                    labels[_normalise_id(row[id_column])] = row[label_column].strip()
        except (FileNotFoundError, PermissionError, OSError) as exc:
            raise InputError(f"cannot read labels file {uri}: {exc}") from exc
    return labels


def load_ffhq_metadata(uri: str) -> dict[str, dict[str, Any]]:
    """FFHQ's ``ffhq-dataset-v2.json`` -> {5-digit id: {category, landmarks}}."""
    try:
        with fsspec.open(uri, "rt") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read FFHQ metadata {uri}: {exc}") from exc
    meta = {}
    for index, entry in raw.items():
        image = entry.get("image", {})
        meta[f"{int(index):05d}"] = {
            "category": entry.get("category"),
            "landmarks": image.get("face_landmarks"),
        }
    return meta


def parse_voc_boxes(xml_bytes: bytes) -> list[tuple[int, int, int, int]]:
    """Pascal-VOC lesion boxes as (xmin, ymin, xmax, ymax)."""
    boxes = []
    for box in ElementTree.fromstring(xml_bytes).iter("bndbox"):
        coords = [int(float(box.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(tuple(coords))
    return boxes


def plan_shard(uri: str, attempts: int = 3, base_delay: float = 0.2) -> Iterator[ImageRef | Outcome]:
    """List the images one shard holds, without reading their bytes."""
    kind = shard_kind(uri)
    if kind == "image":
        yield ImageRef(image_id_from_name(uri), uri, "image")
        return
    if kind == "unsupported":
        yield Outcome.failed(
            image_id_from_name(uri), uri, STAGE,
            f"unsupported file type {_ext(uri) or '(none)'}: expected an image, .tar, .zip or .parquet",
        )
        return
    try:
        with with_retries(lambda: fsspec.open(uri, "rb").open(), attempts, base_delay, uri) as f:
            yield from {"tar": _plan_tar, "zip": _plan_zip, "parquet": _plan_parquet}[kind](uri, f)
    except Exception as exc:
        yield Outcome.failed(image_id_from_name(uri), uri, STAGE, exc)


def _plan_tar(uri: str, f: Any) -> Iterator[ImageRef | Outcome]:
    size = f.size if hasattr(f, "size") else None
    end = 0
    problem = None
    try:
        for member in tarfile.open(fileobj=f, mode="r:"):
            end = member.offset_data + member.size
            if member.isfile() and _ext(member.name) in IMAGE_EXTENSIONS:
                yield ImageRef(_webdataset_key(member.name), uri, "tar", member.name, member.offset_data, member.size)
    except tarfile.ReadError as exc:
        problem = str(exc)
    if size is not None and end > size:
        return  # The last member is cut off; reading it fails with its own reason.
    if problem is None and size is not None:
        # tarfile stops silently at a corrupt header: data after the last good member means lost members.
        f.seek(end + (-end % tarfile.BLOCKSIZE))
        if f.read(min(max(size - f.tell(), 0), 1 << 20)).strip(b"\0"):
            problem = "corrupt tar header"
    if problem is not None:
        yield Outcome.failed(
            f"{image_id_from_name(uri)}@{end}", f"{uri}#offset={end}", STAGE,
            f"{problem} after byte {end}: the members after it could not be read",
        )


def _plan_zip(uri: str, f: Any) -> Iterator[ImageRef]:
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if not info.is_dir() and _ext(info.filename) in IMAGE_EXTENSIONS:
                yield ImageRef(image_id_from_name(info.filename), uri, "zip", info.filename)


def image_column(schema: Any) -> str:
    """The column that holds image bytes: a binary column or an HF ``struct<bytes, path>``."""
    for field in schema:
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            return field.name
    for field in schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field.name
    raise ValueError(f"no image column: expected a binary column or struct<bytes, path>; schema is {schema}")


def _plan_parquet(uri: str, f: Any) -> Iterator[ImageRef | Outcome]:
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    column = image_column(schema)
    id_column = next((c for c in ID_COLUMNS if c in schema.names), None)
    has_path = pa.types.is_struct(schema.field(column).type) and schema.field(column).type.get_field_index("path") >= 0
    stem = image_id_from_name(uri)
    first_row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        try:
            if id_column:
                ids = [str(v) for v in pf.read_row_group(rg, columns=[id_column]).column(0).to_pylist()]
            elif has_path:
                paths = pf.read_row_group(rg, columns=[f"{column}.path"]).column(0).to_pylist()
                ids = [image_id_from_name(p["path"]) if p and p["path"] else f"{stem}-{first_row + i:06d}"
                       for i, p in enumerate(paths)]
            else:
                ids = [f"{stem}-{first_row + i:06d}" for i in range(n)]
        except Exception as exc:
            for i in range(n):
                yield Outcome.failed(f"{stem}-{first_row + i:06d}", f"{uri}#rg{rg}/row{i}", STAGE, exc)
        else:
            for i, image_id in enumerate(ids):
                yield ImageRef(image_id, uri, "parquet", column, row_group=rg, row=i)
        first_row += n


class _ShardReader:
    """Reads image bytes for refs, keeping a few shard handles open between calls.

    Each read is retried on transient errors, on a freshly opened handle.
    """

    def __init__(self, max_open: int = 4, attempts: int = 3, base_delay: float = 0.2):
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max_open
        self._attempts = attempts
        self._base_delay = base_delay

    def _handle(self, uri: str, kind: str) -> Any:
        if uri in self._open:
            self._open.move_to_end(uri)
            return self._open[uri]
        f = fsspec.open(uri, "rb").open()
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
            with fsspec.open(ref.shard_uri, "rb") as f:
                return f.read()
        handle = self._handle(ref.shard_uri, ref.kind)
        if ref.kind == "zip":
            return handle.read(ref.member)
        handle.seek(ref.offset)
        data = handle.read(ref.size)
        if len(data) != ref.size:
            raise EOFError(f"tar member {ref.member} is truncated: {len(data)} of {ref.size} bytes present")
        return data

    def read_row_group(self, refs: Sequence[ImageRef]) -> Iterator[tuple[ImageRef, bytes | None]]:
        first = refs[0]

        def read() -> list[Any]:
            pf = pq.ParquetFile(self._handle(first.shard_uri, "parquet"))
            return pf.read_row_group(first.row_group, columns=[first.member]).column(0).to_pylist()

        values = with_retries(
            read, self._attempts, self._base_delay, f"{first.shard_uri}#rg{first.row_group}",
            lambda: self._forget(first.shard_uri),
        )
        for ref in refs:
            value = values[ref.row]
            yield ref, (value.get("bytes") if isinstance(value, dict) else value)


class PlanShards(beam.DoFn):
    """shard URL -> ImageRefs (main) and failed Outcomes (tag ``outcome``)."""

    def __init__(self, attempts: int = 3, base_delay: float = 0.2) -> None:
        self.inputs = Metrics.counter(NAMESPACE, "inputs")
        self._retry = (attempts, base_delay)

    def process(self, uri: str) -> Iterator[Any]:
        for item in plan_shard(uri, *self._retry):
            self.inputs.inc()
            if isinstance(item, Outcome):
                yield beam.pvalue.TaggedOutput("outcome", item)
            else:
                yield item


def pick_unique(image_id: str, refs: Iterable[ImageRef]) -> Iterator[Any]:
    """Keep one ref per id, deterministically (smallest source URI); the rest fail as duplicates."""
    ordered = sorted(refs, key=lambda r: r.source_uri)
    yield ordered[0]
    for dup in ordered[1:]:
        yield beam.pvalue.TaggedOutput(
            "outcome",
            Outcome.failed(image_id, dup.source_uri, STAGE, f"duplicate image id {image_id!r}; kept {ordered[0].source_uri}"),
        )


class ReadBytes(beam.DoFn):
    """ImageRef(s) -> ImageRecord with bytes, label and metadata attached."""

    def __init__(
        self,
        labels: Mapping[str, str] | None,
        ffhq_meta: Mapping[str, Any] | None,
        voc_annotations: bool,
        attempts: int = 3,
        base_delay: float = 0.2,
    ):
        self._labels = labels
        self._ffhq = ffhq_meta
        self._voc = voc_annotations
        self._retry = (attempts, base_delay)

    def setup(self) -> None:
        self._reader = _ShardReader(attempts=self._retry[0], base_delay=self._retry[1])

    def teardown(self) -> None:
        self._reader.close()

    def process(self, element: ImageRef | tuple[Any, Iterable[ImageRef]]) -> Iterator[Any]:
        if isinstance(element, ImageRef):
            pairs = self._read_one(element)
        else:
            refs = sorted(element[1], key=lambda r: r.row)
            try:
                pairs = list(self._reader.read_row_group(refs))
            except Exception as exc:
                pairs = [(ref, exc) for ref in refs]
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
            meta.update(self._ffhq[ref.image_id])
        if self._voc and ref.kind == "image":
            try:
                with fsspec.open(posixpath.splitext(ref.shard_uri)[0] + ".xml", "rb") as f:
                    meta["lesions"] = parse_voc_boxes(f.read())
            except FileNotFoundError:
                meta["lesions"] = None
            except ElementTree.ParseError as exc:
                return Outcome.failed(ref.image_id, ref.source_uri, STAGE, f"unreadable VOC annotation: {exc}")
        label = None
        if self._labels is not None:
            label = self._labels.get(ref.image_id)
            if label is None:
                return Outcome.failed(
                    ref.image_id, ref.source_uri, "label", f"no label for image id {ref.image_id!r} in --labels-csv"
                )
        return ImageRecord(ref.image_id, ref.source_uri, data=data or b"", label=label, meta=meta)


def _read_unit(ref: ImageRef) -> tuple[str, int]:
    return ref.shard_uri, ref.row_group


class ReadImages(beam.PTransform):
    """Patterns -> (ImageRecords, failed Outcomes, the number of input images as a singleton).

    Every planned image, and every shard part that could not be planned, is one input.

    Labels and FFHQ metadata are small dictionaries loaded once by the launcher and shipped
    with the transform.
    """

    def __init__(
        self,
        patterns: Sequence[str],
        labels: Mapping[str, str] | None = None,
        ffhq_meta: Mapping[str, Any] | None = None,
        voc_annotations: bool = False,
    ):
        super().__init__()
        self._patterns = list(patterns)
        self._read = ReadBytes(labels, ffhq_meta, voc_annotations)

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[beam.PCollection, beam.PCollection]:
        planned = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "ExpandPatterns" >> beam.FlatMap(expand_pattern)
            | "SpreadShards" >> beam.Reshuffle()
            | "PlanShards" >> beam.ParDo(PlanShards()).with_outputs("outcome", main="refs")
        )
        unique = (
            planned.refs
            | "KeyById" >> beam.Map(lambda ref: (ref.image_id, ref))
            | "GroupById" >> beam.GroupByKey()
            | "DropDuplicates" >> beam.FlatMapTuple(pick_unique).with_outputs("outcome", main="refs")
        )
        by_kind = unique.refs | "ByKind" >> beam.Partition(lambda ref, n: int(ref.kind == "parquet"), 2)
        row_groups = (
            by_kind[1]
            | "KeyByRowGroup" >> beam.Map(lambda ref: (_read_unit(ref), ref))
            | "GroupByRowGroup" >> beam.GroupByKey()
        )
        # Flatten the small refs, not the records: a runner may materialise a Flatten's inputs
        # (the DirectRunner always does), and records carry every image's bytes.
        units = (by_kind[0], row_groups) | "ReadUnits" >> beam.Flatten()
        read = units | "ReadFiles" >> beam.ParDo(self._read).with_outputs("outcome", main="records")
        failed = (planned.outcome, unique.outcome, read.outcome) | "ReadFailures" >> beam.Flatten()
        inputs = (
            (planned.refs | "CountRefs" >> beam.combiners.Count.Globally(),
             planned.outcome | "CountUnplannable" >> beam.combiners.Count.Globally())
            | "BothCounts" >> beam.Flatten()
            | "CountInputs" >> beam.CombineGlobally(sum)
        )
        return read.records, failed, inputs
