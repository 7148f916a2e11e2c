"""score end to end: one row per image with calibrated-looking output, and nothing silently dropped."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.dataset import FACES_DIR, PATCH_SCORES_DIR, SCORES_DIR, read_table
from pipelines.common import JobConfigError
from pipelines import build_dataset
from pipelines.score import run


@pytest.fixture(scope="module")
def sample_scores(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("score") / "scores"
    manifest = run(["--input", str(sample_dir), "--output", str(out), "--patch-table"])
    return out, manifest


def test_every_readable_image_gets_a_row_and_failures_get_reasons(sample_scores) -> None:
    out, manifest = sample_scores
    books = manifest["accounting"]
    assert books["ok"] and books["inputs"] == 7 and books["failed"] == 2
    scores = read_table(str(out), SCORES_DIR).to_pandas()
    assert sorted(scores.image_id) == ["00000", "00001", "00002", "00003", "00004"]
    assert set(scores.status) <= {"scored", "no_skin"} and (scores.status == "scored").sum() >= 3
    skinless = scores[scores.status == "no_skin"]
    assert (skinless.patches_used == 0).all() and skinless.reason.str.contains("skin").all()
    errors = read_table(str(out), "errors").to_pandas()
    assert sorted(errors.image_id) == ["00005", "00006"]
    faces = read_table(str(out), FACES_DIR).to_pandas()
    assert len(faces) == 7 and faces.image_id.is_unique


def test_scored_rows_carry_probabilities_top_patches_and_both_hashes(sample_scores) -> None:
    out, manifest = sample_scores
    scores = read_table(str(out), SCORES_DIR).to_pylist()
    classes = json.loads((Path(manifest["checkpoints"]["classifier"]["uri"]) / "config.json").read_text())["classes"]
    for row in (r for r in scores if r["status"] == "scored"):
        probs = dict(row["probabilities"])
        assert sorted(probs) == sorted(classes) and abs(sum(probs.values()) - 1) < 1e-4
        assert row["predicted_class"] == max(probs, key=probs.get)
        assert 1 <= len(row["top_patches"]) <= 3 and row["patches_used"] >= len(row["top_patches"])
        assert all(0 <= p["x"] <= 1024 - p["size"] and 0 <= p["y"] <= 1024 - p["size"] for p in row["top_patches"])
        assert [p["score"] for p in row["top_patches"]] == sorted((p["score"] for p in row["top_patches"]), reverse=True)
        assert row["segmenter_sha256"] == manifest["checkpoints"]["segmenter"]["sha256"]
        assert row["classifier_sha256"] == manifest["checkpoints"]["classifier"]["sha256"]


def test_patches_are_cut_as_the_classifier_saw_them_unless_flags_say_otherwise(
        sample_scores, sample_dir: Path, tmp_path: Path) -> None:
    _, manifest = sample_scores
    trained = json.loads((Path(manifest["checkpoints"]["classifier"]["uri"]) / "config.json").read_text())
    assert (manifest["arguments"]["patch_size"], manifest["arguments"]["min_patch_skin"]) == (
        trained["patch_size"], trained["min_patch_skin"])
    chosen = run(["--input", str(sample_dir), "--output", str(tmp_path / "out"),
                  "--patch-size", "256", "--min-patch-skin", "0.9"])
    assert (chosen["arguments"]["patch_size"], chosen["arguments"]["min_patch_skin"]) == (256, 0.9)
    assert (chosen["arguments"]["patch_size"], chosen["arguments"]["min_patch_skin"]) != (
        trained["patch_size"], trained["min_patch_skin"])


def test_patch_table_holds_every_scored_patch(sample_scores) -> None:
    out, _ = sample_scores
    scores = read_table(str(out), SCORES_DIR).to_pandas()
    patches = read_table(str(out), PATCH_SCORES_DIR).to_pandas()
    assert patches.groupby("image_id").size().to_dict() == scores[scores.status == "scored"].set_index(
        "image_id").patches_used.to_dict()
    assert patches.patch_id.is_unique


def test_wrong_classifier_checkpoint_fails_before_any_work(tmp_path: Path, sample_dir: Path,
                                                           segmenter_checkpoint: str) -> None:
    wrong = tmp_path / "wrong"
    shutil.copytree(segmenter_checkpoint, wrong)
    with pytest.raises(JobConfigError, match="'segmenter' checkpoint, but a 'classifier' checkpoint is needed"):
        run(["--input", str(sample_dir), "--output", str(tmp_path / "out"), "--classifier-checkpoint", str(wrong)])
    assert not (tmp_path / "out").exists()


def test_real_acne04_photos_get_sensible_grades(shared_data: Path, tmp_path: Path) -> None:
    valid = shared_data / "acne" / "acne04" / "valid"
    photos = sorted(valid.glob("levle3_*.jpg"))[:2] + sorted(valid.glob("levle0_*.jpg"))[:2]
    manifest = run(["--input", *map(str, photos), "--output", str(tmp_path / "out"), "--min-face-skin", "0.05"])
    scores = read_table(str(tmp_path / "out"), SCORES_DIR).to_pylist()
    assert manifest["accounting"]["ok"] and len(scores) == 4
    scored = [r for r in scores if r["status"] == "scored"]
    assert len(scored) >= 3, "ACNE04 close-ups are mostly skin"
    for row in scored:
        probs = np.array([p for _, p in row["probabilities"]])
        assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-4 and probs.max() < 0.9999


def test_an_existing_patch_dataset_is_rescored_without_resegmenting(sample_dir: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    built = build_dataset.run(["--input", str(sample_dir), "--output", str(dataset)])
    manifest = run(["--input", str(dataset), "--output", str(tmp_path / "scores")])
    scores = read_table(str(tmp_path / "scores"), SCORES_DIR).to_pandas()
    kept = read_table(str(dataset), FACES_DIR).to_pandas().query("status == 'kept'")
    assert sorted(scores.image_id) == sorted(kept.image_id) and (scores.status == "scored").all()
    assert scores.set_index("image_id").patches_used.to_dict() == kept.set_index("image_id").patch_count.to_dict()
    assert manifest["checkpoints"]["segmenter"] == built["checkpoints"]["segmenter"]
