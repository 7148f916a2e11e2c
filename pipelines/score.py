"""score: bulk acne scoring of image archives.

Read -> Decode -> WorkingResolution -> Segment -> FilterFaces -> CutPatches -> Classify -> Write:
the same stages as build_dataset up to the patches (with photos that were enlarged halved first,
``--working-resolution``), then the classifier counts the lesions on every patch
(batched across images) and judges each face from its total: clear or acne, the acne
probability, the lesion count and, for acne, the severity grade. Given a build_dataset output as its one --input, it
scores that dataset's patches instead (ReadPatchDataset -> Classify -> Write). Every input
ends as one row of ``faces/``; scored and skin-less images also get a row in ``scores/``,
failures go to ``errors/``.

    python -m pipelines.score --input 'archive/*.tar' --output scores/ [Beam flags]
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence

import apache_beam as beam

from models.dataset import PATCH_SCORE_SCHEMA, PATCH_SCORES_DIR, SCORE_SCHEMA, SCORES_DIR, read_manifest
from pipelines.common import (
    JobOutputs, OutputHold, Prepared, cli, complete, finish_job, prepare, segmented_faces, start, workers_run_here,
)
from pipelines.config import ScoreConfig
from pipelines.options import (
    add_input_flags, add_output_flags, add_patch_flags, add_score_flags, add_segment_flags, parse,
)
from transforms.classify import AcneClassifierHandler, ClassifyFaces, patch_rows, score_row, scored_outcome, unscored_row
from transforms.patches import CutPatches, FilterFaces
from transforms.progress import ShowProgress
from transforms.qa import SCORE_GROUPS, SampleFaces, score_ranks
from transforms.read_patches import ReadPatchDataset, is_patch_dataset
from transforms.records import FILTERED, KEPT
from transforms.sink import WriteParquet

DESCRIPTION = """\
Score images for acne: segment skin, cut skin patches, count the acne lesions on each patch
and judge each face. Writes one row per image to OUTPUT/scores/: the verdict ('clear' or
'acne'), the calibrated acne probability, the expected lesion count, the severity (a Hayashi
grade: mild, moderate, severe, very_severe; empty when clear), the most suspicious patches and
both checkpoints' hashes; status 'no_skin' when no usable skin was found. Failures go to
OUTPUT/errors/, every input's fate to OUTPUT/faces/, and manifest.json comes last."""

PROG = "python -m pipelines.score"
# Patch score rows are a few dozen bytes: a file every 1024 (some 60 faces) keeps their count down.
PATCH_SCORE_ROWS_PER_FILE = 1024
# --help shows the groups' sections in this order: input, segmentation, patches, scoring, output.
OPTION_GROUPS = [add_input_flags, add_segment_flags, add_patch_flags, add_score_flags, add_output_flags]
EXAMPLES = f"""\
  {PROG} --input runs/sample --output runs/local/scores
  {PROG} --input runs/local/dataset --output runs/local/rescored   # rescore a dataset's patches
  {PROG} --input 'archive/*.tar' --output out/scores --patch-table --verdict-threshold 0.3
  {PROG} --input 'gs://B/archive/*.tar' --output gs://B/scores/run1 --device cuda --runner DataflowRunner \\
      --project P --region R --temp_location gs://B/tmp --sdk_container_image IMAGE --sdk_location container
"""


def score_rows_of(face: Mapping[str, Any]) -> int:
    """A scored or skin-less face has one scores/ row (what --resume checks before carrying it over)."""
    return int(face["status"] in (KEPT, FILTERED))


def patch_score_rows_of(face: Mapping[str, Any]) -> int:
    """A scored face has one patch_scores/ row per patch."""
    return face["patch_count"] if face["status"] == KEPT else 0


def build(
    p: beam.Pipeline, config: ScoreConfig, prepared: Prepared, checkpoints: dict[str, dict[str, str]]
) -> JobOutputs:
    """Compose the job's stages on ``p``."""
    if is_patch_dataset(config.input[0]):
        patched, read_failed, inputs = p | "ReadPatchDataset" >> ReadPatchDataset(config.input[0], prepared.run.done_list)
        failures, skinless_parts = [read_failed], []
    else:
        segmented, failures, inputs = segmented_faces(
            p, config, prepared, shrink_enlarged=config.working_resolution == "auto"
        )
        faces, low_skin = segmented | "FilterFaces" >> FilterFaces(config.min_face_skin)
        patched, no_patch = faces | "CutPatches" >> CutPatches(
            config.patch_size, config.stride, config.min_patch_skin, config.blackout_background
        )
        skinless_parts = [low_skin, no_patch]
    handler = AcneClassifierHandler(
        config.classifier_checkpoint, config.device, config.classifier_batch_size, config.torch_threads,
        config.verdict_threshold,
    )
    scored, classify_failed = patched | "Classify" >> ClassifyFaces(handler)
    skinless = tuple(skinless_parts) | "Skinless" >> beam.Flatten(pipeline=p)
    hashes = checkpoints["segmenter"]["sha256"], checkpoints["classifier"]["sha256"]
    run = prepared.run.run
    # Scored and skin-less rows go to scores/ by separate writers, each where its rows are made
    # (see WriteOutcomes: a Flatten first would hold every row back until the end on the DirectRunner).
    files = [
        scored | "ScoreRows" >> beam.Map(score_row, config.top_patches, *hashes)
        | "WriteScores" >> WriteParquet(config.output, SCORES_DIR, SCORE_SCHEMA, run=run, name="scored"),
        skinless | "SkinlessRows" >> beam.Map(unscored_row, *hashes)
        | "WriteSkinlessScores" >> WriteParquet(config.output, SCORES_DIR, SCORE_SCHEMA, run=run, name="no_skin"),
    ]
    if config.patch_table:
        files.append(scored | "PatchRows" >> beam.FlatMap(patch_rows) | "WritePatchScores" >> WriteParquet(
            config.output, PATCH_SCORES_DIR, PATCH_SCORE_SCHEMA, run=run, rows_per_file=PATCH_SCORE_ROWS_PER_FILE
        ))
    scored_outcomes = scored | "ScoredOutcomes" >> beam.Map(scored_outcome)
    samples = scored | "SampleFaces" >> SampleFaces(score_ranks, SCORE_GROUPS)
    return JobOutputs(inputs, [*failures, skinless, classify_failed, scored_outcomes], files, samples)


def segmenter_of(config: ScoreConfig, prepared: Prepared) -> dict[str, str]:
    """The segmenter behind the patches: the dataset's own when scoring a patch dataset."""
    if is_patch_dataset(config.input[0]):
        return read_manifest(config.input[0])["checkpoints"]["segmenter"]
    return {"uri": config.segmenter_checkpoint, "sha256": prepared.segmenter_sha256}


def run(argv: Optional[Sequence[str]] = None, pipeline: Optional[beam.Pipeline] = None) -> dict[str, Any]:
    """Run the job; returns the manifest. ``pipeline`` lets tests pass a ``TestPipeline``."""
    flags, options = parse(argv, OPTION_GROUPS, PROG, DESCRIPTION, EXAMPLES)
    config = ScoreConfig.from_flags(flags)
    prepared = prepare(config, options)
    with OutputHold(prepared.lock, options) as hold:
        checkpoints = {
            "segmenter": segmenter_of(config, prepared),
            "classifier": {"uri": config.classifier_checkpoint, "sha256": prepared.classifier_sha256},
        }
        families = {
            SCORES_DIR: score_rows_of, **({PATCH_SCORES_DIR: patch_score_rows_of} if config.patch_table else {})
        }
        prepared = start(config, prepared, "score", checkpoints, families)
        p = pipeline or beam.Pipeline(options=options)
        tables = [SCORES_DIR] + ([PATCH_SCORES_DIR] if config.patch_table else [])
        # A patch dataset's faces are known from its manifest; other inputs' from planning them.
        total = read_manifest(config.input[0])["accounting"]["kept"] if is_patch_dataset(config.input[0]) else None
        with ShowProgress(workers_run_here(options), total, prepared.run.carried_images) as progress:
            prepared = replace(prepared, progress=progress.folder)
            finish_job(config, argv, "score", checkpoints, tables, build(p, config, prepared, checkpoints), prepared)
            result = hold.submit(p, progress.run)
        return complete(result, config.output)


if __name__ == "__main__":
    cli(run)
