"""Segment: RunInference with the skin segmenter; attaches a full-resolution mask per image."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import torch
from apache_beam.ml.inference.base import ModelHandler, RunInference

from models.segmenter import Segmenter
from transforms.records import ImageRecord, failed_batch

STAGE = "segment"
# Images per forward pass on a CPU. Larger batches cost more per image: at 256 px the
# activations of 4+ images overflow the cores' caches (bench/RESULTS.md: batch 8 ~2x slower
# per image than batch 2). GPUs want 32 or more.
DEFAULT_BATCH_SIZE = 2


class SkinSegmenterHandler(ModelHandler[ImageRecord, ImageRecord, Segmenter]):
    """Loads the segmenter once per worker process and masks batches of decoded images."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, torch_threads: int = 0):
        # A fixed size: Beam's adaptive batching would start at 1 and ramp up, and small batches
        # cost more per image than the --batch-size the user asked for (bench/RESULTS.md).
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._checkpoint = checkpoint
        self._device = device
        self._torch_threads = torch_threads

    def load_model(self) -> Segmenter:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        return Segmenter.load(self._checkpoint, self._device)

    def run_inference(
        self, batch: Sequence[ImageRecord], model: Segmenter, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[ImageRecord]:
        masks = model.predict_masks([r.pixels for r in batch])
        return [replace(r, mask=m, skin_fraction=float(m.mean())) for r, m in zip(batch, masks)]

    def get_num_bytes(self, batch: Sequence[ImageRecord]) -> int:
        # The default pickles the whole batch just to measure it: megabytes per image.
        return sum(r.pixels.nbytes for r in batch)

    def get_metrics_namespace(self) -> str:
        return "acne.segment"


class SegmentSkin(beam.PTransform):
    """Decoded ImageRecords -> (records with ``mask`` and ``skin_fraction``, failed Outcomes)."""

    def __init__(self, handler: SkinSegmenterHandler):
        super().__init__()
        self._handler = handler

    def expand(self, records: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        main, other = records | "RunSegmenter" >> RunInference(self._handler).with_exception_handling()
        failed = other.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch, STAGE)
        return main, failed
