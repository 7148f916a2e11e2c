"""Skin segmentation data: reading image/label folders and splitting them without leaks.

A data folder holds ``images/`` plus one of ``labels/`` (FASSEG colour label maps),
``labels_celebamask19/`` (CelebAMask-HQ 19-class index maps) or ``masks/`` (binary masks,
255 = skin). Every layout becomes RGB uint8 images with uint8 0/1 targets at the image's own
size, on one convention: skin, nose, ears and neck are the target. The trainer and the evaluator share ``assign_splits`` so a
checkpoint's held-out photos can be found again from its config.
"""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Region codes used by the trainer's augmentation. Binary masks only know SKIN vs OTHER;
# FASSEG label maps also say which non-skin pixels are hair and which are background.
OTHER, SKIN, HAIR, BACKGROUND = 0, 1, 2, 3

# FASSEG class colours (RGB) and their region. Skin includes neck and ears; the nose is skin
# acne can affect, so it joins the target; eyes and mouth are OTHER.
FASSEG_COLOURS: tuple[tuple[tuple[int, int, int], int], ...] = (
    ((255, 255, 0), SKIN),
    ((0, 255, 255), SKIN),  # nose
    ((0, 0, 255), OTHER),  # eyes
    ((0, 255, 0), OTHER),  # mouth
    ((127, 0, 0), HAIR),  # hair and eyebrows
    ((255, 0, 0), BACKGROUND),
)

# CelebAMask-HQ class ids (the index of each name) and the region each one belongs to. The
# target follows FASSEG, whose skin class includes neck and ears; brows join hair, as in FASSEG.
CELEBAMASK_CLASSES = ("background", "skin", "nose", "eyeglasses", "left_eye", "right_eye", "left_brow",
                      "right_brow", "left_ear", "right_ear", "mouth", "upper_lip", "lower_lip", "hair", "hat",
                      "earring", "necklace", "neck", "cloth")
_CELEBAMASK_REGION = {"background": BACKGROUND, "skin": SKIN, "nose": SKIN, "left_ear": SKIN, "right_ear": SKIN,
                      "neck": SKIN, "hair": HAIR, "left_brow": HAIR, "right_brow": HAIR}
CELEBAMASK_REGIONS = np.array([_CELEBAMASK_REGION.get(c, OTHER) for c in CELEBAMASK_CLASSES], np.uint8)
# Label folders by layout, in the order discover() looks for them.
LABEL_LAYOUTS = (("labels_celebamask19", "celebamask19"), ("labels", "colour"), ("masks", "binary"))

# Pointing'04 file names (FASSEG multipose) carry "personneSSXNN": subject SS, series X, shot NN.
_SUBJECT = re.compile(r"personne(\d{2})")
_PREFIXES = ("face_photo_", "family_photo_")
# Two photo names that contain one another merge into one group only when the shorter key is
# this long; shorter keys ("family") are generic words, not people.
_MIN_MERGE_KEY = 8


@dataclass(frozen=True)
class Pair:
    """One image and its label file, with the dataset it belongs to and its leak group."""

    dataset: str
    image: Path
    label: Path
    kind: str  # "colour" (FASSEG label map), "celebamask19" (class index map) or "binary" (mask)
    group: str

    @property
    def name(self) -> str:
        return self.image.name


def read_rgb(path: Path | str) -> np.ndarray:
    """Decode an image file to RGB uint8 HxWx3."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def colour_label_to_regions(label_rgb: np.ndarray) -> np.ndarray:
    """FASSEG colour map -> region codes, each pixel taking its nearest class colour."""
    colours = np.asarray([c for c, _ in FASSEG_COLOURS], np.int32)
    regions = np.asarray([r for _, r in FASSEG_COLOURS], np.uint8)
    dist = ((label_rgb.astype(np.int32)[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    return regions[dist.argmin(-1)]


def read_classes(pair: Pair, shape: tuple[int, ...]) -> np.ndarray:
    """A CelebAMask pair's class ids (see ``CELEBAMASK_CLASSES``) at the image's height and width."""
    if pair.kind != "celebamask19":
        raise ValueError(f"{pair.label} is a {pair.kind} label; only CelebAMask maps name their classes")
    # Palette PNGs: PIL keeps the indices, where OpenCV would expand them to colours.
    with Image.open(pair.label) as im:
        classes = np.asarray(im)
    if classes.ndim != 2 or classes.max(initial=0) >= len(CELEBAMASK_CLASSES):
        raise ValueError(f"{pair.label} is not a 19-class CelebAMask index map")
    if classes.shape != tuple(shape[:2]):
        classes = cv2.resize(classes, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return classes


def read_regions(pair: Pair, shape: tuple[int, ...]) -> np.ndarray:
    """The pair's region codes (OTHER/SKIN/HAIR/BACKGROUND) at the image's height and width."""
    if pair.kind == "celebamask19":
        return CELEBAMASK_REGIONS[read_classes(pair, shape)]
    if pair.kind == "colour":
        regions = colour_label_to_regions(read_rgb(pair.label))
    else:
        raw = cv2.imread(str(pair.label), cv2.IMREAD_GRAYSCALE)
        if raw is None:
            raise ValueError(f"cannot decode mask {pair.label}")
        regions = np.where(raw >= 128, SKIN, OTHER).astype(np.uint8)
    if regions.shape[:2] != tuple(shape[:2]):
        # Some FASSEG label maps are a few pixels off their image; nearest keeps labels crisp.
        regions = cv2.resize(regions, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return regions


def read_target(pair: Pair, shape: tuple[int, ...]) -> np.ndarray:
    """The pair's 0/1 uint8 target at the image's height and width."""
    return (read_regions(pair, shape) == SKIN).astype(np.uint8)


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair: RGB uint8 image and its 0/1 target of the same size."""
    image = read_rgb(pair.image)
    return image, read_target(pair, image.shape)


def load_regions(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair: RGB uint8 image and its region codes of the same size."""
    image = read_rgb(pair.image)
    return image, read_regions(pair, image.shape)


def _group_key(stem: str) -> str:
    subject = _SUBJECT.search(stem)
    if subject:
        return f"subject{subject.group(1)}"
    low = stem.lower()
    for prefix in _PREFIXES:
        if low.startswith(prefix):
            low = low[len(prefix):]
    letters = re.sub(r"[^a-z]", "", low)
    # Names like "f2_7" or "0520962400" carry no identity beyond the file itself.
    return letters if len(letters) >= 4 else stem.lower()


def group_ids(stems: Sequence[str]) -> list[str]:
    """Leak groups for photo names: same subject, or names that differ only by numbering.

    Several poses of one Pointing'04 subject share a group, as do "actress-001"/"actress-002"
    and a key that contains another long key ("srilankanactressyamunaerandathi" and
    "yamunaerandathi").
    """
    keys = [_group_key(s) for s in stems]
    distinct = sorted(set(keys), key=len)
    merged = {k: k for k in distinct}
    for i, short in enumerate(distinct):
        if len(short) < _MIN_MERGE_KEY or short.startswith("subject"):
            continue
        for long in distinct[i + 1:]:
            if short in long:
                merged[long] = merged[short]
    return [merged[k] for k in keys]


def add_folders_argument(p: argparse.ArgumentParser) -> None:
    """The positional ``data`` folders, as both segmenter CLIs take them."""
    p.add_argument("data", nargs="+", type=Path,
                   help="data folders, each with images/ plus labels_celebamask19/ (CelebAMask-HQ class maps), "
                        "labels/ (FASSEG colour label maps: skin and nose are target) or masks/ (binary, "
                        "255 = skin); the layout is detected per folder")


def discover(folder: Path | str) -> list[Pair]:
    """List the pairs in one data folder, auto-detecting colour label maps vs binary masks."""
    root = Path(folder)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise ValueError(f"{root} has no images/ folder: expected images/ plus labels/, labels_celebamask19/ or masks/")
    found = [(root / name, kind) for name, kind in LABEL_LAYOUTS if (root / name).is_dir()]
    if not found:
        raise ValueError(f"{root} has none of labels_celebamask19/ (class maps), labels/ (colour maps) "
                         "or masks/ (binary masks)")
    label_dir, kind = found[0]
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in labels)
    if not images:
        raise ValueError(f"{root}: no image in images/ has a label of the same name in {label_dir.name}/")
    if kind == "colour":
        # A "labels/" folder may still hold plain binary masks; look at one to be sure.
        sample = read_rgb(labels[images[0].stem])
        if np.array_equal(sample[..., 0], sample[..., 1]) and np.array_equal(sample[..., 1], sample[..., 2]):
            kind = "binary"
    groups = group_ids([p.stem for p in images])
    return [Pair(root.name, p, labels[p.stem], kind, g) for p, g in zip(images, groups)]


def assign_splits(pairs: Sequence[Pair], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Choose held-out groups per dataset: a seeded shuffle of the sorted group ids.

    At least one group of every dataset with two or more groups is held out, so each dataset
    gets a validation score. Returns ``{dataset: sorted validation group ids}``.
    """
    by_dataset: dict[str, set[str]] = {}
    for p in pairs:
        by_dataset.setdefault(p.dataset, set()).add(p.group)
    val: dict[str, list[str]] = {}
    for dataset, groups in sorted(by_dataset.items()):
        ordered = sorted(groups)
        random.Random(f"{seed}:{dataset}").shuffle(ordered)
        n_val = max(1, round(val_fraction * len(ordered))) if len(ordered) > 1 and val_fraction > 0 else 0
        val[dataset] = sorted(ordered[:n_val])
    return val


def select(pairs: Iterable[Pair], val_groups: Mapping[str, Sequence[str]], held_out: bool) -> list[Pair]:
    """The pairs on the held-out side (``held_out=True``) or the training side of a split."""
    return [p for p in pairs if (p.group in set(val_groups.get(p.dataset, ()))) == held_out]


def skin_ita(image: np.ndarray, skin: np.ndarray) -> float:
    """Individual Typology Angle (degrees) of the skin pixels: atan2(L* - 50, b*) in CIELAB.

    Lower is darker (below -30 "dark", above 55 "very light"), within [-90, 90]; medians keep
    it robust to shadows and highlights. NaN when the mask holds no skin.
    """
    pixels = image[skin.astype(bool)]
    if len(pixels) == 0:
        return float("nan")
    lab = cv2.cvtColor(pixels.reshape(-1, 1, 3).astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).reshape(-1, 3)
    lightness, yellow = float(np.median(lab[:, 0])), float(np.median(lab[:, 2]))
    # Grey or bluish casts give b* <= 0; ITA is then +-90 (its limit), not an angle past it.
    return float(np.degrees(np.arctan2(lightness - 50.0, max(yellow, 1e-6))))
