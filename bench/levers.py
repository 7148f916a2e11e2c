"""Each performance lever measured on its own, on the benchmark's images and checkpoints.

One variant at a time against the default, alternating, median of ``--repeats``:
resize before inference (INTER_AREA vs INTER_LINEAR, and what inference at a larger input
would cost), one decode per image, patch encoders and PNG levels, torch threads,
channels_last, and batch sizes. Every figure is per image or per patch.

    python -m bench.levers --input DIR --segmenter-checkpoint S --classifier-checkpoint C --json out.json
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from bench.reference import image_files
from models import defaults
from models.classifier import Classifier
from models.segmenter import Segmenter
from transforms.decode import DEFAULT_MAX_PIXELS, decode_image, probe
from transforms.patches import cut_patches, encode_mask, encode_rgb

# (format, PNG level); JPEG and WebP ignore the level.
ENCODERS: dict[str, tuple[str, int]] = {
    "png level 0": ("png", 0),
    "png level 1 (default)": ("png", 1),
    "png level 3": ("png", 3),
    "png level 6": ("png", 6),
    "png level 9": ("png", 9),
    "webp lossless": ("webp", 1),
    "jpeg q95 (lossy)": ("jpeg", 1),
}


_C, _F, _S = cv2.IMWRITE_PNG_COMPRESSION, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_STRATEGY
# The level-1 codings png_params was chosen over; its pick (average filter, Huffman only) is
# "png level 1 (default)" above.
PNG_CODINGS: dict[str, list[int]] = {
    "png level 1, libpng's adaptive filters": [_C, 1],
    "png level 1, up filter (until Nov 2026)": [_C, 1, _F, cv2.IMWRITE_PNG_FILTER_UP],
    "png level 1, average filter": [_C, 1, _F, cv2.IMWRITE_PNG_FILTER_AVG],
    "png level 1, up filter, Huffman only": [_C, 1, _F, cv2.IMWRITE_PNG_FILTER_UP, _S, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY],
    "png level 1, Paeth filter, Huffman only": [_C, 1, _F, cv2.IMWRITE_PNG_FILTER_PAETH, _S, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY],
}


def _encode_png(pixels: np.ndarray, params: list[int]) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), params)[1].tobytes()


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def compare(variants: dict[str, Callable[[], Any]], units: dict[str, int], repeats: int) -> dict[str, float]:
    """Milliseconds per unit for each variant, interleaved so drift hits all of them alike."""
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(s) / units[name] for name, s in samples.items()}


@torch.inference_mode()
def seg_forward(model: Segmenter, batch: torch.Tensor) -> np.ndarray:
    return model.forward_probs(batch).float().numpy()


def linear_preprocess(model: Segmenter, image: np.ndarray) -> np.ndarray:
    """``Segmenter.preprocess`` with INTER_LINEAR in place of INTER_AREA."""
    size = model.cfg.input_size
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return ((small - model._mean) * model._inv_std).transpose(2, 0, 1)


def decode_levers(blobs: Sequence[bytes], repeats: int) -> dict[str, float]:
    def full_pil() -> None:
        for b in blobs:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    variants = {
        "decode_image (probe + one cv2 decode)": lambda: [decode_image(b) for b in blobs],
        "header probe alone": lambda: [probe(b, DEFAULT_MAX_PIXELS) for b in blobs],
        "a second full decode (PIL)": full_pil,
    }
    return compare(variants, dict.fromkeys(variants, len(blobs)), repeats)


def resize_levers(model: Segmenter, images: Sequence[np.ndarray], repeats: int) -> dict[str, Any]:
    n = len(images)
    ms = compare(
        {
            "INTER_AREA (default)": lambda: [model.preprocess(im) for im in images],
            "INTER_LINEAR": lambda: [linear_preprocess(model, im) for im in images],
        },
        {"INTER_AREA (default)": n, "INTER_LINEAR": n},
        repeats,
    )
    area = seg_forward(model, torch.from_numpy(np.stack([model.preprocess(im) for im in images])))
    linear = seg_forward(model, torch.from_numpy(np.stack([linear_preprocess(model, im) for im in images])))
    threshold = model.cfg.threshold
    agreement = float(((area >= threshold) == (linear >= threshold)).mean())
    size = model.cfg.input_size
    one = torch.from_numpy(model.preprocess(images[0])[None])
    big = torch.nn.functional.interpolate(one, scale_factor=2, mode="bilinear")
    infer = compare(
        {f"inference at {size}px": lambda: seg_forward(model, one), f"inference at {2 * size}px": lambda: seg_forward(model, big)},
        {f"inference at {size}px": 1, f"inference at {2 * size}px": 1},
        repeats,
    )
    return {"ms_per_image": ms, "mask_agreement_area_vs_linear": agreement, "inference_ms_per_image": infer}


def encode_levers(patches: Sequence[Any], repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    units = len(patches)
    for name, (fmt, level) in ENCODERS.items():
        pixels = [p.pixels for p in patches]
        ms = timed(lambda: [encode_rgb(px, fmt, 95, level) for px in pixels], repeats) * 1e3 / units
        size = float(np.mean([len(encode_rgb(px, fmt, 95, level)) for px in pixels]))
        out[name] = {"ms_per_patch": ms, "bytes_per_patch": size}
    for name, params in PNG_CODINGS.items():
        ms = timed(lambda: [_encode_png(px, params) for px in pixels], repeats) * 1e3 / units
        out[name] = {"ms_per_patch": ms, "bytes_per_patch": float(np.mean([len(_encode_png(px, params)) for px in pixels]))}
    masks = [p.mask for p in patches]
    out["mask png level 1 (always)"] = {
        "ms_per_patch": timed(lambda: [encode_mask(m) for m in masks], repeats) * 1e3 / units,
        "bytes_per_patch": float(np.mean([len(encode_mask(m)) for m in masks])),
    }
    return out


def inference_levers(
    seg: Segmenter, cls: Classifier, images: Sequence[np.ndarray], patches: Sequence[np.ndarray], repeats: int,
    default_threads: int,
) -> dict[str, Any]:
    measured_threads = torch.get_num_threads()
    seg_batch = torch.from_numpy(np.stack([seg.preprocess(im) for im in images]))
    cls_batch = torch.from_numpy(np.stack([cls.preprocess(p) for p in patches]))
    n, p = len(seg_batch), len(cls_batch)

    def with_threads(count: int, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            torch.set_num_threads(count)
            try:
                return fn()
            finally:
                torch.set_num_threads(measured_threads)
        return run

    threads = {}
    for count in sorted({1, default_threads}):
        threads[f"segmenter, {count} thread(s)"] = (with_threads(count, lambda: seg_forward(seg, seg_batch)), n)
        threads[f"classifier, {count} thread(s)"] = (with_threads(count, lambda: cls_forward(cls, cls_batch)), p)
    thread_ms = compare({k: v[0] for k, v in threads.items()}, {k: v[1] for k, v in threads.items()}, repeats)

    seg_cl = seg_batch.contiguous(memory_format=torch.channels_last)
    cls_cl = cls_batch.contiguous(memory_format=torch.channels_last)
    layouts = {
        "segmenter, contiguous (default)": (lambda: seg_forward(seg, seg_batch), n),
        "segmenter, channels_last": (lambda: _channels_last(seg.network, lambda: seg_forward(seg, seg_cl)), n),
        "classifier, contiguous (default)": (lambda: cls_forward(cls, cls_batch), p),
        "classifier, channels_last": (lambda: _channels_last(cls.network, lambda: cls_forward(cls, cls_cl)), p),
    }
    layout_ms = compare({k: v[0] for k, v in layouts.items()}, {k: v[1] for k, v in layouts.items()}, repeats)

    # Every variant does the same work (16 images, 128 patches) so that each sample is equally exposed to noise.
    batches: dict[str, tuple[Callable[[], Any], int]] = {}
    for size in (1, 2, 4, 8, 16):
        chunks = [seg_batch[np.arange(start, start + size) % n] for start in range(0, 16, size)]
        batches[f"segmenter, batch {size}"] = (lambda cs=chunks: [seg_forward(seg, c) for c in cs], 16)
    for size in (16, 64, 128):
        chunks = [cls_batch[np.arange(start, start + size) % p] for start in range(0, 128, size)]
        batches[f"classifier, batch {size}"] = (lambda cs=chunks: [cls_forward(cls, c) for c in cs], 128)
    batch_ms = compare({k: v[0] for k, v in batches.items()}, {k: v[1] for k, v in batches.items()}, repeats)
    return {
        "torch_threads_ms_per_item": thread_ms,
        "channels_last_ms_per_item": layout_ms,
        "batch_size_ms_per_item": batch_ms,
        "default_torch_threads": default_threads,
        "measured_at_torch_threads": measured_threads,
    }


@torch.inference_mode()
def cls_forward(model: Classifier, batch: torch.Tensor) -> np.ndarray:
    return model.network(batch).float().numpy()


def _channels_last(network: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the network's weights in channels_last, then put them back."""
    network.to(memory_format=torch.channels_last)
    try:
        return fn()
    finally:
        network.to(memory_format=torch.contiguous_format)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--segmenter-checkpoint", default=defaults.SEGMENTER)
    parser.add_argument("--classifier-checkpoint", default=defaults.CLASSIFIER)
    parser.add_argument("--images", type=int, default=4, help="Images to measure on (default: %(default)s).")
    parser.add_argument("--patches", type=int, default=16, help="Patches to encode per variant (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--min-patch-skin", type=float, default=0.5)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="Threads for every lever but the thread lever itself; 0 keeps torch's default.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    seg = Segmenter.load(args.segmenter_checkpoint)
    cls = Classifier.load(args.classifier_checkpoint)
    blobs = [Path(f).read_bytes() for f in image_files([args.input])[: args.images]]
    images = [decode_image(b) for b in blobs]
    masks = seg.predict_masks(images)
    patches = [p for im, m in zip(images, masks) for p in cut_patches(im, m, args.patch_size, args.patch_size,
                                                                       args.min_patch_skin)]
    if not patches:
        # An untrained segmenter may find no skin; the encoders still need realistic tiles.
        patches = [p for im in images for p in cut_patches(im, np.ones(im.shape[:2], np.uint8), args.patch_size,
                                                            args.patch_size, 0.0)]
    result = {
        "images": len(images),
        "patches": len(patches),
        "repeats": args.repeats,
        "decode_ms_per_image": decode_levers(blobs, args.repeats),
        "resize": resize_levers(seg, images, args.repeats),
        "encode": encode_levers(patches[: args.patches], args.repeats),
        "inference": inference_levers(seg, cls, images, [p.pixels for p in patches], args.repeats, default_threads),
    }
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
