"""Plan: input patterns -> shard files -> one small ``ImageRef`` per image, without reading image bytes.

Each loose file, tar member, zip member, Parquet row or TFRecord record becomes a ref. A shard that cannot be
planned, or a part of it, becomes a failed ``Outcome`` instead of vanishing.

An image whose container declares more than ``--max-image-bytes`` for it (the listed file size,
the tar header, the zip directory, the TFRecord header, a one-image Parquet row group's column
chunk) fails here, before any of it is read. Declared sizes can lie, so the read stage enforces
the limit again on what it actually reads (``transforms.read``).
"""
from __future__ import annotations

import posixpath
import tarfile
import zipfile
from typing import Any, Iterator, Optional, Sequence

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
# Well above any real photo (a 24 MP camera JPEG is about 10 MB, an FFHQ PNG 1.5 MB); a bigger
# image is a bomb or a mistake, and reading it could take a worker's memory.
DEFAULT_MAX_IMAGE_BYTES = 64_000_000
# pyarrow reads a Parquet row group's column whole, at about twice its size in memory; a row
# group of several images is refused when its image column declares more than this many
# images at the limit (1 GB at the default).
ROW_GROUP_IMAGES_AT_LIMIT = 16


class BytesOverLimit(ValueError):
    """An image is larger than ``--max-image-bytes``, as its container declares it or as its bytes arrive."""


def _refused(ref: ImageRef, reason: str) -> Outcome:
    return Outcome.failed(ref.image_id, ref.source_uri, STAGE, BytesOverLimit(reason))


def _within(ref: ImageRef, declared: Optional[int], limit: int, what: str) -> ImageRef | Outcome:
    """The ref, or a failed Outcome when its container declares more than ``limit`` bytes for it."""
    if declared is None or declared <= limit:
        return ref
    return _refused(
        ref, f"{what} declares {declared:,} bytes, over the limit of {limit:,} (--max-image-bytes); none of it was read"
    )


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


def input_files(pattern: str) -> list[tuple[str, Optional[int]]]:
    """(URL, listed size) of the files a pattern names, sorted: in a folder, only images and shards (not
    annotations, READMEs...)."""
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


def plan_shard(
    uri: str, size: Optional[int] = None, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, attempts: int = 3,
    base_delay: float = 0.2,
) -> Iterator[ImageRef | Outcome]:
    """List the images one shard holds, without reading their bytes; ``size`` is the file's listed size."""
    kind = shard_kind(uri)
    if kind == "image":
        yield _within(ImageRef(image_id_from_name(uri), uri, "image"), size, max_image_bytes, "the file")
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
            yield from planner(uri, f, max_image_bytes)
    except Exception as exc:
        yield Outcome.failed(image_id_from_name(uri), uri, STAGE, exc)


def _plan_tar(uri: str, f: Any, limit: int) -> Iterator[ImageRef | Outcome]:
    # tarfile reads each header (and long-name / pax records) and seeks over member data; on an
    # unbuffered handle that fetches the headers alone.
    size = f.size if hasattr(f, "size") else None
    end = 0
    problem = None
    try:
        for member in tarfile.open(fileobj=f, mode="r:"):
            end = member.offset_data + member.size
            if member.isfile() and _ext(member.name) in IMAGE_EXTENSIONS:
                ref = ImageRef(_webdataset_key(member.name), uri, "tar", member.name, member.offset_data, member.size)
                yield _within(ref, member.size, limit, f"tar member {member.name}")
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


def _plan_zip(uri: str, f: Any, limit: int) -> Iterator[ImageRef | Outcome]:
    # zipfile stops a member's stream at the size the directory declares, so checking that size
    # bounds the read; the compression ratio tells a bomb from a big photo in the reason.
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if not info.is_dir() and _ext(info.filename) in IMAGE_EXTENSIONS:
                ref = ImageRef(image_id_from_name(info.filename), uri, "zip", info.filename)
                ratio = info.file_size / max(info.compress_size, 1)
                what = f"zip member {info.filename} ({info.compress_size:,} bytes compressed, {ratio:,.0f}:1)"
                yield _within(ref, info.file_size, limit, what)


def _plan_tfrecord(uri: str, f: Any, limit: int) -> Iterator[ImageRef | Outcome]:
    # Record i is FFHQ image i: StyleGAN wrote the faces in id order.
    planned = 0
    try:
        for offset, size in record_spans(f, f.seek(0, 2)):
            ref = ImageRef(f"{planned:05d}", uri, "tfrecord", offset=offset, size=size, row=planned)
            yield _within(ref, size, limit, f"record {planned}")
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


def _leaf_bytes(pf: pq.ParquetFile, row_group: int, leaf: str) -> int:
    """What a row group's image column declares it holds, uncompressed: its size as the reader holds it."""
    group = pf.metadata.row_group(row_group)
    return sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
               if group.column(j).path_in_schema == leaf)


def _plan_parquet(uri: str, f: Any, limit: int) -> Iterator[ImageRef | Outcome]:
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    column = image_column(schema)
    is_struct = pa.types.is_struct(schema.field(column).type)
    # The refs name the leaf column of the bytes, which the reader reads alone.
    leaf = f"{column}.bytes" if is_struct else column
    id_column = next((c for c in ID_COLUMNS if c in schema.names), None)
    has_path = is_struct and schema.field(column).type.get_field_index("path") >= 0
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
            # One image's column chunk is its size; several images' sizes are only known once read.
            declared = _leaf_bytes(pf, rg, leaf)
            group_limit = ROW_GROUP_IMAGES_AT_LIMIT * limit
            for i, image_id in enumerate(ids):
                ref = ImageRef(image_id, uri, "parquet", leaf, row_group=rg, row=i)
                if n > 1 and declared > group_limit:
                    yield _refused(ref, (
                        f"row group {rg} declares {declared:,} bytes for its {n} images, over "
                        f"{ROW_GROUP_IMAGES_AT_LIMIT} x --max-image-bytes ({group_limit:,}); a row group is read "
                        "whole, at about twice its size in memory, so none of it was read. Rewrite the file with "
                        "smaller row groups (e.g. pyarrow row_group_size=100)"
                    ))
                else:
                    yield _within(ref, declared if n == 1 else None, limit, f"Parquet cell {ref.source_uri}")
        first_row += n


class PlanShards(beam.DoFn):
    """(shard URL, listed size) -> ImageRefs (main) and failed Outcomes (tag ``outcome``)."""

    def __init__(
        self, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, attempts: int = 3, base_delay: float = 0.2
    ) -> None:
        self.inputs = Metrics.counter(NAMESPACE, "inputs")
        self._limits = {"max_image_bytes": max_image_bytes, "attempts": attempts, "base_delay": base_delay}

    def process(self, shard: tuple[str, Optional[int]]) -> Iterator[Any]:
        uri, size = shard
        for item in plan_shard(uri, size, **self._limits):
            self.inputs.inc()
            if isinstance(item, Outcome):
                yield beam.pvalue.TaggedOutput("outcome", item)
            else:
                yield item
