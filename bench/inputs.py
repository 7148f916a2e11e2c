"""The benchmark's input: N jittered 1024x1024 face PNGs in FFHQ layout, made at run time.

Sources are the shared FFHQ photo (``<repo>/../shared/data/ffhq/15723.jpg``) when it is
there, plus the public-domain portraits that ship inside installed packages. Every image
gets its own crop, flip, exposure and small rotation, so no two inputs are identical and
no stage can profit from a repeated image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial
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


def _one(photos: dict[str, np.ndarray], seed: int, index: int) -> np.ndarray:
    """Input ``index``'s pixels: its own random stream, so any process can make any image."""
    names = sorted(photos)
    name = names[index % len(names)]
    return jitter(photos[name], FACE_BOXES[name], np.random.default_rng([seed, index]))


def _write_range(photos: dict[str, np.ndarray], seed: int, out_dir: Path, indices: range) -> list[str]:
    """Write the inputs ``indices``; return their pixels' digests."""
    digests = []
    for index in indices:
        image = _one(photos, seed, index)
        digests.append(hashlib.sha1(image.tobytes()).hexdigest())
        write_png(input_path(out_dir, index), image)
    return digests


def input_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{index // 1000 * 1000:05d}" / f"{index:05d}.png"


def make_inputs(out_dir: Path, count: int, seed: int = 0, workers: int = 1) -> list[Path]:
    """Write ``count`` distinct PNGs as ``out_dir/NNNNN/NNNNN.png`` in ``workers`` processes; return their paths.

    The same (count, seed, sources) always gives the same files, so a folder that already holds
    them, as the stamp beside it (``<out_dir>.inputs.json``) says, is reused as it is.
    """
    photos = sources()
    stamp = out_dir.parent / f"{out_dir.name}.inputs.json"
    wanted = {"count": count, "seed": seed, "sources": sorted(photos)}
    paths = [input_path(out_dir, i) for i in range(count)]
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and all(p.is_file() for p in paths):
        log.info("reusing the %d inputs in %s", count, out_dir)
        return paths
    size = -(-count // (4 * workers))  # a few chunks per process evens out their finishing times
    chunks = [range(start, min(start + size, count)) for start in range(0, count, size)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            digests = [d for part in pool.map(partial(_write_range, photos, seed, out_dir), chunks) for d in part]
    else:
        digests = [d for chunk in chunks for d in _write_range(photos, seed, out_dir, chunk)]
    if len(set(digests)) != count:
        raise RuntimeError(f"two of the {count} inputs came out identical (seed {seed}); the jitter is broken")
    stamp.write_text(json.dumps(wanted) + "\n")
    return paths
