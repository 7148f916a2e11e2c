"""Evaluate an acne classifier checkpoint on a build_dataset patch dataset, per face.

    python -m models.evaluate_classifier DATASET [--checkpoint PATH] [--split NAME|all]
                                         [--json OUT] [--plots DIR]

Every face's patches go through ``Classifier.predict_patches`` and ``Classifier.aggregate``
(exactly what the scoring job does). Prints accuracy, macro-F1, per-class precision/recall/F1
and the confusion matrix; for two classes also ROC and PR curves with their areas. The
dataset's labels pass through the checkpoint's label map, so a binary checkpoint evaluates
on a graded dataset directly.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

import fsspec
import numpy as np

from models import defaults
from models.classification_metrics import classification_report, pr_curve, roc_curve
from models.classifier import Classifier
from models.patch_data import load_patch_set, map_labels, parse_label_map

DEFAULT_CHECKPOINT = defaults.CLASSIFIER
log = logging.getLogger("evaluate_classifier")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.evaluate_classifier",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", help="build_dataset output (local path or fsspec URL)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="classifier checkpoint folder or URL")
    p.add_argument("--split", default="validation", help="train, validation, test, or all (every split pooled)")
    p.add_argument("--json", default=None, help="write every number (metrics, curves, per-face predictions) here")
    p.add_argument("--plots", default=None, help="folder for confusion_matrix.png (and roc.png, pr.png when binary)")
    p.add_argument(
        "--group",
        default="",
        help="score a coarser task with the same checkpoint: map its classes into groups, e.g. '0,1->0;2,3->1' "
        "(face probabilities of a group are summed; labels are mapped the same way)",
    )
    p.add_argument("--device", default="cpu", help="torch device")
    return p.parse_args(argv)


def evaluate(dataset: str, clf: Classifier, split: str, group: str = "") -> dict[str, Any]:
    """Per-face predictions and metrics of ``clf`` on one split (or ``all``) of ``dataset``.

    ``group`` (a label map over the checkpoint's classes) evaluates a coarser task: grouped
    face probabilities are summed.
    """
    data = load_patch_set(dataset, split, clf.cfg.input_size)
    own = list(clf.cfg.classes)
    grouping = parse_label_map(group)
    merged = map_labels(own, grouping)
    classes = list(dict.fromkeys(merged))
    to_group = np.zeros((len(own), len(classes)))
    to_group[np.arange(len(own)), [classes.index(c) for c in merged]] = 1.0
    labels = map_labels(map_labels(data.face_labels, clf.cfg.label_map), grouping)
    unknown = sorted({lab for lab in labels if lab is not None and lab not in classes})
    if unknown:
        raise ValueError(f"dataset labels {unknown} are not classes of this checkpoint ({classes})")
    sizes = sorted(set(data.boxes[:, 2].tolist()))
    if clf.cfg.patch_size and sizes != [clf.cfg.patch_size]:
        log.warning(
            "dataset patches are %s px but the classifier was trained on %d px patches: lesion scale and counts "
            "per patch differ, expect worse results; rebuild the dataset with --patch-size %d",
            sizes,
            clf.cfg.patch_size,
            clf.cfg.patch_size,
        )
    probs = clf.predict_patches(list(data.pixels))
    faces = []
    for face, idx in enumerate(data.face_patches()):
        face_probs = clf.aggregate(probs[idx]) @ to_group
        scores = clf.patch_scores(probs[idx])
        top = idx[int(np.argmax(scores))]
        faces.append(
            {
                "image_id": data.face_ids[face],
                "label": labels[face],
                "predicted": classes[int(face_probs.argmax())],
                "probabilities": dict(zip(classes, face_probs.round(6).tolist())),
                "patches": int(len(idx)),
                "most_suspicious_patch": dict(zip(("x", "y", "size"), data.boxes[top].tolist()), score=float(scores.max())),
            }
        )
    labelled = [f for f in faces if f["label"] is not None]
    if not labelled:
        raise ValueError(f"split {split!r} of {dataset} has no labelled faces to evaluate")
    y_true = np.array([classes.index(f["label"]) for f in labelled])
    face_probs = np.array([[f["probabilities"][c] for c in classes] for f in labelled])
    result: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "checkpoint_sha256": clf.sha256,
        "aggregation": clf.cfg.aggregation,
        "group": grouping,
        "patch_sizes": sizes,
        "unlabelled_faces": len(faces) - len(labelled),
        **classification_report(y_true, face_probs.argmax(1), classes),
    }
    if len(classes) == 2:
        positive = face_probs[:, 1]
        result["positive_class"] = classes[1]
        result["roc"] = roc_curve(y_true == 1, positive)
        result["pr"] = pr_curve(y_true == 1, positive)
    result["faces_detail"] = faces
    return result


def save_plots(result: dict[str, Any], folder: str) -> list[str]:
    """Confusion matrix (and ROC/PR for binary) as PNGs under ``folder``; returns their URLs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    written = []

    def _save(fig: Any, name: str) -> None:
        uri = folder.rstrip("/") + "/" + name
        with fsspec.open(uri, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(uri)

    cm = np.asarray(result["confusion_matrix"])
    classes = result["classes"]
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result['split']}: acc {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}")
    _save(fig, "confusion_matrix.png")
    if "roc" in result:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(result["roc"]["fpr"], result["roc"]["tpr"], label=f"AUC {result['roc']['auc']:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel(f"true positive rate ({result['positive_class']})")
        ax.legend(loc="lower right")
        _save(fig, "roc.png")
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.step(result["pr"]["recall"], result["pr"]["precision"], where="post", label=f"AP {result['pr']['average_precision']:.3f}")
        ax.axhline(result["pr"]["positive_rate"], linestyle=":", color="grey")
        ax.set_xlabel(f"recall ({result['positive_class']})")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower left")
        _save(fig, "pr.png")
    return written


def summary(result: dict[str, Any]) -> str:
    """The human-readable report printed to stdout."""
    lines = [
        f"split {result['split']}: {result['faces']} labelled faces, aggregation {result['aggregation']}",
        f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}",
        "class        precision  recall     F1  support",
    ]
    for c, m in result["per_class"].items():
        lines.append(f"{c:<12} {m['precision']:9.4f} {m['recall']:7.4f} {m['f1']:6.4f} {m['support']:8d}")
    lines.append("confusion matrix (rows true, columns predicted): " + " ".join(result["classes"]))
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in result["confusion_matrix"]]
    if "roc" in result:
        lines.append(
            f"positive class {result['positive_class']}: ROC AUC {result['roc']['auc']:.4f}, "
            f"average precision {result['pr']['average_precision']:.4f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    clf = Classifier.load(args.checkpoint, device=args.device)
    log.info("checkpoint %s (sha256 %s), classes %s", args.checkpoint, clf.sha256[:12], list(clf.cfg.classes))
    result = evaluate(args.dataset, clf, args.split, args.group)
    result["checkpoint"] = args.checkpoint
    if args.plots:
        result["plots"] = save_plots(result, args.plots)
    print(summary(result))
    if args.json:
        with fsspec.open(args.json, "wt") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
