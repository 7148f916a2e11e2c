"""build_dataset end to end: what a data engineer gets from one command, good input and bad."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from models.dataset import FACES_DIR, read_patches, read_table
from pipelines.build_dataset import run
from pipelines.common import JobConfigError
from tests.conftest import REPO
from tests.images import png_bytes, random_rgb
from transforms.split import hash_split, parse_fractions

SMALL = ["--patch-size", "128"]


@pytest.fixture(scope="module")
def sample_build(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("build") / "dataset"
    manifest = run(["--input", str(sample_dir), "--output", str(out)])
    return out, manifest


def test_every_input_is_accounted_for_exactly_once(sample_build) -> None:
    out, manifest = sample_build
    books = manifest["accounting"]
    assert books["ok"] and books["inputs"] == 7
    assert books["kept"] + books["filtered"] + books["failed"] == 7 and books["failed"] == 2
    faces = read_table(str(out), FACES_DIR).to_pandas()
    assert sorted(faces.image_id) == [f"{i:05d}" for i in range(7)]
    failed = faces[faces.status == "failed"]
    assert set(failed.image_id) == {"00005", "00006"} and set(failed.stage) == {"decode"}
    decided = faces[faces.status != "failed"]
    assert ((decided.reason.str.len() > 0) == (decided.status == "filtered")).all(), "filtered faces say why"
    errors = read_table(str(out), "errors").to_pandas()
    assert set(errors.image_id) == {"00005", "00006"} and errors.message.str.len().min() > 10
    assert Image.open(out / "report.png").size[0] > 600


def test_kept_faces_have_patches_and_their_counts_match(sample_build) -> None:
    out, manifest = sample_build
    faces = read_table(str(out), FACES_DIR).to_pandas().set_index("image_id")
    patches = read_patches(str(out)).to_pandas()
    assert manifest["accounting"]["kept"] >= 3, "the three portraits are faces"
    counts = patches.groupby("image_id").size()
    assert counts.to_dict() == faces[faces.status == "kept"].patch_count.to_dict()
    assert (patches.skin_fraction >= 0.5).all() and (patches["size"] == 256).all()
    assert patches.groupby("image_id").split.nunique().max() == 1, "a face never straddles splits"
    assert set(patches.segmenter_sha256) == {manifest["checkpoints"]["segmenter"]["sha256"]}


def test_every_face_that_was_read_carries_its_split_filtered_and_failed_included(sample_build) -> None:
    out, _ = sample_build
    faces = read_table(str(out), FACES_DIR).to_pandas()
    assert {"filtered", "failed"} <= set(faces.status), "the sample has a low-skin face and two broken files"
    expected = {i: hash_split(i, parse_fractions("0.8,0.1,0.1")) for i in faces.image_id}
    assert faces.set_index("image_id").split.to_dict() == expected
    patches = read_patches(str(out), columns=["image_id", "split"]).to_pandas()
    assert (patches.split == patches.image_id.map(expected)).all()
    kept = faces[faces.status == "kept"]
    assert patches.split.value_counts().to_dict() == kept.groupby("split").patch_count.sum().to_dict()


def test_patches_decode_like_a_hugging_face_image_column(sample_build) -> None:
    out, _ = sample_build
    row = read_patches(str(out), columns=["image", "mask", "x", "y", "size"]).slice(0, 1).to_pylist()[0]
    image = Image.open(io.BytesIO(row["image"]["bytes"]))
    mask = np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"])))
    assert image.size == (row["size"], row["size"]) and image.mode == "RGB"
    assert row["image"]["path"].endswith(".png") and set(np.unique(mask)) <= {0, 255}


def test_rerun_with_overwrite_gives_identical_rows(sample_build, sample_dir: Path) -> None:
    out, first = sample_build
    before = read_patches(str(out)).to_pandas().sort_values("patch_id").reset_index(drop=True)
    second = run(["--input", str(sample_dir), "--output", str(out), "--overwrite"])
    after = read_patches(str(out)).to_pandas().sort_values("patch_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    assert second["accounting"] == first["accounting"]


def test_existing_output_is_left_alone_without_overwrite(sample_build, sample_dir: Path) -> None:
    out, _ = sample_build
    manifest_before = (out / "manifest.json").read_text()
    with pytest.raises(JobConfigError, match="--overwrite"):
        run(["--input", str(sample_dir), "--output", str(out)])
    assert (out / "manifest.json").read_text() == manifest_before


def test_bad_checkpoint_fails_before_any_work(tmp_path: Path, sample_dir: Path) -> None:
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"kind": "classifier", "format_version": 1}))
    with pytest.raises(JobConfigError, match="'classifier' checkpoint, but a 'segmenter' checkpoint is needed"):
        run(["--input", str(sample_dir), "--output", str(tmp_path / "out"), "--segmenter-checkpoint", str(broken)])
    with pytest.raises(JobConfigError, match="not found"):
        run(["--input", str(sample_dir), "--output", str(tmp_path / "out"), "--segmenter-checkpoint", "/nope"])
    assert not (tmp_path / "out").exists()


def test_a_malformed_label_file_fails_before_any_work(tmp_path: Path, sample_dir: Path) -> None:
    """A quote that never closes would swallow the rest of the file into one label."""
    (tmp_path / "labels.csv").write_bytes(b'image_id,label\n00000,1\n00001,"' + b"x\n" * 70_000)
    with pytest.raises(JobConfigError, match="labels file .* is not a readable CSV text file after line 2"):
        run(["--input", str(sample_dir), "--output", str(tmp_path / "out"), "--labels-csv", str(tmp_path / "labels.csv")])
    assert not (tmp_path / "out").exists()


def test_mixed_bad_shards_never_stop_the_job(tmp_path: Path) -> None:
    """A corrupt tar member, a truncated member, a 16-bit and a grayscale face, a tiny image."""
    good = png_bytes(random_rgb(160, 160, seed=1))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in [("00001.png", good), ("00002.png", b"\x89PNG garbage"), ("00003.png", good * 3)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = (tmp_path / "shard.tar").read_bytes()
    (tmp_path / "shard.tar").write_bytes(whole[: len(whole) - 2 * 1024 - len(good)])
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "00010.png").write_bytes(png_bytes(random_rgb(160, 160, seed=2).astype(np.uint16) * 257))
    (loose / "00011.png").write_bytes(png_bytes(random_rgb(160, 160, seed=3)[..., 0]))
    (loose / "00012.png").write_bytes(png_bytes(random_rgb(60, 60)))
    manifest = run([
        "--input", str(tmp_path / "shard.tar"), str(loose), "--output", str(tmp_path / "out"),
        "--min-face-skin", "0", "--min-patch-skin", "0", *SMALL,
    ])
    faces = read_table(str(tmp_path / "out"), FACES_DIR).to_pandas().set_index("image_id")
    assert manifest["accounting"]["ok"] and manifest["accounting"]["inputs"] == 6
    assert faces.status.to_dict() == {
        "00001": "kept", "00002": "failed", "00003": "failed", "00010": "kept", "00011": "kept", "00012": "failed",
    }
    assert "truncated" in faces.reason["00003"] and "smaller than one 128x128 patch" in faces.reason["00012"]


def test_labels_lesions_and_folder_splits_travel_into_the_rows(tmp_path: Path) -> None:
    """The ACNE04 shape: train/ and valid/ folders, a labels CSV each, VOC lesion boxes."""
    for split, names in {"train": ["levle1_1", "levle2_7"], "valid": ["levle0_3"]}.items():
        folder = tmp_path / split
        folder.mkdir()
        rows = ["image,grade"]
        for i, name in enumerate(names):
            (folder / f"{name}_jpg.rf.{i}.jpg").write_bytes(png_bytes(random_rgb(256, 256, seed=i)))
            box = "<object><bndbox><xmin>10</xmin><xmax>20</xmax><ymin>10</ymin><ymax>20</ymax></bndbox></object>"
            (folder / f"{name}_jpg.rf.{i}.xml").write_text(f"<annotation>{box * (i + 1)}</annotation>")
            rows.append(f"{name}_jpg.rf.{i}.jpg,{name[5]}")
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    run([
        "--input", str(tmp_path / "train/*.jpg"), str(tmp_path / "valid/*.jpg"),
        "--labels-csv", str(tmp_path / "train/labels.csv"), str(tmp_path / "valid/labels.csv"),
        "--id-column", "image", "--label-column", "grade", "--voc-annotations", "--split", "path",
        "--output", str(out), "--min-face-skin", "0", "--min-patch-skin", "0", *SMALL,
    ])
    patches = read_patches(str(out), columns=["image_id", "split", "label", "x", "y", "lesion_count"]).to_pandas()
    first = patches[(patches.x == 0) & (patches.y == 0)].set_index("image_id")
    assert first.split.to_dict() == {
        "levle1_1_jpg.rf.0": "train", "levle2_7_jpg.rf.1": "train", "levle0_3_jpg.rf.0": "validation"
    }
    assert first.label.to_dict() == {"levle1_1_jpg.rf.0": "1", "levle2_7_jpg.rf.1": "2", "levle0_3_jpg.rf.0": "0"}
    assert first.lesion_count.to_dict() == {"levle1_1_jpg.rf.0": 1, "levle2_7_jpg.rf.1": 2, "levle0_3_jpg.rf.0": 1}
    assert patches.lesion_count.sum() == 4


def test_cli_explains_itself_and_exits_nonzero_on_bad_input(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pipelines.build_dataset"]
    help_text = subprocess.run([*cmd, "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for flag in ("--input", "--labels-csv", "--min-face-skin", "--patch-size", "--stride", "--split", "--overwrite",
                 "--runner"):
        assert flag in help_text
    bad = subprocess.run([*cmd, "--input", str(tmp_path / "none/*.png"), "--output", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "matches no files" in bad.stderr and "Traceback" not in bad.stderr


def test_real_ffhq_face_keeps_skin_patches(shared_data: Path, tmp_path: Path) -> None:
    manifest = run(["--input", str(shared_data / "ffhq" / "15723.jpg"), "--output", str(tmp_path / "out")])
    assert manifest["accounting"]["kept"] == 1
    patches = read_patches(str(tmp_path / "out")).to_pandas()
    assert 2 <= len(patches) <= 16 and (patches.skin_fraction >= 0.5).all()


FASSEG_SKIN = ((255, 255, 0), (0, 255, 255))


def test_kept_patches_lie_on_labelled_skin(shared_data: Path, tmp_path: Path) -> None:
    """On real FASSEG faces, the pixels of kept patches are mostly skin by the human labels."""
    folder = shared_data / "skin" / "fasseg_frontal"
    names = sorted(p.name for p in (folder / "images").iterdir())[:4]
    run([
        "--input", *[str(folder / "images" / n) for n in names], "--output", str(tmp_path / "out"),
        "--patch-size", "64", "--min-patch-skin", "0.8", "--min-face-skin", "0.05",
    ])
    patches = read_patches(str(tmp_path / "out"), columns=["image_id", "x", "y", "size"]).to_pylist()
    assert len(patches) >= 8
    labels = {}
    for name in names:
        stem = Path(name).stem
        label_file = next((folder / "labels").glob(stem + ".*"))
        image = Image.open(folder / "images" / name)
        label = np.asarray(Image.open(label_file).convert("RGB").resize(image.size, Image.NEAREST)).astype(int)
        distance = [np.abs(label - np.array(c)).sum(-1) for c in FASSEG_SKIN]
        labels[stem] = np.minimum(*distance) < 120
    on_skin = [labels[p["image_id"]][p["y"]:p["y"] + p["size"], p["x"]:p["x"] + p["size"]].mean() for p in patches]
    assert np.mean(on_skin) > 0.85, on_skin
