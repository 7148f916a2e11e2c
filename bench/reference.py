"""The floor: each job's work as a plain single-process Python loop, with no Beam.

It is the loop a user could write by hand from the project's own functions: read the
bytes, ``assign_split`` (build), ``decode_record`` and ``at_working_resolution`` (score), the segmenter's ``preprocess`` / network /
``masks_from_probs`` (that is ``predict_masks``, split so each stage can be timed), then the
jobs' own per-record steps (``filter_face``, ``patch_face``, ``encode_patches``)
and pyarrow (build_dataset) or the classifier, ``judge_faces``, ``score_row`` and
``scored_outcome`` (score). The stages' functions are the ones the Beam DoFns call, so the
loop cannot drift from the job. It takes the jobs' own flags with the jobs' own defaults,
so a benchmark compares like with like. ``time.perf_counter`` brackets every stage.

``--workers K`` is the hand-written multi-process peer: K forked processes, one per core,
each running the same loop over every K-th input file into its own ``part-0000i`` files.

``decode`` is the CPU decode floor: each file read and decoded exactly as the jobs do, and
nothing else. No job can outrun it on this host, whatever its accelerator.

    python -m bench.reference build --input DIR --output OUT --json result.json [job flags]
    python -m bench.reference score --input DIR --output OUT --json result.json [--workers K] [job flags]
    python -m bench.reference decode --input DIR --output OUT --json result.json [--workers K]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from models.classifier import Classifier
from models.dataset import (
    FACES_DIR, OUTCOME_SCHEMA, PATCH_SCHEMA, PATCHES_DIR, SCORE_SCHEMA, SCORES_DIR,
)
from models.segmenter import Segmenter
from pipelines import build_dataset, score
from pipelines.config import DatasetConfig, JobConfig, ScoreConfig
from pipelines.options import parse
from transforms.classify import judge_faces, score_row, scored_outcome, unscored_row
from transforms.decode import decode_record
from transforms.finish import outcome_row
from transforms.patches import encode_patches, filter_face, patch_face
from transforms.plan import input_files, shard_kind
from transforms.records import FAILED, FILTERED, KEPT, ImageRecord, Outcome, Step
from transforms.resolution import at_working_resolution
from transforms.segment import with_mask
from transforms.sidefiles import image_id_from_name
from transforms.sink import RowGroupWriter
from transforms.split import assign_split

STAGES = ("read", "decode", "resize", "inference", "upsample", "patch", "encode", "write")


class StageClock:
    """Seconds spent per stage; a key ``stage.detail`` also counts towards ``stage``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - start

    def by_stage(self) -> dict[str, float]:
        totals = dict.fromkeys(STAGES, 0.0)
        for key, seconds in self.seconds.items():
            totals[key.split(".")[0]] += seconds
        return totals


def segment(model: Segmenter, images: Sequence[np.ndarray], clock: StageClock) -> list[np.ndarray]:
    """``Segmenter.predict_masks``, one stage at a time."""
    with clock("resize"):
        batch = model.batch(images)
    with clock("inference"):
        probs = model.probs_from_batch(batch)
    with clock("upsample"):
        return model.masks_from_probs(probs, [im.shape for im in images])


def classify(model: Classifier, patches: Sequence[np.ndarray], batch_size: int,
             clock: StageClock) -> tuple[np.ndarray, np.ndarray]:
    """``Classifier.predict_patches``, one stage at a time: expected lesions and grade probabilities."""
    outputs = []
    for start in range(0, len(patches), batch_size):
        with clock("resize.classifier"):
            chunk = np.stack([model.preprocess(p) for p in patches[start : start + batch_size]])
        with clock("inference.classifier"):
            outputs.append(model.forward_batch(chunk))
    with clock("encode"):
        joined = np.concatenate(outputs)
        return model.lesions_from_outputs(joined), model.grades_from_outputs(joined)


def image_files(patterns: Sequence[str]) -> list[str]:
    return sorted(f for p in patterns for f, _ in input_files(p) if shard_kind(f) == "image")


def run_steps(record: ImageRecord, steps: Sequence[Step]) -> ImageRecord | Outcome:
    """The job's per-record steps in order, up to the first Outcome."""
    result: ImageRecord | Outcome = record
    for step in steps:
        result = step(result)
        if isinstance(result, Outcome):
            break
    return result


def decode_steps(args: JobConfig) -> tuple[Step, ...]:
    """The jobs' steps from an image's bytes to its working pixels: decode, then (score with
    ``--working-resolution auto``) halve the enlarged ones."""
    decode = partial(decode_record, max_pixels=args.max_pixels, min_size=args.patch_size)
    halve = isinstance(args, ScoreConfig) and args.working_resolution == "auto"
    return (decode, at_working_resolution) if halve else (decode,)


def face_steps(args: JobConfig) -> tuple[Step, Step]:
    """The jobs' steps after segmentation: drop faces with too little skin, tile the rest."""
    return (
        partial(filter_face, min_face_skin=args.min_face_skin),
        partial(patch_face, size=args.patch_size, stride=args.stride, min_skin=args.min_patch_skin,
                blackout=args.blackout_background),
    )


class Loop:
    """What both loops share: files in, decoded batches, masks, faces filtered and tiled."""

    def __init__(self, args: JobConfig, clock: StageClock, shard: tuple[int, int], *after_read: Step):
        """``shard`` is (index, count): this loop takes every count-th file from index; ``after_read``
        are the job's steps between reading an image and decoding it."""
        self.args, self.clock = args, clock
        self.shard = shard
        self.part = f"part-{shard[0]:05d}.parquet"
        self.segmenter = Segmenter.load(args.segmenter_checkpoint, args.device)
        self.after_read = after_read
        self.decode = decode_steps(args)
        self.steps = face_steps(args)
        out = Path(args.output)
        self.faces = RowGroupWriter(str(out / FACES_DIR / self.part), OUTCOME_SCHEMA, 256, "zstd")
        self.counts = {"inputs": 0, KEPT: 0, FILTERED: 0, FAILED: 0, "patches": 0}

    def outcome(self, outcome: Outcome) -> None:
        """Count and write one input's fate; patches count from kept outcomes, as in the job's manifest."""
        self.counts[outcome.status] += 1
        self.counts["patches"] += outcome.patch_count
        with self.clock("write"):
            self.faces.add([outcome_row(outcome)])

    def faces_with_patches(self) -> Iterator[ImageRecord | Outcome]:
        """Read, split, decode, segment in batches of --batch-size, filter, tile: faces with patches, or why not."""
        batch: list[ImageRecord] = []
        index, count = self.shard
        for path in image_files(self.args.input)[index::count]:
            self.counts["inputs"] += 1
            with self.clock("read"):
                with open(path, "rb") as f:
                    record = run_steps(ImageRecord(image_id_from_name(path), path, data=f.read()), self.after_read)
            if isinstance(record, Outcome):
                yield record
                continue
            with self.clock("decode"):
                decoded = run_steps(record, self.decode)
            if isinstance(decoded, Outcome):
                yield decoded
                continue
            batch.append(decoded)
            if len(batch) == self.args.batch_size:
                yield from self._segment(batch)
                batch = []
        if batch:
            yield from self._segment(batch)

    def _segment(self, batch: list[ImageRecord]) -> Iterator[ImageRecord | Outcome]:
        for record, mask in zip(batch, segment(self.segmenter, [r.pixels for r in batch], self.clock)):
            segmented = with_mask(record, mask)
            with self.clock("patch"):
                result = run_steps(segmented, self.steps)
            yield result


def run_build(args: DatasetConfig, clock: StageClock, shard: tuple[int, int] = (0, 1)) -> Loop:
    loop = Loop(args, clock, shard, partial(assign_split, mode=args.split, fractions=args.split_fractions))
    out = Path(args.output) / PATCHES_DIR
    sinks: dict[str, RowGroupWriter] = {}
    encoding = (args.patch_format, args.jpeg_quality, args.png_compression, loop.segmenter.sha256)
    for face in loop.faces_with_patches():
        if isinstance(face, Outcome):
            loop.outcome(face)
            continue
        with clock("encode"):
            rows, kept = encode_patches(face, *encoding)
        with clock("write"):
            if face.split not in sinks:
                sinks[face.split] = RowGroupWriter(
                    str(out / face.split / loop.part), PATCH_SCHEMA, build_dataset.PATCH_ROWS_PER_GROUP,
                    "none",
                )
            sinks[face.split].add(rows)
        loop.outcome(kept)
    with clock("write"):
        for sink in sinks.values():
            sink.close()
        loop.faces.close()
    return loop


def run_score(args: ScoreConfig, clock: StageClock, shard: tuple[int, int] = (0, 1)) -> Loop:
    loop = Loop(args, clock, shard)
    classifier = Classifier.load(args.classifier_checkpoint, args.device)
    shas = (loop.segmenter.sha256, classifier.sha256)
    scores = RowGroupWriter(str(Path(args.output) / SCORES_DIR / loop.part), SCORE_SCHEMA, 256, "zstd")
    pending: list[ImageRecord] = []

    def flush() -> None:
        lesions, grades = classify(classifier, [p.pixels for f in pending for p in f.patches],
                                   args.classifier_batch_size, clock)
        # Judging is arithmetic, but it includes the severity network's pass over the acne faces.
        with clock("inference"):
            scored_faces = judge_faces(classifier, pending, lesions, grades, args.verdict_threshold,
                                       args.classifier_batch_size)
        for scored in scored_faces:
            with clock("encode"):
                row = score_row(scored, args.top_patches, *shas)
            with clock("write"):
                scores.add([row])
            loop.outcome(scored_outcome(scored))
        pending.clear()

    for face in loop.faces_with_patches():
        if isinstance(face, Outcome):
            # As in the job, a face without usable skin still gets its row in scores/.
            if face.status == FILTERED:
                with clock("write"):
                    scores.add([unscored_row(face, *shas)])
            loop.outcome(face)
            continue
        # Faces share a classifier batch up to --classifier-batch-size patches, as in the job.
        if pending and sum(len(f.patches) for f in pending) + len(face.patches) > args.classifier_batch_size:
            flush()
        pending.append(face)
    if pending:
        flush()
    with clock("write"):
        scores.close()
        loop.faces.close()
    return loop


def run_decode(args: DatasetConfig, clock: StageClock, shard: tuple[int, int] = (0, 1)) -> dict[str, int]:
    """The decode floor's loop: read and decode every file of the shard, keep nothing; the counts."""
    counts = {"inputs": 0, KEPT: 0, FILTERED: 0, FAILED: 0, "patches": 0}
    index, count = shard
    for path in image_files(args.input)[index::count]:
        counts["inputs"] += 1
        with clock("read"):
            with open(path, "rb") as f:
                record = ImageRecord(image_id_from_name(path), path, data=f.read())
        with clock("decode"):
            decoded = decode_record(record, args.max_pixels, args.patch_size)
        counts[FAILED if isinstance(decoded, Outcome) else KEPT] += 1
    return counts


def run_shard(job: str, config: JobConfig, shard: tuple[int, int]) -> dict[str, Any]:
    """One process's loop over its shard of the input: counts, per-stage seconds, threads, peak RSS."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    clock = StageClock()
    if job == "decode":
        counts = run_decode(config, clock, shard)
    else:
        counts = (run_build if job == "build" else run_score)(config, clock, shard).counts
    return {
        "counts": counts,
        "detail_s": dict(clock.seconds),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_shards(job: str, config: JobConfig, workers: int) -> list[dict[str, Any]]:
    """``workers`` forked processes, one shard each.

    Forked, not spawned: the children inherit the imports, the cheapest start a hand-written
    loop can have, so the peer is as strong as it can be. No torch op has run in the parent
    yet, so no OpenMP pool is forked mid-use.
    """
    if workers == 1:
        return [run_shard(job, config, (0, 1))]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(run_shard, [job] * workers, [config] * workers, [(i, workers) for i in range(workers)]))


def print_result(result: dict[str, Any], path: Optional[str]) -> None:
    """Print a run's result as JSON, and write it to ``path`` too when given."""
    text = json.dumps(result, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run one loop (or ``--workers`` of them); print (and optionally write) its timings as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("job", choices=("build", "score", "decode"))
    own.add_argument("--json", default=None)
    own.add_argument("--workers", type=int, default=1)
    mine, rest = own.parse_known_args(argv)
    # The jobs' own flag groups: same flags, same defaults.
    groups = score.OPTION_GROUPS if mine.job == "score" else build_dataset.OPTION_GROUPS
    flags, _ = parse(rest, groups, f"python -m bench.reference {mine.job}", __doc__)
    config = ScoreConfig.from_flags(flags) if mine.job == "score" else DatasetConfig.from_flags(flags)
    started = time.perf_counter()
    shards = run_shards(mine.job, config, mine.workers)
    seconds = time.perf_counter() - started
    # Stage seconds add up over the processes: per image they are process time, not wall time.
    clock = StageClock()
    counts: dict[str, int] = defaultdict(int)
    for shard in shards:
        for key, value in shard["detail_s"].items():
            clock.seconds[key] += value
        for key, value in shard["counts"].items():
            counts[key] += value
    result = {
        "job": mine.job,
        "workers": mine.workers,
        "seconds": seconds,
        "counts": dict(counts),
        "stages_s": clock.by_stage(),
        "detail_s": dict(clock.seconds),
        "torch_threads": shards[0]["torch_threads"],
        "peak_rss_mb": max(shard["peak_rss_mb"] for shard in shards),
    }
    print_result(result, mine.json)
    return result


if __name__ == "__main__":
    main()
