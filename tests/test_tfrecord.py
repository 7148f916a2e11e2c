"""TFRecord shards (StyleGAN's ffhq-rNN.tfrecords): one ref per record from the headers alone,
checksummed reads, raw CHW pixels that skip decoding, and every broken record a reason."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import apache_beam as beam
import fsspec
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from models.dataset import FACES_DIR, read_patches, read_table
from pipelines.build_dataset import run
from tests.images import random_rgb
from bench.tfrecords import example, face, frame, shard
from tests.test_storage import CountingStore, _put, store  # noqa: F401  (store is a fixture)
from transforms.decode import DecodeError, DecodeImages, ImageTooLarge, raw_image
from transforms.plan import plan_shard
from transforms.read import ReadBytes, ReadImages
from transforms.records import ImageRef, Outcome
from transforms.tfrecord import TFRecordError, masked_crc32c, parse_example

SIDE = 64


FACES = [random_rgb(SIDE, SIDE, seed=i) for i in range(3)] + [random_rgb(72, 80, seed=3)]


def test_the_checksum_is_crc32c_masked_as_tensorflow_masks_it() -> None:
    crc = 0xE3069283  # crc32c(b"123456789"), the standard check value
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_example_parser_reads_bytes_and_int64_lists(packed: bool) -> None:
    data = example({"shape": [3, 1024, 1024], "neg": [-1, 2**40], "data": [b"ab", b""], "f": [0.5]}, packed)
    assert parse_example(data) == {"shape": [3, 1024, 1024], "neg": [-1, 2**40], "data": [b"ab", b""], "f": []}


def test_a_cut_off_example_is_a_reason() -> None:
    with pytest.raises(TFRecordError, match="runs past its message"):
        parse_example(face(FACES[0])[:-10])


def test_raw_pixels_become_rgb_without_decoding() -> None:
    chw = FACES[3].transpose(2, 0, 1)
    assert np.array_equal(raw_image(chw.tobytes(), chw.shape), FACES[3])


@pytest.mark.parametrize(
    "shape, size, error, words",
    [
        ((1, 64, 64), 64 * 64, DecodeError, r"expected \[3, height, width\]"),
        ((3, 64, 64), 3 * 64 * 64 - 1, DecodeError, "need 12,288 bytes; the record holds 12,287"),
        ((3, 100_000, 100_000), 12, ImageTooLarge, "over the limit"),  # refused before allocating 30 GB
    ],
    ids=["gray", "short-data", "huge-declared-size"],
)
def test_wrong_raw_shapes_raise_a_reason(shape: tuple, size: int, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        raw_image(bytes(size), shape)


def _plan(url: str) -> list[ImageRef | Outcome]:
    return list(plan_shard(url))


def test_a_bad_length_checksum_ends_planning_and_keeps_the_records_before(tmp_path: Path) -> None:
    data = bytearray(shard([face(pixels) for pixels in FACES]))
    second = len(frame(face(FACES[0])))
    data[second + 8] ^= 0xFF
    (tmp_path / "ffhq-r06.tfrecords").write_bytes(data)
    *refs, failed = _plan(str(tmp_path / "ffhq-r06.tfrecords"))
    assert [r.image_id for r in refs] == ["00000"] and isinstance(failed, Outcome)
    assert failed.image_id == "00001" and failed.source_uri.endswith("ffhq-r06.tfrecords#record1")
    assert failed.reason == (
        f"bad length checksum in the record header at byte {second}: record 1 and any after it could not be read"
    )


def test_planning_fetches_the_headers_only_and_reading_each_record_once(store: type[CountingStore]) -> None:
    data = shard([face(pixels) for pixels in FACES])
    _put("counted://bucket/ffhq-r06.tfrecords", data)
    refs = _plan("counted://bucket/ffhq-r06.tfrecords")
    assert [r.image_id for r in refs] == ["00000", "00001", "00002", "00003"]
    assert store.fetched == 12 * len(FACES), "12 header bytes per record"
    read = ReadBytes(None, None, False)
    read.setup()
    records = [record for ref in refs for record in read.process(ref)]
    read.teardown()
    assert store.fetched == 12 * len(FACES) + len(data)
    assert [r.raw_shape for r in records] == [(3, 64, 64)] * 3 + [(3, 72, 80)]
    assert [r.source_uri for r in records][-1] == "counted://bucket/ffhq-r06.tfrecords#record3"


def test_a_shard_in_an_object_store_reads_into_pixels(pipeline) -> None:
    with fsspec.open("memory://tfr-bucket/ffhq-r06.tfrecords", "wb") as out:
        out.write(shard([face(pixels) for pixels in FACES]))
    expected = [(f"{i:05d}", pixels.tobytes()) for i, pixels in enumerate(FACES)]
    with pipeline() as p:
        records, failures, inputs = p | ReadImages(["memory://tfr-bucket/*.tfrecords"])
        decoded, failed = records | DecodeImages()
        assert_that(decoded | beam.Map(lambda r: (r.image_id, r.pixels.tobytes())), equal_to(expected))
        assert_that((failures, failed) | beam.Flatten(), equal_to([]), label="no failures")
        assert_that(inputs, equal_to([len(FACES)]), label="inputs")


@pytest.fixture(scope="module")
def broken_shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """Four good faces (one of another size), a corrupt record, a wrong shape, and a cut-off last record."""
    folder = tmp_path_factory.mktemp("tfrecord")
    records = [frame(face(pixels)) for pixels in FACES]
    corrupt = bytearray(frame(face(random_rgb(SIDE, SIDE, seed=9))))
    corrupt[100] ^= 0xFF
    wrong_shape = frame(face(random_rgb(SIDE, SIDE, seed=10), shape=[3, SIDE, SIDE + 1]))
    cut = frame(face(random_rgb(SIDE, SIDE, seed=11)))[:-50]
    (folder / "ffhq-r06.tfrecords").write_bytes(b"".join([*records, bytes(corrupt), wrong_shape, cut]))
    out = folder / "out"
    manifest = run([
        "--input", str(folder / "ffhq-r06.tfrecords"), "--output", str(out),
        "--min-face-skin", "0", "--min-patch-skin", "0", "--patch-size", str(SIDE),
    ])
    yield out, manifest


def test_build_dataset_keeps_good_records_and_fails_broken_ones_with_a_reason(broken_shard) -> None:
    out, manifest = broken_shard
    assert manifest["accounting"]["ok"] and manifest["accounting"]["inputs"] == 7
    faces = read_table(str(out), FACES_DIR).to_pandas().set_index("image_id")
    assert faces.status.to_dict() == {
        "00000": "kept", "00001": "kept", "00002": "kept", "00003": "kept",
        "00004": "failed", "00005": "failed", "00006": "failed",
    }
    assert faces.stage.to_dict()["00004"] == "read" and "data checksum mismatch" in faces.reason["00004"]
    assert faces.stage.to_dict()["00005"] == "decode" and "need 12,480 bytes" in faces.reason["00005"]
    assert "truncated" in faces.reason["00006"] and "record 6 and any after it" in faces.reason["00006"]
    assert faces.source_uri["00004"].endswith("ffhq-r06.tfrecords#record4")


def test_build_dataset_patches_hold_the_record_pixels(broken_shard) -> None:
    out, _ = broken_shard
    patches = read_patches(str(out), columns=["image_id", "image", "x", "y"]).to_pylist()
    whole = {p["image_id"]: p["image"]["bytes"] for p in patches if p["image_id"] < "00003"}
    assert sorted(whole) == ["00000", "00001", "00002"]
    for image_id, png in whole.items():
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), FACES[int(image_id)])
    assert len([p for p in patches if p["image_id"] == "00003"]) == 4, "80x72 cuts into 2x2 flush 64 px tiles"
