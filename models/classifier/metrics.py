"""Face-level classification metrics in plain NumPy (the project ships no scikit-learn)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (C, C): rows are true classes, columns predicted classes."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    A class with no true and no predicted faces has undefined F1; it is left out of the
    macro average (so a validation split that lacks a class is not punished for it).
    """
    n = len(classes)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    total = int(cm.sum())
    return {
        "faces": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """ROC points (one per distinct score, highest first) and the trapezoidal AUC."""
    y = np.asarray(y_true, bool)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.zeros(0, np.int64)
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr, fpr = np.r_[0.0, tps / pos], np.r_[0.0, fps / neg]
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "thresholds": np.r_[np.inf, s[last]].tolist(),
        "auc": float(np.trapezoid(tpr, fpr)),
    }


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate of ``hits`` in ``n`` (95 % by default).

    Per-source rates rest on a few dozen faces at times: 2 false alarms in 28 is 0.071, but
    anything from 0.02 to 0.23 would often give it. Wilson's interval stays inside [0, 1] and
    is sound at 0 or n hits, where the normal approximation collapses to a point.
    """
    if n <= 0:
        return (0.0, 1.0)
    rate, z2 = hits / n, z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # The interval always holds the rate; rounding alone could leave 6 in 6 just above its top.
    return (max(0.0, min(rate, float(centre - half))), min(1.0, max(rate, float(centre + half))))


def source_rates(y_true: np.ndarray, predicted: np.ndarray, sources: Sequence[str], verdicts: Sequence[str]) -> dict[str, Any]:
    """Per source: how often each true verdict was called acne (TPR for acne faces, FPR for clear
    ones), with the count behind it and its 95 % Wilson interval."""
    y, hit, src = np.asarray(y_true), np.asarray(predicted, bool), np.asarray(sources)
    out: dict[str, Any] = {}
    for s in sorted(set(src.tolist())):
        for v in (1, 0):
            mine = (src == s) & (y == v)
            if mine.any():
                called, faces = int(hit[mine].sum()), int(mine.sum())
                rate = called / faces
                out.setdefault(s, {})[verdicts[v]] = {
                    "faces": faces, "called_acne": called, "rate_name": "TPR" if v else "FPR", "rate": rate,
                    "interval_95": list(wilson_interval(called, faces)), "correct": rate if v else 1.0 - rate,
                }
    return out


def binary_verdict_report(y_true: np.ndarray, probs: np.ndarray, threshold: float, sources: Sequence[str],
                          verdicts: Sequence[str]) -> dict[str, Any]:
    """Clear (0) vs acne (1) per face: the pooled report, ROC AUC, and rates per source.

    ``worst_source_rate`` is the lowest share of correct verdicts over every (source, truth)
    group: a model that recognises sources instead of lesions shows up there first.
    """
    y = np.asarray(y_true, np.int64)
    predicted = np.asarray(probs) >= threshold
    by_source = source_rates(y, predicted, sources, verdicts)
    report = classification_report(y, predicted.astype(np.int64), verdicts)
    roc = roc_curve(y == 1, probs)
    return dict(
        report,
        threshold=float(threshold),
        roc_auc=roc["auc"] if (y == 1).any() and (y == 0).any() else float("nan"),
        roc=roc,
        by_source=by_source,
        worst_source_rate=min((g["correct"] for s in by_source.values() for g in s.values()), default=float("nan")),
    )
