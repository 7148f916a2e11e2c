"""Patch datasets in memory, for the classifier's trainer and evaluator.

Reads build_dataset outputs through ``models.dataset`` and decodes every patch once into
one uint8 array at the network's input size, grouped by face. Several outputs load as one
set, each face remembering the source it came from: rates are reported per source, because a
pooled figure hides a model that only recognises where a photo was taken.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import pyarrow as pa

from models.dataset import SPLITS, read_manifest, read_patches

COLUMNS = ["image_id", "split", "label", "x", "y", "size", "lesion_count", "image", "source_uri"]


@dataclass
class PatchSet:
    """One split's patches, decoded, with the face each belongs to."""

    pixels: np.ndarray  # (N, S, S, 3) uint8 RGB at the model's input size
    face: np.ndarray  # (N,) int: index into face_ids
    lesions: np.ndarray  # (N,) float32, NaN where the dataset has no lesion_count
    boxes: np.ndarray  # (N, 3) int: x, y, size of each patch in its face
    face_ids: list[str]
    face_labels: list[str | None]  # the dataset's raw label per face
    face_uris: list[str]  # where each face's image was read from
    face_datasets: list[str]  # the name of the dataset each face came from

    @property
    def face_sources(self) -> list[str]:
        """Each face's source: its dataset name without the ``@scale`` suffix."""
        return [source_of(name) for name in self.face_datasets]

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


def face_verdicts(labels: Sequence[str | None], classes: Sequence[str], verdicts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mapped face labels -> (verdict index: 0 clear, 1 acne, -1 unknown; grade index or -1).

    A severity grade means acne of that grade; a verdict name means just that.
    """
    unknown = sorted({lab for lab in labels if lab is not None and lab not in classes and lab not in verdicts})
    if unknown:
        raise ValueError(f"labels {unknown} are neither grades {list(classes)} nor verdicts {list(verdicts)}; "
                         "map them with --label-map")
    verdict = np.array([-1 if lab is None else 1 if lab in classes else verdicts.index(lab) for lab in labels])
    grade = np.array([classes.index(lab) if lab in classes else -1 for lab in labels])
    return verdict.astype(np.int64), grade.astype(np.int64)


def face_totals(per_patch: np.ndarray, data: PatchSet) -> np.ndarray:
    """Per-face sums of a per-patch quantity, in face_ids order (faces with no patch sum to 0)."""
    return np.bincount(data.face, weights=per_patch, minlength=len(data.face_ids))


def face_mean_grades(patch_grades: np.ndarray, data: PatchSet) -> np.ndarray:
    """Each face's mean patch grade probabilities (faces, grades), in face_ids order."""
    patches = np.maximum(np.bincount(data.face, minlength=len(data.face_ids)), 1)
    return np.stack([face_totals(patch_grades[:, g], data) for g in range(patch_grades.shape[1])], 1) / patches[:, None]


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


def source_of(dataset_name: str) -> str:
    """``acne04@0.5`` -> ``acne04``: copies of one source at other scales are still that source."""
    return dataset_name.split("@", 1)[0]


def parse_dataset_spec(spec: str) -> tuple[str, str]:
    """``NAME=URI`` or a bare URI (named after its last path component) -> (name, uri)."""
    name, sep, uri = spec.partition("=")
    if not sep or "://" in name or "/" in name:
        uri = spec
        name = uri.rstrip("/").rsplit("/", 1)[-1]
    if not name or not uri:
        raise ValueError(f"dataset {spec!r} is not NAME=PATH or PATH")
    return name, uri


def load_patch_set(root: str, split: str, input_size: int, name: str = "") -> PatchSet:
    """Read and decode one split (``all``, or several joined by commas) of a finished build_dataset output."""
    read_manifest(root)
    splits = SPLITS if split == "all" else tuple(s.strip() for s in split.split(","))
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown}; choose from {SPLITS} or 'all'")
    table = pa.concat_tables([read_patches(root, s, columns=COLUMNS) for s in splits])
    face_ids: list[str] = []
    face_labels: list[str | None] = []
    face_uris: list[str] = []
    index: dict[str, int] = {}
    face = np.zeros(table.num_rows, np.int64)
    columns = (table.column(c).to_pylist() for c in ("image_id", "label", "source_uri"))
    for i, (image_id, label, uri) in enumerate(zip(*columns)):
        if image_id not in index:
            index[image_id] = len(face_ids)
            face_ids.append(image_id)
            face_labels.append(label)
            face_uris.append(uri)
        face[i] = index[image_id]
    pixels = np.zeros((table.num_rows, input_size, input_size, 3), np.uint8)
    for i, cell in enumerate(table.column("image").to_pylist()):
        rgb = decode_rgb(cell["bytes"])
        pixels[i] = cv2.resize(rgb, (input_size, input_size), interpolation=cv2.INTER_AREA)
    lesions = np.array(
        [np.nan if v is None else float(v) for v in table.column("lesion_count").to_pylist()], np.float32
    )
    boxes = np.stack([np.asarray(table.column(c).to_pylist(), np.int64) for c in ("x", "y", "size")], axis=1)
    name = name or root.rstrip("/").rsplit("/", 1)[-1]
    return PatchSet(pixels, face, lesions, boxes.reshape(-1, 3), face_ids, face_labels, face_uris,
                    [name] * len(face_ids))


def concat(sets: Sequence[PatchSet]) -> PatchSet:
    """One set from several; faces stay distinct (the same id in two datasets is two faces)."""
    offsets = np.cumsum([0] + [len(s.face_ids) for s in sets])
    return PatchSet(
        pixels=np.concatenate([s.pixels for s in sets]),
        face=np.concatenate([s.face + off for s, off in zip(sets, offsets)]),
        lesions=np.concatenate([s.lesions for s in sets]),
        boxes=np.concatenate([s.boxes for s in sets]),
        face_ids=[i for s in sets for i in s.face_ids],
        face_labels=[lab for s in sets for lab in s.face_labels],
        face_uris=[u for s in sets for u in s.face_uris],
        face_datasets=[d for s in sets for d in s.face_datasets],
    )


def load_sources(specs: Sequence[str], split: str, input_size: int) -> PatchSet:
    """Several build_dataset outputs (``NAME=PATH`` or ``PATH``), one split each, as one set.

    A dataset with no patches in the split adds nothing.
    """
    named = [parse_dataset_spec(s) for s in specs]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"two datasets share a name in {names}; name them NAME=PATH")
    return concat([load_patch_set(uri, split, input_size, name) for name, uri in named])


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
