"""What the segmenter and the classifier share: a network, the config it was trained with,
and its checkpoint hash, loaded once and ready for inference."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointedNetwork:
    """Base of ``Segmenter`` and ``Classifier``: subclasses name their ``kind`` and ``config_type``
    and say how to ``build`` a network from a config and ``describe`` it in error messages."""

    kind: ClassVar[str]
    config_type: ClassVar[Any]

    def __init__(self, network: torch.nn.Module, cfg: Any, sha256: str = "", device: str = "cpu"):
        self.cfg = cfg
        self.sha256 = sha256
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self._mean = np.asarray(cfg.mean, np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(cfg.std, np.float32) * 255.0)

    @staticmethod
    def build(cfg: Any) -> torch.nn.Module:
        raise NotImplementedError

    @staticmethod
    def describe(cfg: Any) -> str:
        raise NotImplementedError

    @classmethod
    def load(cls, uri: str, device: str = "cpu") -> Any:
        """Load a checkpoint of this kind; raises ``CheckpointError`` saying what to fix."""
        ckpt = load_checkpoint(uri, cls.kind)
        cfg = cls.config_type.from_dict(ckpt.config)
        try:
            network = cls.build(cfg)
        except Exception as exc:
            raise CheckpointError(
                f"{cls.kind} checkpoint at {uri} names {cls.describe(cfg)}, which this install cannot build: {exc}"
            ) from exc
        try:
            network.load_state_dict(ckpt.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{cls.kind} weights at {uri} do not fit {cls.describe(cfg)}: the config and the weights come "
                f"from different trainings; re-export the checkpoint with models.train_{cls.kind}. "
                f"Detail: {str(exc)[:300]}"
            ) from exc
        return cls(network, cfg, ckpt.sha256, device)

    def save(self, uri: str, training: Mapping[str, Any] | None = None) -> str:
        """Write the checkpoint (optionally replacing the training record); return its sha256."""
        cfg = self.cfg if training is None else replace(self.cfg, training=dict(training))
        return save_checkpoint(uri, self.network.state_dict(), cfg.to_dict())

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """RGB HxWx3 at the network's input size -> normalised float32 3xHxW."""
        return ((pixels.astype(np.float32) - self._mean) * self._inv_std).transpose(2, 0, 1)
