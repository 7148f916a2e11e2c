"""Classify: RunInference with the acne classifier, batching patches across images.

One element is one face with its patches. A batch holds as many faces as fit in
``--classifier-batch-size`` patches, so small faces share a forward pass; the results are
split back per face and aggregated into the face's class probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler, RunInference

from models.classifier import Classifier
from transforms.patches import patch_id
from transforms.records import FILTERED, KEPT, ImageRecord, Outcome

STAGE = "classify"


@dataclass(frozen=True)
class ScoredFace:
    """A face with its per-patch and aggregated class probabilities."""

    record: ImageRecord
    patch_probs: np.ndarray
    patch_scores: np.ndarray
    face_probs: np.ndarray
    classes: tuple[str, ...]


class AcneClassifierHandler(ModelHandler[ImageRecord, ScoredFace, Classifier]):
    """Loads the classifier once per worker process; scores batches of faces."""

    def __init__(self, checkpoint: str, device: str = "cpu", max_patches: int = 64, torch_threads: int = 0):
        # With element_size_fn, BatchElements sizes a batch by its total patch count; min = max
        # fills each batch as far as faces fit instead of ramping up from a single face.
        super().__init__(min_batch_size=max_patches, max_batch_size=max_patches, element_size_fn=_patch_count)
        self._checkpoint = checkpoint
        self._device = device
        self._max_patches = max_patches
        self._torch_threads = torch_threads

    def load_model(self) -> Classifier:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        return Classifier.load(self._checkpoint, self._device)

    def run_inference(
        self, batch: Sequence[ImageRecord], model: Classifier, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[ScoredFace]:
        pixels = [p.pixels for r in batch for p in r.patches]
        probs = model.probs_from_outputs(model.forward_patches(pixels, self._max_patches))
        scored, start = [], 0
        for record in batch:
            mine = probs[start : start + len(record.patches)]
            start += len(record.patches)
            scored.append(
                ScoredFace(record, mine, model.patch_scores(mine), model.aggregate(mine), tuple(model.cfg.classes))
            )
        return scored

    def get_num_bytes(self, batch: Sequence[ImageRecord]) -> int:
        return sum(p.pixels.nbytes for r in batch for p in r.patches)

    def get_metrics_namespace(self) -> str:
        return "acne.classify"


def _patch_count(record: ImageRecord) -> int:
    return len(record.patches)


def _failed_batch(failure: tuple[Sequence[ImageRecord], Any]) -> Iterator[Outcome]:
    batch, error = failure
    exc = error if isinstance(error, BaseException) else RuntimeError(str(error))
    for record in batch:
        yield Outcome.failed(record.image_id, record.source_uri, STAGE, exc)


class ClassifyFaces(beam.PTransform):
    """Faces with patches -> (ScoredFace, failed Outcomes)."""

    def __init__(self, handler: AcneClassifierHandler):
        super().__init__()
        self._handler = handler

    def expand(self, records: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        main, other = records | "RunClassifier" >> RunInference(self._handler).with_exception_handling()
        return main, other.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch)


def score_row(face: ScoredFace, top_k: int, segmenter_sha: str, classifier_sha: str) -> dict[str, Any]:
    """One ``SCORE_SCHEMA`` row for a scored face."""
    record, patches = face.record, face.record.patches
    order = np.argsort(-face.patch_scores, kind="stable")[:top_k]
    return {
        "image_id": record.image_id,
        "source_uri": record.source_uri,
        "status": "scored",
        "reason": "",
        "skin_fraction": record.skin_fraction,
        "patches_used": len(patches),
        "probabilities": {c: float(p) for c, p in zip(face.classes, face.face_probs)},
        "predicted_class": face.classes[int(np.argmax(face.face_probs))],
        "top_patches": [
            {"x": patches[i].x, "y": patches[i].y, "size": patches[i].size, "score": float(face.patch_scores[i])}
            for i in order
        ],
        "label": record.label,
        "segmenter_sha256": segmenter_sha,
        "classifier_sha256": classifier_sha,
    }


def unscored_row(outcome: Outcome, segmenter_sha: str, classifier_sha: str) -> dict[str, Any]:
    """The row for a face with no usable skin: present, with a status that says why."""
    return {
        "image_id": outcome.image_id,
        "source_uri": outcome.source_uri,
        "status": "no_skin",
        "reason": outcome.reason,
        "skin_fraction": outcome.skin_fraction,
        "patches_used": 0,
        "probabilities": {},
        "predicted_class": None,
        "top_patches": [],
        "label": outcome.label,
        "segmenter_sha256": segmenter_sha,
        "classifier_sha256": classifier_sha,
    }


def patch_rows(face: ScoredFace) -> Iterator[dict[str, Any]]:
    """``PATCH_SCORE_SCHEMA`` rows: one per scored patch."""
    record = face.record
    for patch, probs, score in zip(record.patches, face.patch_probs, face.patch_scores):
        yield {
            "image_id": record.image_id,
            "patch_id": patch_id(record.image_id, patch),
            "x": patch.x,
            "y": patch.y,
            "size": patch.size,
            "skin_fraction": patch.skin_fraction,
            "probabilities": {c: float(p) for c, p in zip(face.classes, probs)},
            "score": float(score),
        }


def scored_outcome(face: ScoredFace) -> Outcome:
    record = face.record
    return Outcome(
        record.image_id, record.source_uri, KEPT, STAGE, skin_fraction=record.skin_fraction,
        patch_count=len(record.patches), label=record.label,
    )


def is_filtered(outcome: Outcome) -> bool:
    return outcome.status == FILTERED
