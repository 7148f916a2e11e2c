"""The acne classifier: a timm patch network, the config that drives it, and face aggregation.

A face is judged from its skin patches (Quattrini et al. 2022): the network scores every
patch, and ``aggregate`` turns one face's patch outputs into face-level class probabilities.

Two kinds of patch output exist, chosen at training time:

* ``patch_output="label"``: the network's first ``C`` outputs are class logits (every patch
  is trained with its face's label); faces pool the patch probabilities by ``mean``,
  ``geomean`` or ``topk``.
* ``patch_output="count"``: an extra output is the patch's expected lesion count ``λ``
  (trained on the dataset's ``lesion_count``). A patch's probabilities are its *evidence*
  ``softmax(a·λ / T)``, and the ``evidence`` aggregation adds the patches' log-evidence and a
  face prior ``b``: ``softmax(a·Σλ + b)``, a multinomial logistic model of the face's total
  lesion count. Severity grades such as Hayashi's are defined by lesion counts, which is why
  this head exists; it still fits the plain ``predict_patches`` -> ``aggregate`` API.

Plain PyTorch and NumPy, no Beam: the trainer, the evaluator and the scoring job call the
same methods.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import timm
import torch

from models.checkpoint import CheckpointError
from models.network import IMAGENET_MEAN, IMAGENET_STD, CheckpointedNetwork

KIND = "classifier"
PATCH_OUTPUTS = ("label", "count")
AGGREGATIONS = ("mean", "geomean", "topk", "evidence")
# float32 probabilities underflow below ~1e-38; keeping a patch's evidence spread under this
# many nats lets ``aggregate`` recover the exact log-evidence from the probabilities.
MAX_EVIDENCE_NATS = 30.0
# The highest per-patch lesion count the evidence temperature is sized for.
MAX_PATCH_LESIONS = 100.0
_EPS = 1e-30


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild the network and use it the way it was trained.

    ``classes`` are ordered from least to most severe: ``patch_scores`` and the binary
    ROC/PR curves treat the last class as the positive one.
    """

    classes: tuple[str, ...]
    arch: str = "mobilenetv3_small_100"
    input_size: int = 96
    # Side in pixels of the dataset patches it was trained on (0 = unknown or mixed): lesion
    # counts are per patch, so scoring should cut patches of this size at the same image scale.
    patch_size: int = 0
    # The least skin coverage of those patches (0 = unknown): the evidence aggregation sums
    # lesions over a face's patches, so scoring must keep the same patches.
    min_patch_skin: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    count_output: bool = False
    patch_output: str = "label"
    aggregation: str = "mean"
    topk: int = 3
    evidence_slopes: tuple[float, ...] = ()
    evidence_bias: tuple[float, ...] = ()
    evidence_temperature: float = 1.0
    label_map: dict[str, str] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ClassifierConfig":
        known = set(cls.__dataclass_fields__)
        try:
            cfg = cls(**{k: v for k, v in raw.items() if k in known})
            cfg = cls(
                **{
                    **asdict(cfg),
                    "classes": tuple(str(c) for c in cfg.classes),
                    "mean": tuple(float(v) for v in cfg.mean),
                    "std": tuple(float(v) for v in cfg.std),
                    "evidence_slopes": tuple(float(v) for v in cfg.evidence_slopes),
                    "evidence_bias": tuple(float(v) for v in cfg.evidence_bias),
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
        if n < 2 or len(set(self.classes)) != n:
            out.append(f"classes must hold at least 2 distinct labels, got {list(self.classes)}")
        if self.input_size < 16:
            out.append(f"input_size must be at least 16, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std, default=0) <= 0:
            out.append("mean/std need 3 values each, std positive")
        if self.patch_output not in PATCH_OUTPUTS:
            out.append(f"patch_output must be one of {PATCH_OUTPUTS}, got {self.patch_output!r}")
        if self.aggregation not in AGGREGATIONS:
            out.append(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.topk < 1:
            out.append(f"topk must be >= 1, got {self.topk}")
        if self.patch_output == "count":
            if not self.count_output:
                out.append("patch_output 'count' needs count_output true")
            if self.aggregation != "evidence":
                out.append("patch_output 'count' needs aggregation 'evidence'")
            if len(self.evidence_slopes) != n or len(self.evidence_bias) != n:
                out.append(f"evidence_slopes and evidence_bias need {n} values (one per class)")
            elif max(self.evidence_slopes) == min(self.evidence_slopes):
                out.append("evidence_slopes must not all be equal")
            if self.evidence_temperature <= 0:
                out.append("evidence_temperature must be positive")
        elif self.aggregation == "evidence":
            out.append("aggregation 'evidence' needs patch_output 'count'")
        return out

    @property
    def num_outputs(self) -> int:
        return len(self.classes) + int(self.count_output)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), kind=KIND)


def build_network(cfg: ClassifierConfig) -> torch.nn.Module:
    """Create the timm network with random weights (nothing is ever downloaded).

    Outputs ``len(classes)`` class logits, plus one log lesion rate when ``count_output``.
    """
    return timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_outputs, **cfg.model_kwargs)


def evidence_temperature(slopes: Sequence[float]) -> float:
    """The temperature that keeps one patch's evidence spread within float32's range."""
    spread = float(max(slopes) - min(slopes))
    return max(1.0, spread * MAX_PATCH_LESIONS / MAX_EVIDENCE_NATS)


class Classifier(CheckpointedNetwork):
    """A loaded classifier: network, config and checkpoint hash, ready for inference."""

    kind = KIND
    config_type = ClassifierConfig
    cfg: ClassifierConfig

    @staticmethod
    def build(cfg: ClassifierConfig) -> torch.nn.Module:
        return build_network(cfg)

    @staticmethod
    def describe(cfg: ClassifierConfig) -> str:
        return f"a {cfg.arch} network with {cfg.num_outputs} outputs (classes {list(cfg.classes)})"

    def preprocess(self, patch: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> normalised float32 3xSxS at the model's input size."""
        if patch.ndim != 3 or patch.shape[2] != 3:
            raise ValueError(f"a patch must be an RGB HxWx3 array, got shape {patch.shape}")
        size = self.cfg.input_size
        if patch.shape[:2] != (size, size):
            patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
        return self.normalise(patch)

    @torch.inference_mode()
    def forward_patches(self, patches: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Raw network outputs, shape (N, num_outputs) float32."""
        if len(patches) == 0:
            return np.zeros((0, self.cfg.num_outputs), np.float32)
        outs = []
        for start in range(0, len(patches), batch_size):
            chunk = np.stack([self.preprocess(p) for p in patches[start : start + batch_size]])
            outs.append(self.network(torch.from_numpy(chunk).to(self.device)).float().cpu().numpy())
        return np.concatenate(outs)

    def probs_from_outputs(self, outputs: np.ndarray) -> np.ndarray:
        """Patch probabilities (N, C) from raw outputs: class softmax, or count evidence."""
        n = len(self.cfg.classes)
        if self.cfg.patch_output == "count":
            logits = np.outer(self.counts_from_outputs(outputs), self.cfg.evidence_slopes)
            logits /= self.cfg.evidence_temperature
        else:
            logits = outputs[:, :n].astype(np.float64)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)

    def counts_from_outputs(self, outputs: np.ndarray) -> np.ndarray:
        """Expected lesions per patch (N,) from raw outputs (needs ``count_output``)."""
        if not self.cfg.count_output:
            raise ValueError("this classifier was trained without a lesion-count output")
        return np.exp(np.clip(outputs[:, len(self.cfg.classes)].astype(np.float64), -20.0, 8.0))

    def predict_patches(self, patches: Sequence[np.ndarray]) -> np.ndarray:
        """Per-patch probabilities (N, C) float32 for RGB uint8 patches of any square size."""
        return self.probs_from_outputs(self.forward_patches(patches))

    def predict_counts(self, patches: Sequence[np.ndarray]) -> np.ndarray:
        """Expected lesions per patch (N,) float32 (needs ``count_output``)."""
        return self.counts_from_outputs(self.forward_patches(patches)).astype(np.float32)

    def _evidence_counts(self, patch_probs: np.ndarray) -> np.ndarray:
        # Inverts probs_from_outputs: the log-ratio of the steepest and flattest class is a·λ/T.
        slopes = np.asarray(self.cfg.evidence_slopes)
        hi, lo = int(slopes.argmax()), int(slopes.argmin())
        logp = np.log(np.maximum(patch_probs.astype(np.float64), _EPS))
        return (logp[:, hi] - logp[:, lo]) * self.cfg.evidence_temperature / (slopes[hi] - slopes[lo])

    def patch_scores(self, patch_probs: np.ndarray) -> np.ndarray:
        """How suspicious each patch is, (P,) float32: expected lesions, or expected severity in [0, 1]."""
        patch_probs = np.asarray(patch_probs)
        if self.cfg.patch_output == "count":
            return np.maximum(self._evidence_counts(patch_probs), 0.0).astype(np.float32)
        rank = np.arange(patch_probs.shape[1], dtype=np.float64) / (patch_probs.shape[1] - 1)
        return (patch_probs.astype(np.float64) @ rank).astype(np.float32)

    def aggregate(self, patch_probs: np.ndarray) -> np.ndarray:
        """Face-level probabilities (C,) float32 from one face's (P, C) patch probabilities."""
        return self.aggregate_with(patch_probs, self.cfg.aggregation)

    def aggregate_with(self, patch_probs: np.ndarray, aggregation: str) -> np.ndarray:
        """``aggregate`` with an explicit method (the trainer compares them on validation)."""
        patch_probs = np.asarray(patch_probs, dtype=np.float64)
        if patch_probs.ndim != 2 or patch_probs.shape[1] != len(self.cfg.classes) or len(patch_probs) == 0:
            raise ValueError(
                f"aggregate needs a non-empty (P, {len(self.cfg.classes)}) array of patch probabilities, "
                f"got shape {patch_probs.shape}"
            )
        if aggregation == "mean":
            face = patch_probs.mean(axis=0)
        elif aggregation == "geomean":
            face = _softmax(np.log(np.maximum(patch_probs, _EPS)).mean(axis=0))
        elif aggregation == "topk":
            top = np.argsort(-self.patch_scores(patch_probs), kind="stable")[: self.cfg.topk]
            face = patch_probs[top].mean(axis=0)
        elif aggregation == "evidence":
            if self.cfg.patch_output != "count":
                raise ValueError("aggregation 'evidence' needs a classifier with patch_output 'count'")
            total = float(self._evidence_counts(patch_probs).sum())
            face = self.face_probs_from_count(total)
        else:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
        return (face / face.sum()).astype(np.float32)

    def face_probs_from_count(self, total_lesions: float) -> np.ndarray:
        """Face probabilities (C,) for a face whose patches hold ``total_lesions`` lesions."""
        logits = np.asarray(self.cfg.evidence_slopes) * total_lesions + np.asarray(self.cfg.evidence_bias)
        return _softmax(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()
