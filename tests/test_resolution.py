"""Working resolution: an enlarged photo is halved before scoring, a sharp one is left alone."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines.sample_data import portraits
from transforms.records import ImageRecord
from transforms.resolution import ENLARGED_BELOW, MIN_WORKING_SIDE, at_working_resolution, detail_ratio, working_scale


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """A 512x512 photo at its own resolution."""
    return portraits()["astronaut"]


def _enlarged(pixels: np.ndarray, factor: float, interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    height, width = pixels.shape[:2]
    return cv2.resize(pixels, (round(width * factor), round(height * factor)), interpolation=interpolation)


def test_a_sharp_photo_keeps_its_size_and_the_same_photo_enlarged_is_halved(astronaut: np.ndarray) -> None:
    # Four sharp copies make a 1024x1024 photo with detail down to the pixel.
    sharp = np.ascontiguousarray(np.tile(astronaut, (2, 2, 1)))
    assert detail_ratio(sharp) > 1.5 * ENLARGED_BELOW and working_scale(sharp) == 1.0
    # Enlarged 3x, as the run_local.sh portraits are (3-5x). At 2x the ratio sits near the line
    # (0.21 for this photo), and 40-80 % of such photos are caught (MODEL_CARD.md).
    for interpolation in (cv2.INTER_LINEAR, cv2.INTER_CUBIC):
        enlarged = _enlarged(astronaut, 3, interpolation)
        assert detail_ratio(enlarged) < ENLARGED_BELOW and working_scale(enlarged) == 0.5


def test_a_photo_is_never_halved_below_the_working_floor(astronaut: np.ndarray) -> None:
    # Enlarged, but halving would leave its long side under MIN_WORKING_SIDE.
    enlarged = _enlarged(astronaut, 3)[: MIN_WORKING_SIDE, : 2 * MIN_WORKING_SIDE - 2]
    assert detail_ratio(enlarged) < ENLARGED_BELOW and working_scale(enlarged) == 1.0


def test_the_halved_record_says_by_how_much_and_a_sharp_one_is_the_same_record(astronaut: np.ndarray) -> None:
    enlarged = ImageRecord("a", "a.png", pixels=_enlarged(astronaut, 3))
    halved = at_working_resolution(enlarged)
    assert halved.scale == 0.5 and halved.pixels.shape == (768, 768, 3) and halved.image_id == "a"
    sharp = ImageRecord("b", "b.png", pixels=np.ascontiguousarray(np.tile(astronaut, (2, 2, 1))))
    assert at_working_resolution(sharp) is sharp
