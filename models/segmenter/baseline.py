"""The no-learning floor: a fixed YCrCb colour threshold.

Every learned skin model is reported next to this one; a model that does not clearly beat
it is not worth its inference cost.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

CR_RANGE = (133, 173)
CB_RANGE = (77, 127)


def colour_skin_mask(image: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> uint8 0/1 mask of pixels whose Cr and Cb fall in the skin box."""
    ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
    lower = np.array([0, CR_RANGE[0], CB_RANGE[0]], np.uint8)
    upper = np.array([255, CR_RANGE[1], CB_RANGE[1]], np.uint8)
    return (cv2.inRange(ycrcb, lower, upper) > 0).astype(np.uint8)


class ColourBaseline:
    """The colour threshold behind the same ``predict_masks`` call as ``Segmenter``."""

    name = "ycrcb_colour_baseline"

    def predict_masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [colour_skin_mask(im) for im in images]
