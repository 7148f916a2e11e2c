"""The benchmark's input: N jittered 1024x1024 face PNGs in FFHQ layout, made at run time.

Sources are the shared FFHQ photo (``<repo>/../shared/data/ffhq/15723.jpg``) when it is
there, plus the public-domain portraits that ship inside installed packages. Every image
gets its own crop, flip, exposure and small rotation, so no two inputs are identical and
no stage can profit from a repeated image.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np

from pipelines.sample_data import FFHQ_SIZE, ffhq_square, portraits, write_png

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_FFHQ = REPO.parent / "shared" / "data" / "ffhq" / "15723.jpg"
# Where each source's face sits: (centre x, centre y, side as a fraction of the short side).
FACE_BOXES = {
    "ffhq": (0.5, 0.5, 1.0),
    "grace_hopper": (0.5, 0.42, 1.0),
    "astronaut": (0.45, 0.35, 0.7),
}


def sources() -> dict[str, np.ndarray]:
    """Face photos as RGB arrays: the shared FFHQ photo if present, and the package portraits."""
    found: dict[str, np.ndarray] = {}
    if SHARED_FFHQ.is_file():
        pixels = cv2.imread(str(SHARED_FFHQ), cv2.IMREAD_COLOR_RGB)
        if pixels is not None:
            found["ffhq"] = pixels
    else:
        log.warning("%s is absent; using package portraits only", SHARED_FFHQ)
    try:
        found.update({k: v for k, v in portraits().items() if k in FACE_BOXES})
    except (ImportError, FileNotFoundError) as exc:
        log.warning("package portraits unavailable (%s)", exc)
    if not found:
        raise FileNotFoundError(f"no source photo: neither {SHARED_FFHQ} nor the package portraits exist")
    return found


def jitter(pixels: np.ndarray, box: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """One FFHQ-sized variant: shifted and scaled crop, maybe mirrored, re-exposed, slightly rotated."""
    cx, cy, side = box
    crop = (cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04), side * rng.uniform(0.85, 1.0))
    image = ffhq_square(pixels[:, ::-1] if rng.random() < 0.5 else pixels, crop)
    gain, gamma = rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.15)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma * gain, 0, 255).astype(np.uint8)
    image = cv2.LUT(image, lut)
    centre = (FFHQ_SIZE / 2, FFHQ_SIZE / 2)
    turn = cv2.getRotationMatrix2D(centre, rng.uniform(-8.0, 8.0), 1.0)
    return cv2.warpAffine(image, turn, (FFHQ_SIZE, FFHQ_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def make_inputs(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` distinct PNGs as ``out_dir/NNNNN/NNNNN.png``; return their paths."""
    photos = sources()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    paths = []
    index = 0
    while len(paths) < count:
        name = names[index % len(names)]
        image = jitter(photos[name], FACE_BOXES[name], rng)
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        path = out_dir / f"{index // 1000 * 1000:05d}" / f"{index:05d}.png"
        write_png(path, image)
        paths.append(path)
        index += 1
    return paths
