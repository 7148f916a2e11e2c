"""A classifier bundled with a severity network: the verdict stays its own, acne faces take the other's grade."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import CheckpointError
from models.classifier import Classifier
from models.classifier.bundle import bundle, main
from tests.classifier_data import save_untrained_classifier

# A grade curve that calls every face very severe, whatever its lesions.
VERY_SEVERE = dict(severity_slopes=(0.0,) * 4, severity_patch_weights=(), severity_bias=(0.0, 0.0, 0.0, 9.0))
PATCHES = dict(patch_size=128, min_patch_skin=0.4)
# Under ALWAYS_CLEAR's calibration every face's acne probability lies above this threshold.
LAX = 1e-9


def _network(root: Path, name: str, **overrides: object) -> str:
    path = str(root / name)
    save_untrained_classifier(path, **{**PATCHES, **overrides})
    return path


def _faces(n: int, patches: int = 3) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(patches)] for _ in range(n)]


@pytest.fixture
def bundled(tmp_path: Path) -> tuple[str, str, str]:
    verdict, grader = _network(tmp_path, "verdict"), _network(tmp_path, "grader", **VERY_SEVERE)
    return verdict, grader, str(tmp_path / "bundle")


def test_acne_faces_take_their_grade_from_the_severity_network_and_nothing_else_changes(bundled) -> None:
    verdict, grader, out = bundled
    sha = bundle(verdict, grader, out)
    both, alone = Classifier.load(out), Classifier.load(verdict)
    assert both.sha256 == sha != alone.sha256 and both.severity_model is not None
    faces = _faces(3)
    answers = {}
    for name, model in (("both", both), ("alone", alone)):
        judged = []
        for i, face in enumerate(faces):
            lesions, grades = model.predict_patches(face)
            # The first two faces are called acne at a lax threshold, the last one stays clear.
            judged.append(model.judge(lesions, LAX if i < 2 else None, grades))
        answers[name] = model.regrade(judged, faces)
    assert [a.severity for a in answers["alone"]] == ["mild", "mild", None]
    assert [a.severity for a in answers["both"]] == ["very_severe", "very_severe", None]
    for mine, theirs in zip(answers["both"], answers["alone"]):
        assert (mine.verdict, mine.acne_probability, mine.lesion_count) == (
            theirs.verdict, theirs.acne_probability, theirs.lesion_count)
    # The clear face was never graded by the second network: its grade shares are the verdict network's.
    assert answers["both"][2] == answers["alone"][2]
    probs = answers["both"][0].probabilities(both.cfg)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert max(both.cfg.classes, key=probs.get) == "very_severe"


def test_a_bundle_that_lost_or_swapped_its_severity_network_is_refused_at_load(bundled, tmp_path: Path) -> None:
    verdict, grader, out = bundled
    bundle(verdict, grader, out)
    shutil.rmtree(Path(out) / "severity")
    with pytest.raises(CheckpointError, match="severity/ folder, which cannot be loaded: copy the whole"):
        Classifier.load(out)
    other = _network(tmp_path, "other", severity_bias=(0.0, 0.0, 9.0, 0.0), severity_patch_weights=())
    shutil.copytree(other, Path(out) / "severity")
    with pytest.raises(CheckpointError, match="come from different bundles"):
        Classifier.load(out)


@pytest.mark.parametrize("overrides, message", [
    ({"patch_size": 96}, "patch_size 96 \\(the classifier's: 128\\)"),
    ({"input_size": 24}, "input_size 24 \\(the classifier's: 32\\)"),
    ({"classes": ("light", "heavy"), "severity_slopes": (0.0, 0.0), "severity_bias": (0.0, 0.0),
      "severity_patch_weights": ()}, "classes"),
])
def test_a_severity_network_that_reads_other_patches_or_grades_cannot_be_bundled(
        tmp_path: Path, overrides: dict, message: str) -> None:
    verdict = _network(tmp_path, "verdict")
    grader = _network(tmp_path, "grader", **overrides)
    with pytest.raises(CheckpointError, match=message):
        bundle(verdict, grader, str(tmp_path / "bundle"))
    assert not (tmp_path / "bundle").exists()


def test_severity_networks_do_not_nest_and_rebundling_replaces_the_old_one(bundled, tmp_path: Path) -> None:
    verdict, grader, out = bundled
    assert main([verdict, grader, "--output", out]) == 0
    with pytest.raises(CheckpointError, match="do not nest"):
        bundle(verdict, out, str(tmp_path / "nested"))
    other = _network(tmp_path, "other", severity_bias=(0.0, 0.0, 9.0, 0.0), severity_patch_weights=())
    bundle(out, other, str(tmp_path / "again"))
    again = Classifier.load(str(tmp_path / "again"))
    assert again.severity_model.sha256 == Classifier.load(other).sha256
    assert again.cfg.severity_network_sha256 == again.severity_model.sha256
