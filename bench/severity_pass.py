"""What a severity network costs: the score loop with and without it, every face called acne.

A bundled classifier (``models.classifier.bundle``) grades each acne face with a second
network, which is one more forward pass over the face's patches. Clear faces cost nothing
more. This runs the score loop (``bench.reference``) on the benchmark's 1024² faces with the
verdict threshold at its floor, so that every face takes the second pass. That is the worst
case, an archive of acne faces only. The reference is the same loop with the bundle's verdict
network alone. The two run alternately, in the same run, and the figure is the ratio of their
seconds per image.

    python -m bench.severity_pass [--images 48] [--repeats 3] [--classifier-checkpoint C] [--json OUT]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.inputs import make_inputs
from bench.reference import print_result, run_shard
from models import defaults
from models.classifier import Classifier
from pipelines import score
from pipelines.config import ScoreConfig
from pipelines.options import parse

# The least threshold a config accepts: every face with a patch is called acne.
EVERY_FACE_ACNE = "1e-9"


def verdict_network_alone(bundle: str, out: str) -> str:
    """Write ``bundle``'s verdict network without its severity network to ``out``; return ``out``."""
    clf = Classifier.load(bundle)
    if clf.severity_model is None:
        raise ValueError(f"{bundle} has no severity network to measure; build one with python -m models.classifier.bundle")
    Classifier(clf.network, replace(clf.cfg, severity_network_sha256="")).save(out)
    return out


def timed_loop(images: str, output: str, checkpoint: str, segmenter: str) -> dict[str, Any]:
    """One in-process score loop over ``images``: seconds, counts and seconds per stage."""
    flags, _ = parse(["--input", images, "--output", output, "--overwrite", "--classifier-checkpoint", checkpoint,
                      "--segmenter-checkpoint", segmenter, "--verdict-threshold", EVERY_FACE_ACNE,
                      "--torch-threads", "1"], score.OPTION_GROUPS, "bench.severity_pass", __doc__)
    started = time.perf_counter()
    shard = run_shard("score", ScoreConfig.from_flags(flags), (0, 1))
    return {"seconds": time.perf_counter() - started, "counts": shard["counts"], "detail_s": shard["detail_s"]}


def measure(images: int, repeats: int, checkpoint: str, segmenter: str, workdir: str) -> dict[str, Any]:
    """Alternate the two loops ``repeats`` times; medians and their ratio."""
    work = Path(workdir)
    make_inputs(work / "inputs", images)
    alone = verdict_network_alone(checkpoint, str(work / "verdict_alone"))
    variants = {"verdict network alone": alone, "with the severity network": checkpoint}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, ckpt in variants.items():
            runs[name].append(timed_loop(str(work / "inputs"), str(work / f"out_{repeat}"), ckpt, segmenter))
    scored = runs["with the severity network"][0]["counts"]["kept"]
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    return {
        "images": images,
        "faces_scored": scored,
        "repeats": repeats,
        "checkpoint": checkpoint,
        "median_seconds": median,
        "ratio": median["with the severity network"] / median["verdict network alone"],
        "runs": runs,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.severity_pass", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=48, help="benchmark faces to score (1024² PNGs made at run time)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop; medians are compared")
    p.add_argument("--classifier-checkpoint", default=defaults.CLASSIFIER, help="a classifier with a severity network")
    p.add_argument("--segmenter-checkpoint", default=defaults.SEGMENTER)
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.images, args.repeats, args.classifier_checkpoint, args.segmenter_checkpoint,
                         args.workdir or tmp)
    print_result(result, args.json)
    return result


if __name__ == "__main__":
    main()
