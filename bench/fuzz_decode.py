"""Fuzz the decode stage: mutated PNG, JPEG and WebP bytes end as an RGB image or a ``DecodeError``.

    PYTHONPATH=. .venv/bin/python -m bench.fuzz_decode --cases 20000 [--seed 0]
    PYTHONPATH=. .venv/bin/python -m bench.fuzz_decode --seed 0 --replay 1234   # one case, described

The seeds are real photos (the public-domain ones ``pipelines.sample_data`` uses): their own files
as shipped, and crops re-encoded by the real encoders in the modes archives hold (RGB, gray,
RGBA, palette, 16-bit; baseline, progressive, EXIF-rotated and CMYK JPEG; lossy, lossless and
alpha WebP). Each case applies one to three seeded mutations: a truncation, bit flips, bytes
overwritten with edge values, a slice repeated, or a length field that lies (a PNG chunk's, a
JPEG segment's, WebP's RIFF and chunk sizes), and declared dimensions that lie (PNG IHDR with
its CRC fixed so decoders look further, JPEG SOF). Case ``i`` of seed ``s`` depends on nothing
else, so ``--replay i`` reproduces it.

``decode_image`` must return an HxWx3 uint8 array or raise ``DecodeError``. Any other exception
stops the run with exit status 1 and the case that caused it; a case running past ``--hang-s``
(10 s) dumps the stack and exits with status 3; a crash in a native decoder kills the process,
which its caller sees as a signal. ``tests/test_fuzz_decode.py`` runs a CI-sized loop.
"""
from __future__ import annotations

import argparse
import faulthandler
import io
import json
import random
import resource
import struct
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

import cv2
import matplotlib
import numpy as np
from PIL import Image

from pipelines.sample_data import portraits
from transforms.decode import DecodeError, decode_image

HANG_S = 10.0
EDGE_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
LYING_LENGTHS = (0, 1, 7, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def _encode(image: np.ndarray | Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(out, fmt, **params)
    return out.getvalue()


def seeds() -> dict[str, bytes]:
    """Real encoders' bytes for real photos, small enough that a case decodes in milliseconds."""
    photos = portraits()
    face = cv2.resize(photos["astronaut"][30:230, 150:350], (96, 96), interpolation=cv2.INTER_AREA)
    cup = cv2.resize(photos["coffee"], (120, 80), interpolation=cv2.INTER_AREA)
    rgba = np.dstack([face, np.linspace(0, 255, 96 * 96).reshape(96, 96).astype(np.uint8)])
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    ok, png16 = cv2.imencode(".png", face.astype(np.uint16) * 257)
    assert ok
    return {
        "jpeg-as-shipped": (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes(),
        "png-rgb": _encode(face, "PNG"),
        "png-gray": _encode(face[..., 0], "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-palette": _encode(Image.fromarray(cup).convert("P"), "PNG"),
        "png-16-bit": png16.tobytes(),
        "jpeg-baseline": _encode(face, "JPEG", quality=90),
        "jpeg-progressive": _encode(cup, "JPEG", quality=80, progressive=True),
        "jpeg-exif-rotated": _encode(cup, "JPEG", exif=exif),
        "jpeg-cmyk": _encode(Image.fromarray(face).convert("CMYK"), "JPEG"),
        "webp-lossy": _encode(face, "WEBP", quality=80),
        "webp-lossless": _encode(cup, "WEBP", lossless=True),
        "webp-alpha": _encode(rgba, "WEBP", quality=70),
    }


# --- mutations: each takes the bytes and the case's rng, returns new bytes and what it did ---------


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    at = rng.randrange(len(data))
    return data[:at], f"truncated to {at} bytes"


def flip_bits(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    flips = [rng.randrange(len(out) * 8) for _ in range(rng.randint(1, 16))]
    for bit in flips:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out), f"flipped bits {flips}"


def overwrite(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    at, n, value = rng.randrange(len(out)), rng.randint(1, 8), rng.choice(EDGE_BYTES)
    out[at : at + n] = bytes([value]) * len(out[at : at + n])
    return bytes(out), f"{n} bytes at {at} set to {value:#04x}"


def repeat_slice(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 4096))
    return data[:end] + data[start:end] * rng.randint(1, 4) + data[end:], f"bytes {start}:{end} repeated"


def _png_chunks(data: bytes) -> list[int]:
    """Offsets of the PNG chunks' length fields (empty if ``data`` is not a PNG)."""
    offsets, at = [], 8
    while data.startswith(b"\x89PNG") and at + 8 <= len(data):
        offsets.append(at)
        at += 12 + struct.unpack(">I", data[at : at + 4])[0]
    return offsets


def _jpeg_segments(data: bytes) -> list[int]:
    """Offsets of the JPEG segments' length fields, up to the start of scan."""
    offsets, at = [], 2
    while data.startswith(b"\xff\xd8") and at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        offsets.append(at + 2)
        if marker == 0xDA:
            break
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    return offsets


def lie_about_a_length(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A PNG chunk, JPEG segment or WebP RIFF/chunk length that says something else."""
    out = bytearray(data)
    lie = rng.choice(LYING_LENGTHS + (rng.randrange(1 << 16),))
    if data.startswith(b"RIFF"):
        at = rng.choice([4, 16])  # the RIFF size, the first chunk's size
        out[at : at + 4] = struct.pack("<I", lie & 0xFFFFFFFF)
        return bytes(out), f"WebP size field at {at} set to {lie}"
    if chunks := _png_chunks(data):
        at = rng.choice(chunks)
        out[at : at + 4] = struct.pack(">I", lie & 0xFFFFFFFF)
        return bytes(out), f"PNG chunk length at {at} set to {lie}"
    if segments := _jpeg_segments(data):
        at = rng.choice(segments)
        out[at : at + 2] = struct.pack(">H", lie & 0xFFFF)
        return bytes(out), f"JPEG segment length at {at} set to {lie & 0xFFFF}"
    return flip_bits(data, rng)


def lie_about_the_size(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Declared dimensions that are not the pixels': PNG IHDR (CRC fixed), JPEG SOF."""
    width, height = rng.choice([0, 1, 2, 95, 97, 4096, 8000, 65535]), rng.choice([0, 1, 3, 96, 8001, 65535])
    out = bytearray(data)
    if data.startswith(b"\x89PNG") and data[12:16] == b"IHDR":
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        return bytes(out), f"PNG IHDR says {width}x{height}"
    sof = next((at for at in _jpeg_segments(data) if data[at - 1] in (0xC0, 0xC1, 0xC2)), None)
    if sof is not None:
        out[sof + 3 : sof + 7] = struct.pack(">HH", height, width)
        return bytes(out), f"JPEG SOF says {width}x{height}"
    return lie_about_a_length(data, rng)


MUTATIONS: tuple[Callable[[bytes, random.Random], tuple[bytes, str]], ...] = (
    truncate, flip_bits, overwrite, repeat_slice, lie_about_a_length, lie_about_the_size,
)


def case(seed_files: dict[str, bytes], seed: int, index: int) -> tuple[bytes, str]:
    """Case ``index`` of ``seed``: the mutated bytes and how they were made."""
    rng = random.Random(f"{seed}:{index}")
    name = rng.choice(sorted(seed_files))
    data, steps = seed_files[name], []
    for _ in range(rng.choice([1, 1, 2, 3])):
        if not data:
            break
        data, step = rng.choice(MUTATIONS)(data, rng)
        steps.append(step)
    return data, f"{name}: " + "; ".join(steps)


def check(data: bytes) -> str:
    """``decoded`` or the DecodeError's class; anything else raises ``AssertionError`` (or escapes)."""
    try:
        pixels = decode_image(data)
    except DecodeError as exc:
        return type(exc).__name__
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8, type(pixels)
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 1, pixels.shape
    return "decoded"


def peak_rss_mb() -> int:
    """This process's own peak RSS. Not getrusage's: Linux adds to it, at exec, the peak of the
    process that started this one (subprocess borrows the parent's memory until the exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def fuzz(cases: int, seed: int, hang_s: float = HANG_S, trace: bool = False) -> dict[str, object]:
    """Run ``cases`` cases; return the tally, the slowest case, the time and the peak RSS. Raises on a bad case.

    ``trace`` prints each case before it runs: what a crash or a hang leaves as the last line.
    """
    seed_files = seeds()
    tally: Counter[str] = Counter()
    slowest = (0.0, -1)
    started = time.perf_counter()
    for index in range(cases):
        data, what = case(seed_files, seed, index)
        if trace:
            print(f"case {index}: {what}", flush=True)
        faulthandler.dump_traceback_later(hang_s, exit=True)
        began = time.perf_counter()
        try:
            tally[check(data)] += 1
        except BaseException as exc:
            raise RuntimeError(f"case {index} of seed {seed} ({what}) raised {type(exc).__name__}: {exc}") from exc
        finally:
            faulthandler.cancel_dump_traceback_later()
        slowest = max(slowest, (time.perf_counter() - began, index))
    return {"cases": cases, "seed": seed, "outcomes": dict(tally.most_common()),
            "slowest_case": {"index": slowest[1], "seconds": round(slowest[0], 3)},
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20_000, help="How many cases (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="The run's seed (default: %(default)s).")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="Run case INDEX alone and describe it.")
    parser.add_argument("--hang-s", type=float, default=HANG_S, help="A case slower than this fails the run.")
    parser.add_argument("--trace", action="store_true", help="Print each case before it runs (to find a crash).")
    args = parser.parse_args(argv)
    if args.replay is not None:
        data, what = case(seeds(), args.seed, args.replay)
        print(f"case {args.replay} of seed {args.seed}: {what} ({len(data)} bytes)", flush=True)
        print(check(data))
        return 0
    try:
        result = fuzz(args.cases, args.seed, args.hang_s, args.trace)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    faulthandler.enable()
    sys.exit(main())
