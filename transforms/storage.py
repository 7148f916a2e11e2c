"""Storage: every open, listing, rename and up-front check of a location, through fsspec.

Local paths and any fsspec URL (gs://, s3://, memory://, ...) go through these functions, so
retries, bucket checks and byte-range reads behave the same for every stage. No Beam here:
the launcher's checks and the benchmark use it too.
"""
from __future__ import annotations

import logging
import socket
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Optional, Sequence, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.core import OpenFile

log = logging.getLogger(__name__)

T = TypeVar("T")

# OSErrors that retrying cannot fix: the object is gone, or we may not read it.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

# Stores whose URLs start with a bucket that must exist before anything can be read or written.
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


class EndpointError(ValueError):
    """An object store cannot be reached at all; raised before any work."""


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


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem behind ``url`` and the path on it, for libraries that take both (pyarrow)."""
    return fsspec.core.url_to_fs(url)


def open_file(url: str, mode: str = "rb", **kwargs: Any) -> OpenFile:
    """``url`` as a context manager giving a file object; ``kwargs`` go to fsspec (``newline``, ``auto_mkdir``...)."""
    return fsspec.open(url, mode, **kwargs)


def open_exact(url: str) -> Any:
    """An open read handle that fetches exactly the bytes each read asks for.

    No readahead block: seeking past a tar member's data or a Parquet column costs nothing,
    where a readahead cache would fetch megabytes around every header it reads.
    """
    fs, path = filesystem(url)
    return fs.open(path, "rb", cache_type="none")


def file_size(url: str) -> Optional[int]:
    """The object's size as the store lists it (None where it does not say)."""
    fs, path = filesystem(url)
    return fs.size(path)


def read_range(url: str, start: int, length: int) -> bytes:
    """Exactly the bytes ``[start, start + length)``, or fewer where the object ends first; no readahead."""
    fs, path = filesystem(url)
    return fs.cat_file(path, start=start, end=start + length)


def is_file(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isfile(path)


def is_dir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def _url(fs: AbstractFileSystem, url: str, path: str) -> str:
    """A listed path in the form ``url`` was given in: with its protocol if it had one."""
    return fs.unstrip_protocol(path) if "://" in url else path


def _full(fs: AbstractFileSystem, url: str, paths: Sequence[str]) -> list[str]:
    return sorted(_url(fs, url, p) for p in paths)


def expand_pattern(pattern: str, in_folder: Callable[[str], bool]) -> list[tuple[str, Optional[int]]]:
    """All files a pattern names, as (full URL, size), in sorted order.

    A folder means the files below it that ``in_folder`` accepts. A file named outright, or
    matched by a glob, always counts. Sizes come with the listing, without another request
    (None where a store does not list them).
    """
    fs, path = filesystem(pattern)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
    elif fs.isdir(path):
        found = {p: info for p, info in fs.find(path, detail=True).items() if in_folder(p)}
    else:
        try:
            found = {path: fs.info(path)}
        except FileNotFoundError:
            found = {}
    return sorted((_url(fs, pattern, p), info.get("size")) for p, info in found.items()
                  if info.get("type") != "directory")


def find_files(url: str, suffix: str) -> list[str]:
    """Files below the folder ``url`` whose names end with ``suffix``, in sorted order ([] if none)."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return []
    return _full(fs, url, [p for p in fs.find(path) if p.endswith(suffix)])


def create_exclusive(url: str, data: bytes) -> None:
    """Write a new object holding ``data``; ``FileExistsError`` if one is already there.

    Atomic where the store can refuse a second create in the write itself: O_EXCL on a local
    disk, ``If-None-Match: *`` on S3, ``ifGenerationMatch=0`` on GCS (fsspec's ``xb`` mode). Other
    stores get the check before the write, which two simultaneous writers can both pass.
    """
    fs, path = filesystem(url)
    if fs.exists(path):
        raise FileExistsError(url)
    with fs.open(path, "xb") as f:
        f.write(data)


def entries(url: str) -> list[str]:
    """The full URLs of what a folder holds directly ([] if it does not exist)."""
    fs, path = filesystem(url)
    return _full(fs, url, fs.ls(path, detail=False)) if fs.exists(path) else []


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def move(source: str, target: str) -> None:
    """Rename ``source`` to ``target`` on the same store."""
    fs, path = filesystem(source)
    fs.mv(path, filesystem(target)[1])


def remove(url: str) -> None:
    """Delete a file, or a folder and everything below it; nothing if it does not exist."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def missing_bucket(url: str) -> Optional[str]:
    """``scheme://bucket`` if ``url`` is on an object store and its bucket does not exist (or cannot be seen)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in BUCKET_PROTOCOLS:
        return None
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    return None if fs.exists(bucket) else f"{scheme}://{bucket}"


def bucket_refusal(url: str, role: str) -> Optional[str]:
    """What to say when the bucket of an ``"input"`` or ``"output"`` URL does not exist.

    Stores report a missing bucket as a bare 404 on reads, and create it on the first write.
    """
    gone = missing_bucket(url)
    if gone is None:
        return None
    if role == "output":
        return (
            f"output bucket {gone} does not exist, or these credentials cannot see it: create it first "
            "(jobs never create buckets) or fix --output"
        )
    return (
        f"input {url!r}: bucket {gone} does not exist, or these credentials cannot see it. "
        "Check the bucket name (and the project or account it belongs to)."
    )


def store_endpoint(url: str) -> Optional[str]:
    """The HTTP endpoint behind an ``s3://`` or ``gs://`` URL (emulators and custom endpoints included)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("gs", "gcs"):
        return fsspec.filesystem("gs")._location
    if scheme in ("s3", "s3a"):
        fs = fsspec.filesystem("s3")
        fs.connect()
        return fs.s3.meta.endpoint_url
    return None


def check_endpoints(urls: Sequence[Optional[str]], timeout: float = 5.0) -> None:
    """Fail in seconds when an object store cannot be reached at all.

    The store clients retry a refused connection with backoff for a minute or more, which
    looks like a hung launcher. One TCP connect per endpoint says it at once. Skipped behind
    an HTTP proxy, where only the proxy is reachable directly.
    """
    if urllib.request.getproxies():
        return
    seen: set[str] = set()
    for url in urls:
        endpoint = store_endpoint(url) if url else None
        if endpoint is None or endpoint in seen:
            continue
        seen.add(endpoint)
        parts = urllib.parse.urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as exc:
            hint = "STORAGE_EMULATOR_HOST" if url.startswith(("gs:", "gcs:")) else "AWS_ENDPOINT_URL_S3"
            raise EndpointError(
                f"cannot reach the storage endpoint {endpoint} for {url}: {type(exc).__name__}: {exc}. "
                f"Check the network, and {hint} if you point at a custom endpoint or emulator."
            ) from exc
