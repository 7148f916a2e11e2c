"""Evaluation: where the errors lie, how scores vary with skin tone, and, on real photos, that
the colour floor is sensible and the shipped model beats it."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image

from models.segmenter.baseline import colour_skin_mask
from models.segmenter import DEFAULT_CHECKPOINT, Segmenter
from models.segmenter.data import (BACKGROUND, CELEBAMASK_CLASSES, CELEBAMASK_REGIONS, HAIR, OTHER, SKIN as SKIN_REGION,
                                   discover, load_pair, select)
from models.segmenter.evaluate import add_class_errors, add_errors, by_skin_tone, main as evaluate_main
from models.segmenter.metrics import THRESHOLDS, best_threshold, counts, mean_scores, scores, threshold_counts

SKIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "skin"
needs_data = pytest.mark.skipif(not SKIN.is_dir(), reason=f"real skin data not found at {SKIN}")


CLASS = {name: i for i, name in enumerate(CELEBAMASK_CLASSES)}
DARKEST, LIGHTEST = np.array([60, 38, 28]), np.array([245, 215, 195])


def _celebamask_face(tone: np.ndarray, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A drawn face in one skin tone on a grey backdrop, and its CelebAMask class map."""
    image = np.full((size, size, 3), 128, np.uint8)
    classes = np.full((size, size), CLASS["background"], np.uint8)
    c = size // 2
    parts = (("cloth", (40, 40, 60), lambda im, v: cv2.rectangle(im, (10, 84), (86, 95), v, -1)),
             ("neck", tone, lambda im, v: cv2.rectangle(im, (38, 66), (58, 84), v, -1)),
             ("hair", (40, 30, 20), lambda im, v: cv2.ellipse(im, (c, 40), (32, 34), 0, 180, 360, v, -1)),
             ("skin", tone, lambda im, v: cv2.ellipse(im, (c, 46), (26, 30), 0, 0, 360, v, -1)),
             ("left_brow", (30, 20, 15), lambda im, v: cv2.rectangle(im, (34, 32), (44, 34), v, -1)),
             ("right_brow", (30, 20, 15), lambda im, v: cv2.rectangle(im, (52, 32), (62, 34), v, -1)),
             ("left_eye", (240, 240, 240), lambda im, v: cv2.rectangle(im, (35, 38), (43, 41), v, -1)),
             ("right_eye", (240, 240, 240), lambda im, v: cv2.rectangle(im, (53, 38), (61, 41), v, -1)),
             ("upper_lip", (170, 60, 70), lambda im, v: cv2.rectangle(im, (40, 60), (56, 61), v, -1)),
             ("mouth", (60, 10, 20), lambda im, v: cv2.rectangle(im, (40, 62), (56, 62), v, -1)),
             ("lower_lip", (170, 60, 70), lambda im, v: cv2.rectangle(im, (40, 63), (56, 65), v, -1)))
    for name, colour, draw in parts:
        draw(image, tuple(int(v) for v in colour))
        draw(classes, CLASS[name])
    return image, classes


def _write_celebamask_folder(root: Path, tones: list[np.ndarray]) -> Path:
    """images/ (PNG), labels_celebamask19/ (palette PNG class maps) and masks/, as in the shared data."""
    for sub in ("images", "labels_celebamask19", "masks"):
        (root / sub).mkdir(parents=True)
    for i, tone in enumerate(tones):
        image, classes = _celebamask_face(tone)
        cv2.imwrite(str(root / "images" / f"face{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        label = Image.fromarray(classes, mode="P")
        label.putpalette(list(np.random.default_rng(0).integers(0, 256, 3 * 256, dtype=np.uint8)))
        label.save(root / "labels_celebamask19" / f"face{i}.png")
        cv2.imwrite(str(root / "masks" / f"face{i}.png"), (CELEBAMASK_REGIONS[classes] == SKIN_REGION) * np.uint8(255))
    return root


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


@pytest.mark.parametrize("skin_share", [0.0, 0.05, 0.5])
def test_scores_and_threshold_sweep_match_segmentation_models_pytorch(skin_share: float) -> None:
    rng = np.random.default_rng(7)
    prob = rng.random((37, 53)).astype(np.float32)
    truth = (rng.random((37, 53)) < skin_share).astype(np.uint8)
    target = torch.from_numpy(truth).long()[None, None]
    pred = prob >= 0.5
    stats = [t.float() for t in smp.metrics.get_stats(torch.from_numpy(pred).long()[None, None], target, mode="binary")]
    expected = {"iou": smp.metrics.iou_score, "dice": smp.metrics.f1_score, "precision": smp.metrics.precision,
                "recall": smp.metrics.recall}
    ours = scores(*counts(pred, truth))
    for name, metric in expected.items():
        assert ours[name] == pytest.approx(metric(*stats, zero_division=1.0).item(), abs=1e-6), name
    swept = [[int(v) for v in smp.metrics.get_stats(torch.from_numpy(prob)[None, None], target, mode="binary",
                                                      threshold=float(t))[:3]] for t in THRESHOLDS]
    assert threshold_counts(prob, truth).tolist() == swept


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


def test_celebamask_errors_are_named_by_class_and_add_up_with_iou() -> None:
    names = ("skin", "skin", "neck", "neck", "nose", "left_eye", "right_eye", "left_brow", "upper_lip", "mouth",
             "hair", "hair", "eyeglasses", "hat", "cloth", "background", "earring", "necklace", "right_ear")
    classes = np.array([[CLASS[n] for n in names]], np.uint8)
    predicted = {"skin", "left_eye", "right_eye", "mouth", "hair", "hat", "background", "necklace", "nose"}
    mask = np.array([[n in predicted for n in names]])
    mask[0, 1] = mask[0, 3] = False  # one face-skin pixel and one neck pixel missed
    mask[0, 11] = False  # one of two hair pixels kept out
    errors = dict.fromkeys(("eyes", "brows", "lips", "hair", "eyeglasses", "hat", "cloth", "background", "other",
                            "missed_neck", "missed_face", "union"), 0)
    add_class_errors(errors, mask, classes)
    assert errors == {"eyes": 2, "brows": 0, "lips": 1, "hair": 1, "eyeglasses": 0, "hat": 1, "cloth": 0,
                      "background": 1, "other": 1, "missed_neck": 2, "missed_face": 2, "union": 13}
    iou = scores(*counts(mask, CELEBAMASK_REGIONS[classes] == SKIN_REGION))["iou"]
    assert iou + sum(v for k, v in errors.items() if k != "union") / errors["union"] == pytest.approx(1.0)


def test_skin_tone_bins_hold_equal_counts_darkest_first_and_shrink_for_small_folders() -> None:
    rows = [{"image": f"{i}", "ita": ita, "iou": iou}
            for i, (ita, iou) in enumerate([(50, 0.9), (-40, 0.5), (10, 0.7), (None, 1.0), (30, 0.8),
                                            (-20, 0.6), (60, 0.95), (0, 0.65), (45, 0.85)])]
    report = by_skin_tone(rows)
    assert [(b["ita_low"], b["ita_high"], b["images"]) for b in report["bins"]] == [
        (-40, -20, 2), (0, 10, 2), (30, 45, 2), (50, 60, 2)]
    assert report["bins"][0]["iou"] == pytest.approx(0.55) and report["tone_gap"] == pytest.approx(0.925 - 0.55)
    assert report["images_without_skin"] == 1
    assert [b["images"] for b in by_skin_tone(rows[:6])["bins"]] == [3, 2]
    alone = by_skin_tone(rows[:1])
    assert [b["images"] for b in alone["bins"]] == [1] and alone["tone_gap"] is None
    assert by_skin_tone([rows[3]]) == {"bins": [], "tone_gap": None, "images_without_skin": 1}


def test_celebamask_folder_reports_errors_by_class_iou_by_skin_tone_and_unlabelled_photos(tmp_path: Path) -> None:
    tones = [np.round(DARKEST + t * (LIGHTEST - DARKEST)) for t in np.linspace(0, 1, 8)]
    celeb = _write_celebamask_folder(tmp_path / "celeb", tones)
    few = tmp_path / "few"
    (few / "images").mkdir(parents=True)
    (few / "masks").mkdir()
    for i in (0, 7, 3):
        (few / "images" / f"face{i}.png").symlink_to(celeb / "images" / f"face{i}.png")
        (few / "masks" / f"face{i}.png").symlink_to(celeb / "masks" / f"face{i}.png")
    out, sheet = tmp_path / "eval.json", tmp_path / "unlabelled.png"
    evaluate_main([str(celeb), str(few), "--json", str(out), "--timing-images", "1", "--threads", "1",
                   "--unlabelled", str(celeb / "images" / "face7.png"), str(celeb / "images"),
                   "--unlabelled-limit", "4", "--unlabelled-sheet", str(sheet)])
    report = json.loads(out.read_text())
    model = report["datasets"]["celeb"]["model"]
    assert report["datasets"]["celeb"]["scope"] == "all"

    by_class = model["error_share_by_class"]
    assert list(by_class) == ["eyes", "brows", "lips", "hair", "eyeglasses", "hat", "cloth", "background", "other",
                              "missed_neck", "missed_face"]
    # Both breakdowns split the same errors over the same pixels.
    assert sum(by_class.values()) == pytest.approx(sum(model["error_share"].values()))
    assert "error_share_by_class" not in report["datasets"]["few"]["model"]

    itas = [row["ita"] for row in model["per_image"]]
    assert itas == sorted(itas) and itas[0] < -30 < 55 < itas[-1]
    for key in ("model", "colour_baseline"):
        tone = report["datasets"]["celeb"][key]["by_skin_tone"]
        assert [b["images"] for b in tone["bins"]] == [2, 2, 2, 2]
        assert tone["bins"][0]["ita_high"] == itas[1] and tone["bins"][-1]["ita_low"] == itas[6]
        assert tone["tone_gap"] == pytest.approx(tone["bins"][-1]["iou"] - tone["bins"][0]["iou"])
    small = report["datasets"]["few"]["model"]["by_skin_tone"]
    assert [b["images"] for b in small["bins"]] == [3] and small["tone_gap"] is None

    unlabelled = report["unlabelled"]
    assert [Path(r["image"]).name for r in unlabelled] == ["face7.png", "face0.png", "face1.png", "face2.png"]
    assert all(r["width"] == r["height"] == 96 and 0 <= r["skin_fraction"] <= 1 for r in unlabelled)
    drawn = cv2.imread(str(sheet))
    assert drawn.shape[0] == 2 * 200 and drawn.shape[1] == 3 * 400
