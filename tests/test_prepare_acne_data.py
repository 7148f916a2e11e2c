"""models.classifier.prepare: the shared sources as build_dataset inputs, at several scales, without leaks."""
from __future__ import annotations

import csv
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import pytest

from models.classifier.prepare import SCALES, duplicate_groups, main, voc_boxes


def _photo(path: Path, seed: int, size: tuple[int, int] = (200, 160)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), size,
                                      interpolation=cv2.INTER_NEAREST))


def _voc(path: Path, boxes: list[tuple[int, int, int, int]]) -> None:
    root = ElementTree.Element("annotation")
    for box in boxes:
        bnd = ElementTree.SubElement(ElementTree.SubElement(root, "object"), "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ElementTree.SubElement(bnd, key).text = str(value)
    path.write_bytes(ElementTree.tostring(root))


@pytest.fixture()
def shared(tmp_path: Path) -> Path:
    """A miniature ../shared/data: two ACNE04 photos, deteksi with a -seg copy and a renamed duplicate, clear faces."""
    data = tmp_path / "data"
    for split, name, grade in (("train", "a.jpg", "0"), ("valid", "b.jpg", "3")):
        folder = data / "acne" / "acne04" / split
        _photo(folder / name, seed=len(name) + int(grade))
        _voc((folder / name).with_suffix(".xml"), [(10, 10, 30, 30), (100, 60, 120, 90)])
        (folder / "labels.csv").write_text(f"image,grade,source_id\n{name},{grade},{name[0]}\n")
    deteksi = data / "acne" / "deteksi"
    for stem, seed in (("train__1", 1), ("train__1-seg", 2), ("test__copy-seg", 2), ("train__9", 9)):
        _photo(deteksi / f"{stem}.jpg", seed)
        _voc(deteksi / f"{stem}.xml", [(50, 40, 70, 60)])
    for i in range(6):
        _photo(data / "faces" / "celebahq" / f"{27000 + i}.jpg", 100 + i)
        _photo(data / "skin" / "pratheepan" / "images" / f"p{i}.jpg", 200 + i)
    for folder in ("fasseg_frontal", "fasseg_multipose"):
        _photo(data / "skin" / folder / "images" / "f.bmp.png", 300)
    # CelebAMask-HQ re-publishes some CelebA-HQ photos, at half their size and under another name.
    _photo(data / "skin" / "celebamask" / "images" / "a1b2.jpg", 102, size=(100, 80))
    _photo(data / "skin" / "celebamask" / "images" / "c3d4.jpg", 500, size=(100, 80))
    _photo(data / "ffhq" / "15723.jpg", 400)
    return data


def test_a_seg_copy_and_a_renamed_duplicate_share_their_original_group(shared: Path) -> None:
    paths = sorted((shared / "acne" / "deteksi").glob("*.jpg"))
    groups = dict(zip((p.stem for p in paths), duplicate_groups(paths)))
    assert groups["train__1"] == groups["train__1-seg"] == groups["test__copy-seg"]
    assert groups["train__9"] != groups["train__1"]


def test_every_source_is_laid_out_at_its_scales_with_labels_and_scaled_boxes(
    shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sources"
    main([str(shared), "--output", str(out)])
    commands = capsys.readouterr().out.strip().splitlines()
    folders = sorted(p.name for p in out.iterdir())
    expected = sorted([f"{s}@{scale:g}" for s, scales in SCALES.items() for scale in scales]
                      + ["fasseg_frontal@1", "fasseg_multipose@1", "celebamask@1", "ffhq@1"])
    assert folders == expected and len(commands) == len(expected)
    assert all(c.startswith("python -m pipelines.build_dataset") and "--voc-annotations" in c for c in commands)
    # ACNE04 keeps its own split and grades become names; the boxes shrink with the photo.
    half = out / "acne04@0.5"
    with open(half / "valid" / "labels.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"image": "b.png", "label": "very_severe"}]
    assert cv2.imread(str(half / "valid" / "b.png")).shape[:2] == (80, 100)
    assert voc_boxes(half / "valid" / "b.xml") == ((5.0, 5.0, 15.0, 15.0), (50.0, 30.0, 60.0, 45.0))
    # Clear faces carry an empty VOC file (zero lesions); the never-trained sources are split 'eval' only.
    clear = next((out / "celebahq@1").glob("*/*.jpg"))
    assert voc_boxes(clear.with_suffix(".xml")) == ()
    assert [p.name for p in (out / "ffhq@1").iterdir()] == ["eval"]
    assert "--split test" in next(c for c in commands if "ffhq@1" in c)
    # A held-out photo that repeats a training photo is left out, so no held-out score sees it.
    assert sorted(p.name for p in (out / "celebamask@1" / "eval").glob("*.jpg")) == ["c3d4.jpg"]
    # Copies of one deteksi photo never straddle train and validation.
    splits = {p.stem: p.parent.name for p in (out / "deteksi@1").glob("*/*.jpg")}
    assert splits["train__1"] == splits["train__1-seg"] == splits["test__copy-seg"]
