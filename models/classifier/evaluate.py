"""Evaluate an acne classifier checkpoint on build_dataset patch datasets, per face.

    python -m models.classifier.evaluate [NAME=]DATASET... [--checkpoint PATH]
                                         [--split validation,test] [--json OUT] [--plots DIR]

Every face's patches go through ``Classifier.predict_patches``, ``Classifier.judge`` and
``Classifier.regrade`` (exactly what the scoring job does). Reports, in this order:

* the binary task, clear vs acne: macro-F1, ROC AUC and the confusion matrix, pooled; then
  the rate per source (TPR on each acne source, FPR on each clear source) and per dataset
  (a source at one scale), because a pooled figure can hide a model that recognises sources,
  each with its 95 % Wilson interval, because some sources hold only a few dozen faces;
* severity on the faces that carry a grade (ACNE04), whatever their verdict, read by the
  checkpoint's severity network where it has one: accuracy, macro-F1, per grade.

``--plots`` writes verdict_confusion_matrix.png, severity_confusion_matrix.png, roc.png and
errors_sheet.png, a contact sheet of the false positives and false negatives with their most
suspicious patches outlined. Dataset labels pass through the checkpoint's label map.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

import cv2
import fsspec
import numpy as np

from models import cli, defaults
from models.classifier.metrics import binary_verdict_report, classification_report, source_rates
from models.classifier.model import Classifier
from models.classifier.data import PatchSet, decode_rgb, face_verdicts, load_sources

DEFAULT_CHECKPOINT = defaults.CLASSIFIER
SHEET_TILE = 220
log = logging.getLogger(__name__)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability strictly between 0 and 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m models.classifier.evaluate", __doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", metavar="[NAME=]DATASET",
                   help="build_dataset outputs (local paths or fsspec URLs); NAME@SCALE names a source at a scale")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="classifier checkpoint folder or URL")
    p.add_argument("--split", default="validation,test",
                   help="splits to score, comma-separated, or 'all'; the default never includes training faces")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="acne probability that makes a face 'acne' (default: the checkpoint's calibrated one)")
    p.add_argument("--json", default=None, help="write every number (metrics, curves, per-face verdicts) here")
    p.add_argument("--plots", default=None,
                   help="folder for verdict_confusion_matrix.png, severity_confusion_matrix.png, roc.png and "
                        "errors_sheet.png")
    p.add_argument("--sheet-faces", type=int, default=12, help="false positives and false negatives on the sheet, each")
    cli.add_torch_args(p, threads=0)
    return p.parse_args(argv)


def judge_faces(data: PatchSet, clf: Classifier, threshold: float | None) -> list[dict[str, Any]]:
    """Every face's answer, with its three most suspicious patches."""
    lesions, grades = clf.predict_patches(list(data.pixels))
    labels = [None if lab is None else clf.cfg.label_map.get(lab, lab) for lab in data.face_labels]
    verdict, grade = face_verdicts(labels, clf.cfg.classes, clf.cfg.verdicts)
    groups = data.face_patches()
    answers = [clf.judge(lesions[idx], threshold, grades[idx]) for idx in groups]
    # Graded faces are graded whatever their verdict, as they would be were they called acne.
    graded = [f for f, a in enumerate(answers) if grade[f] >= 0 or a.verdict == clf.cfg.verdicts[1]]
    regraded = clf.regrade([answers[f] for f in graded], [list(data.pixels[groups[f]]) for f in graded], every=True)
    for f, answer in zip(graded, regraded):
        answers[f] = answer
    faces = []
    for f, (idx, answer) in enumerate(zip(groups, answers)):
        top = idx[np.argsort(-lesions[idx], kind="stable")[:3]]
        faces.append({
            "image_id": data.face_ids[f],
            "dataset": data.face_datasets[f],
            "source": data.face_sources[f],
            "source_uri": data.face_uris[f],
            "true_verdict": None if verdict[f] < 0 else clf.cfg.verdicts[verdict[f]],
            "true_severity": None if grade[f] < 0 else clf.cfg.classes[grade[f]],
            "verdict": answer.verdict,
            "acne_probability": round(answer.acne_probability, 6),
            "lesion_count": round(answer.lesion_count, 3),
            "severity": answer.severity,
            "severity_if_acne": clf.cfg.classes[int(np.argmax(answer.severity_probs))],
            "patches": int(len(idx)),
            "top_patches": [dict(zip(("x", "y", "size"), data.boxes[i].tolist()), lesions=round(float(lesions[i]), 3))
                            for i in top],
        })
    return faces


def evaluate(datasets: Sequence[str], clf: Classifier, split: str, threshold: float | None = None) -> dict[str, Any]:
    """Per-face verdicts and metrics of ``clf`` on the given splits of ``datasets``."""
    data = load_sources(datasets, split, clf.cfg.input_size)
    if not len(data):
        raise ValueError(f"no patches in split {split!r} of {list(datasets)}")
    sizes = sorted(set(data.boxes[:, 2].tolist()))
    if clf.cfg.patch_size and sizes != [clf.cfg.patch_size]:
        log.warning("dataset patches are %s px but the classifier was trained on %d px patches: lesion counts per "
                    "patch differ, expect worse results; rebuild with --patch-size %d", sizes, clf.cfg.patch_size,
                    clf.cfg.patch_size)
    faces = judge_faces(data, clf, threshold)
    cut = clf.cfg.verdict_threshold if threshold is None else threshold
    known = [f for f in faces if f["true_verdict"] is not None]
    if not known:
        raise ValueError(f"split {split!r} of {list(datasets)} has no face labelled with a grade or a verdict")
    y = np.array([clf.cfg.verdicts.index(f["true_verdict"]) for f in known])
    probs = np.array([f["acne_probability"] for f in known])
    result: dict[str, Any] = {
        "datasets": list(datasets),
        "split": split,
        "checkpoint_sha256": clf.sha256,
        "patch_sizes": sizes,
        "unlabelled_faces": len(faces) - len(known),
        "binary": binary_verdict_report(y, probs, cut, [f["source"] for f in known], clf.cfg.verdicts),
    }
    result["binary"]["by_dataset"] = source_rates(y, probs >= cut, [f["dataset"] for f in known], clf.cfg.verdicts)
    graded = [f for f in faces if f["true_severity"] is not None]
    if graded:
        classes = list(clf.cfg.classes)
        truth = np.array([classes.index(f["true_severity"]) for f in graded])
        pred = np.array([classes.index(f["severity_if_acne"]) for f in graded])
        severity = classification_report(truth, pred, classes)
        names = np.array([f["dataset"] for f in graded])
        severity["by_dataset"] = {
            d: {k: v for k, v in classification_report(truth[names == d], pred[names == d], classes).items()
                if k in ("faces", "accuracy", "macro_f1")}
            for d in sorted(set(names.tolist()))
        }
        result["severity"] = severity
    result["faces_detail"] = faces
    return result


def _read_face(uri: str) -> np.ndarray | None:
    try:
        with fsspec.open(uri.split("#")[0], "rb") as f:
            return decode_rgb(f.read())
    except (OSError, ValueError):
        return None


def error_sheet(faces: Sequence[dict[str, Any]], limit: int) -> np.ndarray | None:
    """False positives (top row block) and false negatives, each with its top patches outlined."""
    wrong = [f for f in faces if f["true_verdict"] is not None and f["verdict"] != f["true_verdict"]]
    fps = sorted((f for f in wrong if f["verdict"] == "acne"), key=lambda f: -f["acne_probability"])[:limit]
    fns = sorted((f for f in wrong if f["verdict"] != "acne"), key=lambda f: f["acne_probability"])[:limit]
    tiles = []
    for kind, group in (("FP", fps), ("FN", fns)):
        for face in group:
            image = _read_face(face["source_uri"])
            if image is None:
                image = np.full((SHEET_TILE, SHEET_TILE, 3), 200, np.uint8)
            else:
                image = image.copy()
                thick = max(2, image.shape[0] // 200)
                for box in face["top_patches"]:
                    x, y, s = box["x"], box["y"], box["size"]
                    cv2.rectangle(image, (x, y), (x + s - 1, y + s - 1), (255, 40, 40), thick)
            scale = SHEET_TILE / max(image.shape[:2])
            small = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)
            tile = np.full((SHEET_TILE + 34, SHEET_TILE, 3), 255, np.uint8)
            tile[:small.shape[0], :small.shape[1]] = small
            lines = (f"{kind} {face['dataset']}", f"p={face['acne_probability']:.2f} lesions={face['lesion_count']:.1f}")
            for row, text in enumerate(lines):
                cv2.putText(tile, text[:32], (3, SHEET_TILE + 13 + 15 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                            (0, 0, 0), 1, cv2.LINE_AA)
            tiles.append(tile)
    if not tiles:
        return None
    cols = 6
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % cols)
    return np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])


def _confusion_plot(plt: Any, cm: np.ndarray, classes: Sequence[str], title: str) -> Any:
    fig, ax = plt.subplots(figsize=(1.3 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def save_plots(result: dict[str, Any], folder: str, sheet_faces: int = 12) -> list[str]:
    """The confusion matrices, the ROC curve and the error sheet as PNGs under ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    written = []

    def _write(name: str, data: bytes) -> None:
        uri = folder.rstrip("/") + "/" + name
        with fsspec.open(uri, "wb") as f:
            f.write(data)
        written.append(uri)

    def _save(fig: Any, name: str) -> None:
        uri = folder.rstrip("/") + "/" + name
        with fsspec.open(uri, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(uri)

    b = result["binary"]
    _save(_confusion_plot(plt, np.asarray(b["confusion_matrix"]), b["classes"],
                          f"clear vs acne: macro-F1 {b['macro_f1']:.3f}, AUC {b['roc_auc']:.3f}"),
          "verdict_confusion_matrix.png")
    if "severity" in result:
        s = result["severity"]
        _save(_confusion_plot(plt, np.asarray(s["confusion_matrix"]), s["classes"],
                              f"severity: acc {s['accuracy']:.3f}, macro-F1 {s['macro_f1']:.3f}"),
              "severity_confusion_matrix.png")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(b["roc"]["fpr"], b["roc"]["tpr"], label=f"AUC {b['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (clear faces called acne)")
    ax.set_ylabel("true positive rate (acne faces found)")
    ax.legend(loc="lower right")
    _save(fig, "roc.png")
    sheet = error_sheet(result["faces_detail"], sheet_faces)
    if sheet is not None:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        if ok:
            _write("errors_sheet.png", buf.tobytes())
    return written


def summary(result: dict[str, Any]) -> str:
    """The human-readable report printed to stdout."""
    b = result["binary"]
    lines = [
        f"split {result['split']}: {b['faces']} faces with a known verdict, threshold {b['threshold']:.2f}",
        f"clear vs acne: macro-F1 {b['macro_f1']:.4f}  ROC AUC {b['roc_auc']:.4f}  accuracy {b['accuracy']:.4f}",
        "confusion matrix (rows true, columns predicted): " + " ".join(b["classes"]),
        *("  " + " ".join(f"{v:5d}" for v in row) for row in b["confusion_matrix"]),
        f"{'source / dataset':<26}{'truth':<8}{'faces':>6}  rate       (95 % interval)",
    ]
    for key in ("by_source", "by_dataset"):
        for name, groups in b[key].items():
            for truth, g in groups.items():
                low, high = g["interval_95"]
                lines.append(f"{name:<26}{truth:<8}{g['faces']:>6}  {g['rate_name']} {g['rate']:.3f}  ({low:.3f}-{high:.3f})")
    if "severity" in result:
        s = result["severity"]
        lines += [f"severity on {s['faces']} graded faces: accuracy {s['accuracy']:.4f}  macro-F1 {s['macro_f1']:.4f}",
                  "grade        precision  recall     F1  support"]
        lines += [f"{c:<12} {m['precision']:9.4f} {m['recall']:7.4f} {m['f1']:6.4f} {m['support']:8d}"
                  for c, m in s["per_class"].items()]
        lines += [f"  {d}: {v['faces']} faces, accuracy {v['accuracy']:.4f}, macro-F1 {v['macro_f1']:.4f}"
                  for d, v in s["by_dataset"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    cli.set_threads(args.threads)
    clf = Classifier.load(args.checkpoint, device=args.device)
    log.info("checkpoint %s (sha256 %s), verdicts %s, grades %s", args.checkpoint, clf.sha256[:12],
             list(clf.cfg.verdicts), list(clf.cfg.classes))
    result = evaluate(args.datasets, clf, args.split, args.threshold)
    result["checkpoint"] = args.checkpoint
    if args.plots:
        result["plots"] = save_plots(result, args.plots, args.sheet_faces)
    print(summary(result))
    if args.json:
        with fsspec.open(args.json, "wt") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
