"""The acne classifier: a timm lesion counter, the config that drives it, and the face verdict.

A face is judged from its skin patches (Quattrini et al. 2022). The network predicts how many
acne lesions each patch holds; the face's ``lesion_count`` is their sum, less a small
per-patch floor (``patch_lesion_floor``) that clear skin texture stays under. The verdict
follows from that number and the skin it was counted on:

* ``acne_probability`` = sigmoid(acne_slope · log(1 + lesion_count) + acne_patches_slope ·
  log(patches) + acne_bias), calibrated on validation faces. Skin texture gives every patch a
  small false count, so the same count over more skin (more patches) is weaker evidence of
  acne: ``acne_patches_slope`` is zero or negative;
* ``verdict`` = ``acne`` when that probability reaches ``verdict_threshold``, else ``clear``;
* ``severity`` = the Hayashi grade (``mild`` … ``very_severe``) of a multinomial logistic in
  the lesion count and its logarithm, given only when the verdict is ``acne``: Hayashi grades
  are lesion-count bands. Checkpoints with ``severity_patch_weights`` also read the log of the
  patches' mean grade probabilities, which carry what a count loses (how large and how inflamed
  the lesions look).

A checkpoint may pin a second network of the same kind for severity alone
(``severity_network_sha256``, in its ``severity/`` folder): it grades the acne faces with its
own count and grade outputs, on the same patches, and never touches the verdict. Built with
``python -m models.classifier.bundle``.

Deciding on lesions, not on whole-patch appearance, is what keeps the verdict from learning
where a photo came from (phone close-ups of acne against celebrity portraits of clear skin).
The network also has one logit per severity grade, trained on graded faces; only the
severity reads them, never the verdict.

Plain PyTorch and NumPy, no Beam: the trainer, the evaluator and the scoring job call the
same methods.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import timm
import torch

from models.checkpoint import CheckpointError
from models.network import IMAGENET_MEAN, IMAGENET_STD, CheckpointedNetwork

KIND = "classifier"
CLEAR, ACNE = "clear", "acne"
# Hayashi's four acne grades, least to most severe.
SEVERITIES = ("mild", "moderate", "severe", "very_severe")
# exp() of the log-rate output is clipped to this range: at most ~3000 lesions per patch.
_LOG_RATE_RANGE = (-20.0, 8.0)
# The least mean patch grade probability severity takes the log of: keeps log() finite.
GRADE_PROBABILITY_FLOOR = 1e-6


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild the network and turn its outputs into verdicts.

    ``classes`` are the severity grades, least to most severe; ``verdicts`` name the two
    answers to the paper's question, ``(clear, acne)``. Dataset labels map (``label_map``)
    onto a severity grade, or onto a verdict name for faces known only as acne or clear.
    """

    classes: tuple[str, ...] = SEVERITIES
    verdicts: tuple[str, str] = (CLEAR, ACNE)
    arch: str = "mobilenetv3_small_100"
    input_size: int = 96
    # Side in pixels of the dataset patches it was trained on (0 = unknown or mixed): lesion
    # counts are per patch, so scoring should cut patches of this size.
    patch_size: int = 0
    # The least skin coverage of those patches (0 = unknown): the face sums lesions over its
    # patches, so scoring must keep the same patches.
    min_patch_skin: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    acne_slope: float = 1.0
    acne_patches_slope: float = 0.0
    acne_bias: float = 0.0
    verdict_threshold: float = 0.5
    # Expected lesions a patch may hold and still count none: a 1024² face has ~25 patches, and
    # wrinkles or stubble give each a small rate that would otherwise add up to a lesion or two.
    patch_lesion_floor: float = 0.0
    severity_slopes: tuple[float, ...] = ()
    # Per grade, on log(1 + lesions); empty (checkpoints before it) means the count alone.
    severity_log_slopes: tuple[float, ...] = ()
    # One row per grade, one weight per patch grade, on log(the face's mean patch grade
    # probabilities); empty (checkpoints before it) means the count alone.
    severity_patch_weights: tuple[tuple[float, ...], ...] = ()
    severity_bias: tuple[float, ...] = ()
    # The sha256 of the severity network in the checkpoint's ``severity/`` folder; empty: none, the
    # severity curve above grades the acne faces.
    severity_network_sha256: str = ""
    label_map: dict[str, str] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def untrained(cls, **overrides: Any) -> "ClassifierConfig":
        """A valid config before any calibration: flat severity curves over ``classes`` (for a new
        network, a benchmark or a test); the trainer replaces every curve."""
        n = len(overrides.get("classes", cls.__dataclass_fields__["classes"].default))
        return cls(**{"severity_slopes": (0.0,) * n, "severity_bias": (0.0,) * n, **overrides})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ClassifierConfig":
        if "acne_slope" not in raw:
            raise CheckpointError(
                "classifier config has no acne_slope: it predates the clear/acne verdict. Retrain it with "
                "python -m models.classifier.train, or use the shipped default checkpoint"
            )
        known = set(cls.__dataclass_fields__)
        try:
            cfg = cls(**{k: v for k, v in raw.items() if k in known})
            cfg = cls(
                **{
                    **asdict(cfg),
                    "classes": tuple(str(c) for c in cfg.classes),
                    "verdicts": tuple(str(c) for c in cfg.verdicts),
                    "mean": tuple(float(v) for v in cfg.mean),
                    "std": tuple(float(v) for v in cfg.std),
                    "acne_slope": float(cfg.acne_slope),
                    "acne_patches_slope": float(cfg.acne_patches_slope),
                    "acne_bias": float(cfg.acne_bias),
                    "verdict_threshold": float(cfg.verdict_threshold),
                    "patch_lesion_floor": float(cfg.patch_lesion_floor),
                    "severity_slopes": tuple(float(v) for v in cfg.severity_slopes),
                    "severity_log_slopes": tuple(float(v) for v in cfg.severity_log_slopes),
                    "severity_patch_weights": tuple(tuple(float(v) for v in row)
                                                    for row in cfg.severity_patch_weights),
                    "severity_bias": tuple(float(v) for v in cfg.severity_bias),
                    "severity_network_sha256": str(cfg.severity_network_sha256),
                }
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"classifier config is malformed: {exc}") from exc
        problems = cfg.problems()
        if problems:
            raise CheckpointError("classifier config is invalid: " + "; ".join(problems) + f" (got {dict(raw)!r})")
        return cfg

    def problems(self) -> list[str]:
        """Human-readable reasons this config cannot be used; empty when it is valid."""
        out = []
        n = len(self.classes)
        if n < 1 or len(set(self.classes)) != n:
            out.append(f"classes (severity grades) must be distinct and at least one, got {list(self.classes)}")
        if len(self.verdicts) != 2 or len(set(self.verdicts)) != 2 or set(self.verdicts) & set(self.classes):
            out.append(f"verdicts must be two names, not severity grades, got {list(self.verdicts)}")
        if self.input_size < 16:
            out.append(f"input_size must be at least 16, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std, default=0) <= 0:
            out.append("mean/std need 3 values each, std positive")
        if not (math.isfinite(self.acne_slope) and self.acne_slope > 0 and math.isfinite(self.acne_bias)):
            out.append(f"acne_slope must be positive (more lesions, more acne), got {self.acne_slope}")
        if not (math.isfinite(self.acne_patches_slope) and self.acne_patches_slope <= 0):
            out.append(f"acne_patches_slope must be zero or negative (more skin, not more acne), "
                       f"got {self.acne_patches_slope}")
        if not 0.0 < self.verdict_threshold < 1.0:
            out.append(f"verdict_threshold must lie in (0, 1), got {self.verdict_threshold}")
        if not (math.isfinite(self.patch_lesion_floor) and self.patch_lesion_floor >= 0):
            out.append(f"patch_lesion_floor must be zero or more, got {self.patch_lesion_floor}")
        if len(self.severity_slopes) != n or len(self.severity_bias) != n:
            out.append(f"severity_slopes and severity_bias need {n} values (one per grade)")
        if self.severity_log_slopes and len(self.severity_log_slopes) != n:
            out.append(f"severity_log_slopes needs {n} values (one per grade) or none")
        if self.severity_patch_weights and (len(self.severity_patch_weights) != n
                                            or any(len(row) != n for row in self.severity_patch_weights)):
            out.append(f"severity_patch_weights needs {n} rows of {n} values (grade by patch grade) or none")
        finite = [*self.severity_slopes, *self.severity_log_slopes, *self.severity_bias,
                  *(v for row in self.severity_patch_weights for v in row)]
        if not all(math.isfinite(v) for v in finite):
            out.append("the severity curve's values must be finite numbers")
        return out

    @property
    def reads_patch_grades(self) -> bool:
        """Whether severity needs the patches' grade outputs beside their lesion counts."""
        return bool(self.severity_patch_weights)

    def severity_probs(self, lesions: float, mean_patch_grades: Sequence[float] | None = None) -> np.ndarray:
        """Grade probabilities of a face with ``lesions`` lesions: softmax(slopes · lesions +
        log_slopes · log(1 + lesions) + patch_weights · log(mean_patch_grades) + bias)."""
        logits = np.asarray(self.severity_slopes, np.float64) * lesions + np.asarray(self.severity_bias, np.float64)
        if self.severity_log_slopes:
            logits = logits + np.asarray(self.severity_log_slopes, np.float64) * math.log1p(max(lesions, 0.0))
        if self.reads_patch_grades:
            if mean_patch_grades is None:
                raise ValueError("this classifier reads severity from its patches' grade outputs too: "
                                 "pass their mean probabilities (Classifier.predict_patches gives them)")
            log_grades = np.log(np.maximum(np.asarray(mean_patch_grades, np.float64), GRADE_PROBABILITY_FLOOR))
            logits = logits + np.asarray(self.severity_patch_weights, np.float64) @ log_grades
        z = np.exp(logits - logits.max())
        return z / z.sum()

    @property
    def num_outputs(self) -> int:
        """One logit per severity grade, then the patch's log lesion rate."""
        return len(self.classes) + 1

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), kind=KIND)

    def describe(self) -> str:
        """The network, as error messages name it."""
        return f"a {self.arch} network with {self.num_outputs} outputs (grades {list(self.classes)} and a lesion count)"


@dataclass(frozen=True)
class FaceScore:
    """One face's answer: lesions, the calibrated acne probability, the verdict and the grade."""

    lesion_count: float
    acne_probability: float
    verdict: str
    severity: str | None
    severity_probs: tuple[float, ...]

    def probabilities(self, cfg: ClassifierConfig) -> dict[str, float]:
        """One distribution over clear and every grade: P(clear), then P(acne) · P(grade | acne)."""
        out = {cfg.verdicts[0]: 1.0 - self.acne_probability}
        out.update({c: self.acne_probability * p for c, p in zip(cfg.classes, self.severity_probs)})
        return out


def build_network(cfg: ClassifierConfig) -> torch.nn.Module:
    """Create the timm network with random weights (nothing is ever downloaded)."""
    return timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_outputs, **cfg.model_kwargs)


def acne_probability(lesions: np.ndarray | float, patches: np.ndarray | int, slope: float, patches_slope: float,
                     bias: float) -> np.ndarray:
    """sigmoid(slope · log(1 + lesions) + patches_slope · log(patches) + bias), elementwise."""
    z = (slope * np.log1p(np.maximum(np.asarray(lesions, np.float64), 0.0))
         + patches_slope * np.log(np.maximum(np.asarray(patches, np.float64), 1.0)) + bias)
    return 1.0 / (1.0 + np.exp(-z))


def face_lesion_count(patch_lesions: np.ndarray, floor: float) -> float:
    """A face's lesions: the sum over its patches of what each holds above ``floor``."""
    return float(np.maximum(np.asarray(patch_lesions, np.float64) - floor, 0.0).sum())


# On the CPU, batches run padded to a multiple of this many patches. Faces of every size share batches, so
# unpadded nearly every batch has a shape of its own, and on the CPU each new shape leaves
# glibc's heap more fragmented: 400 batches of 1 to 64 patches grew a process by 820 MB of
# anonymous memory unpadded and by 485 MB padded, at the same CPU time per real patch
# (bench/README.md, "Score's memory").
BATCH_MULTIPLE = 8


# The folder, inside a classifier checkpoint, of the severity network its config pins.
SEVERITY_FOLDER = "severity"
# What a severity network must share with the classifier that carries it: the same grades, read
# from the same patches at the same input size.
SEVERITY_MUST_MATCH = ("classes", "input_size", "patch_size", "min_patch_skin")


def severity_mismatch(verdict: ClassifierConfig, severity: ClassifierConfig) -> list[str]:
    """Why ``severity``'s network cannot grade the faces ``verdict``'s network judges; empty if it can."""
    out = [f"{key} {getattr(severity, key)!r} (the classifier's: {getattr(verdict, key)!r})"
           for key in SEVERITY_MUST_MATCH if getattr(severity, key) != getattr(verdict, key)]
    if severity.severity_network_sha256:
        out.append("a severity network of its own (severity networks do not nest)")
    return out


class Classifier(CheckpointedNetwork, kind=KIND, config_type=ClassifierConfig, build=build_network,
                 enlarge_interpolation=cv2.INTER_AREA):
    """A loaded classifier: network, config and checkpoint hash, ready for inference."""

    cfg: ClassifierConfig
    # Patches per forward pass on a GPU, and the score job's default batch there.
    gpu_rows = 512
    cpu_multiple = BATCH_MULTIPLE
    # The network that grades acne faces, where the checkpoint pins one (``severity_network_sha256``).
    severity_model: "Classifier | None" = None

    @classmethod
    def load(cls, uri: str, device: str = "cpu") -> "Classifier":
        """Load a classifier checkpoint, and the severity network it pins; raises ``CheckpointError``."""
        model = super().load(uri, device)
        pinned = model.cfg.severity_network_sha256
        if not pinned:
            return model
        where = uri.rstrip("/") + "/" + SEVERITY_FOLDER
        try:
            grader = super().load(where, device)
        except CheckpointError as exc:
            raise CheckpointError(
                f"the classifier at {uri} grades severity with the network in its {SEVERITY_FOLDER}/ folder, "
                f"which cannot be loaded: copy the whole checkpoint folder, or rebuild it with "
                f"python -m models.classifier.bundle. Detail: {exc}"
            ) from exc
        if grader.sha256 != pinned:
            raise CheckpointError(
                f"the severity network at {where} has sha256 {grader.sha256[:12]}…, but the classifier at {uri} "
                f"pins {pinned[:12]}…: the folders come from different bundles; rebuild it with "
                "python -m models.classifier.bundle"
            )
        problems = severity_mismatch(model.cfg, grader.cfg)
        if problems:
            raise CheckpointError(f"the severity network at {where} cannot grade this classifier's faces: it has "
                                  + "; ".join(problems))
        model.severity_model = grader
        return model

    def preprocess(self, patch: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> normalised float32 3xSxS at the model's input size."""
        if patch.ndim != 3 or patch.shape[2] != 3:
            raise ValueError(f"a patch must be an RGB HxWx3 array, got shape {patch.shape}")
        return super().preprocess(patch)

    def forward_patches(self, patches: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Raw network outputs, shape (N, num_outputs) float32, preprocessing ``batch_size`` patches at a time."""
        if len(patches) == 0:
            return np.zeros((0, self.cfg.num_outputs), np.float32)
        return np.concatenate([
            self.forward_batch(np.stack([self.preprocess(p) for p in patches[start : start + batch_size]]))
            for start in range(0, len(patches), batch_size)
        ])

    def forward_batch(self, batch: np.ndarray) -> np.ndarray:
        """Raw network outputs (B, num_outputs) float32 for a preprocessed batch (B, 3, S, S),
        run in padded passes (``CheckpointedNetwork.run_passes``)."""
        return self.run_passes(batch, self.network)

    def lesions_from_outputs(self, outputs: np.ndarray) -> np.ndarray:
        """Expected lesions per patch (N,) float64 from raw outputs."""
        return np.exp(np.clip(outputs[:, len(self.cfg.classes)].astype(np.float64), *_LOG_RATE_RANGE))

    def grades_from_outputs(self, outputs: np.ndarray) -> np.ndarray:
        """Grade probabilities per patch (N, grades) float64 from raw outputs."""
        logits = outputs[:, : len(self.cfg.classes)].astype(np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict_lesions(self, patches: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Expected lesions per patch (N,) float32 for RGB uint8 patches of any square size."""
        return self.lesions_from_outputs(self.forward_patches(patches, batch_size)).astype(np.float32)

    def predict_patches(self, patches: Sequence[np.ndarray], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Expected lesions (N,) float32 and grade probabilities (N, grades) float32 per patch:
        everything ``judge`` reads, from one forward pass."""
        outputs = self.forward_patches(patches, batch_size)
        return (self.lesions_from_outputs(outputs).astype(np.float32),
                self.grades_from_outputs(outputs).astype(np.float32))

    def regrade(self, scores: Sequence[FaceScore], patches_per_face: Sequence[Sequence[np.ndarray]],
                batch_size: int = 256, every: bool = False) -> list[FaceScore]:
        """``scores`` (from ``judge``) with the severity network's grades for the acne faces, or for
        every face given with ``every``; unchanged when the checkpoint has no severity network.

        One forward pass over the graded faces' RGB patches: the severity network costs a second
        pass on acne faces only.
        """
        out = list(scores)
        grader = self.severity_model
        todo = [i for i, s in enumerate(scores) if every or s.verdict == self.cfg.verdicts[1]]
        if grader is None or not todo:
            return out
        lesions, grades = grader.predict_patches([p for i in todo for p in patches_per_face[i]], batch_size)
        start = 0
        for i in todo:
            end = start + len(patches_per_face[i])
            probs = grader.cfg.severity_probs(face_lesion_count(lesions[start:end], grader.cfg.patch_lesion_floor),
                                              grades[start:end].mean(axis=0))
            start = end
            out[i] = replace(scores[i], severity_probs=tuple(float(p) for p in probs),
                             severity=None if scores[i].severity is None else self.cfg.classes[int(probs.argmax())])
        return out

    def judge(self, patch_lesions: np.ndarray, threshold: float | None = None,
              patch_grades: np.ndarray | None = None) -> FaceScore:
        """The face's answer from its patches' expected lesions (``threshold`` overrides the config's)
        and, for a checkpoint whose severity reads them, their grade probabilities (N, grades)."""
        patch_lesions = np.asarray(patch_lesions, np.float64)
        if patch_lesions.ndim != 1 or len(patch_lesions) == 0:
            raise ValueError(f"judge needs the expected lesions of at least one patch, got shape {patch_lesions.shape}")
        cfg = self.cfg
        mean_grades = None
        if patch_grades is not None:
            patch_grades = np.asarray(patch_grades, np.float64)
            if patch_grades.shape != (len(patch_lesions), len(cfg.classes)):
                raise ValueError(f"patch_grades must be ({len(patch_lesions)}, {len(cfg.classes)}): one row per "
                                 f"patch, one column per grade; got {patch_grades.shape}")
            mean_grades = patch_grades.mean(axis=0)
        total = face_lesion_count(patch_lesions, cfg.patch_lesion_floor)
        prob = float(acne_probability(total, len(patch_lesions), cfg.acne_slope, cfg.acne_patches_slope, cfg.acne_bias))
        grades = cfg.severity_probs(total, mean_grades)
        is_acne = prob >= (cfg.verdict_threshold if threshold is None else threshold)
        return FaceScore(
            lesion_count=total,
            acne_probability=prob,
            verdict=cfg.verdicts[int(is_acne)],
            severity=cfg.classes[int(grades.argmax())] if is_acne else None,
            severity_probs=tuple(float(p) for p in grades),
        )
