"""Does an image's result depend on the images that share its batch?

Runs the shipped segmenter and classifier over the same benchmark faces and patches grouped in
different ways (each alone, all at once, random batch sizes) and compares every grouping with
each input run alone: the largest output difference, the mask pixels and masks that change, and
how many patches' expected lesions change. "fixed passes" runs ``Segmenter.probs_from_batch`` and
``Classifier.forward_batch`` (padded, fixed-size passes on a GPU); "as given" feeds the network
each batch as it comes, which is what the jobs did before.

    python -m bench.batching --device cuda --images 64 --json out/batching.json

On a GPU it does this with cuDNN's TF32 convolutions on (torch's default) and off. Findings in
bench/README.md, "Same rows on a GPU".
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from bench.inputs import _one, sources
from models import defaults
from models.classifier import Classifier
from models.segmenter import Segmenter

log = logging.getLogger("bench.batching")

Forward = Callable[[np.ndarray], np.ndarray]


def groupings(count: int, largest: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Batch sizes that cover ``count`` inputs: each alone, all at once, and two random mixes."""
    def mixed() -> list[int]:
        sizes: list[int] = []
        while sum(sizes) < count:
            sizes.append(min(int(rng.integers(1, largest + 1)), count - sum(sizes)))
        return sizes
    return {"one at a time": [1] * count, "all at once": [count], "random sizes": mixed(), "random sizes again": mixed()}


def grouped(forward: Forward, batch: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``forward`` over ``batch`` cut into consecutive batches of ``sizes``."""
    edges = np.cumsum([0, *sizes])
    return np.concatenate([forward(batch[a:b]) for a, b in zip(edges[:-1], edges[1:])])


def compare(forward: Forward, batch: np.ndarray, sizes: dict[str, list[int]],
            judge: Callable[[np.ndarray, np.ndarray], dict[str, Any]]) -> dict[str, Any]:
    """Every grouping against the inputs run one at a time."""
    alone = grouped(forward, batch, sizes["one at a time"])
    result = {}
    for name, cut in sizes.items():
        if name == "one at a time":
            continue
        out = grouped(forward, batch, cut)
        result[name] = {"max_abs_diff": float(np.abs(out - alone).max()), "identical": bool(np.array_equal(out, alone)),
                        **judge(out, alone)}
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=48, help="benchmark faces to segment (default: %(default)s)")
    parser.add_argument("--patches", type=int, default=512, help="patches to classify (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segmenter-checkpoint", default=defaults.SEGMENTER)
    parser.add_argument("--classifier-checkpoint", default=defaults.CLASSIFIER)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rng = np.random.default_rng(args.seed)
    photos = sources()
    images = [_one(photos, args.seed, i) for i in range(args.images)]
    seg = Segmenter.load(args.segmenter_checkpoint, args.device)
    clf = Classifier.load(args.classifier_checkpoint, args.device)
    size = clf.cfg.input_size
    corners = rng.integers(0, images[0].shape[0] - size, (args.patches, 2))
    patches = [images[i % len(images)][y : y + size, x : x + size] for i, (y, x) in enumerate(corners)]
    seg_batch = seg.batch(images)
    clf_batch = np.stack([clf.preprocess(p) for p in patches])
    shapes = [im.shape for im in images]

    def masks(out: np.ndarray, alone: np.ndarray) -> dict[str, Any]:
        changed = [int((a != b).sum()) for a, b in zip(seg.masks_from_probs(out, shapes), seg.masks_from_probs(alone, shapes))]
        return {"mask_pixels_changed": sum(changed), "masks_changed": sum(c > 0 for c in changed)}

    def lesions(out: np.ndarray, alone: np.ndarray) -> dict[str, Any]:
        changed = clf.lesions_from_outputs(out) != clf.lesions_from_outputs(alone)
        return {"patch_lesions_changed": int(changed.sum())}

    def as_given(model: Segmenter | Classifier, forward: Callable[[torch.Tensor], torch.Tensor]) -> Forward:
        @torch.inference_mode()
        def run(batch: np.ndarray) -> np.ndarray:
            return forward(model.to_device(batch)).float().cpu().numpy()
        return run

    def both(tf32: bool) -> dict[str, Any]:
        torch.backends.cudnn.allow_tf32 = tf32
        return {
            "segmenter": {
                "fixed passes": compare(seg.probs_from_batch, seg_batch, groupings(args.images, seg.gpu_rows, rng), masks),
                "as given": compare(as_given(seg, seg.forward_probs), seg_batch,
                                    groupings(args.images, seg.gpu_rows, rng), masks),
            },
            "classifier": {
                "fixed passes": compare(clf.forward_batch, clf_batch, groupings(args.patches, clf.gpu_rows, rng), lesions),
                "as given": compare(as_given(clf, clf.network), clf_batch, groupings(args.patches, clf.gpu_rows, rng),
                                    lesions),
            },
        }

    result: dict[str, Any] = {
        "device": args.device, "torch": torch.__version__, "images": args.images, "patches": args.patches,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "tf32_default": torch.backends.cudnn.allow_tf32,
    }
    # cuDNN's TF32 convolutions (torch's default) round to a 10-bit mantissa; only a GPU has them.
    for tf32 in ((True, False) if args.device == "cuda" else (False,)):
        result[f"tf32 {'on' if tf32 else 'off'}"] = both(tf32)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
