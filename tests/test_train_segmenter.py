"""Training as a user runs it: folders in, a loadable checkpoint and a metrics JSON out."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models.segmenter.train as train_segmenter
from models.segmenter import Segmenter
from models.segmenter.data import (SKIN as SKIN_REGION, Pair, assign_splits, colour_label_to_regions, discover,
                                   load_pair, select, skin_ita)

NAMES = ("alice", "bruno", "chiara", "dmitri", "esther", "fatima")
SKIN, NOSE, EYES, HAIR, BACKGROUND = (255, 255, 0), (0, 255, 255), (0, 0, 255), (127, 0, 0), (255, 0, 0)


def _face(rng: np.random.Generator, h: int = 80, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A drawn face on a noisy background, with its 0/1 skin mask."""
    image = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    centre = (int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.4, 0.6)))
    axes = (int(w * 0.3), int(h * 0.35))
    cv2.ellipse(image, centre, axes, 0, 0, 360, (210, 160, 130), -1)
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    return image, mask


def _write_binary_folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = _face(rng)
        cv2.imwrite(str(root / "images" / f"{NAMES[i]}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "masks" / f"{NAMES[i]}.png"), mask * 255)
    return root


def _write_fasseg_folder(root: Path, subjects: int, poses: int, seed: int) -> Path:
    """FASSEG-multipose-like names and colour label maps, a label a few pixels too wide."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for s in range(1, subjects + 1):
        for pose in range(poses):
            image, mask = _face(rng)
            label = np.empty(image.shape, np.uint8)
            label[:] = BACKGROUND
            label[mask > 0] = SKIN
            label[35:45, 30:34] = NOSE
            label[:8] = HAIR
            if pose == 0:
                label = cv2.resize(label, (label.shape[1] + 3, label.shape[0]), interpolation=cv2.INTER_NEAREST)
            name = f"f3_{pose}_personne{s:02d}1{pose:02d}+0+0.png"
            cv2.imwrite(str(root / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / "labels" / name), cv2.cvtColor(label, cv2.COLOR_RGB2BGR))
    return root


def test_anti_aliased_colour_labels_map_to_the_nearest_class() -> None:
    label = np.array([[SKIN, NOSE, EYES, HAIR, BACKGROUND, (240, 250, 20), (200, 30, 10)]], np.uint8)
    np.testing.assert_array_equal(colour_label_to_regions(label) == SKIN_REGION, [[1, 1, 0, 0, 0, 1, 0]])


def test_folders_are_detected_and_labels_fit_their_images(tmp_path: Path) -> None:
    fasseg = discover(_write_fasseg_folder(tmp_path / "multi", subjects=2, poses=2, seed=0))
    binary = discover(_write_binary_folder(tmp_path / "bin", n=2, seed=1))
    assert {p.kind for p in fasseg} == {"colour"} and {p.kind for p in binary} == {"binary"}
    for pair in fasseg + binary:
        image, target = load_pair(pair)
        assert target.shape == image.shape[:2] and set(np.unique(target)) <= {0, 1}


def test_poses_of_one_subject_never_straddle_the_split(tmp_path: Path) -> None:
    pairs = discover(_write_fasseg_folder(tmp_path / "multi", subjects=7, poses=3, seed=0))
    val_groups = assign_splits(pairs, val_fraction=0.25, seed=3)
    assert val_groups == assign_splits(pairs, val_fraction=0.25, seed=3)
    subject = {p.name: re.search(r"personne(\d\d)", p.name).group(1) for p in pairs}
    val = {subject[p.name] for p in select(pairs, val_groups, held_out=True)}
    train = {subject[p.name] for p in select(pairs, val_groups, held_out=False)}
    assert len(val) == 2 and len(train) == 5 and not val & train


def test_augmented_crops_are_square_and_keep_binary_masks() -> None:
    rng = np.random.default_rng(0)
    image, mask = _face(rng, 120, 90)
    for _ in range(20):
        crop, target = train_segmenter.augment(image, mask, 64, rng)
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        assert target.shape == (64, 64) and set(np.unique(target)) <= {0, 1}


def test_retoned_skin_is_mostly_darker_and_the_rest_of_the_photo_untouched() -> None:
    image, mask = _face(np.random.default_rng(0))
    photo = image.astype(np.float32) / 255.0
    # The feathered edge reaches a few pixels past the mask, never further.
    far = cv2.dilate(mask, np.ones((15, 15), np.uint8)) == 0
    before = skin_ita(image, mask)
    after = []
    for seed in range(10):
        toned = train_segmenter._retone_skin(photo, mask, np.random.default_rng(seed))
        assert np.array_equal(toned[far], photo[far])
        after.append(skin_ita((toned * 255 + 0.5).astype(np.uint8), mask))
    assert sum(ita < before for ita in after) >= 7
    assert min(after) < before - 40


def _tone_pair(dataset: str, name: str, colour: tuple[int, int, int]) -> tuple[Pair, tuple[np.ndarray, np.ndarray]]:
    """A photo whose skin is one flat colour, with its region map."""
    image, mask = _face(np.random.default_rng(0))
    image[mask > 0] = colour
    return Pair(dataset, Path(f"{name}.jpg"), Path(f"{name}.png"), "binary", name), (image, mask * SKIN_REGION)


def test_tone_balance_lifts_rare_skin_tones_within_each_set() -> None:
    light, dark = (230, 190, 170), (90, 60, 45)
    pairs, data = zip(*[_tone_pair("a", f"a{i}", light) for i in range(3)], _tone_pair("a", "a_dark", dark),
                      _tone_pair("b", "b0", light), _tone_pair("b", "b_dark", dark))
    assert skin_ita(*data[0]) - skin_ita(*data[3]) > 2 * train_segmenter.ITA_BIN_DEGREES  # bins well apart
    weights = train_segmenter.tone_weights(pairs, data, power=0.5)
    assert weights[3] > weights[0] == weights[1] == weights[2]
    assert weights[3] / weights[0] == pytest.approx(3 ** 0.5)
    assert weights[:4].mean() == pytest.approx(1.0) and weights[4:] == pytest.approx([1.0, 1.0])
    assert train_segmenter.tone_weights(pairs, data, power=0.0) == pytest.approx(np.ones(6))


def test_plain_views_show_the_whole_photo_as_inference_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image, mask = _face(rng, 120, 90)
    args = train_segmenter.parse_args([str(tmp_path), "--input-size", "64", "--plain-views", "1"])
    plain_image, plain_target = train_segmenter.plain_view(image, mask, 64)
    mirrored = 0
    for _ in range(20):
        view, target = train_segmenter.training_view((image, mask), (image, mask), args, rng)
        mirrored += np.array_equal(view, plain_image[:, ::-1])
        assert np.array_equal(view, plain_image) or np.array_equal(view, plain_image[:, ::-1])
        assert np.array_equal(target, plain_target) or np.array_equal(target, plain_target[:, ::-1])
    assert 0 < mirrored < 20


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_segmenter.parse_args(["--help"])
    text = capsys.readouterr().out
    parser_flags = re.findall(r"^  (--[a-z-]+)", text, flags=re.M)
    assert len(parser_flags) >= 15
    for flag in parser_flags:
        line = next(line for line in text.splitlines() if line.startswith(f"  {flag}"))
        following = text.split(line, 1)[1].split("\n  -", 1)[0]
        assert len((line + following).split()) > 3, f"{flag} has no explanation"


def test_short_training_writes_a_loadable_checkpoint_and_metrics(tmp_path: Path) -> None:
    multi = _write_fasseg_folder(tmp_path / "multi", subjects=3, poses=2, seed=0)
    binary = _write_binary_folder(tmp_path / "bin", n=5, seed=1)
    out = tmp_path / "ckpt"
    train_segmenter.main([str(multi), str(binary), "--output", str(out), "--epochs", "2", "--steps-per-epoch", "2",
                          "--batch-size", "2", "--input-size", "64", "--decoder-channels", "16", "16", "16", "16", "16",
                          "--val-fraction", "0.34", "--seed", "1"])
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert set(metrics["best_val"]) == {"multi", "bin", "macro"}

    seg = Segmenter.load(str(out))
    training = seg.cfg.training
    assert training["split"]["val_groups"] == metrics["split"]["val_groups"]
    assert training["settings"]["epochs"] == 2 and "iou" in training["val_metrics"]["macro"]
    assert seg.cfg.input_size == 64
    val_images = set(training["split"]["val_images"]["multi"])
    assert val_images and len(val_images) < 6
    image = np.zeros((50, 40, 3), np.uint8)
    assert seg.predict_masks([image])[0].shape == (50, 40)


def test_moving_average_weights_trail_the_optimiser(tmp_path: Path) -> None:
    data = _write_binary_folder(tmp_path / "bin", n=4, seed=3)
    small = ["--epochs", "1", "--steps-per-epoch", "4", "--batch-size", "2", "--val-fraction", "0.25",
             "--input-size", "64", "--decoder-channels", "16", "16", "16", "16", "16", "--lr", "1e-2"]
    train_segmenter.main([str(data), "--output", str(tmp_path / "start"), "--lr", "0", *small[:-2]])
    for name, extra in (("raw", []), ("ema", ["--ema", "0.999"])):
        train_segmenter.main([str(data), "--output", str(tmp_path / name), "--init", str(tmp_path / "start"),
                              *small, *extra])
    start, raw, ema = ({k: v.detach() for k, v in Segmenter.load(str(tmp_path / n)).network.named_parameters()}
                      for n in ("start", "raw", "ema"))
    moved = {n: sum(float((run[k] - start[k]).norm()) for k in start) for n, run in (("raw", raw), ("ema", ema))}
    assert 0 < moved["ema"] < moved["raw"] / 2
    assert Segmenter.load(str(tmp_path / "ema")).cfg.training["settings"]["ema"] == 0.999


def test_fine_tuning_keeps_matching_weights_and_refuses_another_encoder(tmp_path: Path) -> None:
    data = _write_binary_folder(tmp_path / "bin", n=4, seed=2)
    small = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--val-fraction", "0.25",
             "--decoder-channels", "16", "16", "16", "16", "16"]
    train_segmenter.main([str(data), "--output", str(tmp_path / "a"), "--input-size", "64", *small])
    train_segmenter.main([str(data), "--output", str(tmp_path / "b"), "--input-size", "96",
                          "--init", str(tmp_path / "a"), *small])
    tuned = Segmenter.load(str(tmp_path / "b"))
    assert tuned.cfg.input_size == 96 and tuned.cfg.training["settings"]["init"] == str(tmp_path / "a")
    widened = ["--decoder-channels", "16", "16", "16", "16", "32", "--decoder-attention", "scse"]
    train_segmenter.main([str(data), "--output", str(tmp_path / "w"), "--input-size", "64", "--lr", "0",
                          "--init", str(tmp_path / "a"), *small[:-6], *widened])
    base, wide = Segmenter.load(str(tmp_path / "a")).network, Segmenter.load(str(tmp_path / "w")).network
    encoder = [name for name, _ in base.encoder.named_parameters()]
    assert encoder and all(torch.equal(base.encoder.get_parameter(n), wide.encoder.get_parameter(n)) for n in encoder)
    assert wide.decoder.blocks[4].conv2[0].weight.shape[0] == 32
    with pytest.raises(SystemExit, match="resnet18"):
        train_segmenter.main([str(data), "--output", str(tmp_path / "c"), "--encoder", "resnet18",
                              "--init", str(tmp_path / "a"), *small])
