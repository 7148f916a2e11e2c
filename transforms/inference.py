"""RunInference with our checkpoints: what the segment and classify stages share.

``CheckpointHandler`` loads one of our checkpoints once per worker process into fixed-size
batches; ``RunCheckpoint`` runs it and turns every batch the model could not run into one
failed Outcome per record.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, Sequence, TypeVar

import apache_beam as beam
import torch
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.worker_process import exit_fast_if_sdk_worker, keep_freed_memory
from transforms.records import FAILED, ImageRecord, Outcome

PredictionT = TypeVar("PredictionT")
ModelT = TypeVar("ModelT")


class CheckpointHandler(ModelHandler[ImageRecord, PredictionT, ModelT]):
    """Loads ``model_class`` from a checkpoint URI on ``device``; batches of exactly ``batch_size``.

    A subclass names its model class (anything with ``load(uri, device)``) and its stage, which
    is also its metrics namespace ``acne.<stage>``.
    """

    model_class: ClassVar[Any]
    stage: ClassVar[str]

    def __init__(self, checkpoint: str, device: str, batch_size: int, torch_threads: int, **batching: Any):
        # A fixed size: Beam's adaptive batching would start at 1 and ramp up, and small batches
        # cost more per image than the batch size the user asked for (bench/RESULTS.md).
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size, **batching)
        self._checkpoint = checkpoint
        self._device = device
        self._torch_threads = torch_threads

    def load_model(self) -> ModelT:
        # Once per process, before the first forward pass (transforms.worker_process).
        keep_freed_memory()
        exit_fast_if_sdk_worker()
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        return self.model_class.load(self._checkpoint, self._device)

    def get_metrics_namespace(self) -> str:
        return f"acne.{self.stage}"


def failed_batch(failure: tuple[Sequence[ImageRecord], Any], stage: str) -> Iterator[Outcome]:
    """One failed Outcome per record of a batch that RunInference's exception handling gave up on.

    Beam hands over the error as ``(exception type, repr, traceback lines)``, not the exception:
    the type names the error and the repr is the reason, without the traceback.
    """
    batch, error = failure
    if isinstance(error, BaseException):
        error_type, reason = type(error).__name__, str(error) or repr(error)
    elif isinstance(error, tuple) and len(error) >= 2 and isinstance(error[0], type):
        error_type, reason = error[0].__name__, str(error[1])
    else:
        error_type, reason = "RuntimeError", str(error)
    for record in batch:
        yield Outcome(record.image_id, record.source_uri, FAILED, stage, reason, error_type, split=record.split)


class RunCheckpoint(beam.PTransform):
    """Records -> (the handler's predictions, failed Outcomes): RunInference named ``label``."""

    def __init__(self, label: str, handler: CheckpointHandler):
        super().__init__()
        self._label = label
        self._handler = handler

    def expand(self, records: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        main, other = records | self._label >> RunInference(self._handler).with_exception_handling()
        return main, other.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch, self._handler.stage)
