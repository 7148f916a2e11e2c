"""Shared fixtures: generated images, the shipped checkpoints, the real data beside the repo."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline

from models import defaults
from pipelines import build_dataset, score
from pipelines.sample_data import build_sample

# Hugging Face libraries must never reach for the Hub: tests read only what they wrote.
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip when it is absent (a user's fresh checkout)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def segmenter_checkpoint() -> str:
    return defaults.SEGMENTER


@pytest.fixture(scope="session")
def classifier_checkpoint() -> str:
    return defaults.CLASSIFIER


@pytest.fixture(scope="session")
def untrained_classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A new-format classifier checkpoint with random weights, cutting 128 px patches with at least
    40 % skin. Its calibration calls every face clear (see ``tests.classifier_data.ALWAYS_CLEAR``):
    for behaviour that does not depend on a trained model."""
    from tests.classifier_data import save_untrained_classifier

    path = str(tmp_path_factory.mktemp("untrained_classifier"))
    save_untrained_classifier(path, patch_size=128, min_patch_skin=0.4)
    return path


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run_local.sh sample: five 1024x1024 photos in FFHQ layout plus two broken files."""
    out = tmp_path_factory.mktemp("sample")
    build_sample(out)
    return out


@pytest.fixture
def pipeline() -> Callable[[], TestPipeline]:
    """A TestPipeline on the in-process DirectRunner (Beam would otherwise look for Prism)."""
    return lambda: TestPipeline(options=PipelineOptions(["--runner=DirectRunner"]))


@pytest.fixture(scope="session")
def sample_output(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build_dataset's output for the sample, as ./run_local.sh makes it."""
    out = tmp_path_factory.mktemp("sample_output") / "dataset"
    build_dataset.run(["--input", str(sample_dir), "--output", str(out)])
    return out


@pytest.fixture(scope="session")
def sample_score_output(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """score's output for the sample with the shipped classifier and the patch table, as ./run_local.sh makes it."""
    out = tmp_path_factory.mktemp("sample_score_output") / "scores"
    score.run(["--input", str(sample_dir), "--output", str(out), "--patch-table"])
    return out
