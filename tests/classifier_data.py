"""Generated patch datasets in the real on-disk format, for the classifier's tests.

Faces are made of skin-coloured patches; a face with acne has dark red spots on some of its
patches, a clear face has none. That is all the signal there is, so a classifier that learns
from these data has learned to count spots, not to recognise a dataset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.classifier import Classifier, ClassifierConfig, build_network
from models.dataset import PATCH_SCHEMA, SPLITS, write_manifest

SKIN = (200, 160, 140)
# As a build_dataset manifest records it; a classifier trained on the data carries it on.
MIN_PATCH_SKIN = 0.3
# Total lesions per face, by label: clear faces have none, and the Hayashi grades are lesion
# count bands (here scaled down to a few patches). Labels not listed (raw dataset labels such
# as "0".."3") fall back to the grade of the same rank, see ``lesion_range``.
LESIONS = {
    "clear": (0, 0),
    "face": (0, 0),
    "acne": (3, 8),
    "mild": (2, 3),
    "moderate": (5, 6),
    "severe": (9, 10),
    "very_severe": (13, 15),
}
RAW_GRADES = {"0": "mild", "1": "moderate", "2": "severe", "3": "very_severe"}
CLEAR_LABELS = ("clear", "face")


# A calibration under which no face is acne: even 100 000 lesions give p = sigmoid(11.5 - 20) < 0.001,
# and no face has p below sigmoid(-20) ~ 2e-9. An "acne" can then only come from a threshold
# the user passed. The grade curve: 0 lesions mild, 5 moderate, 10 severe, 20 very severe, nudged
# by the patches' own grade outputs (so every path that judges faces must carry them).
ALWAYS_CLEAR = dict(
    acne_slope=1.0,
    acne_bias=-20.0,
    verdict_threshold=0.5,
    severity_slopes=(0.0, 0.5, 1.0, 1.5),
    severity_patch_weights=tuple(tuple(0.5 * (row == col) for col in range(4)) for row in range(4)),
    severity_bias=(0.0, -2.0, -6.0, -12.0),
)


def save_untrained_classifier(uri: str, **overrides: object) -> str:
    """Write a classifier checkpoint with random weights (a tiny timm test network); return its sha256.

    For behaviour that needs no trained model: batching, ranking, the row format, the flags.
    """
    import torch

    torch.manual_seed(0)
    cfg = ClassifierConfig(**{"arch": "test_byobnet", "input_size": 32, **ALWAYS_CLEAR, **overrides})
    return Classifier(build_network(cfg), cfg).save(uri)


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def lesion_range(label: str, lesions: Mapping[str, tuple[int, int]] | None = None) -> tuple[int, int]:
    """The (least, most) lesions a face with ``label`` gets."""
    table = {**LESIONS, **(lesions or {})}
    if label in table:
        return table[label]
    if label in RAW_GRADES:
        return table[RAW_GRADES[label]]
    raise KeyError(f"no lesion range for label {label!r}: pass lesions={{{label!r}: (lo, hi)}}")


def lesion_patch(lesions: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A skin-coloured patch with ``lesions`` dark red spots (none: plain, slightly noisy skin)."""
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
    lesions: Mapping[str, tuple[int, int]] | None = None,
    unannotated: Collection[str] = CLEAR_LABELS,
    id_prefix: str = "",
) -> Path:
    """Write ``patches/<split>/part-00000.parquet`` plus a manifest under ``root``.

    ``faces_per_label`` maps split -> {label: face count}. Each face gets a total number of
    lesions drawn from its label's range (``LESIONS``, overridden by ``lesions``), spread at
    random over its patches and drawn as spots. Every patch records its spots as
    ``lesion_count``, except on faces whose label is in ``unannotated``: like real clear
    photos (CelebA-HQ), those have no lesion boxes, so their lesion_count is null.
    """
    rng = np.random.default_rng(seed)
    mask = _png(np.full((size, size, 3), 255, np.uint8))
    for split in SPLITS:
        rows: dict[str, list] = {name: [] for name in PATCH_SCHEMA.names}
        for label, n_faces in faces_per_label.get(split, {}).items():
            lo, hi = lesion_range(label, lesions)
            for f in range(n_faces):
                image_id = f"{id_prefix}{split}-{label}-{f}"
                total = int(rng.integers(lo, hi + 1))
                counts = np.bincount(rng.integers(0, patches_per_face, total), minlength=patches_per_face).tolist()
                for p, count in enumerate(counts):
                    values = dict(
                        image_id=image_id,
                        patch_id=f"{image_id}-{p}",
                        split=split,
                        label=label,
                        x=p * size,
                        y=0,
                        size=size,
                        skin_fraction=1.0,
                        lesion_count=None if label in unannotated else count,
                        image={"bytes": _png(lesion_patch(count, size, rng)), "path": None},
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
