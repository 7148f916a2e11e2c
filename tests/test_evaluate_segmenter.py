"""Evaluation on real photos: the colour floor is sensible and the shipped model beats it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.colour_baseline import colour_skin_mask
from models.evaluate_segmenter import add_errors, main as evaluate_main
from models.seg_metrics import best_threshold, counts, mean_scores, scores, threshold_counts
from models.segmenter import DEFAULT_CHECKPOINT, Segmenter
from models.skin_data import BACKGROUND, HAIR, OTHER, SKIN as SKIN_REGION, discover, load_pair, select

SKIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "skin"
needs_data = pytest.mark.skipif(not SKIN.is_dir(), reason=f"real skin data not found at {SKIN}")


def _held_out(folder: str, n: int) -> list:
    """The first n of the default checkpoint's validation photos in one real folder."""
    split = Segmenter.load(DEFAULT_CHECKPOINT).cfg.training["split"]["val_groups"]
    return select(discover(SKIN / folder), split, held_out=True)[:n]


def test_scores_and_threshold_sweep_agree_on_a_known_case() -> None:
    truth = np.zeros((10, 10), np.uint8)
    truth[:, :5] = 1
    prob = np.tile(np.linspace(0.95, 0.05, 10, dtype=np.float32), (10, 1))
    at_half = scores(*counts(prob >= 0.5, truth))
    assert at_half == {"iou": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0}
    assert scores(*counts(prob >= 0.3, truth))["iou"] == pytest.approx(5 / 7)
    threshold, iou = best_threshold([threshold_counts(prob, truth)])
    assert iou == 1.0 and 0.45 <= threshold <= 0.55


@needs_data
def test_colour_baseline_gives_a_sensible_floor_on_real_faces() -> None:
    pairs = discover(SKIN / "fasseg_frontal")
    rows = [scores(*counts(colour_skin_mask(im), truth)) for im, truth in map(load_pair, pairs)]
    # The data README quotes 0.72 for this threshold on fasseg_frontal.
    assert 0.65 < mean_scores(rows)["iou"] < 0.8


def test_error_shares_say_where_false_and_missed_skin_lie_and_add_up_with_iou() -> None:
    regions = np.array([[SKIN_REGION, SKIN_REGION, HAIR, BACKGROUND, OTHER, SKIN_REGION]], np.uint8)
    mask = np.array([[1, 0, 1, 0, 1, 1]], bool)
    errors = dict.fromkeys(("false_skin_hair", "false_skin_background", "false_skin_other", "missed_skin", "union"), 0)
    add_errors(errors, mask, regions)
    assert errors == {"false_skin_hair": 1, "false_skin_background": 0, "false_skin_other": 1, "missed_skin": 1,
                      "union": 5}
    iou = scores(*counts(mask, regions == SKIN_REGION))["iou"]
    assert iou + sum(v for k, v in errors.items() if k != "union") / errors["union"] == pytest.approx(1.0)


@needs_data
def test_default_model_beats_the_colour_baseline_on_held_out_real_photos(tmp_path: Path) -> None:
    # A few held-out photos per folder, under the folder's own name so the split still applies.
    for folder, n in (("fasseg_frontal", 2), ("fasseg_multipose", 3), ("pratheepan", 3)):
        for sub in ("images", "labels" if folder.startswith("fasseg") else "masks"):
            (tmp_path / folder / sub).mkdir(parents=True)
        for pair in _held_out(folder, n):
            (tmp_path / folder / "images" / pair.image.name).symlink_to(pair.image)
            (tmp_path / folder / pair.label.parent.name / pair.label.name).symlink_to(pair.label)
    out, sheet = tmp_path / "eval.json", tmp_path / "sheet.png"
    evaluate_main([str(tmp_path / f) for f in ("fasseg_frontal", "fasseg_multipose", "pratheepan")]
                  + ["--json", str(out), "--sheet", str(sheet), "--timing-images", "2", "--sheet-rows", "1"])
    report = json.loads(out.read_text())
    assert report["checkpoint"] == DEFAULT_CHECKPOINT and report["split"] == "val"
    for name, result in report["datasets"].items():
        model, floor = result["model"], result["colour_baseline"]
        assert result["scope"] == "val"
        assert model["iou"] > floor["iou"] + 0.05, name
        assert {"dice", "precision", "recall", "best_threshold", "ms_per_image_1024_median"} <= set(model)
        assert len(model["per_image"]) == result["images"]
        assert 0 < sum(model["error_share"].values()) < 1
    assert report["datasets"]["pratheepan"]["model"]["error_share"]["false_skin_hair"] == 0
    assert sheet.stat().st_size > 10_000
