"""Evaluation per face: metrics, curves, plots and the JSON record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import defaults
from models.evaluate_classifier import main as evaluate
from models.train_classifier import main as train
from tests.classifier_data import write_patch_dataset

FAST = ["--arch", "test_byobnet", "--input-size", "24", "--batch-size", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = write_patch_dataset(
        root / "data",
        {"train": {"clear": 12, "acne": 12}, "validation": {"clear": 6, "acne": 6}, "test": {"clear": 5, "acne": 7}},
        seed=1,
    )
    assert train([str(data), "--output", str(root / "ckpt"), *FAST, "--epochs", "3", "--classes", "clear,acne"]) == 0
    return data, root / "ckpt"


def test_binary_evaluation_reports_metrics_curves_and_plots(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, ckpt = trained
    out = tmp_path / "eval.json"
    assert evaluate([str(data), "--checkpoint", str(ckpt), "--split", "test", "--json", str(out), "--plots", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy 1.0000  macro-F1 1.0000" in printed and "ROC AUC 1.0000" in printed
    result = json.loads(out.read_text())
    assert result["faces"] == 12 and result["split"] == "test"
    assert result["confusion_matrix"] == [[5, 0], [0, 7]]
    assert result["per_class"]["acne"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 7}
    assert result["positive_class"] == "acne"
    assert result["roc"]["auc"] == 1.0 and result["pr"]["average_precision"] == 1.0
    assert len(result["faces_detail"]) == 12 and "most_suspicious_patch" in result["faces_detail"][0]
    for name in ("confusion_matrix.png", "roc.png", "pr.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_splits_pool_every_face(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = trained
    assert evaluate([str(data), "--checkpoint", str(ckpt), "--split", "all", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["faces"] == 24 + 12 + 12


def test_labels_outside_the_checkpoint_classes_are_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, ckpt = trained
    other = write_patch_dataset(tmp_path / "other", {"validation": {"0": 1, "3": 1}})
    with pytest.raises(ValueError, match="not classes of this checkpoint"):
        evaluate([str(other), "--checkpoint", str(ckpt)])


def test_default_checkpoint_grades_a_dataset_without_being_named(tmp_path: Path) -> None:
    if not (Path(defaults.CLASSIFIER) / "config.json").is_file():
        pytest.skip("no shipped classifier checkpoint in models/defaults/classifier")
    data = write_patch_dataset(tmp_path / "graded", {"validation": {"0": 2, "3": 2}}, size=128)
    assert evaluate([str(data), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["faces"] == 4 and result["classes"] == ["0", "1", "2", "3"]


def test_group_scores_a_coarser_task_with_the_same_checkpoint(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = trained
    out = tmp_path / "g.json"
    assert evaluate([str(data), "--checkpoint", str(ckpt), "--split", "test", "--group", "clear->ok;acne->bad", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == ["ok", "bad"] and result["positive_class"] == "bad"
    assert result["accuracy"] == 1.0 and result["confusion_matrix"] == [[5, 0], [0, 7]]
