"""What skipping decoding saves: a 1024x1024 FFHQ-style PNG decoded vs. the same face as a raw TFRecord record.

    PYTHONPATH=. python -m bench.tfrecord [--images 8] [--repeats 5]

Both paths start from the bytes a read returns and end at the HxWx3 RGB array the decode stage
hands on; the raw path includes the data checksum and the Example parse. Prints a Markdown table.
Its steps alone add up to less than the whole: each run of the whole touches three fresh 3 MB
buffers (record data, pixel bytes, array), whose page faults the steps timed one by one avoid.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.inputs import make_inputs
from bench.tfrecords import face, frame
from transforms.decode import decode_image, raw_image
from transforms.tfrecord import example_pixels, unframe


def best_ms(fn: Callable[[Any], Any], items: Sequence[Any], repeats: int) -> float:
    """Milliseconds per item, best pass of ``repeats`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return best * 1000


def record_to_array(framed: bytes) -> np.ndarray:
    data, shape = example_pixels(unframe(framed, 0))
    return raw_image(data, shape)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pngs = [path.read_bytes() for path in make_inputs(Path(tmp), args.images)]
    records = [frame(face(decode_image(png))) for png in pngs]
    assert all(np.array_equal(decode_image(p), record_to_array(r)) for p, r in zip(pngs, records))
    payloads = [unframe(r, 0) for r in records]
    examples = [example_pixels(p) for p in payloads]
    rows = [
        ("PNG decode (probe + cv2.imdecode)", best_ms(decode_image, pngs, args.repeats), np.mean([len(p) for p in pngs])),
        ("raw record -> array (the three steps below)", best_ms(record_to_array, records, args.repeats), np.mean([len(r) for r in records])),
        ("  data crc32c check", best_ms(lambda r: unframe(r, 0), records, args.repeats), None),
        ("  Example parse", best_ms(example_pixels, payloads, args.repeats), None),
        ("  CHW -> HWC copy", best_ms(lambda e: raw_image(*e), examples, args.repeats), None),
    ]
    print(f"{args.images} images of 1024x1024, best of {args.repeats} passes\n")
    print("| path | ms / image | MB / image read |\n|---|---|---|")
    for name, ms, size in rows:
        print(f"| {name} | {ms:.2f} | {'' if size is None else f'{size / 1e6:.2f}'} |")
    print(f"\nraw is {rows[0][1] / rows[1][1]:.0f}x faster than PNG decode")


if __name__ == "__main__":
    main()
