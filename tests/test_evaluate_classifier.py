"""Evaluation per face: the verdict pooled and per source, severity on graded faces, plots, JSON."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import defaults
from models.classifier import SEVERITIES, Classifier
from models.classifier.evaluate import main as evaluate
from models.classifier.metrics import wilson_interval
from models.classifier.train import main as train
from tests.classifier_data import write_patch_dataset

FAST = ["--arch", "test_byobnet", "--input-size", "24", "--batch-size", "16", "--threads", "1"]
LABEL_MAP = "0->mild;1->moderate;2->severe;3->very_severe;face->clear"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """Three datasets as a user names them (clear celebrities, ACNE04 at two scales, raw labels)
    and a classifier trained on them with a label map."""
    root = tmp_path_factory.mktemp("evaluate")
    grades = ("0", "1", "2", "3")
    celeb = write_patch_dataset(root / "celeb", {"train": {"face": 10}, "validation": {"face": 4}, "test": {"face": 4}},
                                seed=1, id_prefix="c")
    acne = write_patch_dataset(
        root / "acne04",
        {"train": {g: 3 for g in grades}, "validation": {g: 1 for g in grades}, "test": {g: 1 for g in grades}},
        seed=2, id_prefix="a",
    )
    half = write_patch_dataset(root / "half", {"train": {"1": 2, "2": 2}, "validation": {"1": 1}, "test": {"0": 1, "3": 1}},
                               size=12, seed=3, id_prefix="h")
    datasets = [f"celeb={celeb}", f"acne04={acne}", f"acne04@0.5={half}"]
    assert train([*datasets, "--output", str(root / "ckpt"), *FAST, "--epochs", "3", "--epoch-patches", "256",
                  "--lr", "5e-3", "--label-map", LABEL_MAP]) == 0
    return datasets, root / "ckpt"


def _evaluate(datasets: list[str], ckpt: Path, out: Path, *extra: str) -> dict:
    assert evaluate([*datasets, "--checkpoint", str(ckpt), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_reports_the_verdict_pooled_per_source_and_per_dataset(
    trained: tuple[list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets, ckpt = trained
    result = _evaluate(datasets, ckpt, tmp_path / "eval.json", "--split", "test")
    clf = Classifier.load(str(ckpt))
    assert result["split"] == "test" and result["checkpoint_sha256"] == clf.sha256
    binary = result["binary"]
    assert binary["threshold"] == clf.cfg.verdict_threshold
    assert binary["faces"] == 4 + 4 + 2 and binary["classes"] == ["clear", "acne"]
    assert np.asarray(binary["confusion_matrix"]).sum(axis=1).tolist() == [4, 6]
    assert binary["macro_f1"] >= 0.9 and binary["roc_auc"] >= 0.9
    # Rates per source (the scale suffix collapses) and per dataset (it does not).
    assert {s: {t: g["faces"] for t, g in groups.items()} for s, groups in binary["by_source"].items()} == {
        "celeb": {"clear": 4}, "acne04": {"acne": 6}
    }
    assert {s: {t: g["faces"] for t, g in groups.items()} for s, groups in binary["by_dataset"].items()} == {
        "celeb": {"clear": 4}, "acne04": {"acne": 4}, "acne04@0.5": {"acne": 2}
    }
    # Every rate is what the per-face verdicts say.
    faces = result["faces_detail"]
    assert len(faces) == 10
    for source, truth in (("celeb", "clear"), ("acne04", "acne")):
        mine = [f for f in faces if f["source"] == source]
        assert all(f["true_verdict"] == truth for f in mine)
        group = binary["by_source"][source][truth]
        assert group["rate"] == pytest.approx(np.mean([f["verdict"] == "acne" for f in mine]))
        assert group["called_acne"] == sum(f["verdict"] == "acne" for f in mine)
        assert group["interval_95"][0] <= group["rate"] <= group["interval_95"][1]
    for f in faces:
        assert f["verdict"] in ("clear", "acne") and (f["severity"] is None) == (f["verdict"] == "clear")
        assert (f["verdict"] == "acne") == (f["acne_probability"] >= binary["threshold"] - 1e-6)
        assert f["true_severity"] in (None, *SEVERITIES) and (f["true_severity"] is None) == (f["source"] == "celeb")
        assert 1 <= len(f["top_patches"]) <= 3
    printed = capsys.readouterr().out
    assert f"clear vs acne: macro-F1 {binary['macro_f1']:.4f}" in printed
    assert "celeb" in printed and "acne04@0.5" in printed and "FPR" in printed and "TPR" in printed


def test_reports_severity_on_the_graded_faces_only(trained: tuple[list[str], Path], tmp_path: Path) -> None:
    datasets, ckpt = trained
    severity = _evaluate(datasets, ckpt, tmp_path / "eval.json", "--split", "test")["severity"]
    assert severity["faces"] == 6 and severity["classes"] == list(SEVERITIES)
    assert {c: m["support"] for c, m in severity["per_class"].items()} == {
        "mild": 2, "moderate": 1, "severe": 1, "very_severe": 2
    }
    assert {d: v["faces"] for d, v in severity["by_dataset"].items()} == {"acne04": 4, "acne04@0.5": 2}
    assert np.asarray(severity["confusion_matrix"]).sum() == 6


def test_a_threshold_flips_verdicts_and_the_plots_show_the_errors(
    trained: tuple[list[str], Path], tmp_path: Path
) -> None:
    datasets, ckpt = trained
    calibrated = _evaluate(datasets, ckpt, tmp_path / "a.json", "--split", "test")
    # A threshold just above the least likely acne face: that face (at least) is now missed.
    probs = {f["image_id"]: f["acne_probability"] for f in calibrated["faces_detail"]}
    least = min(p for f, p in zip(calibrated["faces_detail"], probs.values()) if f["true_verdict"] == "acne")
    above = [p for p in probs.values() if p > least]
    strict = (least + min(above, default=1.0)) / 2
    assert least < strict < 1.0
    plots = tmp_path / "plots"
    result = _evaluate(datasets, ckpt, tmp_path / "b.json", "--split", "test", "--threshold", str(strict),
                       "--plots", str(plots))
    assert result["binary"]["threshold"] == strict
    called = {f["image_id"]: f["verdict"] for f in result["faces_detail"]}
    assert called == {i: "acne" if p >= strict else "clear" for i, p in probs.items()}
    truth = [f["true_verdict"] for f in calibrated["faces_detail"]]
    missed = sum(t == "acne" and called[f["image_id"]] == "clear" for t, f in zip(truth, calibrated["faces_detail"]))
    assert missed >= 1 and result["binary"]["confusion_matrix"][1][0] == missed
    assert all((f["severity"] is None) == (f["verdict"] == "clear") for f in result["faces_detail"])
    names = ("verdict_confusion_matrix.png", "severity_confusion_matrix.png", "roc.png", "errors_sheet.png")
    assert sorted(Path(p).name for p in result["plots"]) == sorted(names)
    for name in names:
        assert (plots / name).read_bytes()[:8] == PNG, name


def test_all_splits_pool_every_face(trained: tuple[list[str], Path], tmp_path: Path) -> None:
    datasets, ckpt = trained
    result = _evaluate(datasets, ckpt, tmp_path / "e.json", "--split", "all")
    assert result["split"] == "all"
    assert result["binary"]["faces"] == (10 + 4 + 4) + (12 + 4 + 4) + (4 + 1 + 2)
    assert result["severity"]["faces"] == (12 + 4 + 4) + (4 + 1 + 2)
    default = _evaluate(datasets, ckpt, tmp_path / "d.json")
    assert default["binary"]["faces"] == (4 + 4) + (4 + 4) + (1 + 2)  # validation and test, never train


def test_a_bundled_severity_network_grades_every_graded_face_and_leaves_the_verdicts(
        trained: tuple[list[str], Path], tmp_path: Path) -> None:
    from models.classifier.bundle import bundle
    from tests.classifier_data import save_untrained_classifier

    datasets, ckpt = trained
    cfg = Classifier.load(str(ckpt)).cfg
    grader = str(tmp_path / "grader")
    save_untrained_classifier(grader, input_size=cfg.input_size, patch_size=cfg.patch_size,
                              min_patch_skin=cfg.min_patch_skin, severity_slopes=(0.0,) * 4,
                              severity_patch_weights=(), severity_bias=(0.0, 0.0, 0.0, 9.0))
    bundle(str(ckpt), grader, str(tmp_path / "bundle"))
    alone = _evaluate(datasets, ckpt, tmp_path / "alone.json", "--split", "test")
    both = _evaluate(datasets, tmp_path / "bundle", tmp_path / "both.json", "--split", "test")
    assert both["binary"] == alone["binary"]
    graded = [f for f in both["faces_detail"] if f["true_severity"] is not None]
    assert graded and all(f["severity_if_acne"] == "very_severe" for f in graded)
    assert all(f["severity"] in (None, "very_severe") for f in both["faces_detail"])
    assert both["severity"]["per_class"]["very_severe"]["recall"] == 1.0


def test_a_label_that_is_neither_a_grade_nor_a_verdict_is_refused(trained: tuple[list[str], Path], tmp_path: Path) -> None:
    _, ckpt = trained
    other = write_patch_dataset(tmp_path / "other", {"validation": {"0": 1, "7": 1}}, lesions={"7": (1, 2)})
    with pytest.raises(ValueError, match=r"labels \['7'\] are neither grades .* map them with --label-map"):
        evaluate([str(other), "--checkpoint", str(ckpt)])


def test_default_checkpoint_judges_a_dataset_without_being_named(tmp_path: Path) -> None:
    if not (Path(defaults.CLASSIFIER) / "config.json").is_file():
        pytest.skip("no shipped classifier checkpoint in models/defaults/classifier")
    data = write_patch_dataset(tmp_path / "graded", {"validation": {"clear": 2, "severe": 2}}, size=128)
    assert evaluate([str(data), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["checkpoint_sha256"] == Classifier.load(defaults.CLASSIFIER).sha256
    assert result["binary"]["faces"] == 4 and result["severity"]["faces"] == 2
    # The shipped model grades acne faces with its own severity network (MODEL_CARD.md says why).
    assert Classifier.load(defaults.CLASSIFIER).severity_model is not None


@pytest.mark.parametrize("hits, n, low, high", [
    (0, 10, 0.0, 0.2775),     # no false alarm in 10 faces still allows a rate over a quarter
    (5, 10, 0.2366, 0.7634),
    (2, 28, 0.0198, 0.2265),  # a small clear source two false alarms off the 5 % target
    (45, 781, 0.0433, 0.0762),
])
def test_a_rate_per_source_comes_with_its_95_percent_wilson_interval(hits: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(hits, n) == pytest.approx((low, high), abs=1e-4)
