"""A job's configuration is settled once from its flags, before any work, and never changes."""
from __future__ import annotations

import argparse
import dataclasses
import re
from types import ModuleType

import pytest

from pipelines import build_dataset, score
from pipelines.common import JobConfigError
from pipelines.config import DatasetConfig, ScoreConfig
from pipelines.options import (
    DEFAULT_MIN_FACE_SKIN, DEFAULT_MIN_PATCH_SKIN, DEFAULT_PATCH_SIZE, SCORE_MIN_FACE_SKIN, parse,
)


def _flags(job: ModuleType, *argv: str) -> argparse.Namespace:
    flags, _ = parse(["--input", "in/*.png", "--output", "out", *argv], job.OPTION_GROUPS, job.PROG, job.DESCRIPTION)
    return flags


def test_a_config_cannot_be_changed_once_built() -> None:
    config = DatasetConfig.from_flags(_flags(build_dataset))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.patch_size = 64  # type: ignore[misc]


def test_build_dataset_tiles_with_the_defaults_and_parses_its_flags_once() -> None:
    config = DatasetConfig.from_flags(_flags(build_dataset, "--split-fractions", "0.6,0.2,0.2"))
    tiling = (config.patch_size, config.stride, config.min_patch_skin, config.min_face_skin)
    assert tiling == (DEFAULT_PATCH_SIZE, DEFAULT_PATCH_SIZE, DEFAULT_MIN_PATCH_SKIN, DEFAULT_MIN_FACE_SKIN)
    assert config.split_fractions == (0.6, 0.2, 0.2)
    assert (config.input, config.labels_csv) == (("in/*.png",), ())


def test_score_tiles_as_its_classifier_was_trained_unless_flags_say_otherwise(untrained_classifier: str) -> None:
    trained = ScoreConfig.from_flags(_flags(score, "--classifier-checkpoint", untrained_classifier))
    assert (trained.patch_size, trained.stride, trained.min_patch_skin) == (128, 128, 0.4)
    assert trained.min_face_skin == SCORE_MIN_FACE_SKIN
    chosen = ScoreConfig.from_flags(_flags(
        score, "--classifier-checkpoint", untrained_classifier, "--patch-size", "200", "--min-patch-skin", "0",
        "--min-face-skin", "0",
    ))
    assert (chosen.patch_size, chosen.stride, chosen.min_patch_skin, chosen.min_face_skin) == (200, 200, 0.0, 0.0)


def test_batch_sizes_follow_the_device_unless_given(untrained_classifier: str) -> None:
    # A CPU runs fastest on tiny batches; a GPU needs large ones to be kept busy (bench/RESULTS.md).
    cpu = ScoreConfig.from_flags(_flags(score, "--classifier-checkpoint", untrained_classifier))
    gpu = ScoreConfig.from_flags(_flags(score, "--classifier-checkpoint", untrained_classifier, "--device", "cuda"))
    chosen = ScoreConfig.from_flags(_flags(
        score, "--classifier-checkpoint", untrained_classifier, "--device", "cuda", "--batch-size", "8",
        "--classifier-batch-size", "100",
    ))
    assert (cpu.batch_size, cpu.classifier_batch_size) == (2, 64)
    assert (gpu.batch_size, gpu.classifier_batch_size) == (32, 512)
    assert (chosen.batch_size, chosen.classifier_batch_size) == (8, 100)
    assert DatasetConfig.from_flags(_flags(build_dataset, "--device", "cuda")).batch_size == 32
    # The manifest records the sizes as resolved.
    assert gpu.arguments()["batch_size"] == 32


@pytest.mark.parametrize("argv, message", [
    (["--split", "sideways"], "--split 'sideways' must be one of"),
    (["--split-fractions", "0.5,0.5"], "must be three non-negative numbers that sum to 1"),
    (["--split", "ffhq"], "--split ffhq needs --ffhq-metadata"),
], ids=["mode", "fractions", "ffhq-without-metadata"])
def test_split_flags_are_refused_before_any_work(argv: list[str], message: str) -> None:
    with pytest.raises(JobConfigError, match=re.escape(message)):
        DatasetConfig.from_flags(_flags(build_dataset, *argv))


def test_a_mistyped_flag_stops_the_job_before_any_work_with_beams_suggestion(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        build_dataset.run(["--input", str(tmp_path), "--output", str(output), "--min-face-skn", "0.9"])
    assert stopped.value.code == 2
    assert "unknown flag(s): --min-face-skn (did you mean --min-face-skin?)" in capsys.readouterr().err
    assert not output.exists()


def test_a_flag_of_the_other_job_is_refused_and_beams_own_flags_pass() -> None:
    with pytest.raises(SystemExit):
        _flags(build_dataset, "--top-patches", "3")
    flags, options = parse(
        ["--input", "in", "--output", "out", "--min-face-skin", "0.3", "--direct_num_workers", "2",
         "--project=p", "--labels", "team=acne"],
        build_dataset.OPTION_GROUPS, build_dataset.PROG, build_dataset.DESCRIPTION,
    )
    assert flags.min_face_skin == 0.3
    assert options.get_all_options()["direct_num_workers"] == 2 and options.get_all_options()["labels"] == ["team=acne"]
