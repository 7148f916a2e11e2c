"""Lay out the classifier's training sources as build_dataset inputs, at several image scales.

    python -m models.classifier.prepare ../shared/data --output /tmp/acne_sources

ACNE04 shows a cheek close-up (a median lesion box is 30 px at 640²); FFHQ shows a whole face
at 1024², where a lesion spans 5-12 px. The lesion counter learns across that range from
copies of every photo shrunk by each of ``SCALES`` (VOC boxes shrunk with them), rather than
from one normalised scale: a skin-mask extent says nothing about the distance to the camera
when one set is all close-ups and the other all portraits.

Each source becomes ``OUTPUT/<source>@<scale>/{train,valid}/`` (``eval`` for the clear sources
kept out of training), with a ``labels.csv`` per folder and a VOC file per image: the acne
sources keep their boxes, and a clear face gets an empty one, so its patches carry
``lesion_count`` 0. Splits group what would leak: ACNE04 keeps its own train/valid split (no
``source_id`` is shared); a deteksi ``-seg`` file joins its original, and near-duplicate
photos (equal 16×16 thumbnails) share one group; CelebA-HQ and Pratheepan photos split by a
hash of the id. The FASSEG portraits, the CelebAMask-HQ faces and the FFHQ photo are never
trained on; a held-out photo that repeats a CelebA-HQ one is left out.
The printed build_dataset commands turn every folder into a patch dataset.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from xml.etree import ElementTree

import cv2
import numpy as np
from defusedxml import ElementTree as SafeElementTree

log = logging.getLogger(__name__)

# Shrink factors per source: ACNE04 close-ups down to FFHQ's lesion size, and clear faces down
# to the same face sizes, so that scale alone never tells acne from clear.
SCALES = {"acne04": (1.0, 0.5, 0.3), "deteksi": (1.0, 0.6), "celebahq": (1.0, 0.5, 0.35), "pratheepan": (1.0, 0.5)}
# Clear-skin sources never trained on, scored only by models.classifier.evaluate: lab portraits,
# celebrity faces at 512² framed like FFHQ, and FFHQ.
HELD_OUT_CLEAR = {"fasseg_frontal": "skin/fasseg_frontal/images", "fasseg_multipose": "skin/fasseg_multipose/images",
                  "celebamask": "skin/celebamask/images", "ffhq": "ffhq"}
# build_dataset's --min-face-skin per source (default 0.15 elsewhere): Pratheepan's family and
# group photos hold faces that cover a few percent of the frame, which score still judges (0.02).
MIN_FACE_SKIN = {"pratheepan": 0.02}
SEVERITY_LABELS = {"0": "mild", "1": "moderate", "2": "severe", "3": "very_severe"}
CLEAR, ACNE = "clear", "acne"
VALID_SHARE = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_THUMB = 16
# Mean absolute difference (0-255) below which two thumbnails are one photo.
_DUPLICATE_THUMB_DIFF = 6.0


@dataclass(frozen=True)
class Photo:
    """One source photo, its face label, its split, and its lesion boxes (None for clear faces)."""

    path: Path
    label: str
    split: str
    boxes: tuple[tuple[float, float, float, float], ...] = ()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.classifier.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", type=Path, help="the shared data folder (holds acne/, faces/, skin/, ffhq/)")
    p.add_argument("--output", type=Path, required=True, help="folder to write the source folders into")
    p.add_argument("--sources", nargs="+", default=[*SCALES, *HELD_OUT_CLEAR], help="sources to lay out")
    return p.parse_args(argv)


def voc_boxes(xml_path: Path) -> tuple[tuple[float, float, float, float], ...]:
    # Reading goes through defusedxml, as the jobs' VOC reader does: no entity is ever expanded.
    root = SafeElementTree.parse(xml_path, forbid_dtd=True).getroot()
    return tuple(tuple(float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")) for b in root.iter("bndbox"))


def hash_split(key: str) -> str:
    """train or valid, from a sha256 of the key (stable across machines and runs)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "valid" if bucket < VALID_SHARE else "train"


def _thumbnail(path: Path) -> np.ndarray:
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(gray, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)


def duplicate_groups(paths: Sequence[Path]) -> list[str]:
    """A group key per photo: a ``-seg`` copy joins its original, equal thumbnails join each other."""
    parent = list(range(len(paths)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    by_stem: dict[str, int] = {}
    for i, path in enumerate(paths):
        by_stem.setdefault(re.sub(r"-seg.*$", "", path.stem), i)
        union(i, by_stem[re.sub(r"-seg.*$", "", path.stem)])
    thumbs = [_thumbnail(p) for p in paths]
    for i in range(len(paths)):
        for j in range(i):
            if np.abs(thumbs[i] - thumbs[j]).mean() < _DUPLICATE_THUMB_DIFF:
                union(i, j)
    return [paths[find(i)].stem for i in range(len(paths))]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def acne04(data: Path) -> Iterator[Photo]:
    for split in ("train", "valid"):
        folder = data / "acne" / "acne04" / split
        with open(folder / "labels.csv", newline="") as f:
            grades = {row["image"]: row["grade"] for row in csv.DictReader(f)}
        for path in _images(folder):
            yield Photo(path, SEVERITY_LABELS[grades[path.name]], split, voc_boxes(path.with_suffix(".xml")))


def deteksi(data: Path) -> Iterator[Photo]:
    paths = _images(data / "acne" / "deteksi")
    for path, group in zip(paths, duplicate_groups(paths)):
        yield Photo(path, ACNE, hash_split(group), voc_boxes(path.with_suffix(".xml")))


def celebahq(data: Path) -> Iterator[Photo]:
    for path in _images(data / "faces" / "celebahq"):
        yield Photo(path, CLEAR, hash_split(path.stem))


def pratheepan(data: Path) -> Iterator[Photo]:
    """Web photos of clear skin, often with bodies, hands and patterned clothes around the face."""
    for path in _images(data / "skin" / "pratheepan" / "images"):
        yield Photo(path, CLEAR, hash_split(path.stem))


def held_out(data: Path, source: str) -> Iterator[Photo]:
    """The source's photos, less those that repeat a trained CelebA-HQ photo (CelebAMask-HQ holds
    19 of them): a held-out score must never see a training face."""
    trained = np.stack([_thumbnail(p) for p in _images(data / "faces" / "celebahq")])
    for path in _images(data / HELD_OUT_CLEAR[source]):
        if np.abs(trained - _thumbnail(path)).mean(axis=(1, 2)).min() < _DUPLICATE_THUMB_DIFF:
            log.info("leaving out %s: the same photo as a CelebA-HQ face", path)
            continue
        yield Photo(path, CLEAR, "eval")


def _voc_xml(name: str, shape: tuple[int, ...], boxes: Sequence[Sequence[float]]) -> bytes:
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "filename").text = name
    size = ElementTree.SubElement(root, "size")
    for key, value in (("width", shape[1]), ("height", shape[0]), ("depth", 3)):
        ElementTree.SubElement(size, key).text = str(value)
    for box in boxes:
        obj = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(obj, "name").text = "acne"
        bnd = ElementTree.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ElementTree.SubElement(bnd, key).text = str(int(round(value)))
    return ElementTree.tostring(root)


def write_source(photos: Sequence[Photo], out: Path, scale: float) -> None:
    """Write one source at one scale: images (PNG when shrunk, so no new artefacts), VOC files, labels."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for photo in photos:
        folder = out / photo.split
        folder.mkdir(parents=True, exist_ok=True)
        rgb = cv2.imread(str(photo.path), cv2.IMREAD_COLOR)
        if rgb is None:
            log.warning("skipping unreadable %s", photo.path)
            continue
        if scale != 1.0:
            size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            name = photo.path.stem + ".png"
            cv2.imwrite(str(folder / name), rgb, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        else:
            name = photo.path.name
            (folder / name).write_bytes(photo.path.read_bytes())
        boxes = [[v * scale for v in box] for box in photo.boxes]
        (folder / name).with_suffix(".xml").write_bytes(_voc_xml(name, rgb.shape, boxes))
        rows.setdefault(photo.split, []).append((name, photo.label))
    for split, labelled in rows.items():
        with open(out / split / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label"])
            writer.writerows(sorted(labelled))


def build_command(folder: Path, dataset: Path, source: str) -> str:
    splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
    fixed = "test" if splits == ["eval"] else "path"
    face_skin = f"--min-face-skin {MIN_FACE_SKIN[source]} " if source in MIN_FACE_SKIN else ""
    return (f"python -m pipelines.build_dataset --input {' '.join(str(folder / s) for s in splits)} "
            f"--labels-csv {' '.join(str(folder / s / 'labels.csv') for s in splits)} --id-column image --voc-annotations "
            f"--patch-size 128 --min-patch-skin 0.2 {face_skin}--split {fixed} --output {dataset} --overwrite")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    readers = {"acne04": acne04, "deteksi": deteksi, "celebahq": celebahq, "pratheepan": pratheepan}
    for source in args.sources:
        photos = list(readers[source](args.data) if source in readers else held_out(args.data, source))
        for scale in SCALES.get(source, (1.0,)):
            folder = args.output / f"{source}@{scale:g}"
            write_source(photos, folder, scale)
            counts = {s: sum(p.split == s for p in photos) for s in sorted({p.split for p in photos})}
            log.info("%s: %s", folder, counts)
            print(build_command(folder, args.output / "datasets" / folder.name, source))


if __name__ == "__main__":
    main()
