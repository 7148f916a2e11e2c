"""Decode: every image mode becomes RGB uint8; every broken image becomes a reason, not a crash."""
from __future__ import annotations

import io
import struct
import zlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from tests.images import jpeg_bytes, png_bytes, random_rgb
from transforms.decode import DecodeError, DecodeImages, ImageTooLarge, ImageTooSmall, decode_image
from transforms.records import ImageRecord


def with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR to claim another size (the shape of a decompression bomb)."""
    ihdr = png[12:29]
    new = b"IHDR" + struct.pack(">II", width, height) + ihdr[12:]
    return png[:12] + new + struct.pack(">I", zlib.crc32(new)) + png[33:]


def test_rgb_png_round_trips_exactly() -> None:
    pixels = random_rgb(40, 30)
    assert np.array_equal(decode_image(png_bytes(pixels)), pixels)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = random_rgb(20, 20)[..., 0]
    out = decode_image(png_bytes(gray))
    assert out.shape == (20, 20, 3) and np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)


def test_rgba_drops_alpha_and_keeps_colour() -> None:
    pixels = random_rgb(16, 16)
    rgba = np.dstack([pixels, np.full((16, 16), 90, np.uint8)])
    assert np.array_equal(decode_image(png_bytes(rgba)), pixels)


def test_16_bit_png_is_scaled_to_8_bit() -> None:
    pixels = random_rgb(16, 16)
    out = decode_image(png_bytes(pixels.astype(np.uint16) * 257))
    assert out.dtype == np.uint8 and np.array_equal(out, pixels)


def test_cmyk_jpeg_becomes_rgb() -> None:
    pixels = np.full((32, 32, 3), (200, 120, 60), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(buf, "JPEG", quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - pixels).mean() < 8


def test_exif_orientation_is_applied() -> None:
    image = Image.fromarray(random_rgb(30, 60))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    assert decode_image(jpeg_bytes(np.asarray(image), exif=exif)).shape == (60, 30, 3)


@pytest.mark.parametrize(
    "data, error, words",
    [
        (b"", DecodeError, "empty file"),
        (b"PK\x03\x04 this is a zip, not an image", DecodeError, "not a recognised image"),
        (png_bytes(random_rgb(64, 64))[:300], DecodeError, "(?i)truncated"),
        (jpeg_bytes(random_rgb(256, 256))[:-2000], DecodeError, "(?i)truncated"),
        (with_declared_size(png_bytes(random_rgb(8, 8)), 100_000, 100_000), ImageTooLarge, "over the limit"),
    ],
    ids=["zero-byte", "non-image", "truncated-png", "truncated-jpeg", "huge-declared-size"],
)
def test_broken_images_raise_a_reason(data: bytes, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        decode_image(data)


def test_image_smaller_than_a_patch_is_refused() -> None:
    with pytest.raises(ImageTooSmall, match="smaller than one 64x64 patch"):
        decode_image(png_bytes(random_rgb(40, 100)), min_size=64)


def test_decode_stage_routes_failures_and_drops_the_bytes(pipeline) -> None:
    good = ImageRecord("good", "mem://good.png", data=png_bytes(random_rgb(64, 64)))
    bad = ImageRecord("bad", "mem://bad.png", data=b"")
    with pipeline() as p:
        decoded, failed = p | beam.Create([good, bad]) | DecodeImages(min_size=32)
        assert_that(
            decoded | beam.Map(lambda r: (r.image_id, r.pixels.shape, r.data)),
            equal_to([("good", (64, 64, 3), None)]), label="decoded",
        )
        assert_that(
            failed | beam.Map(lambda o: (o.image_id, o.status, o.stage, o.error_type)),
            equal_to([("bad", "failed", "decode", "DecodeError")]), label="failed",
        )


def test_a_png_chunk_claiming_more_bytes_than_the_file_holds_is_refused_before_decoding() -> None:
    """OpenCV would allocate the 4 GiB the length field claims (found by bench.fuzz_decode)."""
    png = bytearray(png_bytes(random_rgb(32, 32)))
    png[33:37] = struct.pack(">I", 0xFFFFFFFF)  # the length of the chunk after IHDR
    with pytest.raises(DecodeError, match="chunk .* at byte 33 declares 4,294,967,295 bytes"):
        decode_image(bytes(png))
