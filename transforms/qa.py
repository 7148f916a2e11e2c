"""The QA sheet: ``OUTPUT/qa.png``, a page of sample faces to check a run by eye.

build_dataset shows kept faces with their skin mask tinted and their kept patches outlined,
filtered faces with the reason, and lists failures; score shows the most and the least
acne-affected faces with their most suspicious patches outlined and their verdicts named.

The outputs hold patches, not whole faces, so the faces are sampled as they pass: each bundle
keeps the few with the smallest rank per group (a hash of the id, or the lesion count), making a
thumbnail only for a face that enters its bundle's few, and a global ``Top`` keeps the smallest
of those. So the sample is the same whatever the runner or the bundling, thumbnails cost next
to nothing, and memory and the sheet stay the same size whatever the run's. ``Finish`` draws the
sheet from the samples and the written tables (status, reason, patches, top patches). After a
``--resume``, it samples the images that run processed.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import textwrap
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.transforms.window import GlobalWindows

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import Rectangle  # noqa: E402

from models.dataset import (  # noqa: E402
    ERROR_SCHEMA, ERRORS_DIR, FACES_DIR, OUTCOME_SCHEMA, PATCH_SCHEMA, PATCHES_DIR, SCORE_SCHEMA, SCORES_DIR, join,
    read_parquet_dir,
)
from transforms.classify import ScoredFace  # noqa: E402
from transforms.records import ImageRecord  # noqa: E402
from transforms.storage import open_file  # noqa: E402

QA_SHEET = "qa.png"
THUMB_SIDE = 160  # pixels on a thumbnail's long side
COLUMNS = 6
DPI = 80
CELL_INCHES = 2.4  # one thumbnail with its caption
TITLE_INCHES = 0.35  # a block's title
MAX_FAILURES_LISTED = 10
# Faces per group on the sheet, in the order the groups are drawn.
BUILD_GROUPS = {"kept": 2 * COLUMNS, "filtered": COLUMNS}
SCORE_GROUPS = {"most acne-affected": COLUMNS, "least acne-affected": COLUMNS}
SKIN_TINT = np.array([0, 200, 255], np.float32)
COLOURS = {"kept": "#2a9d8f", "filtered": "#e9c46a", "failed": "#e76f51", "clear": "#2a9d8f", "acne": "#e76f51"}

Rank = tuple[Any, ...]
Ranks = Callable[[Any], list[tuple[str, Rank]]]


@dataclass(frozen=True)
class Thumb:
    """One sampled face: its group on the sheet, its rank there (smallest first) and a small JPEG of it."""

    group: str
    rank: Rank
    image_id: str
    height: int  # of the full image: patch boxes are drawn at ``THUMB_SIDE / max(height, width)``
    width: int
    jpeg: bytes


def id_hash(image_id: str) -> str:
    """A stable, well-spread order on ids: the sample of a run that does not depend on its inputs' names."""
    return hashlib.sha256(image_id.encode()).hexdigest()[:16]


def build_ranks(record: ImageRecord, min_face_skin: float) -> list[tuple[str, Rank]]:
    """build_dataset samples kept and filtered faces apart, each by id hash (the skin fraction decides which)."""
    group = "kept" if (record.skin_fraction or 0.0) >= min_face_skin else "filtered"
    return [(group, (id_hash(record.image_id),))]


def score_ranks(face: ScoredFace) -> list[tuple[str, Rank]]:
    """score samples the faces with the most and the fewest expected lesions (ties by id hash)."""
    lesions, tie = float(face.score.lesion_count), id_hash(face.record.image_id)
    return [("most acne-affected", (-lesions, tie)), ("least acne-affected", (lesions, tie))]


def record_of(element: ImageRecord | ScoredFace) -> ImageRecord:
    return element.record if isinstance(element, ScoredFace) else element


def thumbnail(record: ImageRecord, tint_skin: bool) -> tuple[bytes, int, int]:
    """A JPEG of the face at ``THUMB_SIDE`` (skin tinted if asked), and the full image's height and width.

    A face read back from a patch dataset has no whole image: its patches are laid where they were cut.
    """
    if record.pixels is not None:
        # The source's size: the top patches are outlined in its pixels (transforms.resolution).
        height, width = (round(side / record.scale) for side in record.pixels.shape[:2])
    else:
        height = max(p.y + p.size for p in record.patches)
        width = max(p.x + p.size for p in record.patches)
    scale = THUMB_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if record.pixels is not None:
        small = cv2.resize(record.pixels, size, interpolation=cv2.INTER_AREA)
    else:
        small = np.full((size[1], size[0], 3), 96, np.uint8)
        for p in record.patches:
            side = max(1, round(p.size * scale))
            x, y = round(p.x * scale), round(p.y * scale)
            tile = cv2.resize(p.pixels, (side, side), interpolation=cv2.INTER_AREA)
            small[y:y + side, x:x + side] = tile[: size[1] - y, : size[0] - x]
    if tint_skin and record.mask is not None:
        skin = cv2.resize(record.mask * np.uint8(255), size, interpolation=cv2.INTER_AREA) >= 128
        small[skin] = (0.65 * small[skin] + 0.35 * SKIN_TINT).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError(f"could not encode the thumbnail of {record.image_id}")
    return buf.tobytes(), height, width


class _KeepSmallest(beam.DoFn):
    """Per bundle, the ``limits[group]`` elements of smallest rank per group, as Thumbs made on entry."""

    def __init__(self, ranks: Ranks, limits: Mapping[str, int], tint_skin: bool):
        self._ranks, self._limits, self._tint = ranks, dict(limits), tint_skin

    def start_bundle(self) -> None:
        self._kept: dict[str, list[tuple[Rank, str, Thumb]]] = {g: [] for g in self._limits}

    def process(self, element: Any) -> None:
        for group, rank in self._ranks(element):
            kept = self._kept[group]
            if len(kept) >= self._limits[group] and rank >= kept[-1][0]:
                continue
            record = record_of(element)
            jpeg, height, width = thumbnail(record, self._tint)
            bisect.insort(kept, (rank, record.image_id, Thumb(group, rank, record.image_id, height, width, jpeg)))
            del kept[self._limits[group]:]

    def finish_bundle(self) -> Iterator[Any]:
        for kept in self._kept.values():
            for _, _, thumb in kept:
                yield GlobalWindows.windowed_value(thumb)


def _rank_of(thumb: Thumb) -> Rank:
    return thumb.rank


class SampleFaces(beam.PTransform):
    """Faces (ImageRecords or ScoredFaces) -> (group, its Thumbs, smallest rank first) per group."""

    def __init__(self, ranks: Ranks, limits: Mapping[str, int], tint_skin: bool = False):
        super().__init__()
        self._fn = _KeepSmallest(ranks, limits, tint_skin)
        self._n = max(limits.values())

    def expand(self, faces: beam.PCollection) -> beam.PCollection:
        return (
            faces
            | "KeepSmallestPerBundle" >> beam.ParDo(self._fn)
            | "ByGroup" >> beam.Map(lambda thumb: (thumb.group, thumb))
            # reverse: the n smallest ranks, smallest first
            | "KeepSmallest" >> beam.combiners.Top.PerKey(self._n, key=_rank_of, reverse=True)
        )


def _caption(text: str, width: int = 36, lines: int = 3) -> str:
    return "\n".join(textwrap.wrap(text, width)[:lines])


def _draw_face(ax: plt.Axes, thumb: Thumb, boxes: Sequence[tuple[int, int, int]], colour: str, caption: str) -> None:
    """The thumbnail, ``boxes`` (x, y, size in the full image) outlined, the caption above."""
    ax.imshow(cv2.imdecode(np.frombuffer(thumb.jpeg, np.uint8), cv2.IMREAD_COLOR_RGB))
    scale = THUMB_SIDE / max(thumb.height, thumb.width)
    for x, y, size in boxes:
        ax.add_patch(Rectangle((x * scale - 0.5, y * scale - 0.5), size * scale, size * scale, fill=False,
                               edgecolor=colour, linewidth=1.2))
    ax.set_title(_caption(caption), fontsize=7, loc="left")


def _grid(fig: Any, title: str, n: int) -> list[plt.Axes]:
    """A titled block of ``n`` (at least one) cells, ``COLUMNS`` to a row; cells off by default."""
    rows = -(-n // COLUMNS)
    height = rows * CELL_INCHES + TITLE_INCHES
    fig.suptitle(title, x=0.005, y=1 - 0.05 / height, ha="left", va="top", fontsize=10, fontweight="bold")
    axes = np.atleast_1d(fig.subplots(rows, COLUMNS)).ravel()
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.03, top=1 - (TITLE_INCHES + 0.45) / height, wspace=0.05,
                        hspace=0.45)
    for ax in axes:
        ax.axis("off")
    return list(axes)


def _rows_by_id(table: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in table:
        out.setdefault(row["image_id"], []).append(row)
    return out


@dataclass(frozen=True)
class Block:
    """One group's part of the sheet: its faces, each with how to draw it."""

    group: str
    title: str
    faces: list[tuple[str, Callable[[plt.Axes], None]]]


def _build_blocks(root: str, samples: Mapping[str, Sequence[Thumb]]) -> list[Block]:
    """build_dataset's sheet: kept faces (skin tinted, kept patches outlined), filtered ones with the reason."""
    ids = {t.image_id for thumbs in samples.values() for t in thumbs}
    faces = {r["image_id"]: r for r in read_parquet_dir(join(root, FACES_DIR), OUTCOME_SCHEMA).to_pylist()
             if r["image_id"] in ids}
    patches = _rows_by_id([r for r in read_parquet_dir(
        join(root, PATCHES_DIR), PATCH_SCHEMA, ["image_id", "x", "y", "size"]).to_pylist() if r["image_id"] in ids])
    blocks = []
    for group, limit in BUILD_GROUPS.items():
        cells = []
        for thumb in samples.get(group, [])[:limit]:
            face = faces.get(thumb.image_id, {"status": "failed", "reason": "no faces/ row", "skin_fraction": None})
            skin = "" if face["skin_fraction"] is None else f", skin {face['skin_fraction']:.2f}"
            if face["status"] == "kept":
                caption = f"{thumb.image_id}: kept{skin}, {face['patch_count']} patches"
            else:
                caption = f"{thumb.image_id}: {face['status']}{skin}: {face['reason']}"
            boxes = [(p["x"], p["y"], p["size"]) for p in patches.get(thumb.image_id, [])]
            cells.append((thumb.image_id, partial(_draw_face, thumb=thumb, boxes=boxes, colour=COLOURS[face["status"]],
                                                  caption=caption)))
        title = ("kept faces (a sample by id hash; skin tinted blue, kept patches outlined)" if group == "kept"
                 else f"{group} faces (a sample by id hash) and why")
        blocks.append(Block(group, title, cells))
    return blocks


def _score_blocks(root: str, samples: Mapping[str, Sequence[Thumb]]) -> list[Block]:
    """score's sheet: the most and the least acne-affected faces, their top patches outlined, verdicts named."""
    scores = {r["image_id"]: r for r in read_parquet_dir(join(root, SCORES_DIR), SCORE_SCHEMA).to_pylist()}
    # A run with fewer faces than both groups hold shows each face once: the more affected half first.
    faces = len({t.image_id for thumbs in samples.values() for t in thumbs})
    quotas = [min(limit, -(-faces // 2)) for limit in SCORE_GROUPS.values()]
    shown: set[str] = set()
    blocks = []
    for (group, _), quota in zip(SCORE_GROUPS.items(), quotas):
        cells = []
        for thumb in [t for t in samples.get(group, []) if t.image_id not in shown][:quota]:
            shown.add(thumb.image_id)
            row = scores[thumb.image_id]
            verdict = row["verdict"] + (f" ({row['severity']})" if row["severity"] else "")
            top = ", ".join(f"{p['score']:.1f}" for p in row["top_patches"])
            caption = (f"{thumb.image_id}: {verdict}, p(acne) {row['acne_probability']:.2f}, "
                       f"{row['lesion_count']:.1f} lesions; top patches {top}")
            boxes = [(p["x"], p["y"], p["size"]) for p in row["top_patches"]]
            cells.append((thumb.image_id, partial(_draw_face, thumb=thumb, boxes=boxes,
                                                  colour=COLOURS.get(row["verdict"], "#264653"), caption=caption)))
        blocks.append(Block(group, f"{group} faces (their most suspicious patches outlined)", cells))
    return blocks


def _failure_lines(root: str) -> list[str]:
    errors = read_parquet_dir(join(root, ERRORS_DIR), ERROR_SCHEMA).to_pylist()
    errors.sort(key=lambda e: id_hash(e["image_id"]))
    lines = [f"{e['image_id'][:24]}  {e['stage']}/{e['error_type']}: {e['message']}"[:110]
             for e in errors[:MAX_FAILURES_LISTED]]
    if len(errors) > MAX_FAILURES_LISTED:
        lines.append(f"... and {len(errors) - MAX_FAILURES_LISTED:,} more in errors/")
    return lines or ["none"]


def _heading(root: str, job: str, books: Mapping[str, Any]) -> str:
    heading = (f"{job}: {books['inputs']:,} inputs: {books['kept']:,} kept, {books['filtered']:,} filtered, "
               f"{books['failed']:,} failed")
    if job == "score":
        rows = read_parquet_dir(join(root, SCORES_DIR), SCORE_SCHEMA, ["verdict", "severity"]).to_pylist()
        verdicts = Counter(r["verdict"] for r in rows)
        severities = Counter(r["severity"] for r in rows if r["severity"])
        grades = ", ".join(f"{g} {n:,}" for g, n in sorted(severities.items()))
        named = [f"{v} {n:,}" + (f" ({grades})" if v == "acne" and grades else "")
                 for v, n in sorted((v, n) for v, n in verdicts.items() if v)]
        heading += "\nverdicts: " + ", ".join(named + [f"no usable skin {verdicts[None]:,}"])
    return heading


def write_qa_sheet(
    root: str, job: str, samples: Sequence[tuple[str, Sequence[Thumb]]], books: Mapping[str, Any]
) -> dict[str, Any]:
    """Draw ``OUTPUT/qa.png``: the sampled faces by group, then the failures; return its path and the faces on it.

    Its size does not grow with the run: so many faces per group, so many failures listed.
    """
    by_group = {group: sorted(thumbs, key=_rank_of) for group, thumbs in samples}
    blocks = _score_blocks(root, by_group) if job == "score" else _build_blocks(root, by_group)
    failures = _failure_lines(root)
    heading = _heading(root, job, books)
    heights = [
        0.25 + 0.2 * heading.count("\n") + TITLE_INCHES,
        *(-(-len(b.faces) // COLUMNS) * CELL_INCHES + TITLE_INCHES + (0 if b.faces else 0.2) for b in blocks),
        TITLE_INCHES + 0.15 * len(failures) + 0.1,
    ]
    fig = plt.figure(figsize=(COLUMNS * CELL_INCHES, sum(heights)), dpi=DPI)
    top, *parts, bottom = fig.subfigures(len(heights), 1, height_ratios=heights)
    top.text(0.005, 0.9, heading, ha="left", va="top", fontsize=11)
    for part, block, height in zip(parts, blocks, heights[1:]):
        if not block.faces:
            part.text(0.005, 1 - 0.05 / height, f"{block.title}: none", ha="left", va="top", fontsize=10,
                      fontweight="bold")
            continue
        for ax, (_, draw) in zip(_grid(part, block.title, len(block.faces)), block.faces):
            draw(ax)
    bottom.text(0.005, 1 - 0.05 / heights[-1], "failures (a sample by id hash)", ha="left", va="top", fontsize=10,
                fontweight="bold")
    bottom.text(0.005, 1 - (TITLE_INCHES + 0.05) / heights[-1], "\n".join(failures), family="monospace",
                fontsize=7.5, ha="left", va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    path = join(root, QA_SHEET)
    with open_file(path, "wb") as f:
        f.write(buf.getvalue())
    return {"path": path, "faces": {b.group: [image_id for image_id, _ in b.faces] for b in blocks}}
