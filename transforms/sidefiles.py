"""Side files: what is joined to images by id (label CSVs, FFHQ metadata, VOC lesion boxes).

Label CSVs and FFHQ metadata travel to the workers as URIs, not as data: a million labels or
the 70,000-entry ``ffhq-dataset-v2.json`` pickled into the job graph would exceed the 20 MB
that Dataflow accepts for a job request. The launcher parses each file once to fail fast and
discards the result; each worker process loads it again in ``ReadBytes.setup``
(``transforms.read``, shared across the process's threads), keeping only the fields the stages
use. Not a Beam side input: the join is one dict lookup per image, and a side input would add
a stage that reads, shuffles and re-materialises a million rows on every worker for what a
plain load gives as fast (about 4 s and 90 MB for a million labels). VOC boxes sit beside
each image and are read with it.

No side file can take a worker's memory or time: a label CSV or FFHQ metadata file over its
size limit, with an overlong line or entry, or that is not text, fails before any work
(``InputError``); a VOC file over its limit or with a DTD (the door to entity expansion, which
defusedxml never lets run) fails its own image (``AnnotationError``).
"""
from __future__ import annotations

import csv
import json
import posixpath
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional
from xml.etree.ElementTree import ParseError

from defusedxml import ElementTree as SafeElementTree

from transforms.storage import file_size, open_file, read_range

# Text read per step when streaming FFHQ metadata; one face's entry is a few kB.
JSON_CHUNK_CHARS = 1 << 20
# Every worker process holds all labels: 256 MiB of CSV is some 8 million, about 700 MB per process.
MAX_LABELS_BYTES = 256 << 20
MAX_LABEL_LINE_CHARS = 64 << 10
# The real ffhq-dataset-v2.json is 267 MB; it is streamed, so only its size in time is at stake.
MAX_FFHQ_METADATA_BYTES = 1 << 30
MAX_JSON_ENTRY_CHARS = 16 << 20
# A VOC file is a few kB; a thousand boxes would be about 100 kB.
MAX_VOC_BYTES = 1 << 20


class InputError(ValueError):
    """An input pattern, label file or metadata file cannot be used; raised before any work."""


class AnnotationError(ValueError):
    """The VOC file beside an image cannot be used; that image fails with the reason."""


@dataclass(frozen=True)
class LabelFiles:
    """Label CSVs by URI, and the columns that hold the image id and its label."""

    uris: tuple[str, ...]
    id_column: str
    label_column: str


def image_id_from_name(name: str) -> str:
    """A stable id from a file or member name: its stem (FFHQ ``00042.png`` -> ``00042``)."""
    base = posixpath.basename(name.rstrip("/"))
    return posixpath.splitext(base)[0]


def _normalise_id(value: str) -> str:
    return image_id_from_name(value.strip())


def _refuse_huge(uri: str, what: str, limit: int) -> None:
    size = file_size(uri)
    if size is not None and size > limit:
        raise InputError(f"{what} {uri} is {size:,} bytes, over the {limit:,} a job reads: is it the right file?")


def _lines(f: Any, uri: str) -> Iterator[str]:
    """The lines of a text file, refusing one that would not end (a binary file, a missing newline)."""
    number = 0
    while line := f.readline(MAX_LABEL_LINE_CHARS + 1):
        number += 1
        if len(line) > MAX_LABEL_LINE_CHARS:
            raise InputError(f"labels file {uri} line {number} is over {MAX_LABEL_LINE_CHARS:,} characters long")
        yield line


def load_labels(files: LabelFiles) -> dict[str, str]:
    """Read label CSVs into {image id: label}; ids match by file stem (``a/b.jpg`` -> ``b``)."""
    labels: dict[str, str] = {}
    for uri in files.uris:
        line = 0
        try:
            _refuse_huge(uri, "labels file", MAX_LABELS_BYTES)
            with open_file(uri, "rt", newline="") as f:
                reader = csv.reader(_lines(f, uri))
                header = next(reader, [])
                missing = {files.id_column, files.label_column} - set(header)
                if missing:
                    raise InputError(
                        f"labels file {uri} has no column(s) {sorted(missing)}; its columns are "
                        f"{header or None}. Set --id-column / --label-column."
                    )
                id_at, label_at = header.index(files.id_column), header.index(files.label_column)
                for row in reader:
                    line = reader.line_num
                    if not row:
                        continue
                    if len(row) <= max(id_at, label_at):
                        raise InputError(f"labels file {uri} line {line} has {len(row)} of "
                                         f"{len(header)} columns")
                    # A few distinct labels repeat across millions of rows: one string object each.
                    labels[_normalise_id(row[id_at])] = sys.intern(row[label_at].strip())
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"labels file {uri} is not a readable CSV text file after line {line}: {exc}") from exc
        except (FileNotFoundError, PermissionError, OSError) as exc:
            raise InputError(f"cannot read labels file {uri}: {exc}") from exc
    return labels


class _JsonStream:
    """Decodes the JSON values of a text file one at a time, reading it in chunks."""

    def __init__(self, f: Any):
        self._f, self._text, self._pos, self._eof = f, "", 0, False
        self._decoder = json.JSONDecoder()

    def _more(self) -> None:
        chunk = self._f.read(JSON_CHUNK_CHARS)
        self._text, self._pos, self._eof = self._text[self._pos:] + chunk, 0, not chunk

    def _skip_space(self) -> None:
        while True:
            while self._pos < len(self._text) and self._text[self._pos] in " \t\r\n":
                self._pos += 1
            if self._pos < len(self._text) or self._eof:
                return
            self._more()

    def take(self, token: str) -> bool:
        """Consume ``token`` (one character) if it comes next."""
        self._skip_space()
        if self._text[self._pos:self._pos + 1] == token:
            self._pos += 1
            return True
        return False

    def at_end(self) -> bool:
        self._skip_space()
        return self._pos == len(self._text)

    def value(self) -> Any:
        self._skip_space()
        while True:
            try:
                item, end = self._decoder.raw_decode(self._text, self._pos)
                # A number cut at the chunk's end would decode as a shorter number.
                if end < len(self._text) or self._eof:
                    self._pos = end
                    return item
            except json.JSONDecodeError:
                if self._eof:
                    raise
            if len(self._text) - self._pos > MAX_JSON_ENTRY_CHARS:
                raise self.fail(f"a value over {MAX_JSON_ENTRY_CHARS:,} characters long")
            self._more()

    def fail(self, message: str) -> json.JSONDecodeError:
        return json.JSONDecodeError(message, self._text, self._pos)


def _json_entries(uri: str) -> Iterator[tuple[Any, Any]]:
    """The top-level (key, value) pairs of a JSON object file, decoded one at a time.

    ``json.load`` would hold every face's landmarks at once (gigabytes for the real file);
    decoding entry by entry keeps one entry and one chunk of text in memory.
    """
    with open_file(uri, "rt") as f:
        stream = _JsonStream(f)
        if not stream.take("{"):
            raise stream.fail("Expecting '{'")
        if not stream.take("}"):
            while True:
                key = stream.value()
                if not stream.take(":"):
                    raise stream.fail("Expecting ':' delimiter")
                yield key, stream.value()
                if stream.take("}"):
                    break
                if not stream.take(","):
                    raise stream.fail("Expecting ',' delimiter")
        if not stream.at_end():
            raise stream.fail("Extra data")


def _ffhq_field(uri: str, pick: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """FFHQ's ``ffhq-dataset-v2.json`` -> {5-digit id: ``pick(entry)``}, one entry decoded at a time."""
    try:
        _refuse_huge(uri, "FFHQ metadata", MAX_FFHQ_METADATA_BYTES)
        return {f"{int(index):05d}": pick(entry) for index, entry in _json_entries(uri)}
    except InputError:
        raise
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"cannot read FFHQ metadata {uri}: {exc}") from exc


def load_ffhq_categories(uri: str) -> dict[str, Optional[str]]:
    """{5-digit id: FFHQ category}; the category is all ``--split ffhq`` uses."""
    return _ffhq_field(uri, lambda entry: entry.get("category"))


def load_ffhq_licences(uri: str) -> dict[str, Optional[str]]:
    """{5-digit id: the photo's licence} (FFHQ's ``metadata.license``, e.g. "Attribution License"), for the card."""
    return _ffhq_field(uri, lambda entry: (entry.get("metadata") or {}).get("license"))


def parse_voc_boxes(xml_bytes: bytes) -> list[tuple[int, int, int, int]]:
    """Pascal-VOC lesion boxes as (xmin, ymin, xmax, ymax); ``AnnotationError`` if the XML is unusable.

    A DTD is refused outright: VOC files have none, and it is where entity bombs and external
    entities are declared.
    """
    try:
        boxes = []
        for box in SafeElementTree.fromstring(xml_bytes, forbid_dtd=True).iter("bndbox"):
            coords = [int(float(box.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax")]
            boxes.append(tuple(coords))
        return boxes
    except (ParseError, ValueError) as exc:  # defusedxml's refusals are ValueErrors too
        raise AnnotationError(f"{type(exc).__name__}: {exc}") from None


def voc_boxes(image_uri: str) -> Optional[list[tuple[int, int, int, int]]]:
    """The boxes of the VOC file beside an image (``a/b.jpg`` -> ``a/b.xml``); None if it has none.

    An unusable file raises ``AnnotationError``; no more than one byte past its size limit is read.
    """
    uri = posixpath.splitext(image_uri)[0] + ".xml"
    try:
        data = read_range(uri, 0, MAX_VOC_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_VOC_BYTES:
        raise AnnotationError(f"{uri} is over {MAX_VOC_BYTES:,} bytes: not an annotation of one image")
    return parse_voc_boxes(data)
