"""Generated patch datasets in the real on-disk format, for the classifier's tests."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.dataset import PATCH_SCHEMA, SPLITS, write_manifest

SKIN = (200, 160, 140)
# As a build_dataset manifest records it; a classifier trained on the data carries it on.
MIN_PATCH_SKIN = 0.3


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def colour_patch(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy patch that is reddish for label "acne" (or grades >= 2), greenish otherwise."""
    red = label in ("acne", "2", "3")
    base = np.array((190, 70, 60) if red else (70, 170, 80), np.float32)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def lesion_patch(lesions: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A skin-coloured patch with ``lesions`` dark red spots."""
    patch = np.clip(np.array(SKIN, np.float32) + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    r = max(2, size // 10)
    for _ in range(lesions):
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        cv2.circle(patch, (cx, cy), r, (150, 20, 30), -1)
    return patch


def write_patch_dataset(
    root: Path,
    faces_per_label: dict[str, dict[str, int]],
    patches_per_face: int = 4,
    size: int = 24,
    seed: int = 0,
    lesion_grades: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """Write ``patches/<split>/part-00000.parquet`` plus a manifest under ``root``.

    ``faces_per_label`` maps split -> {label: face count}. Without ``lesion_grades`` the
    patch colour gives the label away and lesion_count is null; with it, each face of grade
    g gets a total lesion count drawn from ``lesion_grades[g]`` spread over its patches,
    and lesion_count records the spots on each patch.
    """
    rng = np.random.default_rng(seed)
    mask = _png(np.full((size, size, 3), 255, np.uint8))
    for split in SPLITS:
        rows: dict[str, list] = {name: [] for name in PATCH_SCHEMA.names}
        for label, n_faces in faces_per_label.get(split, {}).items():
            for f in range(n_faces):
                image_id = f"{split}-{label}-{f}"
                if lesion_grades is None:
                    counts: list[int | None] = [None] * patches_per_face
                else:
                    lo, hi = lesion_grades[label]
                    total = int(rng.integers(lo, hi + 1))
                    counts = np.bincount(rng.integers(0, patches_per_face, total), minlength=patches_per_face).tolist()
                for p, count in enumerate(counts):
                    pixels = colour_patch(label, size, rng) if count is None else lesion_patch(count, size, rng)
                    values = dict(
                        image_id=image_id,
                        patch_id=f"{image_id}-{p}",
                        split=split,
                        label=label,
                        x=p * size,
                        y=0,
                        size=size,
                        skin_fraction=1.0,
                        lesion_count=count,
                        image={"bytes": _png(pixels), "path": None},
                        mask={"bytes": mask, "path": None},
                        source_uri=f"generated://{image_id}.png",
                        segmenter_sha256="generated",
                    )
                    for k, v in values.items():
                        rows[k].append(v)
        (root / "patches" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows, schema=PATCH_SCHEMA), root / "patches" / split / "part-00000.parquet")
    write_manifest(str(root), {"generated_by": "tests.classifier_data", "accounting": {"ok": True},
                               "arguments": {"min_patch_skin": MIN_PATCH_SKIN}})
    return root
