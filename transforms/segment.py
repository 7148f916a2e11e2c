"""Segment: RunInference with the skin segmenter; attaches a full-resolution mask per image."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from models.segmenter import Segmenter
from transforms.inference import CheckpointHandler, RunCheckpoint
from transforms.records import ImageRecord

# Images per batch, by --device. On a CPU larger batches cost more per image: at 256 px the
# activations of 4+ images overflow the cores' caches (bench/RESULTS.md: batch 8 ~2x slower
# per image than batch 2). A GPU wants many, to amortise its kernel launches and copies, and
# runs every forward pass at its fixed size (``CheckpointedNetwork.gpu_rows``).
BATCH_SIZES = {"cpu": 2, "cuda": Segmenter.gpu_rows}
DEFAULT_BATCH_SIZE = BATCH_SIZES["cpu"]


def with_mask(record: ImageRecord, mask: np.ndarray) -> ImageRecord:
    """The record with its full-resolution skin mask and the share of the image that is skin."""
    return replace(record, mask=mask, skin_fraction=float(mask.mean()))


class SkinSegmenterHandler(CheckpointHandler[ImageRecord, Segmenter]):
    """Loads the segmenter once per worker process and masks batches of decoded images."""

    model_class = Segmenter
    stage = "segment"

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, torch_threads: int = 0):
        super().__init__(checkpoint, device, batch_size, torch_threads)

    def run_inference(
        self, batch: Sequence[ImageRecord], model: Segmenter, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[ImageRecord]:
        masks = model.predict_masks([r.pixels for r in batch])
        return [with_mask(r, m) for r, m in zip(batch, masks)]

    def get_num_bytes(self, batch: Sequence[ImageRecord]) -> int:
        # The default pickles the whole batch just to measure it: megabytes per image.
        return sum(r.pixels.nbytes for r in batch)


class SegmentSkin(RunCheckpoint):
    """Decoded ImageRecords -> (records with ``mask`` and ``skin_fraction``, failed Outcomes)."""

    def __init__(self, handler: SkinSegmenterHandler):
        super().__init__("RunSegmenter", handler)
