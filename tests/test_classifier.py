"""The classifier's public API: lesion counts, the face verdict, checkpoint round-trips and refusals."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError
from models.classifier import SEVERITIES, Classifier, ClassifierConfig, build_network
from models.classifier.model import BATCH_MULTIPLE
from models.segmenter import Segmenter, SegmenterConfig
from models.segmenter import build_network as build_segmenter

ARCH = "test_byobnet"
# A face with no lesion is clear (p = sigmoid(-3) ~ 0.05); six lesions make acne (p ~ 0.71).
# The grade curve: 0 lesions mild, 5 moderate, 10 severe, 20 very severe.
DECISION = dict(
    acne_slope=2.0,
    acne_bias=-3.0,
    verdict_threshold=0.5,
    severity_slopes=(0.0, 0.5, 1.0, 1.5),
    severity_bias=(0.0, -2.0, -6.0, -12.0),
)


def _classifier(**overrides) -> Classifier:
    torch.manual_seed(0)
    cfg = ClassifierConfig(arch=ARCH, input_size=32, **{**DECISION, **overrides})
    return Classifier(build_network(cfg), cfg)


def _patches(n: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_lesions_are_predicted_per_patch_for_patches_of_any_size() -> None:
    clf = _classifier()
    lesions = clf.predict_lesions(_patches(5) + _patches(2, size=17))
    assert lesions.shape == (7,) and lesions.dtype == np.float32
    assert np.all(np.isfinite(lesions)) and np.all(lesions >= 0)
    # Batching is an implementation detail: one patch at a time gives the same counts.
    np.testing.assert_allclose(clf.predict_lesions(_patches(5), batch_size=2), lesions[:5], rtol=1e-5)
    assert clf.predict_lesions([]).shape == (0,)
    with pytest.raises(ValueError, match="RGB"):
        clf.predict_lesions([np.zeros((32, 32), np.uint8)])


def test_batches_of_every_size_run_in_a_few_shapes_and_keep_each_patch_its_own_count() -> None:
    clf = _classifier()
    seen: set[int] = set()
    clf.network.register_forward_pre_hook(lambda _, args: seen.add(args[0].shape[0]))
    patches = _patches(BATCH_MULTIPLE + 3)
    one_at_a_time = np.concatenate([clf.predict_lesions([p]) for p in patches])
    for size in range(1, len(patches) + 1):
        np.testing.assert_allclose(clf.predict_lesions(patches[:size]), one_at_a_time[:size], rtol=1e-5)
    # Eleven batch sizes went in; the network saw two shapes (faces of every size share batches,
    # and a new shape per batch fragments a long-running worker's heap).
    assert seen == {BATCH_MULTIPLE, 2 * BATCH_MULTIPLE}


def test_fixed_passes_run_every_batch_at_one_shape_and_keep_each_patch_its_own_count() -> None:
    clf = _classifier()
    clf.fixed_rows = 4  # what a GPU does at gpu_rows, so that a patch's count does not follow its batch
    seen: set[int] = set()
    clf.network.register_forward_pre_hook(lambda _, args: seen.add(args[0].shape[0]))
    patches = _patches(11)
    one_at_a_time = np.concatenate([clf.predict_lesions([p]) for p in patches])
    for size in (1, 3, 4, 5, 11):
        np.testing.assert_allclose(clf.predict_lesions(patches[:size], batch_size=size), one_at_a_time[:size], rtol=1e-5)
    assert seen == {4}


def test_the_face_counts_the_lesions_of_all_its_patches() -> None:
    clf = _classifier()
    face = clf.judge(np.array([1.0, 2.0, 0.5, 2.5]))
    assert face.lesion_count == pytest.approx(6.0)
    assert clf.judge(np.array([2.5, 0.5, 2.0, 1.0])) == face
    assert clf.judge(np.array([6.0])).acne_probability == pytest.approx(face.acne_probability)
    with pytest.raises(ValueError, match="at least one patch"):
        clf.judge(np.zeros(0))


def test_the_same_lesions_over_more_skin_are_weaker_evidence_of_acne() -> None:
    # Four lesions on a 4-patch close-up, and the same four on a 28-patch portrait.
    close_up, portrait = np.ones(4), np.concatenate([np.ones(4), np.zeros(24)])
    skin_aware = _classifier(acne_patches_slope=-0.5)
    assert skin_aware.judge(portrait).lesion_count == skin_aware.judge(close_up).lesion_count == 4.0
    assert skin_aware.judge(portrait).acne_probability < skin_aware.judge(close_up).acne_probability
    # A checkpoint calibrated without the term judges by the count alone.
    assert _classifier().judge(portrait).acne_probability == _classifier().judge(close_up).acne_probability


def test_more_lesions_mean_a_higher_acne_probability() -> None:
    clf = _classifier()
    probs = [clf.judge(np.array([c])).acne_probability for c in (0.0, 0.5, 2.0, 6.0, 20.0, 100.0)]
    assert all(0.0 < p < 1.0 for p in probs)
    assert probs == sorted(probs) and len(set(probs)) == len(probs)


def test_a_clear_face_has_no_severity_and_an_acne_face_has_a_grade() -> None:
    clf = _classifier()
    clear = clf.judge(np.zeros(4))
    assert clear.verdict == "clear" and clear.severity is None
    assert clear.acne_probability == pytest.approx(1 / (1 + np.exp(3.0)))
    graded = {c: clf.judge(np.array([c])) for c in (6.0, 10.0, 20.0)}
    assert {c: (f.verdict, f.severity) for c, f in graded.items()} == {
        6.0: ("acne", "moderate"), 10.0: ("acne", "severe"), 20.0: ("acne", "very_severe")
    }


def test_a_threshold_overrides_the_calibrated_one() -> None:
    clf = _classifier()
    six = np.array([3.0, 3.0])  # p ~ 0.71: acne at the config's 0.5
    assert clf.judge(six).verdict == "acne"
    stricter = clf.judge(six, threshold=0.9)
    assert (stricter.verdict, stricter.severity) == ("clear", None)
    assert stricter.acne_probability == clf.judge(six).acne_probability
    laxer = clf.judge(np.zeros(3), threshold=0.01)  # p ~ 0.05
    assert (laxer.verdict, laxer.severity) == ("acne", "mild")
    # The config's own threshold decides when none is given.
    assert _classifier(verdict_threshold=0.9).judge(six).verdict == "clear"


def test_probabilities_are_one_distribution_over_clear_and_every_grade() -> None:
    clf = _classifier()
    for counts in (np.zeros(3), np.array([3.0, 3.0]), np.array([50.0])):
        face = clf.judge(counts)
        probs = face.probabilities(clf.cfg)
        assert list(probs) == ["clear", *SEVERITIES]
        assert sum(probs.values()) == pytest.approx(1.0)
        assert all(p >= 0 for p in probs.values())
        assert probs["clear"] == pytest.approx(1 - face.acne_probability)
        assert sum(face.severity_probs) == pytest.approx(1.0)
    # A clear face puts most mass on clear; many lesions put it on a grade.
    assert max(clf.judge(np.zeros(3)).probabilities(clf.cfg).items(), key=lambda kv: kv[1])[0] == "clear"
    assert max(clf.judge(np.array([50.0])).probabilities(clf.cfg).items(), key=lambda kv: kv[1])[0] == "very_severe"


def test_severity_can_follow_the_patches_grade_outputs_beside_the_count() -> None:
    # Each grade's logit gains 3 x log(mean patch probability of that grade).
    reads_grades = _classifier(severity_patch_weights=tuple(tuple(3.0 * (r == c) for c in range(4)) for r in range(4)))
    ten = np.array([4.0, 6.0])
    assert _classifier().judge(ten).severity == "severe"
    mild_looking = np.tile([0.7, 0.1, 0.1, 0.1], (2, 1))
    assert reads_grades.judge(ten, patch_grades=mild_looking).severity == "mild"
    assert reads_grades.judge(ten, patch_grades=mild_looking[:, ::-1]).severity == "very_severe"
    # The verdict never reads them: it follows the lesions alone.
    assert reads_grades.judge(ten, patch_grades=mild_looking).acne_probability == _classifier().judge(ten).acne_probability
    with pytest.raises(ValueError, match="grade outputs too"):
        reads_grades.judge(ten)
    with pytest.raises(ValueError, match="one row per patch"):
        reads_grades.judge(ten, patch_grades=mild_looking[:1])
    lesions, grades = reads_grades.predict_patches(_patches(3))
    np.testing.assert_allclose(lesions, reads_grades.predict_lesions(_patches(3)), rtol=1e-5)
    assert grades.shape == (3, 4) and np.allclose(grades.sum(1), 1.0, atol=1e-5)


def test_checkpoint_round_trip_keeps_predictions_and_identity(tmp_path: Path) -> None:
    clf = _classifier(label_map={"0": "mild", "3": "very_severe", "face": "clear"}, patch_size=128,
                      min_patch_skin=0.4, severity_patch_weights=((0.5,) * 4,) * 4)
    sha = clf.save(str(tmp_path / "ckpt"), training={"epochs": 1})
    loaded = Classifier.load(str(tmp_path / "ckpt"))
    assert loaded.sha256 == sha and len(sha) == 64
    assert loaded.cfg.classes == SEVERITIES and loaded.cfg.verdicts == ("clear", "acne")
    assert loaded.cfg.label_map == {"0": "mild", "3": "very_severe", "face": "clear"}
    assert loaded.cfg.training == {"epochs": 1}
    assert loaded.cfg == replace(clf.cfg, training={"epochs": 1})
    patches = _patches(4)
    np.testing.assert_allclose(loaded.predict_lesions(patches), clf.predict_lesions(patches), rtol=1e-5)
    counts, grades = clf.predict_patches(patches)
    assert loaded.judge(counts, patch_grades=grades) == clf.judge(counts, patch_grades=grades)
    # Saving again gives the same identity: the hash names the content, not the moment.
    assert loaded.save(str(tmp_path / "again")) == sha


def test_checkpoint_round_trip_through_an_fsspec_url() -> None:
    clf = _classifier(verdict_threshold=0.3)
    sha = clf.save("memory://classifier-test/ckpt")
    loaded = Classifier.load("memory://classifier-test/ckpt")
    assert loaded.sha256 == sha and loaded.cfg.verdict_threshold == 0.3
    patches = _patches(3)
    np.testing.assert_allclose(loaded.predict_lesions(patches), clf.predict_lesions(patches), rtol=1e-5)


def test_missing_checkpoint_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found .* pass a folder that holds weights.safetensors"):
        Classifier.load(str(tmp_path / "nowhere"))


def test_segmenter_checkpoint_is_refused_as_classifier(tmp_path: Path) -> None:
    cfg = SegmenterConfig(encoder="mobilenet_v2", input_size=64)
    Segmenter(build_segmenter(cfg), cfg).save(str(tmp_path / "seg"))
    with pytest.raises(CheckpointError, match="'segmenter' checkpoint, but a 'classifier'"):
        Classifier.load(str(tmp_path / "seg"))


def _edit_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _classifier().save(str(ckpt))
    # Same weights, but a config that promises one grade more: the heads cannot match.
    _edit_config(ckpt, classes=[*SEVERITIES, "extreme"], severity_slopes=[0, 1, 2, 3, 4], severity_bias=[0] * 5)
    with pytest.raises(CheckpointError, match="do not fit a test_byobnet network with 6 outputs.*re-export"):
        Classifier.load(str(ckpt))


def test_corrupt_weights_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _classifier().save(str(ckpt))
    (ckpt / "weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="do not belong together"):
        Classifier.load(str(ckpt))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"acne_slope": -1.0}, "acne_slope must be positive"),
        ({"acne_patches_slope": 0.5}, "acne_patches_slope must be zero or negative"),
        ({"verdict_threshold": 1.5}, r"verdict_threshold must lie in \(0, 1\)"),
        ({"severity_slopes": [1.0, 2.0]}, "severity_slopes and severity_bias need 4 values"),
        ({"severity_log_slopes": [1.0, 2.0]}, "severity_log_slopes needs 4 values"),
        ({"severity_patch_weights": [[1.0] * 4] * 3}, "severity_patch_weights needs 4 rows of 4 values"),
        ({"severity_patch_weights": [[1.0, 2.0]] * 4}, "severity_patch_weights needs 4 rows of 4 values"),
        ({"verdicts": ["clear", "mild"]}, "verdicts must be two names, not severity grades"),
        ({"acne_bias": "high"}, "malformed"),
    ],
)
def test_invalid_configs_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    ckpt = tmp_path / "ckpt"
    _classifier().save(str(ckpt))
    _edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=message):
        Classifier.load(str(ckpt))


def test_an_old_format_config_is_refused_with_a_message_to_retrain(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _classifier().save(str(ckpt))
    # What the previous classifier wrote: per-class outputs aggregated over patches, no verdict.
    _edit_config(ckpt, acne_slope=None, acne_bias=None, verdict_threshold=None, severity_slopes=None,
                 severity_bias=None, verdicts=None, classes=["0", "1", "2", "3"], aggregation="evidence",
                 patch_output="count", evidence_slopes=[0, 1, 2, 3])
    with pytest.raises(CheckpointError, match="no acne_slope.*Retrain it with python -m models.classifier.train"):
        Classifier.load(str(ckpt))


def test_patches_under_the_lesion_floor_count_no_lesions() -> None:
    """Faint rates on many clear patches (wrinkles, stubble) must not add up to a lesion."""
    faint = np.full(30, 0.1)
    assert _classifier().judge(faint).lesion_count == pytest.approx(3.0)
    floored = _classifier(patch_lesion_floor=0.1)
    assert floored.judge(faint).lesion_count == 0.0
    assert floored.judge(faint).verdict == "clear"
    assert floored.judge(np.array([0.1, 2.1, 3.1])).lesion_count == pytest.approx(5.0)


def test_a_negative_lesion_floor_is_refused() -> None:
    with pytest.raises(CheckpointError, match="patch_lesion_floor"):
        ClassifierConfig.from_dict(dict(ClassifierConfig.untrained().to_dict(), patch_lesion_floor=-1))
