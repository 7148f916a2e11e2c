"""The floor: each job's work as a plain single-process Python loop, with no Beam.

It is the loop a user could write by hand from the project's own functions: read the
bytes, ``decode_image``, the segmenter's ``preprocess`` / network / ``masks_from_probs``
(that is ``predict_masks``, split so each stage can be timed), filter, ``cut_patches``,
then ``encode_rgb`` / ``encode_mask`` and pyarrow (build_dataset) or the classifier and
``score_row`` (score). It takes the jobs' own flags with the jobs' own defaults, so a
benchmark compares like with like. ``time.perf_counter`` brackets every stage.

    python -m bench.reference build --input DIR --output OUT --json result.json [job flags]
    python -m bench.reference score --input DIR --output OUT --json result.json [job flags]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
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
from transforms.classify import judge_faces, score_row
from transforms.decode import DecodeError, decode_image
from transforms.patches import cut_patches, encode_mask, encode_rgb, lesion_count, patch_id
from transforms.read import expand_pattern, image_id_from_name, shard_kind
from transforms.records import FAILED, FILTERED, KEPT, ImageRecord, Outcome
from transforms.split import hash_split
from transforms.write import RowGroupWriter, outcome_row

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


def classify(model: Classifier, patches: Sequence[np.ndarray], batch_size: int, clock: StageClock) -> np.ndarray:
    """``Classifier.forward_patches`` + ``lesions_from_outputs``, one stage at a time."""
    outputs = []
    for start in range(0, len(patches), batch_size):
        with clock("resize.classifier"):
            chunk = torch.from_numpy(np.stack([model.preprocess(p) for p in patches[start : start + batch_size]]))
        with clock("inference.classifier"), torch.inference_mode():
            outputs.append(model.network(chunk.to(model.device)).float().cpu().numpy())
    with clock("encode"):
        return model.lesions_from_outputs(np.concatenate(outputs))


def image_files(patterns: Sequence[str]) -> list[str]:
    return sorted(f for p in patterns for f in expand_pattern(p) if shard_kind(f) == "image")


class Loop:
    """What both loops share: files in, decoded batches, masks, faces filtered and tiled."""

    def __init__(self, args: JobConfig, clock: StageClock):
        self.args, self.clock = args, clock
        self.segmenter = Segmenter.load(args.segmenter_checkpoint, args.device)
        out = Path(args.output)
        self.faces = RowGroupWriter(str(out / FACES_DIR / "part-00000.parquet"), OUTCOME_SCHEMA, 256, "zstd")
        self.counts = {"inputs": 0, KEPT: 0, FILTERED: 0, FAILED: 0, "patches": 0}

    def outcome(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        with self.clock("write"):
            self.faces.add([outcome_row(outcome)])

    def faces_with_patches(self) -> Iterator[ImageRecord]:
        """Decode, segment in batches of --batch-size, filter, tile; yield faces that have patches."""
        batch: list[ImageRecord] = []
        for path in image_files(self.args.input):
            self.counts["inputs"] += 1
            image_id = image_id_from_name(path)
            with self.clock("read"):
                with open(path, "rb") as f:
                    data = f.read()
            try:
                with self.clock("decode"):
                    pixels = decode_image(data, self.args.max_pixels, self.args.patch_size)
            except DecodeError as exc:
                self.outcome(Outcome.failed(image_id, path, "decode", exc))
                continue
            batch.append(ImageRecord(image_id, path, pixels=pixels))
            if len(batch) == self.args.batch_size:
                yield from self._segment(batch)
                batch = []
        if batch:
            yield from self._segment(batch)

    def _segment(self, batch: list[ImageRecord]) -> Iterator[ImageRecord]:
        a = self.args
        for record, mask in zip(batch, segment(self.segmenter, [r.pixels for r in batch], self.clock)):
            skin = float(mask.mean())
            if skin < a.min_face_skin:
                reason = f"skin fraction {skin:.3f} is under --min-face-skin {a.min_face_skin}"
                self.outcome(Outcome(record.image_id, record.source_uri, FILTERED, "filter_faces", reason, skin_fraction=skin))
                continue
            with self.clock("patch"):
                patches = tuple(
                    cut_patches(record.pixels, mask, a.patch_size, a.stride, a.min_patch_skin, a.blackout_background)
                )
            if not patches:
                self.outcome(Outcome(record.image_id, record.source_uri, FILTERED, "patch",
                                     "no patch reaches --min-patch-skin", skin_fraction=skin))
                continue
            self.counts["patches"] += len(patches)
            yield ImageRecord(record.image_id, record.source_uri, skin_fraction=skin, patches=patches)


def run_build(args: DatasetConfig, clock: StageClock) -> Loop:
    loop = Loop(args, clock)
    fractions = args.split_fractions
    out = Path(args.output) / PATCHES_DIR
    sinks: dict[str, RowGroupWriter] = {}
    sha = loop.segmenter.sha256
    encoding = (args.patch_format, args.jpeg_quality, args.png_compression)
    for face in loop.faces_with_patches():
        split = hash_split(face.image_id, fractions)
        with clock("encode"):
            rows = []
            for patch in face.patches:
                pid = patch_id(face.image_id, patch)
                rows.append({
                    "image_id": face.image_id, "patch_id": pid, "split": split, "label": None,
                    "x": patch.x, "y": patch.y, "size": patch.size, "skin_fraction": patch.skin_fraction,
                    "lesion_count": lesion_count(None, patch),
                    "image": {"bytes": encode_rgb(patch.pixels, *encoding), "path": f"{pid}.{args.patch_format}"},
                    "mask": {"bytes": encode_mask(patch.mask), "path": f"{pid}.mask.png"},
                    "source_uri": face.source_uri, "segmenter_sha256": sha,
                })
        with clock("write"):
            if split not in sinks:
                sinks[split] = RowGroupWriter(
                    str(out / split / "part-00000.parquet"), PATCH_SCHEMA, build_dataset.PATCH_ROWS_PER_GROUP, "none"
                )
            sinks[split].add(rows)
        loop.outcome(Outcome(face.image_id, face.source_uri, KEPT, "patch", skin_fraction=face.skin_fraction,
                             patch_count=len(face.patches), split=split))
    with clock("write"):
        for sink in sinks.values():
            sink.close()
        loop.faces.close()
    return loop


def run_score(args: ScoreConfig, clock: StageClock) -> Loop:
    loop = Loop(args, clock)
    classifier = Classifier.load(args.classifier_checkpoint, args.device)
    shas = (loop.segmenter.sha256, classifier.sha256)
    scores = RowGroupWriter(str(Path(args.output) / SCORES_DIR / "part-00000.parquet"), SCORE_SCHEMA, 256, "zstd")
    pending: list[ImageRecord] = []

    def flush() -> None:
        lesions = classify(classifier, [p.pixels for f in pending for p in f.patches], args.classifier_batch_size, clock)
        with clock("encode"):
            scored_faces = judge_faces(classifier, pending, lesions, args.verdict_threshold)
        for face, scored in zip(pending, scored_faces):
            with clock("encode"):
                row = score_row(scored, args.top_patches, *shas)
            with clock("write"):
                scores.add([row])
            loop.outcome(Outcome(face.image_id, face.source_uri, KEPT, "classify", skin_fraction=face.skin_fraction,
                                 patch_count=len(face.patches)))
        pending.clear()

    # Faces share a classifier batch up to --classifier-batch-size patches, as in the job.
    for face in loop.faces_with_patches():
        if pending and sum(len(f.patches) for f in pending) + len(face.patches) > args.classifier_batch_size:
            flush()
        pending.append(face)
    if pending:
        flush()
    with clock("write"):
        scores.close()
        loop.faces.close()
    return loop


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run one loop; print (and optionally write) its timings as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("job", choices=("build", "score"))
    own.add_argument("--json", default=None)
    mine, rest = own.parse_known_args(argv)
    # The jobs' own flag groups: same flags, same defaults.
    groups = build_dataset.OPTION_GROUPS if mine.job == "build" else score.OPTION_GROUPS
    flags, _ = parse(rest, groups, f"python -m bench.reference {mine.job}", __doc__)
    config = DatasetConfig.from_flags(flags) if mine.job == "build" else ScoreConfig.from_flags(flags)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    clock = StageClock()
    started = time.perf_counter()
    loop = (run_build if mine.job == "build" else run_score)(config, clock)
    seconds = time.perf_counter() - started
    result = {
        "job": mine.job,
        "seconds": seconds,
        "counts": loop.counts,
        "stages_s": clock.by_stage(),
        "detail_s": dict(clock.seconds),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    text = json.dumps(result, indent=2)
    if mine.json:
        Path(mine.json).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
