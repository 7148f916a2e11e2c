"""The records that flow between stages.

One image travels as one ``ImageRecord``; each stage fills in what it computes with
``dataclasses.replace``. Anything that leaves the main path does so as an ``Outcome``:
the one row per input image that says whether it was kept, filtered (and why) or failed
(where and why). The outcomes are how every input is accounted for exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

KEPT = "kept"
FILTERED = "filtered"
FAILED = "failed"


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives, before any of its bytes are read.

    ``member`` is the tar member offset/size or zip member name; ``row_group``/``row`` locate a
    Parquet row. Refs are small, so the job shuffles refs rather than image bytes.
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
    """One image on its way through the stages."""

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
    def failed(cls, image_id: str, source_uri: str, stage: str, exc: BaseException | str) -> "Outcome":
        if isinstance(exc, BaseException):
            return cls(image_id, source_uri, FAILED, stage, str(exc) or repr(exc), type(exc).__name__)
        return cls(image_id, source_uri, FAILED, stage, exc, "InvalidInput")


def failed_batch(failure: tuple[Sequence["ImageRecord"], Any], stage: str) -> Iterator[Outcome]:
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
        yield Outcome(record.image_id, record.source_uri, FAILED, stage, reason, error_type)
