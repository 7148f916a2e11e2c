"""The Ray Data peer: each job as the Ray Data pipeline a user would write instead of Beam.

``from_items`` (the input paths) -> ``map_batches`` with a callable class that holds the
model(s), one actor per core -> ``write_parquet``. The actors do what the reference loop
and the Beam DoFns do, with the same per-record functions: read, ``assign_split`` (build),
``decode_record`` and ``at_working_resolution`` (score), ``Segmenter.predict_masks``, ``filter_face``, ``patch_face``, then
``encode_patches`` (build) or ``Classifier.predict_patches``, ``judge_faces`` and
``score_row`` (score). Each batch comes back as one Arrow table whose rows are either a
result row (a patch or a score) or a faces/ row; the dataset is materialised once and each
kind written to its own folder, so nothing is computed twice.

Ray is a bench-only extra (``pip install -e .[bench]``), never a dependency of the jobs.

    python -m bench.ray_peer build|score --input DIR --output OUT --json result.json [--workers K] [job flags]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from models.classifier import Classifier
from models.dataset import FACES_DIR, OUTCOME_SCHEMA, PATCH_SCHEMA, PATCHES_DIR, SCORE_SCHEMA, SCORES_DIR
from models.segmenter import Segmenter
from pipelines import build_dataset, score
from pipelines.config import DatasetConfig, JobConfig, ScoreConfig
from pipelines.options import parse
from transforms.classify import judge_faces, score_row, scored_outcome, unscored_row
from transforms.finish import outcome_row
from transforms.patches import encode_patches
from transforms.records import FAILED, FILTERED, KEPT, ImageRecord, Outcome, Step
from transforms.segment import with_mask
from transforms.sidefiles import image_id_from_name
from transforms.split import assign_split

from bench.reference import decode_steps, face_steps, image_files, print_result, run_steps

# The column of a batch's table that holds faces/ rows; the other holds the job's result rows.
FACE = "face"


class Faces:
    """Read, decode, segment, filter and tile a batch of paths: what both jobs' actors share."""

    def __init__(self, config: JobConfig, *after_read: Step):
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.segmenter = Segmenter.load(config.segmenter_checkpoint, config.device)
        self.after_read, self.decode, self.steps = after_read, decode_steps(config), face_steps(config)

    def faces(self, paths: Sequence[str]) -> tuple[list[ImageRecord], list[Outcome]]:
        """The batch's faces with patches, and the Outcomes of the inputs that ended before that."""
        decoded, ended = [], []
        for path in paths:
            with open(path, "rb") as f:
                record = run_steps(ImageRecord(image_id_from_name(path), path, data=f.read()), self.after_read)
            if not isinstance(record, Outcome):
                record = run_steps(record, self.decode)
            (ended if isinstance(record, Outcome) else decoded).append(record)
        faces = []
        if decoded:
            for record, mask in zip(decoded, self.segmenter.predict_masks([r.pixels for r in decoded])):
                face = run_steps(with_mask(record, mask), self.steps)
                (ended if isinstance(face, Outcome) else faces).append(face)
        return faces, ended


def union(result: str, schema: pa.Schema, rows: list[dict[str, Any]], outcomes: Sequence[Outcome]) -> pa.Table:
    """One table for a batch: ``result`` rows then faces/ rows, each kind in its own struct column."""
    results = pa.array(rows + [None] * len(outcomes), pa.struct(schema))
    faces = pa.array([None] * len(rows) + [outcome_row(o) for o in outcomes], pa.struct(OUTCOME_SCHEMA))
    return pa.table({result: results, FACE: faces})


def rows_of(table: pa.Table, column: str) -> pa.Table:
    """The rows of one kind, as a flat table."""
    kept = table.filter(pc.is_valid(table[column]))[column].combine_chunks()
    return pa.Table.from_struct_array(kept)


class BuildFaces(Faces):
    """build_dataset's work on a batch of paths: patch rows and faces/ rows."""

    def __init__(self, config: DatasetConfig):
        super().__init__(config, partial(assign_split, mode=config.split, fractions=config.split_fractions))
        self.encoding = (config.patch_format, config.jpeg_quality, config.png_compression, self.segmenter.sha256)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        faces, outcomes = self.faces(batch["path"])
        rows = []
        for face in faces:
            patch_rows, kept = encode_patches(face, *self.encoding)
            rows += patch_rows
            outcomes.append(kept)
        return union("patch", PATCH_SCHEMA, rows, outcomes)


class ScoreFaces(Faces):
    """score's work on a batch of paths: score rows and faces/ rows."""

    def __init__(self, config: ScoreConfig):
        super().__init__(config)
        self.classifier = Classifier.load(config.classifier_checkpoint, config.device)
        self.shas = (self.segmenter.sha256, self.classifier.sha256)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        faces, outcomes = self.faces(batch["path"])
        # As in the job, a face without usable skin still gets its row in scores/.
        rows = [unscored_row(o, *self.shas) for o in outcomes if o.status == FILTERED]
        if faces:
            patches = [p.pixels for f in faces for p in f.patches]
            lesions, grades = self.classifier.predict_patches(patches, self.config.classifier_batch_size)
            for scored in judge_faces(self.classifier, faces, lesions, grades, self.config.verdict_threshold,
                                      self.config.classifier_batch_size):
                rows.append(score_row(scored, self.config.top_patches, *self.shas))
                outcomes.append(scored_outcome(scored))
        return union("score", SCORE_SCHEMA, rows, outcomes)


def run(job: str, config: JobConfig, workers: int) -> dict[str, int]:
    """The Ray Data pipeline on a local Ray of ``workers`` CPUs; the inputs' counts, as the loop's."""
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        udf, result, folder, compression = (
            (BuildFaces, "patch", PATCHES_DIR, "none") if job == "build" else (ScoreFaces, "score", SCORES_DIR, "zstd")
        )
        paths = image_files(config.input)
        done = ray.data.from_items([{"path": p} for p in paths]).map_batches(
            udf, fn_constructor_kwargs={"config": config}, batch_size=config.batch_size, concurrency=workers,
            num_cpus=1, batch_format="numpy",
        ).materialize()
        out = Path(config.output)
        written = {}
        for column, where, how in ((result, out / folder, compression), (FACE, out / FACES_DIR, "zstd")):
            rows = done.map_batches(partial(rows_of, column=column), batch_format="pyarrow", zero_copy_batch=True)
            # build_dataset's patches go to one folder per split, as the job's do.
            partitions = ["split"] if column == "patch" else None
            rows.write_parquet(str(where), partition_cols=partitions, compression=how)
            written[column] = rows
        faces = written[FACE].select_columns(["status", "patch_count"]).to_pandas()
    finally:
        ray.shutdown()
    counts = {"inputs": len(paths), KEPT: 0, FILTERED: 0, FAILED: 0}
    counts.update(faces["status"].value_counts().to_dict())
    counts["patches"] = int(faces.loc[faces["status"] == KEPT, "patch_count"].sum())
    return counts


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run one job on Ray Data; print (and optionally write) its counts and time as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("job", choices=("build", "score"))
    own.add_argument("--json", default=None)
    own.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    mine, rest = own.parse_known_args(argv)
    # The jobs' own flag groups: same flags, same defaults.
    groups = build_dataset.OPTION_GROUPS if mine.job == "build" else score.OPTION_GROUPS
    flags, _ = parse(rest, groups, f"python -m bench.ray_peer {mine.job}", __doc__)
    config = DatasetConfig.from_flags(flags) if mine.job == "build" else ScoreConfig.from_flags(flags)
    started = time.perf_counter()
    counts = run(mine.job, config, mine.workers)
    result = {
        "job": mine.job,
        "workers": mine.workers,
        "seconds": time.perf_counter() - started,
        "counts": counts,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print_result(result, mine.json)
    return result


if __name__ == "__main__":
    main()
