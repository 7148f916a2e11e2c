"""Classify: patches from many faces share batches, and every face still gets its own verdict."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from models.classifier import SEVERITIES, Classifier
from models.dataset import PATCH_SCORE_SCHEMA, SCORE_SCHEMA
from tests.images import random_rgb
from transforms.classify import AcneClassifierHandler, ClassifyFaces, patch_rows, score_row
from transforms.records import FAILED, ImageRecord, Patch


def face(image_id: str, n_patches: int) -> ImageRecord:
    patches = tuple(
        Patch(64 * i, 0, 64, 1.0, random_rgb(64, 64, seed=hash((image_id, i)) % 1000), None) for i in range(n_patches)
    )
    return ImageRecord(image_id, f"mem://{image_id}", patches=patches, skin_fraction=0.5, label="lab")


def _scored(checkpoint: str, faces: list[ImageRecord], **handler_kwargs):
    """What RunInference does with one batch: load once, score the faces together."""
    handler = AcneClassifierHandler(checkpoint, **handler_kwargs)
    return list(handler.run_inference(faces, handler.load_model()))


def test_faces_batched_together_get_the_same_answer_as_alone(pipeline, untrained_classifier: str) -> None:
    faces = [face("a", 5), face("b", 1), face("c", 7)]
    classifier = Classifier.load(untrained_classifier)
    alone = {f.image_id: classifier.predict_patches([p.pixels for p in f.patches]) for f in faces}

    def check(scored) -> None:
        assert sorted(s.record.image_id for s in scored) == ["a", "b", "c"]
        for s in scored:
            lesions, grades = alone[s.record.image_id]
            expected = classifier.judge(lesions, patch_grades=grades)
            np.testing.assert_allclose(s.patch_lesions, lesions, rtol=1e-4)
            assert s.score.lesion_count == pytest.approx(expected.lesion_count, rel=1e-4)
            assert s.score.acne_probability == pytest.approx(expected.acne_probability, rel=1e-4)
            assert (s.score.verdict, s.score.severity) == (expected.verdict, expected.severity)
            assert s.probabilities == pytest.approx(expected.probabilities(classifier.cfg), rel=1e-4)

    with pipeline() as p:
        # At most 8 patches per batch: the faces of 5, 1 and 7 patches are split across batches.
        scored, failed = p | beam.Create(faces) | ClassifyFaces(AcneClassifierHandler(untrained_classifier, max_patches=8))
        assert_that(scored, check, label="scored")
        assert_that(failed, lambda got: not got or pytest.fail(f"unexpected failures {got}"), label="failed")


def _classify_broken_face(pipeline, checkpoint: str, check) -> None:
    broken = ImageRecord("bad", "mem://bad", patches=(Patch(0, 0, 64, 1.0, np.zeros((64, 64), np.uint8), None),))
    with pipeline() as p:
        scored, failed = p | beam.Create([broken]) | ClassifyFaces(AcneClassifierHandler(checkpoint))
        assert_that(failed, check, label="failed")
        assert_that(scored, lambda got: not got or pytest.fail(f"unexpected scores {got}"), label="scored")


def test_a_face_that_cannot_be_classified_fails_with_a_reason(pipeline, untrained_classifier: str) -> None:
    def check(failed) -> None:
        assert [(o.image_id, o.status, o.stage) for o in failed] == [("bad", FAILED, "classify")]
        assert "a patch must be an RGB HxWx3 array" in failed[0].reason

    _classify_broken_face(pipeline, untrained_classifier, check)


def test_a_classify_failure_names_the_real_error_type(pipeline, untrained_classifier: str) -> None:
    def check(failed) -> None:
        assert failed[0].error_type == "ValueError"
        assert "Traceback" not in failed[0].reason

    _classify_broken_face(pipeline, untrained_classifier, check)


def test_score_rows_carry_the_verdict_and_rank_the_most_suspicious_patches_first(untrained_classifier: str) -> None:
    record = face("d", 6)
    [scored] = _scored(untrained_classifier, [record])
    row = score_row(scored, top_k=3, segmenter_sha="s", classifier_sha="c")
    assert set(row) == set(SCORE_SCHEMA.names)
    lesions = scored.patch_lesions
    ranked = np.argsort(-lesions, kind="stable")[:3]
    assert [p["x"] for p in row["top_patches"]] == [64 * i for i in ranked]
    assert [p["score"] for p in row["top_patches"]] == pytest.approx(lesions[ranked].tolist())
    assert row["lesion_count"] == pytest.approx(float(lesions.sum()), rel=1e-4)
    assert row["verdict"] == "clear" and row["severity"] is None  # the fixture's calibration: always clear
    assert 0 < row["acne_probability"] < 0.5
    assert [p["name"] for p in row["probabilities"]] == ["clear", *SEVERITIES]
    assert sum(p["probability"] for p in row["probabilities"]) == pytest.approx(1.0)
    assert (row["patches_used"], row["status"], row["label"]) == (6, "scored", "lab")
    assert (row["segmenter_sha256"], row["classifier_sha256"]) == ("s", "c")


def test_a_verdict_threshold_overrides_the_calibrated_one(untrained_classifier: str) -> None:
    faces = [face("e", 3), face("f", 2)]
    calibrated = _scored(untrained_classifier, faces)
    assert [(s.score.verdict, s.score.severity) for s in calibrated] == [("clear", None), ("clear", None)]
    lax = _scored(untrained_classifier, faces, verdict_threshold=1e-12)
    assert [s.score.verdict for s in lax] == ["acne", "acne"]
    assert all(s.score.severity in SEVERITIES for s in lax)
    # The threshold moves the verdict, not the evidence.
    for a, b in zip(calibrated, lax):
        assert a.score.acne_probability == b.score.acne_probability and a.score.lesion_count == b.score.lesion_count
        row = score_row(b, top_k=2, segmenter_sha="s", classifier_sha="c")
        assert (row["verdict"], row["severity"]) == ("acne", b.score.severity)


def test_patch_rows_hold_every_patch_with_its_expected_lesions(untrained_classifier: str) -> None:
    record = face("g", 4)
    [scored] = _scored(untrained_classifier, [record])
    rows = list(patch_rows(scored))
    assert len(rows) == 4 and all(set(r) == set(PATCH_SCORE_SCHEMA.names) for r in rows)
    assert len({r["patch_id"] for r in rows}) == 4
    assert [(r["x"], r["y"], r["size"]) for r in rows] == [(64 * i, 0, 64) for i in range(4)]
    assert [r["lesions"] for r in rows] == pytest.approx(scored.patch_lesions.tolist())
    assert sum(r["lesions"] for r in rows) == pytest.approx(scored.score.lesion_count, rel=1e-4)
