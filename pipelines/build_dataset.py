"""build_dataset: face images -> skin-filtered, high-resolution patches in Parquet.

Read -> Split -> Decode -> Segment -> FilterFaces -> CutPatches -> Write, with every input
image ending as exactly one row of ``faces/``: kept, filtered (with a reason) or failed
(with the stage and error). ``manifest.json`` is written last and checks that count. The
split depends only on the id, path and metadata, so it is set right after the read and every
row from there on, filtered or failed, carries it.

    python -m pipelines.build_dataset --input 'ffhq/*/*.png' --output out/ [Beam flags]
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import apache_beam as beam

from models.dataset import PATCH_SCHEMA, PATCHES_DIR, SPLITS
from pipelines.common import (
    JobOutputs, OutputHold, Prepared, cli, complete, finish_job, prepare, segmented_faces, start, workers_run_here,
)
from pipelines.config import DatasetConfig
from pipelines.options import (
    add_encode_flags, add_input_flags, add_output_flags, add_patch_flags, add_segment_flags, add_split_flags, parse,
)
from transforms.patches import CutPatches, EncodePatchRows, FilterFaces
from transforms.progress import ShowProgress
from transforms.qa import BUILD_GROUPS, SampleFaces, build_ranks
from transforms.records import KEPT
from transforms.sink import WriteParquet
from transforms.split import AssignSplit

DESCRIPTION = """\
Build a training set: segment the skin of every face, drop faces and patches with too little
skin, and write the kept patches (with their masks) as Parquet under OUTPUT/patches/<split>/.
Every input image gets one row in OUTPUT/faces/ (kept, filtered or failed, with the reason);
failures also go to OUTPUT/errors/. OUTPUT/manifest.json is written last."""

# Patch rows carry image bytes; small row groups keep each writer's buffer to a few MB, and a
# file of 16 groups (about 200 MB of 256 px PNGs, some 80 faces) is what a kill can lose per writer.
PATCH_ROWS_PER_GROUP = 64
PATCH_ROWS_PER_FILE = 16 * PATCH_ROWS_PER_GROUP

PROG = "python -m pipelines.build_dataset"
# --help shows the groups' sections in this order: input, segmentation, patches, output.
OPTION_GROUPS = [
    add_input_flags, add_segment_flags, add_patch_flags, add_output_flags, add_split_flags, add_encode_flags,
]
EXAMPLES = f"""\
  {PROG} --input runs/sample --output runs/local/dataset
  {PROG} --input 'ffhq/images1024x1024/*/*.png' --output out/ffhq \\
      --ffhq-metadata ffhq/ffhq-dataset-v2.json --split ffhq \\
      --direct_num_workers 2 --direct_running_mode multi_processing
  {PROG} --input 'acne04/train/*.jpg' --labels-csv acne04/train/labels.csv --voc-annotations \\
      --split path --output out/acne04
  {PROG} --input 'gs://B/shards/*.tar' --output gs://B/datasets/run1 --runner DataflowRunner \\
      --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py
  {PROG} --input runs/sample --output runs/local/dataset --resume   # finish a killed run
"""


def patch_rows_of(face: Mapping[str, Any]) -> int:
    """The patch rows a face's faces/ row promises (what --resume checks before carrying it over)."""
    return face["patch_count"] if face["status"] == KEPT else 0


def build(p: beam.Pipeline, config: DatasetConfig, prepared: Prepared) -> JobOutputs:
    """Compose the job's stages on ``p``."""
    split = AssignSplit(config.split, config.split_fractions)
    segmented, failures, inputs = segmented_faces(p, config, prepared, split)
    faces, filtered = segmented | "FilterFaces" >> FilterFaces(config.min_face_skin)
    patched, no_patch = faces | "CutPatches" >> CutPatches(
        config.patch_size, config.stride, config.min_patch_skin, config.blackout_background
    )
    rows, kept = patched | "EncodePatches" >> EncodePatchRows(
        config.patch_format, config.jpeg_quality, config.png_compression, prepared.segmenter_sha256
    )
    samples = segmented | "SampleFaces" >> SampleFaces(
        partial(build_ranks, min_face_skin=config.min_face_skin), BUILD_GROUPS, tint_skin=True
    )
    by_split = rows | "BySplit" >> beam.Partition(lambda row, n: SPLITS.index(row["split"]), len(SPLITS))
    files = [
        part | f"Write{name.title()}Patches" >> WriteParquet(
            config.output, f"{PATCHES_DIR}/{name}", PATCH_SCHEMA,
            rows_per_group=PATCH_ROWS_PER_GROUP, compression="none", run=prepared.run.run,
            rows_per_file=PATCH_ROWS_PER_FILE,
        )
        for name, part in zip(SPLITS, by_split)
    ]
    return JobOutputs(inputs, [*failures, filtered, no_patch, kept], files, samples)


def run(argv: Optional[Sequence[str]] = None, pipeline: Optional[beam.Pipeline] = None) -> dict[str, Any]:
    """Run the job; returns the manifest. ``pipeline`` lets tests pass a ``TestPipeline``."""
    flags, options = parse(argv, OPTION_GROUPS, PROG, DESCRIPTION, EXAMPLES)
    config = DatasetConfig.from_flags(flags)
    prepared = prepare(config, options)
    with OutputHold(prepared.lock, options) as hold:
        checkpoints = {"segmenter": {"uri": config.segmenter_checkpoint, "sha256": prepared.segmenter_sha256}}
        prepared = start(config, prepared, "build_dataset", checkpoints, {PATCHES_DIR: patch_rows_of})
        p = pipeline or beam.Pipeline(options=options)
        tables = [f"{PATCHES_DIR}/{s}" for s in SPLITS]
        with ShowProgress(workers_run_here(options), skipped=prepared.run.carried_images) as progress:
            prepared = replace(prepared, progress=progress.folder)
            finish_job(config, argv, "build_dataset", checkpoints, tables, build(p, config, prepared), prepared)
            result = hold.submit(p, progress.run)
        return complete(result, config.output)


if __name__ == "__main__":
    cli(run)
