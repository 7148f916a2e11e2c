"""Patch datasets in memory, for the classifier's trainer and evaluator.

Reads a build_dataset output through ``models.dataset`` and decodes every patch once into
one uint8 array at the network's input size, grouped by face.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import numpy as np

from models.dataset import SPLITS, read_manifest, read_patches

COLUMNS = ["image_id", "split", "label", "x", "y", "size", "lesion_count", "image"]


@dataclass
class PatchSet:
    """One split's patches, decoded, with the face each belongs to."""

    pixels: np.ndarray  # (N, S, S, 3) uint8 RGB at the model's input size
    face: np.ndarray  # (N,) int: index into face_ids
    lesions: np.ndarray  # (N,) float32, NaN where the dataset has no lesion_count
    boxes: np.ndarray  # (N, 3) int: x, y, size of each patch in its face
    face_ids: list[str]
    face_labels: list[str | None]  # the dataset's raw label per face

    def __len__(self) -> int:
        return len(self.face)

    def face_patches(self) -> list[np.ndarray]:
        """Patch indices of every face, in face_ids order."""
        order = np.argsort(self.face, kind="stable")
        bounds = np.searchsorted(self.face[order], np.arange(len(self.face_ids) + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(len(self.face_ids))]


def decode_rgb(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> RGB uint8 HxWx3."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("patch image bytes are not a readable PNG or JPEG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_splits_disjoint(root: str) -> None:
    """Refuse a dataset where a face appears in more than one split (it would leak)."""
    table = read_patches(root, "all", columns=["image_id", "split"])
    seen: dict[str, str] = {}
    for image_id, split in zip(table.column("image_id").to_pylist(), table.column("split").to_pylist()):
        if seen.setdefault(image_id, split) != split:
            raise ValueError(
                f"face {image_id!r} has patches in splits {seen[image_id]!r} and {split!r}; "
                "rebuild the dataset so that every face lives in one split"
            )


def load_patch_set(root: str, split: str, input_size: int) -> PatchSet:
    """Read and decode one split (or ``all``) of a finished build_dataset output."""
    read_manifest(root)
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS} or 'all'")
    table = read_patches(root, split, columns=COLUMNS)
    face_ids: list[str] = []
    face_labels: list[str | None] = []
    index: dict[str, int] = {}
    face = np.zeros(table.num_rows, np.int64)
    for i, (image_id, label) in enumerate(zip(table.column("image_id").to_pylist(), table.column("label").to_pylist())):
        if image_id not in index:
            index[image_id] = len(face_ids)
            face_ids.append(image_id)
            face_labels.append(label)
        face[i] = index[image_id]
    pixels = np.zeros((table.num_rows, input_size, input_size, 3), np.uint8)
    for i, cell in enumerate(table.column("image").to_pylist()):
        rgb = decode_rgb(cell["bytes"])
        pixels[i] = cv2.resize(rgb, (input_size, input_size), interpolation=cv2.INTER_AREA)
    lesions = np.array(
        [np.nan if v is None else float(v) for v in table.column("lesion_count").to_pylist()], np.float32
    )
    boxes = np.stack([np.asarray(table.column(c).to_pylist(), np.int64) for c in ("x", "y", "size")], axis=1)
    return PatchSet(pixels, face, lesions, boxes.reshape(-1, 3), face_ids, face_labels)


def parse_label_map(spec: str) -> dict[str, str]:
    """``"0,1->0;2,3->1"`` -> {"0": "0", "1": "0", "2": "1", "3": "1"}; empty spec -> {}."""
    mapping: dict[str, str] = {}
    for group in filter(None, (g.strip() for g in spec.split(";"))):
        match = re.fullmatch(r"([^>]+)->(.+)", group)
        if not match:
            raise ValueError(f"label map group {group!r} is not of the form 'a,b->target'")
        target = match.group(2).strip()
        for source in (s.strip() for s in match.group(1).split(",")):
            if not source or not target:
                raise ValueError(f"label map group {group!r} has an empty label")
            if mapping.get(source, target) != target:
                raise ValueError(f"label {source!r} is mapped twice in {spec!r}")
            mapping[source] = target
    return mapping


def map_labels(labels: Sequence[str | None], mapping: Mapping[str, str]) -> list[str | None]:
    """Apply a label map (identity when empty); unlabelled faces stay None."""
    if not mapping:
        return list(labels)
    missing = sorted({lab for lab in labels if lab is not None and lab not in mapping})
    if missing:
        raise ValueError(f"labels {missing} are not in the label map {dict(mapping)}; add them to --label-map")
    return [None if lab is None else mapping[lab] for lab in labels]


def order_classes(labels: Sequence[str]) -> tuple[str, ...]:
    """Distinct labels, numerically ordered when they are all numbers (grades), else sorted."""
    distinct = sorted(set(labels))
    try:
        return tuple(sorted(distinct, key=float))
    except ValueError:
        return tuple(distinct)
