"""Training on generated patch datasets: the signal is learned, decisions are per face."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from models.classifier import Classifier
from models.train_classifier import main
from tests.classifier_data import MIN_PATCH_SKIN, write_patch_dataset

FAST = ["--arch", "test_byobnet", "--input-size", "24", "--batch-size", "16", "--threads", "1"]


def _train(dataset: Path, out: Path, *extra: str) -> dict:
    assert main([str(dataset), "--output", str(out), *FAST, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    counts = {"clear": 12, "acne": 12}
    return write_patch_dataset(
        tmp_path_factory.mktemp("colour"), {"train": counts, "validation": {"clear": 6, "acne": 6}, "test": counts}
    )


def test_learns_a_separable_signal_and_writes_a_usable_checkpoint(colour_dataset: Path, tmp_path: Path) -> None:
    metrics = _train(colour_dataset, tmp_path / "ckpt", "--epochs", "3", "--classes", "clear,acne")
    assert metrics["validation"]["accuracy"] == 1.0 and metrics["validation"]["macro_f1"] == 1.0
    assert metrics["classes"] == ["clear", "acne"]
    assert metrics["aggregation"] in ("mean", "geomean", "topk")
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    assert set(metrics["history"][0]["validation"]) == {"mean", "geomean", "topk"}
    clf = Classifier.load(str(tmp_path / "ckpt"))
    assert clf.sha256 == metrics["checkpoint_sha256"]
    assert clf.cfg.training["best_epoch"] == metrics["best_epoch"]
    assert clf.cfg.training["args"]["seed"] == 0
    assert clf.cfg.patch_size == 24 and clf.cfg.input_size == 24
    assert clf.cfg.min_patch_skin == MIN_PATCH_SKIN


def test_label_map_groups_grades_and_classes_come_from_the_data(tmp_path: Path) -> None:
    grades = {"0": 6, "1": 6, "2": 6, "3": 6}
    data = write_patch_dataset(tmp_path / "graded", {"train": grades, "validation": {g: 3 for g in grades}})
    metrics = _train(data, tmp_path / "ckpt", "--epochs", "2", "--label-map", "0,1->0;2,3->1")
    assert metrics["classes"] == ["0", "1"]
    assert metrics["validation"]["per_class"]["1"]["support"] == 6
    assert Classifier.load(str(tmp_path / "ckpt")).cfg.label_map == {"0": "0", "1": "0", "2": "1", "3": "1"}


def test_unmapped_labels_are_refused(tmp_path: Path) -> None:
    data = write_patch_dataset(tmp_path / "graded", {"train": {"0": 2, "2": 2}, "validation": {"0": 1, "2": 1}})
    with pytest.raises(ValueError, match=r"labels \['2'\] are not in the label map"):
        main([str(data), "--output", str(tmp_path / "ckpt"), *FAST, "--label-map", "0->low"])


def test_lesion_counts_are_learned_and_grade_faces_by_evidence(tmp_path: Path) -> None:
    grades = {"0": (0, 1), "1": (6, 8)}
    data = write_patch_dataset(
        tmp_path / "lesions",
        {"train": {"0": 10, "1": 10}, "validation": {"0": 5, "1": 5}},
        patches_per_face=4,
        size=32,
        lesion_grades=grades,
    )
    metrics = _train(data, tmp_path / "ckpt", "--epochs", "6", "--aggregation", "evidence", "--lr", "5e-3")
    assert metrics["aggregation"] == "evidence"
    assert metrics["validation"]["accuracy"] >= 0.9
    assert metrics["history"][-1]["val_face_lesion_mae"] < metrics["history"][0]["val_face_lesion_mae"] + 1e-9
    clf = Classifier.load(str(tmp_path / "ckpt"))
    assert clf.cfg.patch_output == "count" and clf.cfg.count_output
    # New labels for the same lesions: keep the counting network, refit only the face decision.
    refit = _train(
        data, tmp_path / "refit", "--init", str(tmp_path / "ckpt"), "--epochs", "0",
        "--label-map", "0->clear;1->acne", "--classes", "clear,acne",
    )
    with pytest.raises(ValueError, match="pass --input-size 24"):
        main([str(data), "--output", str(tmp_path / "x"), *FAST, "--input-size", "32", "--init", str(tmp_path / "ckpt")])
    evidence = refit["validation_by_aggregation"]["evidence"]
    assert evidence["accuracy"] == metrics["validation"]["accuracy"]
    assert refit["classes"] == ["clear", "acne"]


def test_a_face_in_two_splits_is_refused(tmp_path: Path) -> None:
    data = write_patch_dataset(tmp_path / "d", {"train": {"clear": 2, "acne": 2}, "validation": {"acne": 1}})
    # Rename the validation face so that it collides with a training face.
    part = data / "patches" / "validation" / "part-00000.parquet"
    table = pq.read_table(part)
    table = table.set_column(0, "image_id", pc.replace_substring(table["image_id"], "validation", "train"))
    pq.write_table(table, part)
    with pytest.raises(ValueError, match="has patches in splits"):
        main([str(data), "--output", str(tmp_path / "ckpt"), *FAST])


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--label-map", "--lesion-target", "--aggregation", "--balance", "--seed", "--classes", "--init"):
        assert flag in text
