"""TFRecord shards without TensorFlow: the record framing and a tf.train.Example reader.

A record is ``uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)``,
little-endian. Planning walks the 12-byte headers only; reading fetches one record by its exact
byte range and checks both checksums. StyleGAN's ``ffhq-rNN.tfrecords`` hold one Example per face:
``shape`` (int64 CHW) and ``data`` (the raw uint8 pixels).
"""
from __future__ import annotations

import struct
from typing import Any, Iterator

import google_crc32c

HEADER = 12
FOOTER = 4
_LENGTH = struct.Struct("<QI")
_CRC = struct.Struct("<I")

# Wire types of the protobuf encoding, and the field numbers of Example's messages.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_BYTES_LIST, _INT64_LIST = 1, 3


class TFRecordError(ValueError):
    """The framing or the Example of a record is broken."""


# TFRecord rotates and offsets the CRC, so that a CRC of data holding CRCs is not itself a CRC.
_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: crc32c (google-crc32c's C build, a gcsfs dependency), masked."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def record_spans(f: Any, size: int) -> Iterator[tuple[int, int]]:
    """(offset, framed size) of each record, reading nothing but the headers.

    Raises ``TFRecordError`` where the file is cut off or a length checksum is wrong: nothing
    after that point can be located.
    """
    offset = 0
    while offset < size:
        f.seek(offset)
        header = f.read(HEADER)
        if len(header) < HEADER:
            raise TFRecordError(f"the file ends inside the record header at byte {offset}")
        length, crc = _LENGTH.unpack(header)
        if masked_crc32c(header[:8]) != crc:
            raise TFRecordError(f"bad length checksum in the record header at byte {offset}")
        end = offset + HEADER + length + FOOTER
        if end > size:
            raise TFRecordError(
                f"the record at byte {offset} is truncated: it needs {end - offset:,} bytes, the file ends at byte {size:,}"
            )
        yield offset, end - offset
        offset = end


def unframe(framed: bytes, offset: int) -> bytes:
    """The data of one framed record read from ``offset``, after checking its length and both checksums."""
    length, length_crc = _LENGTH.unpack_from(framed)
    if masked_crc32c(framed[:8]) != length_crc or HEADER + length + FOOTER != len(framed):
        raise TFRecordError(f"the record header at byte {offset} changed since the shard was planned")
    data = framed[HEADER : HEADER + length]
    (data_crc,) = _CRC.unpack_from(framed, HEADER + length)
    if masked_crc32c(data) != data_crc:
        raise TFRecordError(f"data checksum mismatch in the record at byte {offset}: the record is corrupt")
    return data


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise TFRecordError("malformed Example: a varint runs past its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: varints as ints, the rest as memoryviews (no copies)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        else:
            if wire == _BYTES:
                n, pos = _varint(buf, pos)
            elif wire in (_FIXED64, _FIXED32):
                n = 8 if wire == _FIXED64 else 4
            else:
                raise TFRecordError(f"malformed Example: unsupported wire type {wire}")
            if pos + n > len(buf):
                raise TFRecordError("malformed Example: a field runs past its message")
            value, pos = buf[pos : pos + n], pos + n
        yield key >> 3, wire, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _messages(buf: memoryview, number: int) -> Iterator[memoryview]:
    """The length-delimited values of field ``number`` (embedded messages, strings, packed lists)."""
    for n, wire, value in _fields(buf):
        if n == number and wire == _BYTES:
            yield value


def _feature(buf: memoryview) -> list[Any]:
    """A Feature's values: bytes of a bytes_list, ints of an int64_list (packed or not); [] for a float_list."""
    values: list[Any] = []
    for items in _messages(buf, _BYTES_LIST):
        values.extend(bytes(value) for value in _messages(items, 1))
    for items in _messages(buf, _INT64_LIST):
        for number, wire, value in _fields(items):
            if number == 1 and wire == _VARINT:
                values.append(_int64(value))
        for packed in _messages(items, 1):
            pos = 0
            while pos < len(packed):
                item, pos = _varint(packed, pos)
                values.append(_int64(item))
    return values


def parse_example(data: bytes | memoryview) -> dict[str, list[Any]]:
    """A serialized tf.train.Example -> {feature name: values}."""
    features: dict[str, list[Any]] = {}
    # Example {Features features = 1}; Features {map<string, Feature> feature = 1}; a map entry
    # is {string key = 1; Feature value = 2}.
    for feats in _messages(memoryview(data), 1):
        for entry in _messages(feats, 1):
            fields = {n: v for n, wire, v in _fields(entry) if wire == _BYTES}
            features[bytes(fields.get(1, b"")).decode("utf-8", "replace")] = _feature(fields.get(2, memoryview(b"")))
    return features


def example_pixels(data: bytes | memoryview) -> tuple[bytes, tuple[int, ...]]:
    """StyleGAN's Example -> (raw uint8 pixels, their CHW shape); the decode stage checks the two agree."""
    features = parse_example(data)
    shape, pixels = features.get("shape"), features.get("data")
    if not shape or not all(isinstance(v, int) for v in shape):
        raise TFRecordError(f"the Example has no int64 'shape' feature (features: {sorted(features)})")
    if not pixels or len(pixels) != 1 or not isinstance(pixels[0], bytes):
        raise TFRecordError(f"the Example has no single bytes 'data' feature (features: {sorted(features)})")
    return pixels[0], tuple(shape)
