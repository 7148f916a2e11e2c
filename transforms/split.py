"""Split: a deterministic train/validation/test assignment per face.

The split is a function of the image id alone (or of metadata that travels with it), so
all patches of one face land in one split and every rerun assigns the same split.
"""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import replace
from functools import partial
from typing import Sequence

from models.dataset import SPLITS
from transforms.records import ImageRecord, Outcome, RecordStep, WithOutcomes

STAGE = "split"
MODES = ("hash", "ffhq", "path")
FFHQ_CATEGORIES = {"training": "train", "validation": "validation"}
PATH_NAMES = {"train": "train", "training": "train", "valid": "validation", "val": "validation",
              "validation": "validation", "test": "test"}


class SplitError(ValueError):
    """A record carries nothing the chosen split mode can use."""


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (train, validation, test), checked to sum to 1."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SplitError(f"--split-fractions {text!r} must be three numbers, e.g. 0.8,0.1,0.1") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise SplitError(f"--split-fractions {text!r} must be three non-negative numbers that sum to 1")
    return values  # type: ignore[return-value]


def hash_split(image_id: str, fractions: Sequence[float]) -> str:
    """Map an id to a split through a uniform hash: stable across runs, machines and runners."""
    u = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def split_for(record: ImageRecord, mode: str, fractions: Sequence[float]) -> str:
    """The split of one record under ``mode``: hash, ffhq, path, or a fixed split name."""
    if mode == "hash":
        return hash_split(record.image_id, fractions)
    if mode == "ffhq":
        category = record.meta.get("category")
        if category not in FFHQ_CATEGORIES:
            raise SplitError(f"no FFHQ category for {record.image_id}: pass --ffhq-metadata with ffhq-dataset-v2.json")
        return FFHQ_CATEGORIES[category]
    if mode == "path":
        for part in reversed(posixpath.dirname(record.source_uri.split("#")[0]).split("/")):
            if part.lower() in PATH_NAMES:
                return PATH_NAMES[part.lower()]
        raise SplitError(f"no train/valid/test folder in the path {record.source_uri}")
    return mode


def check_mode(mode: str) -> None:
    if mode not in MODES and mode not in SPLITS:
        raise SplitError(f"--split {mode!r} must be one of {MODES + SPLITS}")


def assign_split(record: ImageRecord, mode: str, fractions: Sequence[float]) -> ImageRecord | Outcome:
    """The record with its ``split`` set; a failed Outcome when nothing places it under ``mode``."""
    try:
        return replace(record, split=split_for(record, mode, fractions))
    except SplitError as exc:
        return Outcome.failed(record.image_id, record.source_uri, STAGE, exc)


class AssignSplit(WithOutcomes):
    """Records -> (records with ``split`` set, failed Outcomes for records no split fits)."""

    def __init__(self, mode: str, fractions: Sequence[float]):
        check_mode(mode)
        step = partial(assign_split, mode=mode, fractions=tuple(fractions))
        super().__init__("SetSplit", RecordStep(step, "split_failed"))
