"""A job's configuration: typed, frozen, and built once from its parsed flags.

One class per job on a shared base. ``JobConfig`` holds the flags both jobs take (input,
segmentation, faces and patches, output); ``DatasetConfig`` adds build_dataset's encoding and
split, ``ScoreConfig`` the classifier's. So each job's ``build`` takes exactly the fields it
may read, and a type checker refuses a job reading the other's flag. Fields are named as the
flags' destinations (``--patch-size`` -> ``patch_size``), so the manifest's ``arguments``
record each flag's resolved value under the name a user knows.

Whatever the flags leave open is settled here, before any work and never again: the tiling
(score cuts patches as its classifier saw them in training, build_dataset takes the defaults),
the batch sizes (by --device),
the split fractions (parsed once), and the flags that need one another.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, TypeVar

from models.checkpoint import CheckpointError, read_config
from models.classifier import Classifier, ClassifierConfig
from pipelines.common import JobConfigError
from pipelines.options import DEFAULT_MIN_FACE_SKIN, DEFAULT_MIN_PATCH_SKIN, DEFAULT_PATCH_SIZE, SCORE_MIN_FACE_SKIN
from transforms.classify import BATCH_PATCHES
from transforms.segment import BATCH_SIZES
from transforms.split import SplitError, check_mode, parse_fractions
from transforms.storage import EndpointError, check_endpoints

C = TypeVar("C", bound="JobConfig")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """The flags both jobs take, with every tiling flag resolved."""

    input: tuple[str, ...]
    labels_csv: tuple[str, ...]
    id_column: str
    label_column: str
    ffhq_metadata: Optional[str]
    voc_annotations: bool
    max_image_bytes: int
    segmenter_checkpoint: str
    device: str
    batch_size: int
    torch_threads: int
    max_pixels: int
    min_face_skin: float
    patch_size: int
    stride: int
    min_patch_skin: float
    blackout_background: bool
    output: str
    overwrite: bool
    resume: bool

    @classmethod
    def _of_flags(
        cls: type[C], flags: argparse.Namespace, patch_size: int, min_patch_skin: float, min_face_skin: float,
        **parsed: Any,
    ) -> C:
        """The config of ``flags``: unset tiling flags take the job's values, ``parsed`` replaces raw text."""
        if flags.resume and flags.overwrite:
            raise JobConfigError("--resume keeps what an earlier run wrote and --overwrite deletes it: pass one of them")
        size = patch_size if flags.patch_size is None else flags.patch_size
        resolved = {
            "input": tuple(flags.input),
            "batch_size": flags.batch_size or BATCH_SIZES[flags.device],
            "labels_csv": tuple(flags.labels_csv or ()),
            "min_face_skin": min_face_skin if flags.min_face_skin is None else flags.min_face_skin,
            "patch_size": size,
            "stride": size if flags.stride is None else flags.stride,
            "min_patch_skin": min_patch_skin if flags.min_patch_skin is None else flags.min_patch_skin,
            **parsed,
        }
        return cls(**{f.name: resolved.get(f.name, getattr(flags, f.name)) for f in fields(cls)})

    def arguments(self) -> dict[str, Any]:
        """Every flag's resolved value by name, as the manifest records them."""
        return dict(sorted(asdict(self).items()))


@dataclass(frozen=True, kw_only=True)
class DatasetConfig(JobConfig):
    """build_dataset's flags: the shared ones, how patches are encoded, how faces are split."""

    patch_format: str
    jpeg_quality: int
    png_compression: int
    split: str
    split_fractions: tuple[float, float, float]

    @classmethod
    def from_flags(cls, flags: argparse.Namespace) -> DatasetConfig:
        """Check the split flags; unset tiling flags take the defaults."""
        try:
            check_mode(flags.split)
            fractions = parse_fractions(flags.split_fractions)
            if flags.split == "ffhq" and flags.ffhq_metadata is None:
                raise SplitError("--split ffhq needs --ffhq-metadata ffhq-dataset-v2.json")
        except SplitError as exc:
            raise JobConfigError(str(exc)) from exc
        return cls._of_flags(
            flags, DEFAULT_PATCH_SIZE, DEFAULT_MIN_PATCH_SKIN, DEFAULT_MIN_FACE_SKIN, split_fractions=fractions
        )


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(JobConfig):
    """score's flags: the shared ones, the classifier, and what the job writes."""

    classifier_checkpoint: str
    classifier_batch_size: int
    top_patches: int
    patch_table: bool
    verdict_threshold: Optional[float]
    working_resolution: str

    @classmethod
    def from_flags(cls, flags: argparse.Namespace) -> ScoreConfig:
        """Unset tiling flags take the values the classifier's training patches were cut with:
        a face's lesions are summed over its patches, so they must be the patches it learnt on."""
        trained = trained_config(flags.classifier_checkpoint)
        return cls._of_flags(
            flags,
            trained.patch_size or DEFAULT_PATCH_SIZE,
            trained.min_patch_skin or DEFAULT_MIN_PATCH_SKIN,
            SCORE_MIN_FACE_SKIN,
            classifier_batch_size=flags.classifier_batch_size or BATCH_PATCHES[flags.device],
        )


def trained_config(uri: str) -> ClassifierConfig:
    """The classifier checkpoint's config, read without its weights; what to fix if it cannot be."""
    try:
        check_endpoints([uri])
        return ClassifierConfig.from_dict(read_config(uri, Classifier.kind)[0])
    except (CheckpointError, EndpointError) as exc:
        raise JobConfigError(str(exc)) from exc
