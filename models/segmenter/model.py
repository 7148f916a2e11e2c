"""The skin segmenter: a segmentation-models-pytorch network plus the config that drives it.

Plain PyTorch and NumPy, no Beam: the pipelines, the trainer, the evaluator and the
benchmark's reference loop all call the same ``Segmenter.predict_masks``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch

from models import defaults
from models.checkpoint import CheckpointError
from models.network import IMAGENET_MEAN, IMAGENET_STD, CheckpointedNetwork

KIND = "segmenter"
# The shipped checkpoint, trained by models.segmenter.train (see its MODEL_CARD.md).
DEFAULT_CHECKPOINT = defaults.SEGMENTER


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything needed to rebuild the network and use it the way it was trained."""

    arch: str = "Unet"
    encoder: str = "mobilenet_v2"
    input_size: int = 256
    threshold: float = 0.5
    # Average each prediction with that of the mirrored image: faces are near-symmetric, so the
    # two views disagree mostly at uncertain borders (measured gain in the MODEL_CARD).
    flip_average: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SegmenterConfig":
        known = {f for f in cls.__dataclass_fields__}
        try:
            cfg = cls(**{k: v for k, v in raw.items() if k in known})
            cfg = cls(**{**asdict(cfg), "mean": tuple(cfg.mean), "std": tuple(cfg.std)})
        except TypeError as exc:
            raise CheckpointError(f"segmenter config is malformed: {exc}") from exc
        if not 0.0 < cfg.threshold < 1.0 or cfg.input_size % 32 or len(cfg.mean) != 3 or len(cfg.std) != 3:
            raise CheckpointError(
                f"segmenter config is invalid: threshold must lie in (0, 1), input_size must be a "
                f"multiple of 32, mean/std need 3 values (got {raw!r})"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), kind=KIND)

    def describe(self) -> str:
        """The network, as error messages name it."""
        return f"a {self.arch}/{self.encoder} network"


def build_network(cfg: SegmenterConfig) -> torch.nn.Module:
    """Create the smp network with random weights (nothing is ever downloaded)."""
    return smp.create_model(
        cfg.arch, encoder_name=cfg.encoder, encoder_weights=None, in_channels=3, classes=1, **cfg.model_kwargs
    )


class Segmenter(CheckpointedNetwork, kind=KIND, config_type=SegmenterConfig, build=build_network,
                enlarge_interpolation=cv2.INTER_LINEAR):
    """A loaded segmenter: network, config and checkpoint hash, ready for inference."""

    cfg: SegmenterConfig
    # Images per forward pass on a GPU, and the job's default batch there.
    gpu_rows = 32

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images -> one normalised input batch (N, 3, S, S) float32 on the host."""
        return np.stack([self.preprocess(im) for im in images])

    def probs_from_batch(self, batch: np.ndarray) -> np.ndarray:
        """Skin probabilities for an input batch, shape (N, S, S), float32."""
        return self.run_passes(batch, self.forward_probs)

    def forward_probs(self, batch: torch.Tensor) -> torch.Tensor:
        """Skin probabilities (N, S, S) for a batch on the device, as the network computes them."""
        probs = torch.sigmoid(self.network(batch))
        if self.cfg.flip_average:
            probs = (probs + torch.sigmoid(self.network(batch.flip(-1))).flip(-1)) / 2
        return probs[:, 0]

    def predict_probs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Skin probabilities at the model's input size, shape (N, S, S), float32."""
        return self.probs_from_batch(self.batch(images))

    def masks_from_probs(self, probs: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        """Bring each probability map back to its image's full resolution and threshold it."""
        masks = []
        for prob, shape in zip(probs, shapes):
            full = cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
            masks.append((full >= self.cfg.threshold).astype(np.uint8))
        return masks

    def predict_masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Full-resolution binary skin masks (uint8 0/1), one per RGB uint8 image."""
        return self.masks_from_probs(self.predict_probs(images), [im.shape for im in images])
