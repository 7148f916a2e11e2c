"""report.png: a score job's picture names its verdicts and the grades of the acne faces."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from models.dataset import FACES_DIR, OUTCOME_SCHEMA, SCORE_SCHEMA, SCORES_DIR  # noqa: E402
from transforms.report import draw_verdicts, write_report  # noqa: E402


def _score(image_id: str, verdict: str | None, severity: str | None = None) -> dict:
    scored = verdict is not None
    return {
        "image_id": image_id, "source_uri": f"mem://{image_id}", "status": "scored" if scored else "no_skin",
        "reason": "" if scored else "skin fraction 0.01 < 0.02", "skin_fraction": 0.5 if scored else 0.01,
        "patches_used": 4 if scored else 0, "verdict": verdict, "acne_probability": 0.9 if verdict == "acne" else 0.1,
        "lesion_count": 3.0, "severity": severity, "probabilities": [], "top_patches": [], "label": None,
        "segmenter_sha256": "s", "classifier_sha256": "c",
    }


ROWS = [
    _score("a", "clear"), _score("b", "clear"),
    _score("c", "acne", "mild"), _score("d", "acne", "severe"), _score("e", "acne", "mild"),
    _score("f", None),
]


def _bars(ax: plt.Axes) -> dict[int, float]:
    heights: dict[int, float] = defaultdict(float)
    for bar in ax.patches:
        heights[round(bar.get_x() + bar.get_width() / 2)] += bar.get_height()
    return dict(heights)


def test_verdicts_are_named_and_acne_is_split_by_grade() -> None:
    fig, ax = plt.subplots()
    draw_verdicts(ax, ROWS)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clear", "acne", "no usable skin"]
    assert _bars(ax) == {0: 2, 1: 3, 2: 1}
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "severity"
    assert [t.get_text() for t in legend.get_texts()] == ["acne: mild", "acne: severe"]
    assert "6 images" in ax.get_title()
    plt.close(fig)


def test_a_job_with_no_acne_has_no_severity_legend() -> None:
    fig, ax = plt.subplots()
    draw_verdicts(ax, [_score("a", "clear"), _score("b", None)])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clear", "no usable skin"]
    assert _bars(ax) == {0: 1, 1: 1} and ax.get_legend() is None
    plt.close(fig)


def _outcomes(root: Path, with_scores: bool) -> None:
    (root / FACES_DIR).mkdir(parents=True)
    faces = [
        {"image_id": r["image_id"], "source_uri": r["source_uri"], "status": "kept" if r["verdict"] else "filtered",
         "stage": "" if r["verdict"] else "filter", "reason": r["reason"], "error_type": "",
         "skin_fraction": r["skin_fraction"], "patch_count": r["patches_used"], "split": None, "label": None}
        for r in ROWS
    ]
    pq.write_table(pa.Table.from_pylist(faces, schema=OUTCOME_SCHEMA), root / FACES_DIR / "part-0.parquet")
    if with_scores:
        (root / SCORES_DIR).mkdir()
        pq.write_table(pa.Table.from_pylist(ROWS, schema=SCORE_SCHEMA), root / SCORES_DIR / "part-0.parquet")


def test_a_score_report_has_a_verdict_panel(tmp_path: Path) -> None:
    _outcomes(tmp_path / "score", with_scores=True)
    _outcomes(tmp_path / "build", with_scores=False)
    scored = Path(write_report(str(tmp_path / "score"), "score", 0.02))
    built = Path(write_report(str(tmp_path / "build"), "build_dataset", 0.15))
    assert scored == tmp_path / "score" / "report.png" and built == tmp_path / "build" / "report.png"
    for path in (scored, built):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Three panels against two: the verdicts are drawn only when there are scores.
    assert Image.open(scored).size[0] > 1.4 * Image.open(built).size[0]
