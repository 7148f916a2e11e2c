"""Patch: tiles cover the face, keep only skin, and encode losslessly by default."""
from __future__ import annotations

from dataclasses import replace

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.testing.util import assert_that, equal_to

from models.dataset import PATCH_SCHEMA
from tests.images import random_rgb
from transforms.patches import (
    CutPatches, EncodePatchRows, FilterFaces, cut_patches, encode_mask, encode_patches, encode_rgb, filter_face,
    lesion_count, patch_face, patch_id, tile_origins,
)
from transforms.records import FILTERED, KEPT, ImageRecord, Outcome, Patch


def test_tiles_cover_the_whole_side_with_a_last_tile_flush_to_the_edge() -> None:
    assert tile_origins(1024, 256, 256) == [0, 256, 512, 768]
    assert tile_origins(640, 256, 256) == [0, 256, 384]
    assert tile_origins(640, 256, 128) == [0, 128, 256, 384]
    assert tile_origins(100, 256, 256) == []


def test_only_tiles_with_enough_skin_are_kept_with_their_coordinates() -> None:
    pixels = random_rgb(512, 512)
    mask = np.zeros((512, 512), np.uint8)
    mask[:256, :256] = 1  # one tile all skin
    mask[256:, 256:320] = 1  # one tile a quarter skin
    kept = cut_patches(pixels, mask, 256, 256, min_skin=0.5)
    assert [(p.x, p.y, p.skin_fraction) for p in kept] == [(0, 0, 1.0)]
    assert np.array_equal(kept[0].pixels, pixels[:256, :256]) and kept[0].mask.all()
    loose = cut_patches(pixels, mask, 256, 256, min_skin=0.25)
    assert [(p.x, p.y, p.skin_fraction) for p in loose] == [(0, 0, 1.0), (256, 256, 0.25)]


def test_blackout_sets_non_skin_pixels_to_black() -> None:
    pixels = np.full((64, 64, 3), 200, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :40] = 1
    (patch,) = cut_patches(pixels, mask, 64, 64, min_skin=0.5, blackout=True)
    assert patch.pixels[:, :40].min() == 200 and patch.pixels[:, 40:].max() == 0


def test_png_and_webp_are_lossless_and_jpeg_is_smaller() -> None:
    tile = random_rgb(128, 128)
    for fmt in ("png", "webp"):
        decoded = cv2.imdecode(np.frombuffer(encode_rgb(tile, fmt), np.uint8), cv2.IMREAD_COLOR_RGB)
        assert np.array_equal(decoded, tile), fmt
    smooth = cv2.GaussianBlur(tile, (15, 15), 5)
    assert len(encode_rgb(smooth, "jpeg", quality=80)) < len(encode_rgb(smooth, "png"))


def test_masks_encode_as_black_and_white_png() -> None:
    mask = (random_rgb(32, 32)[..., 0] > 128).astype(np.uint8)
    decoded = cv2.imdecode(np.frombuffer(encode_mask(mask), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(decoded)) <= {0, 255} and np.array_equal(decoded // 255, mask)


def test_lesions_count_where_their_centre_falls() -> None:
    patch = Patch(x=100, y=100, size=100, skin_fraction=1.0, pixels=None, mask=None)
    boxes = [(110, 110, 120, 120), (190, 190, 230, 230), (0, 0, 10, 10)]
    assert lesion_count(boxes, patch) == 1
    assert lesion_count(None, patch) is None


def test_patch_ids_are_stable_and_sort_in_reading_order() -> None:
    a = patch_id("00042", Patch(256, 0, 256, 1.0, None, None))
    b = patch_id("00042", Patch(0, 256, 256, 1.0, None, None))
    assert a == "00042_y00000_x00256" and a < b


def test_patch_stages_keep_skinny_faces_out_and_say_why(pipeline) -> None:
    mask = np.zeros((256, 256), np.uint8)
    mask[:128, :128] = 1
    faces = [
        ImageRecord("skin", "mem://skin", pixels=random_rgb(256, 256), mask=mask, skin_fraction=0.25, split="train"),
        ImageRecord("bare", "mem://bare", pixels=random_rgb(256, 256), mask=mask * 0, skin_fraction=0.0),
        ImageRecord("edge", "mem://edge", pixels=random_rgb(256, 256), mask=np.pad(mask[:64], ((0, 192), (0, 0))),
                    skin_fraction=0.125, split="train"),
    ]
    with pipeline() as p:
        kept, low_skin = p | beam.Create(faces) | FilterFaces(min_face_skin=0.1)
        patched, no_patch = kept | CutPatches(size=128, stride=128, min_patch_skin=0.9)
        rows, done = patched | EncodePatchRows("png", 95, 1, "sha")
        assert_that(rows | beam.Map(lambda r: (r["patch_id"], r["skin_fraction"], r["split"])),
                    equal_to([("skin_y00000_x00000", 1.0, "train")]), label="rows")
        outcomes = (low_skin, no_patch, done) | beam.Flatten()
        assert_that(outcomes | beam.Map(lambda o: (o.image_id, o.status, o.stage, o.patch_count)),
                    equal_to([("bare", "filtered", "filter_faces", 0), ("edge", "filtered", "patch", 0),
                              ("skin", "kept", "patch", 1)]), label="outcomes")


def test_one_face_goes_through_the_per_record_steps_with_its_label_split_and_lesions() -> None:
    mask = np.zeros((128, 128), np.uint8)
    mask[:64] = 1
    face = ImageRecord("f", "mem://f", label="acne", meta={"lesions": [(10, 10, 20, 20), (70, 70, 80, 80)]},
                       pixels=random_rgb(128, 128), mask=mask, skin_fraction=0.5, split="test")
    low = filter_face(face, min_face_skin=0.6)
    assert isinstance(low, Outcome) and (low.status, low.label) == (FILTERED, "acne") and "0.500" in low.reason
    assert filter_face(face, min_face_skin=0.5) is face
    none = patch_face(replace(face, mask=mask * 0), 64, 64, min_skin=0.5)
    assert isinstance(none, Outcome) and (none.status, none.split) == (FILTERED, "test")
    patched = patch_face(face, 64, 64, min_skin=0.9)
    rows, kept = encode_patches(patched, "png", 95, 1, "sha")
    assert all(set(r) == set(PATCH_SCHEMA.names) for r in rows)
    assert [(r["x"], r["y"], r["label"], r["split"], r["lesion_count"]) for r in rows] == [
        (0, 0, "acne", "test", 1), (64, 0, "acne", "test", 0),
    ]
    assert (kept.status, kept.patch_count, kept.label, kept.split) == (KEPT, 2, "acne", "test")
