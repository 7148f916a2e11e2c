"""The classifier's public API: predictions, aggregation, checkpoint round-trips and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError
from models.classifier import Classifier, ClassifierConfig, build_network, evidence_temperature
from models.segmenter import Segmenter, SegmenterConfig
from models.segmenter import build_network as build_segmenter

ARCH = "test_byobnet"


def _classifier(**overrides) -> Classifier:
    torch.manual_seed(0)
    cfg = ClassifierConfig(classes=("0", "1", "2"), arch=ARCH, input_size=32, **overrides)
    return Classifier(build_network(cfg), cfg)


def _patches(n: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_predictions_have_the_documented_shapes() -> None:
    clf = _classifier()
    probs = clf.predict_patches(_patches(5) + _patches(2, size=17))
    assert probs.shape == (7, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for aggregation in ("mean", "geomean", "topk"):
        face = clf.aggregate_with(probs, aggregation)
        assert face.shape == (3,) and face.dtype == np.float32 and abs(float(face.sum()) - 1) < 1e-5
    scores = clf.patch_scores(probs)
    assert scores.shape == (7,) and np.all((scores >= 0) & (scores <= 1))
    assert clf.predict_patches([]).shape == (0, 3)


def test_aggregate_refuses_a_face_without_patches() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        _classifier().aggregate(np.zeros((0, 3), np.float32))


def test_evidence_aggregation_grades_by_total_predicted_lesions() -> None:
    slopes, bias = (0.0, 1.0, 2.0), (0.0, -5.0, -25.0)
    clf = _classifier(
        count_output=True,
        patch_output="count",
        aggregation="evidence",
        evidence_slopes=slopes,
        evidence_bias=bias,
        evidence_temperature=evidence_temperature(slopes),
    )
    patches = _patches(6)
    counts = clf.predict_counts(patches)
    probs = clf.predict_patches(patches)
    # The per-patch probabilities carry each patch's count exactly, so the face needs nothing else.
    np.testing.assert_allclose(clf.patch_scores(probs), counts, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(clf.aggregate(probs), clf.face_probs_from_count(float(counts.sum())), atol=1e-4)
    assert int(np.argmax(clf.face_probs_from_count(0.0))) == 0
    assert int(np.argmax(clf.face_probs_from_count(10.0))) == 1
    assert int(np.argmax(clf.face_probs_from_count(30.0))) == 2


def test_checkpoint_round_trip_keeps_predictions_and_identity(tmp_path: Path) -> None:
    clf = _classifier(label_map={"a": "0", "b": "1", "c": "2"})
    sha = clf.save(str(tmp_path / "ckpt"), training={"epochs": 1})
    loaded = Classifier.load(str(tmp_path / "ckpt"))
    assert loaded.sha256 == sha and len(sha) == 64
    assert loaded.cfg.classes == ("0", "1", "2") and loaded.cfg.input_size == 32
    assert loaded.cfg.label_map == {"a": "0", "b": "1", "c": "2"} and loaded.cfg.training == {"epochs": 1}
    patches = _patches(4)
    np.testing.assert_allclose(loaded.predict_patches(patches), clf.predict_patches(patches), atol=1e-6)


def test_checkpoint_round_trip_through_an_fsspec_url() -> None:
    clf = _classifier()
    sha = clf.save("memory://classifier-test/ckpt")
    assert Classifier.load("memory://classifier-test/ckpt").sha256 == sha


def test_missing_checkpoint_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Classifier.load(str(tmp_path / "nowhere"))


def test_segmenter_checkpoint_is_refused_as_classifier(tmp_path: Path) -> None:
    cfg = SegmenterConfig(encoder="mobilenet_v2", input_size=64)
    Segmenter(build_segmenter(cfg), cfg).save(str(tmp_path / "seg"))
    with pytest.raises(CheckpointError, match="'segmenter' checkpoint, but a 'classifier'"):
        Classifier.load(str(tmp_path / "seg"))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _classifier().save(str(ckpt))
    config = json.loads((ckpt / "config.json").read_text())
    # Same weights, but a config that promises one class more: the heads cannot match.
    config["classes"] = ["0", "1", "2", "3"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit a test_byobnet network with 4 outputs"):
        Classifier.load(str(ckpt))


def test_corrupt_weights_and_invalid_configs_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _classifier().save(str(ckpt))
    config_text = (ckpt / "config.json").read_text()
    (ckpt / "weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="do not belong together"):
        Classifier.load(str(ckpt))
    _classifier().save(str(ckpt))
    config = json.loads(config_text)
    config["aggregation"] = "evidence"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="aggregation 'evidence' needs patch_output 'count'"):
        Classifier.load(str(ckpt))
