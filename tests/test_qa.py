"""qa.png: a sheet of sample faces to check a run by eye, the same for any bundling and bounded in size."""
from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from models.dataset import ERROR_SCHEMA, ERRORS_DIR, FACES_DIR, OUTCOME_SCHEMA, SCORES_DIR, read_table
from tests.images import random_rgb
from transforms.qa import THUMB_SIDE, SampleFaces, Thumb, build_ranks, id_hash, thumbnail, write_qa_sheet
from transforms.records import ImageRecord

MIN_SKIN = 0.3


def _face(i: int, skin: float) -> ImageRecord:
    pixels = random_rgb(96, 64, seed=i)
    mask = np.zeros((96, 64), np.uint8)
    mask[: round(96 * skin)] = 1
    return ImageRecord(f"face{i:03d}", f"mem://{i}", pixels=pixels, mask=mask, skin_fraction=float(mask.mean()))


def test_the_sample_is_the_smallest_id_hashes_of_each_group_whatever_the_bundling(pipeline) -> None:
    faces = [_face(i, skin=0.5 if i % 3 else 0.1) for i in range(30)]
    by_hash = sorted(faces, key=lambda f: id_hash(f.image_id))
    expected = [
        ("filtered", tuple(f.image_id for f in by_hash if f.skin_fraction < MIN_SKIN)[:2]),
        ("kept", tuple(f.image_id for f in by_hash if f.skin_fraction >= MIN_SKIN)[:4]),
    ]
    with pipeline() as p:
        for name, order in (("AsGiven", faces), ("Shuffled", faces[::-1])):
            records = p | f"{name}Faces" >> beam.Create(order)
            if name == "Shuffled":
                records = records | beam.Reshuffle()
            samples = records | f"{name}Sample" >> SampleFaces(
                partial(build_ranks, min_face_skin=MIN_SKIN), {"kept": 4, "filtered": 2}, tint_skin=True)
            ids = samples | f"{name}Ids" >> beam.MapTuple(
                lambda group, thumbs: (group, tuple(t.image_id for t in thumbs)))
            assert_that(ids, equal_to(expected), label=f"{name}Check")


def test_a_thumbnail_is_small_and_tints_the_skin() -> None:
    face = _face(1, skin=0.5)
    jpeg, height, width = thumbnail(face, tint_skin=True)
    small = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    assert (height, width) == (96, 64) and max(small.shape[:2]) == THUMB_SIDE
    plain = np.asarray(Image.open(io.BytesIO(thumbnail(face, tint_skin=False)[0])).convert("RGB")).astype(int)
    top, bottom = slice(0, small.shape[0] // 2 - 4), slice(small.shape[0] // 2 + 4, None)
    assert np.abs(small[top] - plain[top]).mean() > 20, "skin is tinted"
    assert np.abs(small[bottom] - plain[bottom]).mean() < 4, "the rest is not"


def test_the_build_sheet_shows_kept_and_filtered_faces_and_the_manifest_names_them(sample_output: Path) -> None:
    manifest = json.loads((sample_output / "manifest.json").read_text())
    faces = read_table(str(sample_output), FACES_DIR).to_pandas()
    kept = sorted(faces[faces.status == "kept"].image_id, key=id_hash)
    filtered = sorted(faces[faces.status == "filtered"].image_id, key=id_hash)
    assert manifest["qa"]["faces"] == {"kept": kept[:12], "filtered": filtered[:6]}
    sheet = Image.open(manifest["qa"]["path"])
    assert sheet.format == "PNG" and sheet.size[0] <= 1200


def test_the_score_sheet_shows_the_most_and_the_least_affected_faces(sample_score_output: Path) -> None:
    manifest = json.loads((sample_score_output / "manifest.json").read_text())
    scores = read_table(str(sample_score_output), SCORES_DIR).to_pandas().query("status == 'scored'")
    ranked = scores.sort_values("lesion_count", ascending=False).image_id.tolist()
    half = -(-len(ranked) // 2)
    shown = manifest["qa"]["faces"]
    assert shown["most acne-affected"] == ranked[:half]
    assert shown["least acne-affected"] == ranked[half:][::-1]
    assert Image.open(sample_score_output / "qa.png").format == "PNG"


def _output(root: Path, failures: int) -> list[tuple[str, list[Thumb]]]:
    """A build output's faces and errors tables, and full sample groups of random faces."""
    (root / FACES_DIR).mkdir(parents=True)
    (root / ERRORS_DIR).mkdir()
    samples = {"kept": [], "filtered": []}
    faces = []
    for i in range(18):
        group = "kept" if i < 12 else "filtered"
        jpeg, h, w = thumbnail(_face(i, 0.5), tint_skin=True)
        samples[group].append(Thumb(group, (id_hash(f"face{i:03d}"),), f"face{i:03d}", h, w, jpeg))
        faces.append({"image_id": f"face{i:03d}", "status": group, "reason": "skin fraction 0.100 is under 0.15",
                      "skin_fraction": 0.1, "patch_count": 0})
    errors = [{"image_id": f"bad{i:05d}", "stage": "decode", "error_type": "DecodeError", "message": "x" * 300}
              for i in range(failures)]
    pq.write_table(pa.Table.from_pylist(faces, OUTCOME_SCHEMA), root / FACES_DIR / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(errors, ERROR_SCHEMA), root / ERRORS_DIR / "part-0.parquet")
    return list(samples.items())


def test_the_sheet_stays_the_same_size_however_many_failures(tmp_path: Path) -> None:
    books = {"inputs": 1, "kept": 1, "filtered": 0, "failed": 0}
    sizes = {}
    for failures in (12, 5000):
        root = tmp_path / str(failures)
        write_qa_sheet(str(root), "build_dataset", _output(root, failures), books)
        sizes[failures] = (Image.open(root / "qa.png").size, (root / "qa.png").stat().st_size)
    assert sizes[12][0] == sizes[5000][0]
    assert sizes[12][0][0] <= 1200 and sizes[12][0][1] <= 900 and max(s for _, s in sizes.values()) < 1_000_000
