"""Score a skin segmenter checkpoint, and the YCrCb colour baseline, on labelled folders.

    python -m models.segmenter.evaluate ../shared/data/skin/fasseg_frontal \\
        ../shared/data/skin/fasseg_multipose ../shared/data/skin/pratheepan \\
        --json runs/eval.json --sheet runs/sheet.png

Per folder: mean per-image IoU, Dice, precision and recall at the checkpoint's threshold; the
threshold that would maximise mean IoU on that folder; and milliseconds per image for a
1024x1024 input, end to end (decoded RGB image -> full-resolution 0/1 mask via
``Segmenter.predict_masks``). The colour baseline gets the same report.

Where the model errs: false skin by region (hair, background, other) and missed skin, and on
CelebAMask folders by class (eyes, brows, lips, hair, eyeglasses, hat, cloth, background, other;
missed neck and missed face skin). How it fares across skin tones: each folder's images are
split into quartiles by the Individual Typology Angle (ITA) of their true skin, and the mean IoU
of each quartile is reported with the gap between the lightest and the darkest.

``--unlabelled`` segments photos without labels at their full size (FFHQ and CelebA-HQ are
1024x1024) and draws them on a sheet of their own, to be checked by eye.

By default only the checkpoint's held-out photos are scored (``--split val``): the trainer
stores its validation groups in the checkpoint config, so scores never include photos (or
other poses of subjects) it trained on.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from models import cli
from models.segmenter.baseline import ColourBaseline
from models.segmenter.metrics import METRICS, THRESHOLDS, best_threshold, counts, mean_scores, scores, threshold_counts
from models.segmenter.model import DEFAULT_CHECKPOINT, Segmenter
from models.segmenter.data import (BACKGROUND, CELEBAMASK_CLASSES, CELEBAMASK_REGIONS, HAIR, IMAGE_SUFFIXES, OTHER,
                                    SKIN, Pair, add_folders_argument, discover, read_classes, read_regions, read_rgb,
                                    select, skin_ita)

log = logging.getLogger(__name__)
TIMING_SIZE = 1024
SHEET_TILE = 200
# Where the model's errors lie: false skin by the region the label gives it, and missed skin.
# Binary masks know no hair or background, so all their false skin counts as "other".
ERROR_REGIONS = (("false_skin_hair", HAIR), ("false_skin_background", BACKGROUND), ("false_skin_other", OTHER))
ERROR_LABELS = {"false_skin_hair": "false skin on hair/eyebrows", "false_skin_background": "on background",
                "false_skin_other": "on other (eyes, mouth)", "missed_skin": "missed skin"}
# CelebAMask-HQ names its classes, so its errors can be told apart finely: false skin on each
# non-skin class, and missed skin with the neck apart (target here, as in FASSEG, but easy to stop
# at the jaw). Every class is in exactly one group, so the shares add up to one minus the pooled IoU.
CLASS_ERRORS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("eyes", "eyes", ("left_eye", "right_eye")),
    ("brows", "brows", ("left_brow", "right_brow")),
    ("lips", "lips/mouth", ("upper_lip", "lower_lip", "mouth")),
    ("hair", "hair", ("hair",)),
    ("eyeglasses", "glasses", ("eyeglasses",)),
    ("hat", "hat", ("hat",)),
    ("cloth", "cloth", ("cloth",)),
    ("background", "background", ("background",)),
    ("other", "other (earrings, necklaces)", ("earring", "necklace")),
    ("missed_neck", "missed neck", ("neck",)),
    ("missed_face", "missed face skin (skin, nose, ears)", ("skin", "nose", "left_ear", "right_ear")),
)
TONE_BINS = 4
UNLABELLED_PER_ROW = 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m models.segmenter.evaluate",
                   "Evaluate a skin segmenter checkpoint next to the YCrCb colour-threshold baseline.")
    add_folders_argument(p)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="segmenter checkpoint folder or fsspec URL (default: the shipped checkpoint)")
    p.add_argument("--split", choices=("val", "train", "all"), default="val",
                   help="which photos to score: the checkpoint's held-out groups, its training groups, or all; "
                        "a folder the checkpoint was not trained on is scored whole")
    p.add_argument("--json", type=Path, default=None, help="write every figure, per folder and per image, here")
    p.add_argument("--sheet", type=Path, default=None,
                   help="write a PNG contact sheet of the worst and best images per folder "
                        "(image | truth | prediction: green = hit, red = false skin, blue = missed skin)")
    p.add_argument("--sheet-rows", type=int, default=3, help="worst and best images per folder on the sheet")
    p.add_argument("--timing-images", type=int, default=10,
                   help="images per folder timed one by one at 1024x1024 (after 2 warm-up calls)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass while scoring")
    cli.add_torch_args(p, threads=1)
    p.add_argument("--unlabelled", nargs="+", type=Path, default=[], metavar="FOLDER_OR_IMAGE",
                   help="photos without labels (files, or folders read in sorted order) to segment at their "
                        "full size, e.g. FFHQ's 1024x1024 faces; their skin fractions go to the table and --json")
    p.add_argument("--unlabelled-sheet", type=Path, default=None, metavar="PATH",
                   help="write a PNG sheet of the --unlabelled photos: image | predicted skin in green, "
                        "captioned with the skin fraction")
    p.add_argument("--unlabelled-limit", type=int, default=12, metavar="N",
                   help="take the first N --unlabelled photos, in the order given (a folder's by file name)")
    args = p.parse_args(argv)
    if args.unlabelled_sheet and not args.unlabelled:
        p.error("--unlabelled-sheet needs --unlabelled photos")
    if args.unlabelled_limit < 1:
        p.error("--unlabelled-limit must be at least 1")
    return args


def time_per_image(model: Any, images: Sequence[np.ndarray]) -> dict[str, float]:
    """Milliseconds for predict_masks on one 1024x1024 image at a time (median and mean)."""
    big = [cv2.resize(im, (TIMING_SIZE, TIMING_SIZE), interpolation=cv2.INTER_LINEAR) for im in images]
    for im in big[:2]:
        model.predict_masks([im])
    times = []
    for im in big:
        start = time.perf_counter()
        model.predict_masks([im])
        times.append((time.perf_counter() - start) * 1000)
    return {"ms_per_image_1024_median": float(np.median(times)), "ms_per_image_1024_mean": float(np.mean(times)),
            "timed_images": len(times)}


def _overlay(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    out = image.astype(np.float32)
    if truth is None:
        layers = [(mask.astype(bool), (0, 255, 0))]
    else:
        m, t = mask.astype(bool), truth.astype(bool)
        layers = [(m & t, (0, 255, 0)), (m & ~t, (255, 0, 0)), (~m & t, (0, 0, 255))]
    for where, colour in layers:
        out[where] = 0.45 * out[where] + 0.55 * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def _tile(image: np.ndarray, caption: str = "") -> np.ndarray:
    h, w = image.shape[:2]
    scale = SHEET_TILE / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tile = np.full((SHEET_TILE, SHEET_TILE, 3), 255, np.uint8)
    y, x = (SHEET_TILE - small.shape[0]) // 2, (SHEET_TILE - small.shape[1]) // 2
    tile[y:y + small.shape[0], x:x + small.shape[1]] = small
    if caption:
        cv2.putText(tile, caption, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(tile, caption, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_sheet(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, float, float]]) -> None:
    """One row per case: image, truth overlay, model overlay, colour-baseline overlay."""
    lines = []
    for caption, image, truth, pred, iou, base_pred_iou in rows:
        lines.append(np.hstack([
            _tile(image, caption[:34]),
            _tile(_overlay(image, truth, None), "truth"),
            _tile(_overlay(image, pred[0], truth), f"model IoU {iou:.3f}"),
            _tile(_overlay(image, pred[1], truth), f"colour IoU {base_pred_iou:.3f}"),
        ]))
    _write_png(path, np.vstack(lines))


def write_unlabelled_sheet(path: Path, pairs: Sequence[np.ndarray]) -> None:
    """Lay out (image | predicted skin) tile pairs, a few to a row, blank where the last row ends."""
    blank = np.full_like(pairs[0], 255)
    padded = list(pairs) + [blank] * (-len(pairs) % UNLABELLED_PER_ROW)
    rows = [np.hstack(padded[i:i + UNLABELLED_PER_ROW]) for i in range(0, len(padded), UNLABELLED_PER_ROW)]
    _write_png(path, np.vstack(rows))


def add_errors(errors: dict[str, int], mask: np.ndarray, regions: np.ndarray) -> None:
    """Add one image's error pixels by region, and its skin-or-predicted pixel count, to ``errors``."""
    skin = regions == SKIN
    for name, region in ERROR_REGIONS:
        errors[name] += int((mask & (regions == region)).sum())
    errors["missed_skin"] += int((skin & ~mask).sum())
    errors["union"] += int((skin | mask).sum())


def add_class_errors(errors: dict[str, int], mask: np.ndarray, classes: np.ndarray) -> None:
    """Add one CelebAMask image's error pixels by ``CLASS_ERRORS`` group, and its skin-or-predicted
    pixel count, to ``errors``: a pixel is wrong where the prediction disagrees with its class's region."""
    skin = CELEBAMASK_REGIONS[classes] == SKIN
    wrong = np.bincount(classes[mask != skin].ravel(), minlength=len(CELEBAMASK_CLASSES))
    for key, _, names in CLASS_ERRORS:
        errors[key] += int(sum(wrong[CELEBAMASK_CLASSES.index(n)] for n in names))
    errors["union"] += int((skin | mask).sum())


def by_skin_tone(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean IoU per skin-tone quartile of a folder's images, darkest first, and the light-dark gap.

    The images whose truth holds skin are sorted by its ITA (``row["ita"]``) and cut into equal
    counts. A folder with fewer than two such images per quartile gets fewer bins, so that no
    bin rests on one photo; ``tone_gap`` (IoU of the lightest bin minus the darkest) needs two bins.
    """
    toned = sorted((r for r in rows if r["ita"] is not None), key=lambda r: r["ita"])
    n_bins = min(TONE_BINS, len(toned) // 2) or min(1, len(toned))
    bins = []
    for chunk in (np.array_split(np.arange(len(toned)), n_bins) if n_bins else []):
        members = [toned[i] for i in chunk]
        bins.append({"ita_low": members[0]["ita"], "ita_high": members[-1]["ita"], "images": len(members),
                     "iou": float(np.mean([r["iou"] for r in members]))})
    return {"bins": bins, "tone_gap": bins[-1]["iou"] - bins[0]["iou"] if len(bins) > 1 else None,
            "images_without_skin": len(rows) - len(toned)}


def load_labelled(pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Decode one pair: RGB image, region codes and, for a CelebAMask pair, its class ids."""
    image = read_rgb(pair.image)
    if pair.kind != "celebamask19":
        return image, read_regions(pair, image.shape), None
    classes = read_classes(pair, image.shape)
    return image, CELEBAMASK_REGIONS[classes], classes


def evaluate_folder(segmenter: Segmenter, pairs: Sequence[Pair], args: argparse.Namespace) -> tuple[dict[str, Any], list]:
    """Scores, error shares, IoU by skin tone, threshold sweep and timing for model and baseline on one folder."""
    baseline = ColourBaseline()
    model_rows, base_rows, sweeps, cases = [], [], [], []
    images_for_timing = []
    errors = dict.fromkeys([name for name, _ in ERROR_REGIONS] + ["missed_skin", "union"], 0)
    class_errors = dict.fromkeys([key for key, _, _ in CLASS_ERRORS] + ["union"], 0)
    for start in range(0, len(pairs), args.batch_size):
        chunk = [(p, *load_labelled(p)) for p in pairs[start:start + args.batch_size]]
        images = [im for _, im, _, _ in chunk]
        probs = segmenter.predict_probs(images)
        masks = segmenter.masks_from_probs(probs, [im.shape for im in images])
        base_masks = baseline.predict_masks(images)
        for (pair, image, regions, classes), prob, mask, base in zip(chunk, probs, masks, base_masks):
            truth = (regions == SKIN).astype(np.uint8)
            add_errors(errors, mask.astype(bool), regions)
            if classes is not None:
                add_class_errors(class_errors, mask.astype(bool), classes)
            full = cv2.resize(prob, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
            sweeps.append(threshold_counts(full, truth))
            ita = skin_ita(image, truth)
            tone = {"image": pair.name, "ita": None if np.isnan(ita) else ita}
            m, b = scores(*counts(mask, truth)), scores(*counts(base, truth))
            model_rows.append(dict(m, **tone))
            base_rows.append(dict(b, **tone))
            cases.append((pair.name, image, truth, (mask, base), m["iou"], b["iou"]))
        images_for_timing.extend(images[: max(0, args.timing_images - len(images_for_timing))])
    thr, thr_iou = best_threshold(sweeps)
    union = max(errors.pop("union"), 1)
    model = dict(mean_scores(model_rows), threshold=segmenter.cfg.threshold, best_threshold=thr,
                 best_threshold_iou=thr_iou, error_share={k: v / union for k, v in errors.items()},
                 by_skin_tone=by_skin_tone(model_rows), **time_per_image(segmenter, images_for_timing),
                 per_image=model_rows)
    if any(p.kind == "celebamask19" for p in pairs):
        class_union = max(class_errors.pop("union"), 1)
        model["error_share_by_class"] = {k: v / class_union for k, v in class_errors.items()}
    base = dict(mean_scores(base_rows), by_skin_tone=by_skin_tone(base_rows),
                **time_per_image(baseline, images_for_timing), per_image=base_rows)
    cases.sort(key=lambda c: c[4])
    n = min(args.sheet_rows, len(cases) // 2) if len(cases) > 1 else len(cases)
    picked = cases[:n] + cases[len(cases) - n:] if len(cases) > 1 else cases
    return {"images": len(pairs), "model": model, "colour_baseline": base}, picked


def unlabelled_paths(specs: Sequence[Path], limit: int) -> list[Path]:
    """The first ``limit`` images among files named directly and the sorted contents of named
    folders, in the order given; a path that does not exist stops the run before any scoring."""
    found: list[Path] = []
    for spec in specs:
        if spec.is_dir():
            found.extend(sorted(p for p in spec.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif spec.is_file():
            found.append(spec)
        else:
            raise SystemExit(f"--unlabelled {spec}: no such file or folder")
    found = list(dict.fromkeys(found))[:limit]
    if not found:
        raise SystemExit(f"--unlabelled {' '.join(map(str, specs))}: no images found")
    return found


def segment_unlabelled(segmenter: Segmenter, paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Segment each photo alone at its full size; return its figures and its (image | skin) sheet tiles."""
    rows, tiles = [], []
    for path in paths:
        try:
            image = read_rgb(path)
        except ValueError as exc:
            log.warning("--unlabelled: %s; skipped", exc)
            continue
        start = time.perf_counter()
        mask = segmenter.predict_masks([image])[0]
        ms = (time.perf_counter() - start) * 1000
        fraction = float(mask.mean())
        rows.append({"image": str(path), "height": image.shape[0], "width": image.shape[1],
                     "skin_fraction": fraction, "ms": ms})
        tiles.append(np.hstack([_tile(image, path.name[:34]), _tile(_overlay(image, mask, None), f"skin {fraction:.1%}")]))
    return rows, tiles


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every folder, then the unlabelled photos; return the report that --json writes."""
    cli.set_threads(args.threads)
    unlabelled = unlabelled_paths(args.unlabelled, args.unlabelled_limit) if args.unlabelled else []
    segmenter = Segmenter.load(args.checkpoint, args.device)
    split = segmenter.cfg.training.get("split", {})
    val_groups = split.get("val_groups", {})
    report: dict[str, Any] = {"checkpoint": args.checkpoint, "checkpoint_sha256": segmenter.sha256,
                              "arch": segmenter.cfg.arch, "encoder": segmenter.cfg.encoder,
                              "input_size": segmenter.cfg.input_size, "split": args.split,
                              "thresholds_swept": [float(t) for t in THRESHOLDS], "datasets": {}}
    sheet_rows = []
    for folder in args.data:
        pairs = discover(folder)
        name = pairs[0].dataset
        scope = args.split
        if args.split != "all" and name not in val_groups:
            log.warning("%s: the checkpoint holds no split for this folder; scoring all %d images", name, len(pairs))
            scope = "all"
        elif args.split != "all":
            pairs = select(pairs, val_groups, held_out=args.split == "val")
        if not pairs:
            log.warning("%s: no images in the %s split; skipped", name, args.split)
            continue
        result, picked = evaluate_folder(segmenter, pairs, args)
        result["scope"] = scope
        report["datasets"][name] = result
        sheet_rows.extend((f"{name}/{c[0]}", *c[1:]) for c in picked)
        log.info("%s (%s, %d images): model IoU %.4f vs colour %.4f", name, scope, len(pairs),
                 result["model"]["iou"], result["colour_baseline"]["iou"])
    tiles: list[np.ndarray] = []
    if unlabelled:
        report["unlabelled"], tiles = segment_unlabelled(segmenter, unlabelled)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.sheet and sheet_rows:
        write_sheet(args.sheet, sheet_rows)
    if args.unlabelled_sheet and tiles:
        write_unlabelled_sheet(args.unlabelled_sheet, tiles)
    return report


def print_table(report: dict[str, Any]) -> None:
    """A plain-text summary on stdout."""
    head = f"{'dataset':<18}{'method':<16}{'n':>4}" + "".join(f"{m:>10}" for m in METRICS) + f"{'best thr':>10}{'ms/1024²':>10}"
    print(head)
    for name, res in report["datasets"].items():
        for label, key in (("model", "model"), ("colour baseline", "colour_baseline")):
            r = res[key]
            thr = f"{r['best_threshold']:.2f}" if "best_threshold" in r else "-"
            print(f"{name:<18}{label:<16}{res['images']:>4}" + "".join(f"{r[m]:>10.4f}" for m in METRICS)
                  + f"{thr:>10}{r['ms_per_image_1024_median']:>10.1f}")
    print("model errors, as a share of the pixels that are skin in the truth or the prediction (other is eyes and "
          "mouth, on CelebAMask also glasses, hats, clothes and jewellery; binary masks count all false skin as other):")
    for name, res in report["datasets"].items():
        print(f"  {name:<18}" + ", ".join(f"{ERROR_LABELS[k]} {v:.1%}" for k, v in res["model"]["error_share"].items()))
    by_class = {name: res["model"]["error_share_by_class"] for name, res in report["datasets"].items()
                if "error_share_by_class" in res["model"]}
    if by_class:
        labels = {key: label for key, label, _ in CLASS_ERRORS}
        print("model errors by CelebAMask class, same denominator: false skin on each class, then missed target "
              "skin (CelebAMask-HQ labels beards and moustaches as skin, so they count as face skin and "
              "cannot be reported apart):")
        for name, shares in by_class.items():
            print(f"  {name:<18}" + ", ".join(f"{labels[k]} {v:.1%}" for k, v in shares.items()))
    print("mean IoU by skin tone: each folder's images with skin, cut into quartiles by the ITA of their true "
          "skin (degrees, lower = darker), darkest first; gap = lightest - darkest:")
    print(f"  {'dataset':<18}{'ITA range':>16}{'n':>6}{'model':>9}{'colour':>9}")
    for name, res in report["datasets"].items():
        model, base = res["model"]["by_skin_tone"], res["colour_baseline"]["by_skin_tone"]
        for m, b in zip(model["bins"], base["bins"]):
            span = f"{m['ita_low']:.1f} .. {m['ita_high']:.1f}"
            print(f"  {name:<18}{span:>16}{m['images']:>6}{m['iou']:>9.4f}{b['iou']:>9.4f}")
        if model["tone_gap"] is not None:
            print(f"  {name:<18}{'gap':>16}{'':>6}{model['tone_gap']:>+9.4f}{base['tone_gap']:>+9.4f}")
    if report.get("unlabelled"):
        print("unlabelled photos, segmented at full size (predicted skin fraction, ms for the one image):")
        for row in report["unlabelled"]:
            print(f"  {Path(row['image']).name:<40}{row['width']:>5}x{row['height']:<5}"
                  f"skin {row['skin_fraction']:>6.1%}{row['ms']:>8.0f} ms")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    run(parse_args(argv))


if __name__ == "__main__":
    main()
