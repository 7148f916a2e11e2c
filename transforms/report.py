"""A one-page picture of a finished job: where the images went, and how much skin they had.

People judge a run faster from a histogram than from a table: a threshold that filters half
the faces, or a failure reason that dominates, shows at a glance.
"""
from __future__ import annotations

import io
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from models.dataset import FACES_DIR, OUTCOME_SCHEMA, SCORE_SCHEMA, SCORES_DIR, join, read_parquet_dir  # noqa: E402
from transforms.storage import open_file  # noqa: E402

REPORT = "report.png"
VERDICT_COLOURS = {"clear": "#2a9d8f", "acne": "#e76f51", "no usable skin": "#adb5bd"}
SEVERITY_SHADES = ("#f4a261", "#e76f51", "#c1121f", "#780000")
COLOURS = {"kept": "#2a9d8f", "filtered": "#e9c46a", "failed": "#e76f51"}


def write_report(output: str, job: str, min_face_skin: float) -> str:
    """Draw outcomes by reason, the skin-fraction histogram and (score) the verdicts to ``OUTPUT/report.png``."""
    faces = read_parquet_dir(join(output, FACES_DIR), OUTCOME_SCHEMA).to_pylist()
    reasons = Counter(
        (f["status"], f["status"] if f["status"] == "kept" else f"{f['stage']}: {f['error_type'] or f['reason']}"[:48])
        for f in faces
    )
    scores = read_parquet_dir(join(output, SCORES_DIR), SCORE_SCHEMA, ["verdict", "severity"]).to_pylist()
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
        draw_verdicts(axes[2], scores)
    for axis in [left.xaxis, right.yaxis] + ([axes[2].yaxis] if scores else []):
        axis.set_major_locator(MaxNLocator(integer=True))  # image counts
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    path = join(output, REPORT)
    with open_file(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def draw_verdicts(ax: plt.Axes, scores: list[dict]) -> None:
    """One bar per verdict; the acne bar is stacked by severity grade, named in the legend."""
    verdicts = Counter(r["verdict"] or "no usable skin" for r in scores)
    names = [v for v in ("clear", "acne", "no usable skin") if verdicts[v]] + sorted(
        v for v in verdicts if v not in VERDICT_COLOURS)
    grades = Counter(r["severity"] for r in scores if r["verdict"] == "acne")
    for i, name in enumerate(names):
        if name == "acne" and grades:
            bottom = 0
            for shade, (grade, n) in zip(SEVERITY_SHADES * 2, sorted(grades.items(), key=lambda g: str(g[0]))):
                ax.bar(i, n, bottom=bottom, color=shade, label=f"acne: {grade}")
                bottom += n
        else:
            ax.bar(i, verdicts[name], color=VERDICT_COLOURS.get(name, "#264653"))
    # Positions, not the names, on the axis: matplotlib would treat string bars as categories.
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("verdict")
    ax.set_ylabel("images")
    ax.set_title(f"verdicts of {len(scores)} images")
    if grades:
        ax.legend(title="severity")
