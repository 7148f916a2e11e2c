"""What the segmenter and the classifier share: a network, the config it was trained with,
and its checkpoint hash, loaded once and ready for inference."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, ClassVar, Mapping

import cv2
import numpy as np
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
    """``batch`` with zero rows appended up to ``rows`` (unchanged if it has that many)."""
    pad = rows - len(batch)
    return np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)]) if pad > 0 else batch


class CheckpointedNetwork:
    """Base of ``Segmenter`` and ``Classifier``, which pass as class arguments their ``kind``, their
    ``config_type`` (whose ``describe()`` names the network in error messages), how to ``build`` a
    network from it, and the interpolation that enlarges an input to the network's size."""

    kind: ClassVar[str]
    config_type: ClassVar[Any]
    build: ClassVar[Callable[[Any], torch.nn.Module]]
    # INTER_AREA is the right filter for shrinking; what fits enlarging is the one each model was trained with.
    enlarge_interpolation: ClassVar[int]
    # On a GPU every forward pass runs at exactly this many rows, zero-padded: cuDNN picks its
    # kernels by the batch's shape, and kernels round differently. With fixed passes (and full
    # float32, see __init__) an image's mask no longer depends on the images that share its
    # batch (bench/README.md, "Same rows on a GPU").
    gpu_rows: ClassVar[int]
    # On the CPU a pass pads to a multiple of this (1: runs as given).
    cpu_multiple: ClassVar[int] = 1

    def __init_subclass__(cls, kind: str, config_type: Any, build: Callable[[Any], torch.nn.Module],
                          enlarge_interpolation: int, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind, cls.config_type, cls.enlarge_interpolation = kind, config_type, enlarge_interpolation
        cls.build = staticmethod(build)

    def __init__(self, network: torch.nn.Module, cfg: Any, sha256: str = "", device: str = "cpu"):
        self.cfg = cfg
        self.sha256 = sha256
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        # Every forward pass's rows, where they are fixed: on a GPU (see gpu_rows).
        self.fixed_rows: int | None = self.gpu_rows if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            # torch runs float32 convolutions as TF32 on a GPU by default. Measured on an H200, that
            # moved a patch's expected lesions by up to 0.21 and changed the masks of 46 of 48
            # faces with the batch they ran in; full float32 is what the models were validated in.
            torch.backends.cudnn.allow_tf32 = False
        self._mean = np.asarray(cfg.mean, np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(cfg.std, np.float32) * 255.0)

    @classmethod
    def load(cls, uri: str, device: str = "cpu") -> Any:
        """Load a checkpoint of this kind; raises ``CheckpointError`` saying what to fix."""
        ckpt = load_checkpoint(uri, cls.kind)
        cfg = cls.config_type.from_dict(ckpt.config)
        try:
            network = cls.build(cfg)
        except Exception as exc:
            raise CheckpointError(
                f"{cls.kind} checkpoint at {uri} names {cfg.describe()}, which this install cannot build: {exc}"
            ) from exc
        try:
            network.load_state_dict(ckpt.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{cls.kind} weights at {uri} do not fit {cfg.describe()}: the config and the weights come "
                f"from different trainings; re-export the checkpoint with models.{cls.kind}.train. "
                f"Detail: {str(exc)[:300]}"
            ) from exc
        return cls(network, cfg, ckpt.sha256, device)

    def save(self, uri: str, training: Mapping[str, Any] | None = None) -> str:
        """Write the checkpoint (optionally replacing the training record); return its sha256."""
        cfg = self.cfg if training is None else replace(self.cfg, training=dict(training))
        return save_checkpoint(uri, self.network.state_dict(), cfg.to_dict())

    def to_device(self, batch: np.ndarray) -> torch.Tensor:
        """A host batch as a tensor on the model's device, in one copy.

        On a GPU the copy goes through pinned memory and does not block: the worker's other
        threads go on decoding and stacking their batches while the device copies and computes.
        """
        tensor = torch.from_numpy(batch)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def pass_rows(self, real: int) -> int:
        """The rows a forward pass of ``real`` inputs runs at."""
        if self.fixed_rows:
            return self.fixed_rows
        return -(-real // self.cpu_multiple) * self.cpu_multiple

    @torch.inference_mode()
    def run_passes(self, batch: np.ndarray, forward: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """``forward`` over a preprocessed host batch, in padded passes of ``pass_rows`` rows
        (at most ``fixed_rows`` inputs each where that is set): one float32 output row per input."""
        step = self.fixed_rows or max(len(batch), 1)
        outputs = []
        for start in range(0, len(batch), step):
            part = batch[start : start + step]
            padded = self.to_device(pad_rows(part, self.pass_rows(len(part))))
            outputs.append(forward(padded)[: len(part)].float().cpu().numpy())
        return np.concatenate(outputs)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> normalised float32 3xSxS at the model's input size."""
        size = self.cfg.input_size
        if image.shape[:2] != (size, size):
            interp = cv2.INTER_AREA if min(image.shape[:2]) > size else self.enlarge_interpolation
            image = cv2.resize(image, (size, size), interpolation=interp)
        return self.normalise(image)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """RGB HxWx3 at the network's input size -> normalised float32 3xHxW."""
        return ((pixels.astype(np.float32) - self._mean) * self._inv_std).transpose(2, 0, 1)
