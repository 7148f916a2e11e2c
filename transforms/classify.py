"""Classify: RunInference with the acne classifier, batching patches across images.

One element is one face with its patches. A batch holds as many faces as fit in
``--classifier-batch-size`` patches, so small faces share a forward pass; the results are
split back per face, and each face is judged from its patches' expected lesions (and grade
outputs, for severity): verdict, acne probability, lesion count and (for acne) severity. A
checkpoint with a severity network grades the acne faces with it, in a second pass over
their patches.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from models.classifier import Classifier, FaceScore
from transforms.inference import CheckpointHandler, RunCheckpoint
from transforms.patches import patch_id
from transforms.records import KEPT, ImageRecord, Outcome, Patch

STAGE = "classify"
# Patches per batch, by --device: a 96 px patch is small, so even a CPU batches 64. A GPU runs
# every forward pass at its fixed size (``CheckpointedNetwork.gpu_rows``).
BATCH_PATCHES = {"cpu": 64, "cuda": Classifier.gpu_rows}


@dataclass(frozen=True)
class ScoredFace:
    """A face with its patches' expected lesions and its answer."""

    record: ImageRecord
    patch_lesions: np.ndarray
    score: FaceScore
    probabilities: dict[str, float]


def judge_faces(model: Classifier, records: Sequence[ImageRecord], lesions: np.ndarray, grades: np.ndarray,
                threshold: Optional[float] = None, batch_size: int = BATCH_PATCHES["cpu"]) -> list[ScoredFace]:
    """Split a batch's per-patch expected lesions and grade probabilities (``Classifier.predict_patches``)
    back per face, judge each face, and grade the acne faces (``Classifier.regrade``).

    The one path from patch outputs to face answers, for the job and the benchmark's loop alike.
    """
    answers, ends = [], np.cumsum([len(r.patches) for r in records])
    for record, end in zip(records, ends):
        start = end - len(record.patches)
        answers.append(model.judge(lesions[start:end], threshold, grades[start:end]))
    answers = model.regrade(answers, [[p.pixels for p in r.patches] for r in records], batch_size)
    return [ScoredFace(record, lesions[end - len(record.patches) : end], face, face.probabilities(model.cfg))
            for record, end, face in zip(records, ends, answers)]


class AcneClassifierHandler(CheckpointHandler[ScoredFace, Classifier]):
    """Loads the classifier once per worker process; scores batches of faces."""

    model_class = Classifier
    stage = STAGE

    def __init__(self, checkpoint: str, device: str = "cpu", max_patches: int = BATCH_PATCHES["cpu"], torch_threads: int = 0,
                 verdict_threshold: Optional[float] = None):
        # With element_size_fn, BatchElements sizes a batch by its total patch count, so the
        # fixed batch size fills each batch as far as faces fit.
        super().__init__(checkpoint, device, max_patches, torch_threads, element_size_fn=_patch_count)
        self._max_patches = max_patches
        self._threshold = verdict_threshold

    def run_inference(
        self, batch: Sequence[ImageRecord], model: Classifier, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[ScoredFace]:
        lesions, grades = model.predict_patches([p.pixels for r in batch for p in r.patches], self._max_patches)
        return judge_faces(model, batch, lesions, grades, self._threshold, self._max_patches)

    def get_num_bytes(self, batch: Sequence[ImageRecord]) -> int:
        return sum(p.pixels.nbytes for r in batch for p in r.patches)


def _patch_count(record: ImageRecord) -> int:
    return len(record.patches)


class ClassifyFaces(RunCheckpoint):
    """Faces with patches -> (ScoredFace, failed Outcomes)."""

    def __init__(self, handler: AcneClassifierHandler):
        super().__init__("RunClassifier", handler)


def in_source(record: ImageRecord, patch: Patch) -> dict[str, int]:
    """A patch's x, y and size in the source image's pixels (it was cut at ``record.scale``)."""
    return {k: round(getattr(patch, k) / record.scale) for k in ("x", "y", "size")}


def score_row(face: ScoredFace, top_k: int, segmenter_sha: str, classifier_sha: str) -> dict[str, Any]:
    """One ``SCORE_SCHEMA`` row for a scored face."""
    record, patches, answer = face.record, face.record.patches, face.score
    order = np.argsort(-face.patch_lesions, kind="stable")[:top_k]
    return {
        "image_id": record.image_id,
        "source_uri": record.source_uri,
        "status": "scored",
        "reason": "",
        "skin_fraction": record.skin_fraction,
        "patches_used": len(patches),
        "working_scale": record.scale,
        "verdict": answer.verdict,
        "acne_probability": answer.acne_probability,
        "lesion_count": answer.lesion_count,
        "severity": answer.severity,
        "probabilities": [{"name": k, "probability": p} for k, p in face.probabilities.items()],
        "top_patches": [
            {**in_source(record, patches[i]), "score": float(face.patch_lesions[i])} for i in order
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
        "working_scale": None,
        "verdict": None,
        "acne_probability": None,
        "lesion_count": None,
        "severity": None,
        "probabilities": [],
        "top_patches": [],
        "label": outcome.label,
        "segmenter_sha256": segmenter_sha,
        "classifier_sha256": classifier_sha,
    }


def patch_rows(face: ScoredFace) -> Iterator[dict[str, Any]]:
    """``PATCH_SCORE_SCHEMA`` rows: one per scored patch."""
    record = face.record
    for patch, lesions in zip(record.patches, face.patch_lesions):
        box = in_source(record, patch)
        yield {
            "image_id": record.image_id,
            "patch_id": patch_id(record.image_id, replace(patch, **box)),
            **box,
            "skin_fraction": patch.skin_fraction,
            "lesions": float(lesions),
        }


def scored_outcome(face: ScoredFace) -> Outcome:
    """The kept Outcome of a scored face."""
    record = face.record
    return Outcome(
        record.image_id, record.source_uri, KEPT, STAGE, skin_fraction=record.skin_fraction,
        patch_count=len(record.patches), split=record.split, label=record.label,
    )
