"""TFRecord shards for tests and the benchmark, framed and encoded by hand (no TensorFlow)."""
from __future__ import annotations

import struct

import numpy as np

from transforms.tfrecord import masked_crc32c


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(values: list[bytes] | list[int] | list[float], packed: bool) -> bytes:
    if values and isinstance(values[0], bytes):
        return _message(1, b"".join(_message(1, v) for v in values))
    if values and isinstance(values[0], float):
        return _message(2, _message(1, struct.pack(f"<{len(values)}f", *values)))
    if packed:
        return _message(3, _message(1, b"".join(_varint(v) for v in values)))
    return _message(3, b"".join(_varint(1 << 3) + _varint(v) for v in values))


def example(features: dict[str, list], packed: bool = True) -> bytes:
    """A serialized tf.train.Example, encoded by hand."""
    entries = b"".join(
        _message(1, _message(1, name.encode()) + _message(2, _feature(values, packed)))
        for name, values in features.items()
    )
    return _message(1, entries)


def face(pixels: np.ndarray, shape: list[int] | None = None) -> bytes:
    """StyleGAN's record for an HxWx3 face: CHW pixels and their shape."""
    chw = pixels.transpose(2, 0, 1)
    return example({"shape": shape or list(chw.shape), "data": [chw.tobytes()]})


def frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def shard(records: list[bytes]) -> bytes:
    """A whole .tfrecords file of these records."""
    return b"".join(frame(r) for r in records)
