"""Classify: patches from many faces share batches, and every face still gets its own verdict."""
from __future__ import annotations


import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from models.classifier import Classifier, ClassifierConfig, build_network
from tests.images import random_rgb
from transforms.classify import AcneClassifierHandler, ClassifyFaces, ScoredFace, score_row
from transforms.records import ImageRecord, Patch


@pytest.fixture(scope="module")
def untrained_classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real, randomly initialised network: batching must not change what it says."""
    cfg = ClassifierConfig(classes=("clear", "acne"), input_size=64)
    path = str(tmp_path_factory.mktemp("classifier"))
    Classifier(build_network(cfg), cfg).save(path)
    return path


def face(image_id: str, n_patches: int) -> ImageRecord:
    patches = tuple(
        Patch(64 * i, 0, 64, 1.0, random_rgb(64, 64, seed=hash((image_id, i)) % 1000), None) for i in range(n_patches)
    )
    return ImageRecord(image_id, f"mem://{image_id}", patches=patches, skin_fraction=0.5)


def test_faces_batched_together_get_the_same_probabilities_as_alone(pipeline, untrained_classifier: str) -> None:
    faces = [face("a", 5), face("b", 1), face("c", 7)]
    classifier = Classifier.load(untrained_classifier)
    expected = {
        f.image_id: classifier.aggregate(classifier.predict_patches([p.pixels for p in f.patches])) for f in faces
    }

    def check(scored) -> None:
        assert sorted(s.record.image_id for s in scored) == ["a", "b", "c"]
        for s in scored:
            assert len(s.patch_probs) == len(s.record.patches)
            np.testing.assert_allclose(s.face_probs, expected[s.record.image_id], atol=1e-5)

    with pipeline() as p:
        scored, failed = p | beam.Create(faces) | ClassifyFaces(AcneClassifierHandler(untrained_classifier, max_patches=8))
        assert_that(scored, check, label="scored")
        assert_that(failed, lambda got: not got or pytest.fail(f"unexpected failures {got}"), label="failed")


def test_score_rows_rank_the_most_suspicious_patches_first(untrained_classifier: str) -> None:
    classifier = Classifier.load(untrained_classifier)
    record = face("d", 6)
    probs = classifier.predict_patches([p.pixels for p in record.patches])

    row = score_row(
        ScoredFace(record, probs, classifier.patch_scores(probs), classifier.aggregate(probs), ("clear", "acne")),
        top_k=3, segmenter_sha="s", classifier_sha="c",
    )
    scores = classifier.patch_scores(probs)
    assert [p["x"] for p in row["top_patches"]] == [64 * i for i in np.argsort(-scores, kind="stable")[:3]]
    assert row["predicted_class"] in ("clear", "acne") and row["patches_used"] == 6
