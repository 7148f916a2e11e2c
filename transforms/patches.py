"""Patch: tile a full-resolution face, keep the tiles that are mostly skin, encode them.

``cut_patches`` is shared by both jobs: build_dataset encodes the patches into Parquet
rows, score feeds them to the classifier. ``filter_face``, ``patch_face`` and
``encode_patches`` are the stages' per-record work, for the job and bench/reference.py alike.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.metrics import Metrics

from transforms.records import FILTERED, KEPT, OUTCOME, ImageRecord, Outcome, Patch, RecordStep, WithOutcomes

STAGE = "patch"
FORMATS = ("png", "jpeg", "webp")


def tile_origins(length: int, size: int, stride: int) -> list[int]:
    """Tile starts along one axis; a last tile flush with the edge covers any remainder."""
    starts = list(range(0, length - size + 1, stride))
    if starts and starts[-1] + size < length:
        starts.append(length - size)
    return starts


def cut_patches(
    pixels: np.ndarray,
    mask: np.ndarray,
    size: int,
    stride: int,
    min_skin: float,
    blackout: bool = False,
) -> list[Patch]:
    """Tiles of ``pixels`` whose skin coverage in ``mask`` is at least ``min_skin``, in row-major order."""
    height, width = mask.shape
    # An integral image gives every tile's skin count in O(1), so rejected tiles cost nothing.
    integral = cv2.integral(mask, sdepth=cv2.CV_32S)
    area = float(size * size)
    patches = []
    for y in tile_origins(height, size, stride):
        for x in tile_origins(width, size, stride):
            skin = integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
            fraction = skin / area
            if fraction < min_skin:
                continue
            tile_mask = mask[y : y + size, x : x + size]
            tile = pixels[y : y + size, x : x + size]
            if blackout:
                tile = tile * tile_mask[..., None]
            patches.append(Patch(x, y, size, float(fraction), tile, tile_mask))
    return patches


def encode_rgb(pixels: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 1) -> bytes:
    """Encode an RGB tile; PNG and lossless WebP keep every pixel, JPEG trades them for size."""
    params = {
        "png": png_params(png_level),
        "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
        "webp": [cv2.IMWRITE_WEBP_QUALITY, 101],
    }[fmt]
    ok, buf = cv2.imencode("." + fmt, cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"could not encode a {pixels.shape} tile as {fmt}")
    return buf.tobytes()


def png_params(level: int) -> list[int]:
    """cv2 PNG settings for face patches at zlib ``level`` (0 stores, 1 is the fastest coding).

    Measured on face patches (bench/README.md): the "average" filter predicts skin best of
    the fast filters, and at level 1 Huffman-only coding skips zlib's match search, which
    finds little in photos: 34% faster than plain level 1 for 1% more bytes. Levels 2-9 keep
    the match search: up to 12% smaller, 3-40x slower. Pixels are identical at every level.
    """
    params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_AVG]
    if level == 1:
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    return params


def encode_mask(mask: np.ndarray) -> bytes:
    """A 0/255 grayscale PNG: opens in any viewer and decodes as an HF Image."""
    ok, buf = cv2.imencode(".png", mask * np.uint8(255), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("could not encode a mask")
    return buf.tobytes()


def lesion_count(boxes: Optional[Sequence[Sequence[int]]], patch: Patch) -> Optional[int]:
    """Lesion boxes (xmin, ymin, xmax, ymax) whose centre lies inside the patch; None if unannotated."""
    if boxes is None:
        return None
    count = 0
    for xmin, ymin, xmax, ymax in boxes:
        cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
        count += patch.x <= cx < patch.x + patch.size and patch.y <= cy < patch.y + patch.size
    return count


def patch_id(image_id: str, patch: Patch) -> str:
    return f"{image_id}_y{patch.y:05d}_x{patch.x:05d}"


def filter_face(record: ImageRecord, min_face_skin: float) -> ImageRecord | Outcome:
    """The face itself when enough of it is skin; otherwise a filtered Outcome that says why."""
    if record.skin_fraction is not None and record.skin_fraction >= min_face_skin:
        return record
    return Outcome(
        record.image_id, record.source_uri, FILTERED, "filter_faces",
        f"skin fraction {record.skin_fraction:.3f} is under --min-face-skin {min_face_skin}",
        skin_fraction=record.skin_fraction, split=record.split, label=record.label,
    )


def patch_face(
    record: ImageRecord, size: int, stride: int, min_skin: float, blackout: bool = False
) -> ImageRecord | Outcome:
    """The face with its ``patches`` attached; a filtered Outcome when no tile has enough skin."""
    patches = tuple(cut_patches(record.pixels, record.mask, size, stride, min_skin, blackout))
    if patches:
        return replace(record, patches=patches)
    return Outcome(
        record.image_id, record.source_uri, FILTERED, STAGE, "no patch reaches --min-patch-skin",
        skin_fraction=record.skin_fraction, split=record.split, label=record.label,
    )


def encode_patches(
    record: ImageRecord, fmt: str, quality: int, png_level: int, segmenter_sha256: str
) -> tuple[list[dict[str, Any]], Outcome]:
    """A face's ``PATCH_SCHEMA`` rows, and its kept Outcome."""
    rows = []
    for patch in record.patches:
        pid = patch_id(record.image_id, patch)
        rows.append({
            "image_id": record.image_id,
            "patch_id": pid,
            "split": record.split,
            "label": record.label,
            "x": patch.x,
            "y": patch.y,
            "size": patch.size,
            "skin_fraction": patch.skin_fraction,
            "lesion_count": lesion_count(record.meta.get("lesions"), patch),
            "image": {"bytes": encode_rgb(patch.pixels, fmt, quality, png_level), "path": f"{pid}.{fmt}"},
            "mask": {"bytes": encode_mask(patch.mask), "path": f"{pid}.mask.png"},
            "source_uri": record.source_uri,
            "segmenter_sha256": segmenter_sha256,
        })
    kept = Outcome(
        record.image_id, record.source_uri, KEPT, STAGE, skin_fraction=record.skin_fraction,
        patch_count=len(record.patches), split=record.split, label=record.label,
    )
    return rows, kept


class FilterFaces(WithOutcomes):
    """Segmented records -> (faces with enough skin, filtered Outcomes)."""

    def __init__(self, min_face_skin: float):
        step = partial(filter_face, min_face_skin=min_face_skin)
        super().__init__("CheckSkinFraction", RecordStep(step, "faces_filtered_low_skin"))


class CutPatches(WithOutcomes):
    """Faces -> (faces with their ``patches`` attached, filtered Outcomes for faces with none)."""

    def __init__(self, size: int, stride: int, min_patch_skin: float, blackout: bool = False):
        step = partial(patch_face, size=size, stride=stride, min_skin=min_patch_skin, blackout=blackout)
        super().__init__("CutTiles", _CutPatches(step, "faces_filtered_no_patch"))


class _CutPatches(RecordStep):
    def setup(self) -> None:
        super().setup()
        self._patches = Metrics.counter("acne", "patches")

    def passed(self, record: ImageRecord) -> None:
        self._patches.inc(len(record.patches))


class EncodePatchRows(WithOutcomes):
    """Faces with patches -> (``PATCH_SCHEMA`` rows, one kept Outcome per face)."""

    def __init__(self, fmt: str, quality: int, png_level: int, segmenter_sha256: str):
        encode = partial(encode_patches, fmt=fmt, quality=quality, png_level=png_level,
                         segmenter_sha256=segmenter_sha256)
        super().__init__("Encode", _EncodePatchRows(encode))


class _EncodePatchRows(beam.DoFn):
    def __init__(self, encode: Callable[[ImageRecord], tuple[list[dict[str, Any]], Outcome]]):
        self._encode = encode

    def process(self, record: ImageRecord) -> Iterator[object]:
        rows, kept = self._encode(record)
        yield from rows
        yield beam.pvalue.TaggedOutput(OUTCOME, kept)
