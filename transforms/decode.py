"""Decode: encoded bytes -> RGB uint8, with every guard a public image archive needs.

The header is probed first (cheap, no pixels) so a decompression bomb is refused before
any memory is spent. OpenCV then decodes once, straight to RGB, applying EXIF orientation
and folding grayscale, alpha, 16-bit and CMYK inputs to 8-bit RGB. Raw CHW pixels (a
TFRecord's) skip decoding: their declared shape gets the same size checks, then a transpose.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import replace
from functools import partial

import cv2
import numpy as np
from PIL import Image

from transforms.records import ImageRecord, Outcome, RecordStep, WithOutcomes

# Failures are reported as outcomes with a reason; OpenCV's own stderr warnings would only be noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

STAGE = "decode"
DEFAULT_MAX_PIXELS = 64_000_000
_PNG_CHUNK = struct.Struct(">I4s")


class DecodeError(ValueError):
    """The bytes are not a usable image."""


class ImageTooLarge(DecodeError):
    """The declared size is over the pixel limit (a possible decompression bomb)."""


class ImageTooSmall(DecodeError):
    """The image cannot hold a single patch."""


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"declared size {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,} (--max-pixels)"
        )


def _check_patch_fits(width: int, height: int, min_size: int) -> None:
    if min(width, height) < min_size:
        raise ImageTooSmall(f"image is {width}x{height}, smaller than one {min_size}x{min_size} patch")


def probe(data: bytes, max_pixels: int) -> tuple[str, str, int, int]:
    """Return (format, mode, width, height) from the header alone, refusing oversized images."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, (width, height) = im.format or "?", im.mode, im.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"declared size is over the limit of {max_pixels:,} pixels (--max-pixels): {exc}") from None
    except Image.UnidentifiedImageError:
        # PIL's own message names a BytesIO object at a memory address: different on every run.
        raise DecodeError(f"not a recognised image format ({len(data)} bytes, starting {data[:8]!r})") from None
    except Exception as exc:
        raise DecodeError(f"not a recognised image ({len(data)} bytes): {exc}") from None
    _check_size(width, height, max_pixels)
    return fmt, mode, width, height


def _check_png_chunks(data: bytes, width: int, height: int) -> None:
    """Every PNG chunk must fit in the file.

    OpenCV allocates what a chunk's length field claims before reading it: one length of
    0xFFFFFFFF in a 17 kB file cost 4.4 GB and 3 s (found by ``bench.fuzz_decode``).
    """
    at = 8
    while at + 8 <= len(data):
        length, kind = _PNG_CHUNK.unpack_from(data, at)
        if at + 12 + length > len(data):
            raise DecodeError(
                f"PNG {width}x{height} is corrupt: chunk {kind.decode('latin-1')!r} at byte {at:,} declares {length:,} "
                f"bytes, and the file ends {len(data) - at - 12:,} bytes after its header"
            )
        if kind == b"IEND":
            return
        at += 12 + length


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> np.ndarray:
    """Bytes -> HxWx3 RGB uint8, EXIF-oriented. Raises ``DecodeError`` with a reason."""
    fmt, mode, width, height = probe(data, max_pixels)
    # libjpeg pads a cut-off JPEG with grey and calls it success, and libpng prints to stderr
    # before failing; the missing end marker says "truncated" plainly and early.
    if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise DecodeError(f"JPEG {width}x{height} is truncated: no end-of-image marker")
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        raise DecodeError(f"PNG {width}x{height} is truncated: no IEND chunk")
    if fmt == "PNG":
        _check_png_chunks(data, width, height)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if pixels is None:
        raise DecodeError(f"{fmt} {mode} {width}x{height} image could not be decoded: truncated or corrupt data")
    _check_patch_fits(pixels.shape[1], pixels.shape[0], min_size)
    return pixels


def raw_image(
    data: bytes, shape: tuple[int, ...], max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1
) -> np.ndarray:
    """Raw uint8 pixels of CHW ``shape`` -> HxWx3 RGB uint8. Raises ``DecodeError`` with a reason.

    The shape is checked against the limits before the HWC copy is allocated.
    """
    if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
        raise DecodeError(f"raw pixels of shape {list(shape)}: expected [3, height, width] (RGB, channels first)")
    _, height, width = shape
    _check_size(width, height, max_pixels)
    if len(data) != 3 * height * width:
        raise DecodeError(
            f"raw pixels of shape [3, {height}, {width}] need {3 * height * width:,} bytes; the record holds {len(data):,}"
        )
    _check_patch_fits(width, height, min_size)
    # cv2.merge interleaves the planes about 100x faster than numpy's strided transpose copy.
    return cv2.merge(tuple(np.frombuffer(data, np.uint8).reshape(shape)))


def decode_record(
    record: ImageRecord, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1
) -> ImageRecord | Outcome:
    """The record with its pixels in place of its bytes; a failed Outcome with the reason otherwise."""
    try:
        if record.raw_shape is None:
            pixels = decode_image(record.data or b"", max_pixels, min_size)
        else:
            pixels = raw_image(record.data or b"", record.raw_shape, max_pixels, min_size)
    except Exception as exc:
        return Outcome.failed(record.image_id, record.source_uri, STAGE, exc, record.split)
    # The encoded bytes are no longer needed; dropping them halves what each record holds.
    return replace(record, data=None, raw_shape=None, pixels=pixels)


class DecodeImages(WithOutcomes):
    """ImageRecord with bytes -> (ImageRecord with pixels, failed Outcomes)."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1):
        step = partial(decode_record, max_pixels=max_pixels, min_size=min_size)
        super().__init__("DecodeImage", RecordStep(step, "decode_failed"))
