"""Resolution: score an enlarged photo at the resolution its detail actually has.

Many photos reach 1024² by upscaling (CelebA-HQ's faces, some of FFHQ's, the astronaut sample).
Their pixels hold no detail finer than the original's, and the classifier, which never saw an
upscaled photo in training, reads the soft blotches of interpolation as lesions. Halving such
an image loses nothing it holds, and shows the classifier sharp pixels at the scale it knows.

The test is the image's own detail: how much of what a 1/4-size copy loses is still there after
a 1/2-size copy. A photo enlarged 2x or more has almost nothing between the two.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.metrics import Metrics

from transforms.records import ImageRecord

# Below this detail ratio an image counts as enlarged. Measured on the shared photos (centre
# crops): sharp sources' 5th percentiles lie at 0.18-0.29 (ACNE04 0.24, Pratheepan 0.29,
# CelebAMask-HQ 0.24, deteksi 0.18), the same photos enlarged 2x at medians of 0.13-0.20, and
# the sample portraits (enlarged 5x) at 0.10-0.16 (MODEL_CARD.md, "Working resolution").
ENLARGED_BELOW = 0.2
# Never shrink a photo's long side below this: smaller faces give the classifier too few patches.
MIN_WORKING_SIDE = 512
# The share of the image, around its centre, that the test reads: the face, not the background.
CENTRE = 0.6


def _lost_by(gray: np.ndarray, factor: float) -> float:
    """Mean squared difference between ``gray`` and a copy shrunk by ``factor`` and scaled back."""
    height, width = gray.shape
    small = cv2.resize(gray, (max(1, round(width * factor)), max(1, round(height * factor))),
                       interpolation=cv2.INTER_AREA)
    return float(((gray - cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)) ** 2).mean())


def detail_ratio(pixels: np.ndarray) -> float:
    """What a half-size copy of the image's centre loses, as a share of what a quarter-size copy
    loses: about 0.5 for a sharp photo, under 0.2 for one enlarged 2x or more."""
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32)
    height, width = gray.shape
    dy, dx = round(height * (1 - CENTRE) / 2), round(width * (1 - CENTRE) / 2)
    centre = gray[dy : height - dy, dx : width - dx]
    quarter = _lost_by(centre, 0.25)
    return _lost_by(centre, 0.5) / quarter if quarter > 0 else 0.0


def working_scale(pixels: np.ndarray) -> float:
    """1.0, or 0.5 for an enlarged image whose long side stays at least ``MIN_WORKING_SIDE``."""
    if max(pixels.shape[:2]) // 2 < MIN_WORKING_SIDE:
        return 1.0
    return 0.5 if detail_ratio(pixels) < ENLARGED_BELOW else 1.0


def at_working_resolution(record: ImageRecord) -> ImageRecord:
    """The record with its pixels at their working scale (``record.scale``)."""
    scale = working_scale(record.pixels)
    if scale == 1.0:
        return record
    height, width = record.pixels.shape[:2]
    size = (round(width * scale), round(height * scale))
    return replace(record, pixels=cv2.resize(record.pixels, size, interpolation=cv2.INTER_AREA), scale=scale)


class _Halve(beam.DoFn):
    def setup(self) -> None:
        self._halved = Metrics.counter("acne", "faces_halved_as_enlarged")

    def process(self, record: ImageRecord) -> Iterator[ImageRecord]:
        working = at_working_resolution(record)
        if working.scale != 1.0:
            self._halved.inc()
        yield working


class ShrinkEnlarged(beam.PTransform):
    """Decoded records -> the same records, the enlarged ones halved: score's working resolution."""

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "HalveEnlarged" >> beam.ParDo(_Halve())
