"""Storage: planning a shard and reading its images fetch each byte about once, as from an object store."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from typing import Any, Iterator

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from transforms.plan import input_files, plan_shard
from transforms.read import ReadBytes
from transforms.records import ImageRef, Outcome
from transforms.storage import read_range

MEMBERS = {f"shard/{i:05d}.png": os.urandom(40_000 + 997 * i) for i in range(40)}
MEMBERS["shard/" + "a-very-long-folder-name/" * 6 + "00099.png"] = os.urandom(3000)  # a pax long-name header


class _RemoteFile(AbstractBufferedFile):
    """A read handle like s3fs's or gcsfs's: ranged fetches through a cache (readahead unless told otherwise)."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start, end)


class CountingStore(MemoryFileSystem):
    """An in-memory object store that counts every byte it hands out."""

    protocol = "counted"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]
    fetched = 0

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(str(path).removeprefix("counted://"))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data = super().cat_file(path, start, end, **kwargs)
        CountingStore.fetched += len(data)
        return data

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any) -> Any:
        if mode != "rb":
            return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)
        return _RemoteFile(self, self._strip_protocol(path), mode, block_size or "default",
                           cache_options=cache_options, **kwargs)


@pytest.fixture
def store() -> Iterator[type[CountingStore]]:
    fsspec.register_implementation("counted", CountingStore, clobber=True)
    CountingStore.store.clear()
    yield CountingStore
    CountingStore.store.clear()


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)
    CountingStore.fetched = 0


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in MEMBERS.items():
            archive.writestr(name, data)
    return buf.getvalue()


def _read(refs: list[ImageRef], **kwargs: Any) -> list[Any]:
    read = ReadBytes(None, None, False, **kwargs)
    read.setup()
    try:
        return [record for ref in refs for record in read.process(ref)]
    finally:
        read.teardown()


def _plan_and_read(url: str) -> dict[str, bytes]:
    refs = list(plan_shard(url))
    assert all(isinstance(r, ImageRef) for r in refs)
    return {ref.member: record.data for ref, record in zip(refs, _read(refs))}


@pytest.mark.parametrize("kind, shard", [("tar", _tar), ("zip", _zip)])
def test_planning_and_reading_a_shard_fetch_it_about_once(store: type[CountingStore], kind: str, shard: Any) -> None:
    data = shard()
    _put(f"counted://bucket/s.{kind}", data)
    assert _plan_and_read(f"counted://bucket/s.{kind}") == MEMBERS
    assert store.fetched <= 1.1 * len(data), f"fetched {store.fetched} bytes of a {len(data)}-byte {kind}"


def test_a_range_read_returns_exactly_the_range_or_what_is_left(store: type[CountingStore]) -> None:
    _put("counted://bucket/blob", bytes(range(100)))
    assert read_range("counted://bucket/blob", 10, 5) == bytes(range(10, 15))
    assert read_range("counted://bucket/blob", 98, 5) == bytes([98, 99])
    assert store.fetched == 7


def test_a_file_that_grew_past_the_limit_after_listing_is_read_one_byte_past_it_and_no_further(
    store: type[CountingStore]
) -> None:
    _put("counted://bucket/00001.png", bytes(100))
    [(url, listed)] = input_files("counted://bucket/00001.png")
    [ref] = plan_shard(url, listed, max_image_bytes=1000)
    _put(url, bytes(50_000))

    [failed] = _read([ref], max_image_bytes=1000)
    outcome = failed.value
    assert isinstance(outcome, Outcome) and outcome.error_type == "BytesOverLimit"
    assert "holds more than the limit of 1,000 bytes (--max-image-bytes)" in outcome.reason
    assert store.fetched == 1001
