"""Plan: input patterns -> shard files -> one small ``ImageRef`` per image, without reading image bytes.

Each loose file, tar member, zip member, Parquet row or TFRecord record becomes a ref. A shard that cannot be
planned, or a part of it, becomes a failed ``Outcome`` instead of vanishing.
"""
from __future__ import annotations

import posixpath
import tarfile
import zipfile
from typing import Any, Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from transforms.records import ImageRef, Outcome
from transforms.sidefiles import InputError, image_id_from_name
from transforms.storage import bucket_refusal, expand_pattern, open_exact, with_retries
from transforms.tfrecord import TFRecordError, record_spans

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
SHARD_KINDS = {".tar": "tar", ".zip": "zip", ".parquet": "parquet", ".tfrecords": "tfrecord", ".tfrecord": "tfrecord"}
ID_COLUMNS = ("image_id", "id", "key", "__key__")
STAGE = "read"
NAMESPACE = "acne"


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _webdataset_key(member: str) -> str:
    """webdataset groups ``dir/key.jpg`` and ``dir/key.cls`` by the part before the first dot."""
    return posixpath.basename(member).split(".", 1)[0]


def shard_kind(uri: str) -> str:
    ext = _ext(uri)
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return SHARD_KINDS.get(ext, "unsupported")


def input_files(pattern: str) -> list[str]:
    """The files a pattern names, sorted: in a folder, only images and shards (not annotations, READMEs...)."""
    return expand_pattern(pattern, lambda path: shard_kind(path) != "unsupported")


def _refuse_missing_bucket(pattern: str) -> None:
    try:
        refusal = bucket_refusal(pattern, "input")
    except Exception:
        return  # the caller reports the listing error itself
    if refusal:
        raise InputError(refusal)


def check_patterns(patterns: Sequence[str]) -> int:
    """Fail fast on a pattern that matches nothing or cannot be listed; return the file count."""
    if not patterns:
        raise InputError("no --input given: pass one or more paths, globs or URLs (gs://, s3://, ...)")
    total = 0
    for pattern in patterns:
        try:
            files = input_files(pattern)
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


def plan_shard(uri: str, attempts: int = 3, base_delay: float = 0.2) -> Iterator[ImageRef | Outcome]:
    """List the images one shard holds, without reading their bytes."""
    kind = shard_kind(uri)
    if kind == "image":
        yield ImageRef(image_id_from_name(uri), uri, "image")
        return
    if kind == "unsupported":
        yield Outcome.failed(
            image_id_from_name(uri), uri, STAGE,
            f"unsupported file type {_ext(uri) or '(none)'}: expected an image, .tar, .zip, .parquet or .tfrecords",
        )
        return
    try:
        with with_retries(lambda: open_exact(uri), attempts, base_delay, uri) as f:
            planner = {"tar": _plan_tar, "zip": _plan_zip, "parquet": _plan_parquet, "tfrecord": _plan_tfrecord}[kind]
            yield from planner(uri, f)
    except Exception as exc:
        yield Outcome.failed(image_id_from_name(uri), uri, STAGE, exc)


def _plan_tar(uri: str, f: Any) -> Iterator[ImageRef | Outcome]:
    # tarfile reads each header (and long-name / pax records) and seeks over member data; on an
    # unbuffered handle that fetches the headers alone.
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


def _plan_tfrecord(uri: str, f: Any) -> Iterator[ImageRef | Outcome]:
    # Record i is FFHQ image i: StyleGAN wrote the faces in id order.
    planned = 0
    try:
        for offset, size in record_spans(f, f.seek(0, 2)):
            yield ImageRef(f"{planned:05d}", uri, "tfrecord", offset=offset, size=size, row=planned)
            planned += 1
    except TFRecordError as exc:
        yield Outcome.failed(
            f"{planned:05d}", f"{uri}#record{planned}", STAGE,
            f"{exc}: record {planned} and any after it could not be read",
        )


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
