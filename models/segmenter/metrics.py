"""Per-image mask scores, shared by the trainer's validation and the evaluator.

Scores are computed per image and then averaged over images ("mean IoU"), so a small face
counts as much as a large one.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

METRICS = ("iou", "dice", "precision", "recall")
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


# counts, scores and threshold_counts give smp.metrics' numbers (tests/test_evaluate_segmenter.py) but run faster,
# measured on a 1024² mask: counts 0.3 ms vs get_stats 18 ms; the 19-threshold sweep 82 ms vs 813 ms; scores 1 µs vs 400 µs.
def counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of a 0/1 prediction."""
    p, t = pred.astype(bool), truth.astype(bool)
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """IoU, Dice, precision and recall from counts; an empty-vs-empty image scores 1."""
    def ratio(num: float, den: float) -> float:
        return float(num / den) if den else 1.0

    return {
        "iou": ratio(tp, tp + fp + fn),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def mean_scores(per_image: Iterable[dict[str, float]]) -> dict[str, float]:
    """Average each metric over images."""
    rows = list(per_image)
    return {m: float(np.mean([r[m] for r in rows])) if rows else float("nan") for m in METRICS}


def threshold_counts(prob: np.ndarray, truth: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """(len(thresholds), 3) array of tp, fp, fn when ``prob >= t`` is the prediction."""
    t = truth.astype(bool).ravel()
    p = prob.ravel()
    pos, neg = np.sort(p[t]), np.sort(p[~t])
    thr = np.asarray(thresholds, np.float32)
    tp = pos.size - np.searchsorted(pos, thr, side="left")
    fp = neg.size - np.searchsorted(neg, thr, side="left")
    return np.stack([tp, fp, pos.size - tp], axis=1)


def best_threshold(per_image_counts: Sequence[np.ndarray], thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, float]:
    """The threshold with the highest mean per-image IoU, and that IoU."""
    ious = np.array([[scores(*row)["iou"] for row in c] for c in per_image_counts]).mean(axis=0)
    best = int(np.argmax(ious))
    return float(thresholds[best]), float(ious[best])
