"""The records that flow between stages.

One image travels as one ``ImageRecord``; each stage fills in what it computes with
``dataclasses.replace``. Anything that leaves the main path does so as an ``Outcome``:
the one row per input image that says whether it was kept, filtered (and why) or failed
(where and why). The outcomes are how every input is accounted for exactly once.

A stage's work on one record is one plain function, ``record -> next record | Outcome``:
the Beam job runs it through ``RecordStep`` and bench/reference.py calls it directly, so
the benchmark's loop cannot drift from the job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

KEPT = "kept"
FILTERED = "filtered"
FAILED = "failed"


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives, before any of its bytes are read.

    ``member`` is the tar or zip member name, or the Parquet column of the image bytes (``image.bytes``
    in a struct); ``offset``/``size`` the byte range of a tar member's
    data or of a whole framed TFRecord record; ``row_group``/``row`` locate a Parquet row (``row``
    is also a TFRecord record's index). Refs are small, so the job shuffles refs rather than image bytes.
    """

    image_id: str
    shard_uri: str
    kind: str
    member: Optional[str] = None
    offset: int = 0
    size: int = 0
    row_group: int = 0
    row: int = 0

    @property
    def source_uri(self) -> str:
        if self.kind in ("tar", "zip"):
            return f"{self.shard_uri}#{self.member}"
        if self.kind == "parquet":
            return f"{self.shard_uri}#rg{self.row_group}/row{self.row}"
        if self.kind == "tfrecord":
            return f"{self.shard_uri}#record{self.row}"
        return self.shard_uri


@dataclass(frozen=True)
class Patch:
    """One square tile of a face, with its own mask and where it came from."""

    x: int
    y: int
    size: int
    skin_fraction: float
    pixels: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class ImageRecord:
    """One image on its way through the stages.

    ``data`` is an encoded image, or raw uint8 pixels when ``raw_shape`` gives their CHW shape
    (a TFRecord's pixels, which need no decoding).
    """

    image_id: str
    source_uri: str
    data: Optional[bytes] = None
    label: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)
    pixels: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    skin_fraction: Optional[float] = None
    split: Optional[str] = None
    patches: Optional[tuple[Patch, ...]] = None
    raw_shape: Optional[tuple[int, ...]] = None
    # Working pixels per source pixel: below 1 when score halved an enlarged photo
    # (transforms.resolution). Patches are cut in working pixels.
    scale: float = 1.0


@dataclass(frozen=True)
class Outcome:
    """The fate of one input image: exactly one per input."""

    image_id: str
    source_uri: str
    status: str
    stage: str = ""
    reason: str = ""
    error_type: str = ""
    skin_fraction: Optional[float] = None
    patch_count: int = 0
    split: Optional[str] = None
    label: Optional[str] = None

    @classmethod
    def failed(
        cls, image_id: str, source_uri: str, stage: str, exc: BaseException | str, split: Optional[str] = None
    ) -> "Outcome":
        if isinstance(exc, BaseException):
            return cls(image_id, source_uri, FAILED, stage, str(exc) or repr(exc), type(exc).__name__, split=split)
        return cls(image_id, source_uri, FAILED, stage, exc, "InvalidInput", split=split)


Step = Callable[[ImageRecord], Union[ImageRecord, Outcome]]

# The tag under which a stage's Outcomes leave its main output.
OUTCOME = "outcome"


class RecordStep(beam.DoFn):
    """One stage's per-record function as a DoFn: the next record goes on, an Outcome leaves by ``OUTCOME``.

    ``left_counter`` names the Metrics counter of the records that leave the main path here.
    """

    def __init__(self, step: Step, left_counter: str):
        self._step = step
        self._left_counter = left_counter

    def setup(self) -> None:
        self._left = Metrics.counter("acne", self._left_counter)

    def process(self, record: ImageRecord) -> Iterator[object]:
        result = self._step(record)
        if isinstance(result, Outcome):
            self._left.inc()
            yield beam.pvalue.TaggedOutput(OUTCOME, result)
            return
        self.passed(result)
        yield result

    def passed(self, record: ImageRecord) -> None:
        """Count what a stage measures on the records it passes on; nothing by default."""


class WithOutcomes(beam.PTransform):
    """Records -> (``fn``'s main output, the Outcomes it tags ``OUTCOME``): a ParDo named ``label``."""

    def __init__(self, label: str, fn: beam.DoFn):
        super().__init__()
        self._label = label
        self._fn = fn

    def expand(self, records: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        main, outcomes = records | self._label >> beam.ParDo(self._fn).with_outputs(OUTCOME, main="main")
        return main, outcomes
