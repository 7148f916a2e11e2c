"""A one-page picture of a finished job: where the images went, and how much skin they had.

People judge a run faster from a histogram than from a table: a threshold that filters half
the faces, or a failure reason that dominates, shows at a glance.
"""
from __future__ import annotations

import io
from collections import Counter

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from models.dataset import FACES_DIR, OUTCOME_SCHEMA, SCORE_SCHEMA, SCORES_DIR, join, read_parquet_dir  # noqa: E402

REPORT = "report.png"
COLOURS = {"kept": "#2a9d8f", "filtered": "#e9c46a", "failed": "#e76f51"}


def write_report(output: str, job: str, min_face_skin: float) -> str:
    """Draw outcomes by reason, the skin-fraction histogram and (score) the verdicts to ``OUTPUT/report.png``."""
    faces = read_parquet_dir(join(output, FACES_DIR), OUTCOME_SCHEMA).to_pylist()
    reasons = Counter(
        (f["status"], f["status"] if f["status"] == "kept" else f"{f['stage']}: {f['error_type'] or f['reason']}"[:48])
        for f in faces
    )
    scores = read_parquet_dir(join(output, SCORES_DIR), SCORE_SCHEMA, ["predicted_class"]).column(0).to_pylist()
    panels = 3 if scores else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), gridspec_kw={"width_ratios": [1.2] + [1] * (panels - 1)})
    left, right = axes[0], axes[1]
    labels = [label for (_, label), _ in reasons.most_common()]
    left.barh(labels, [n for _, n in reasons.most_common()], color=[COLOURS[s] for (s, _), _ in reasons.most_common()])
    left.invert_yaxis()
    left.set_xlabel("images")
    left.set_title(f"{job}: {len(faces)} inputs by outcome")
    for status in ("kept", "filtered"):
        values = [f["skin_fraction"] for f in faces if f["status"] == status and f["skin_fraction"] is not None]
        right.hist(values, bins=20, range=(0, 1), alpha=0.8, color=COLOURS[status], label=status)
    right.axvline(min_face_skin, color="black", linestyle="--", label=f"--min-face-skin {min_face_skin}")
    right.set_xlabel("skin fraction of the face")
    right.set_ylabel("images")
    right.set_title("skin per face")
    right.legend()
    if scores:
        classes = Counter(c for c in scores if c is not None)
        names = sorted(classes)
        # Positions, not the names: class names such as "0".."3" would be taken for numbers.
        axes[2].bar(range(len(names)), [classes[n] for n in names], color="#264653", tick_label=names)
        axes[2].set_xlabel("predicted class")
        axes[2].set_ylabel("images")
        axes[2].set_title(f"verdicts ({scores.count(None)} without usable skin)")
    for axis in [left.xaxis, right.yaxis] + ([axes[2].yaxis] if scores else []):
        axis.set_major_locator(MaxNLocator(integer=True))  # image counts
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    path = join(output, REPORT)
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())
    return path
