"""Side files: what is joined to images by id (label CSVs, FFHQ metadata, VOC lesion boxes).

Labels and FFHQ metadata are small and loaded once by the launcher, so a bad file fails
before any work; VOC boxes sit beside each image and are read with it.
"""
from __future__ import annotations

import csv
import json
import posixpath
from typing import Any, Optional, Sequence
from xml.etree import ElementTree

from transforms.storage import open_file, read_bytes


class InputError(ValueError):
    """An input pattern, label file or metadata file cannot be used; raised before any work."""


def image_id_from_name(name: str) -> str:
    """A stable id from a file or member name: its stem (FFHQ ``00042.png`` -> ``00042``)."""
    base = posixpath.basename(name.rstrip("/"))
    return posixpath.splitext(base)[0]


def _normalise_id(value: str) -> str:
    return image_id_from_name(value.strip())


def load_labels(uris: Sequence[str], id_column: str, label_column: str) -> dict[str, str]:
    """Read label CSVs into {image id: label}; ids match by file stem (``a/b.jpg`` -> ``b``)."""
    labels: dict[str, str] = {}
    for uri in uris:
        try:
            with open_file(uri, "rt", newline="") as f:
                reader = csv.DictReader(f)
                missing = {id_column, label_column} - set(reader.fieldnames or ())
                if missing:
                    raise InputError(
                        f"labels file {uri} has no column(s) {sorted(missing)}; its columns are "
                        f"{reader.fieldnames}. Set --id-column / --label-column."
                    )
                for row in reader:
                    labels[_normalise_id(row[id_column])] = row[label_column].strip()
        except (FileNotFoundError, PermissionError, OSError) as exc:
            raise InputError(f"cannot read labels file {uri}: {exc}") from exc
    return labels


def load_ffhq_metadata(uri: str) -> dict[str, dict[str, Any]]:
    """FFHQ's ``ffhq-dataset-v2.json`` -> {5-digit id: {category, landmarks}}."""
    try:
        with open_file(uri, "rt") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read FFHQ metadata {uri}: {exc}") from exc
    meta = {}
    for index, entry in raw.items():
        image = entry.get("image", {})
        meta[f"{int(index):05d}"] = {
            "category": entry.get("category"),
            "landmarks": image.get("face_landmarks"),
        }
    return meta


def parse_voc_boxes(xml_bytes: bytes) -> list[tuple[int, int, int, int]]:
    """Pascal-VOC lesion boxes as (xmin, ymin, xmax, ymax)."""
    boxes = []
    for box in ElementTree.fromstring(xml_bytes).iter("bndbox"):
        coords = [int(float(box.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(tuple(coords))
    return boxes


def voc_boxes(image_uri: str) -> Optional[list[tuple[int, int, int, int]]]:
    """The boxes of the VOC file beside an image (``a/b.jpg`` -> ``a/b.xml``); None if it has none.

    An unreadable file raises ``ElementTree.ParseError``.
    """
    try:
        return parse_voc_boxes(read_bytes(posixpath.splitext(image_uri)[0] + ".xml"))
    except FileNotFoundError:
        return None
