"""Small generated images for tests, encoded the way real archives hold them."""
from __future__ import annotations

import io

import cv2
import numpy as np


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG bytes of an RGB (HxWx3), gray (HxW) or RGBA (HxWx4) array, 8- or 16-bit."""
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return buf.tobytes()


def jpeg_bytes(pixels: np.ndarray, **save_kwargs: object) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, **save_kwargs)
    return out.getvalue()
