"""Read: every shard kind yields stable ids; broken shards and duplicates become reasons."""
from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
from pathlib import Path

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.images import png_bytes, random_rgb
from transforms import sidefiles
from transforms.plan import check_patterns, plan_shard
from transforms.read import ReadImages
from transforms.records import ImageRef, Outcome
from transforms.sidefiles import InputError, LabelFiles, load_ffhq_categories, load_labels, parse_voc_boxes

PNG = png_bytes(random_rgb(8, 8))


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def failures_like(expected: list[tuple[str, str, str]]):
    """A matcher: failures with these (id, stage) whose reasons contain the given words."""

    def match(actual: list[tuple[str, str, str]]) -> None:
        got = sorted(actual)
        assert [(i, s) for i, s, _ in got] == [(i, s) for i, s, _ in expected], got
        for (_, _, reason), (_, _, words) in zip(got, expected):
            assert words in reason, (words, reason)

    return match


def expect_read(pipeline, patterns, ok: list, failed: list, **kwargs) -> None:
    """Run ReadImages; check the (id, label) records and the (id, stage, words-in-reason) failures."""
    with pipeline() as p:
        records, failures, inputs = p | ReadImages(patterns, **kwargs)
        assert_that(records | beam.Map(lambda r: (r.image_id, r.label)), equal_to(ok), label="records")
        assert_that(inputs, equal_to([len(ok) + len(failed)]), label="inputs")
        assert_that(
            failures | beam.Map(lambda o: (o.image_id, o.stage, o.reason)), failures_like(failed), label="failed"
        )


def test_ffhq_folder_layout_gives_five_digit_ids(tmp_path: Path, pipeline) -> None:
    for i in (0, 1, 1001):
        path = tmp_path / f"{i // 1000 * 1000:05d}" / f"{i:05d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(PNG)
    expect_read(pipeline, [str(tmp_path)], [("00000", None), ("00001", None), ("01001", None)], [])


def test_a_folder_means_its_images_but_a_named_file_is_always_an_input(tmp_path: Path, pipeline) -> None:
    (tmp_path / "a.jpg").write_bytes(PNG)
    (tmp_path / "a.xml").write_text("<annotation/>")
    (tmp_path / "labels.csv").write_text("image,grade\n")
    expect_read(pipeline, [str(tmp_path)], [("a", None)], [])
    expect_read(pipeline, [str(tmp_path / "labels.csv")], [], [("labels", "read", "unsupported file type .csv")])


def test_webdataset_tar_members_become_images_by_key(tmp_path: Path) -> None:
    write_tar(tmp_path / "shard-000.tar", {"a/00007.png": PNG, "a/00007.json": b"{}", "a/00008.jpg": PNG})
    refs = list(plan_shard(str(tmp_path / "shard-000.tar")))
    assert [(r.image_id, r.member) for r in refs] == [("00007", "a/00007.png"), ("00008", "a/00008.jpg")]


def test_zip_members_become_images(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as archive:
        archive.writestr("x/00003.png", PNG)
        archive.writestr("README.txt", "not an image")
    assert [r.image_id for r in plan_shard(str(tmp_path / "faces.zip"))] == ["00003"]


def test_parquet_with_hf_image_struct_and_with_binary_column(tmp_path: Path, pipeline) -> None:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": PNG, "path": "faces/00042.png"}], struct)}),
                   tmp_path / "hf.parquet")
    pq.write_table(pa.table({"id": ["k1", "k2"], "jpg": pa.array([PNG, PNG], pa.binary())}), tmp_path / "bin.parquet")
    expect_read(pipeline, [str(tmp_path / "*.parquet")], [("00042", None), ("k1", None), ("k2", None)], [])


def test_truncated_tar_keeps_whole_members_and_fails_the_cut_one(tmp_path: Path, pipeline) -> None:
    write_tar(tmp_path / "t.tar", {"00001.png": PNG, "00002.png": PNG * 20})
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: 1024 + len(PNG) + 600])
    expect_read(pipeline, [str(tmp_path / "t.tar")], [("00001", None)], [("00002", "read", "truncated")])


def test_corrupt_tar_header_is_reported_not_silently_skipped(tmp_path: Path) -> None:
    write_tar(tmp_path / "c.tar", {"00001.png": PNG, "00002.png": PNG, "00003.png": PNG})
    data = bytearray((tmp_path / "c.tar").read_bytes())
    second_header = 512 + (len(PNG) + 511) // 512 * 512
    data[second_header : second_header + 100] = b"\xff" * 100
    (tmp_path / "c.tar").write_bytes(bytes(data))
    items = list(plan_shard(str(tmp_path / "c.tar")))
    assert [i.image_id for i in items if isinstance(i, ImageRef)] == ["00001"]
    failures = [i for i in items if isinstance(i, Outcome)]
    assert len(failures) == 1 and "corrupt tar header" in failures[0].reason


def test_corrupt_parquet_row_group_fails_its_rows_only(tmp_path: Path, pipeline) -> None:
    path = tmp_path / "rg.parquet"
    table = pa.table({"image_id": [f"r{i}" for i in range(4)], "png": pa.array([PNG] * 4, pa.binary())})
    pq.write_table(table, path, row_group_size=2, compression="none")
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 40] = b"\x00" * 40
    path.write_bytes(bytes(data))
    expect_read(
        pipeline, [str(path)], [("r0", None), ("r1", None)], [("rg-000002", "read", ""), ("rg-000003", "read", "")]
    )


def test_duplicate_ids_keep_one_and_fail_the_rest(tmp_path: Path, pipeline) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "00005.png").write_bytes(PNG)
    expect_read(
        pipeline, [str(tmp_path / "a"), str(tmp_path / "b")], [("00005", None)],
        [("00005", "read", f"duplicate image id '00005'; kept {tmp_path}/a/00005.png")],
    )


def test_labels_match_by_file_stem_and_missing_labels_fail(tmp_path: Path, pipeline) -> None:
    (tmp_path / "levle0_10.jpg").write_bytes(PNG)
    (tmp_path / "levle3_2.jpg").write_bytes(PNG)
    (tmp_path / "labels.csv").write_text("image,grade\nimages/levle0_10.jpg,0\n")
    labels = LabelFiles((str(tmp_path / "labels.csv"),), "image", "grade")
    assert load_labels(labels) == {"levle0_10": "0"}
    expect_read(
        pipeline, [str(tmp_path / "*.jpg")], [("levle0_10", "0")],
        [("levle3_2", "label", "no label for image id 'levle3_2' in --labels-csv")], labels=labels,
    )


def test_label_file_without_the_named_columns_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("name,grade\na,1\n")
    with pytest.raises(InputError, match=r"no column\(s\) \['image_id'\].*--id-column"):
        load_labels(LabelFiles((str(tmp_path / "labels.csv"),), "image_id", "grade"))


@pytest.mark.parametrize("pattern", ["/no/such/folder/*.png", "memory://empty-bucket/x/*.tar"])
def test_patterns_that_match_nothing_fail_fast(pattern: str) -> None:
    with pytest.raises(InputError, match="matches no files"):
        check_patterns([pattern])


def test_memory_urls_are_read_through_fsspec(pipeline) -> None:
    with fsspec.open("memory://bucket/ffhq/00009.png", "wb") as f:
        f.write(PNG)
    assert check_patterns(["memory://bucket/ffhq/*.png"]) == 1
    expect_read(pipeline, ["memory://bucket/ffhq/*.png"], [("00009", None)], [])


def test_voc_boxes_are_parsed() -> None:
    xml = b"<annotation><object><bndbox><xmin>1</xmin><xmax>5</xmax><ymin>2</ymin><ymax>9</ymax></bndbox></object></annotation>"
    assert parse_voc_boxes(xml) == [(1, 2, 5, 9)]


def test_short_label_rows_fail_fast(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image_id,grade\na,1\n\nb\n")
    with pytest.raises(InputError, match="line 4 has 1 of 2 columns"):
        load_labels(LabelFiles((str(tmp_path / "labels.csv"),), "image_id", "grade"))


def test_ffhq_metadata_gives_the_category_by_five_digit_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the category is kept; entries are decoded one at a time, across chunk boundaries."""
    monkeypatch.setattr(sidefiles, "JSON_CHUNK_CHARS", 7)
    (tmp_path / "ffhq.json").write_text(
        '{"7": {"category": "validation", "image": {"face_landmarks": [[1.0, 2.0]]}, "metadata": {}},\n'
        ' "12" : {"category": "training", "image": {"pixel_size": [1024, 1024]}} }\n'
    )
    assert load_ffhq_categories(str(tmp_path / "ffhq.json")) == {"00007": "validation", "00012": "training"}


@pytest.mark.parametrize("text", ["", "[1, 2]", '{"7": {"category": "training"}', '{"7": {}} {}', '{"7": 3}', "{,}"])
def test_ffhq_metadata_that_is_not_a_json_object_of_faces_fails_fast(tmp_path: Path, text: str) -> None:
    (tmp_path / "ffhq.json").write_text(text)
    with pytest.raises(InputError, match="cannot read FFHQ metadata"):
        load_ffhq_categories(str(tmp_path / "ffhq.json"))


def test_labels_and_ffhq_categories_reach_the_records_by_uri(tmp_path: Path, pipeline) -> None:
    for name in ("00001", "00002"):
        (tmp_path / f"{name}.png").write_bytes(PNG)
    (tmp_path / "labels.csv").write_text("image_id,label\n00001,0\n00002,3\n")
    (tmp_path / "ffhq.json").write_text('{"1": {"category": "validation"}, "2": {"category": "training"}}')
    with pipeline() as p:
        records, _, _ = p | ReadImages(
            [str(tmp_path / "*.png")], LabelFiles((str(tmp_path / "labels.csv"),), "image_id", "label"),
            str(tmp_path / "ffhq.json"),
        )
        assert_that(
            records | beam.Map(lambda r: (r.image_id, r.label, r.meta)),
            equal_to([("00001", "0", {"category": "validation"}), ("00002", "3", {"category": "training"})]),
        )


LIMIT = 4096  # a small --max-image-bytes, so that over-limit images stay small on disk


def test_images_whose_container_declares_more_than_the_limit_fail_unread(tmp_path: Path, pipeline) -> None:
    """A loose file, a tar member, a zip member and a one-image Parquet row group, each over the limit."""
    big = png_bytes(random_rgb(64, 64))
    assert len(big) > LIMIT
    (tmp_path / "00001.png").write_bytes(big)
    (tmp_path / "00002.png").write_bytes(PNG)
    write_tar(tmp_path / "s.tar", {"t/00003.png": big, "t/00004.png": PNG})
    with zipfile.ZipFile(tmp_path / "s.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("00005.png", bytes(LIMIT * 100))  # compresses about 400:1
        archive.writestr("00006.png", PNG)
    pq.write_table(pa.table({"id": ["p7", "p8"], "png": pa.array([big, PNG], pa.binary())}),
                   tmp_path / "s.parquet", row_group_size=1, compression="zstd")
    expect_read(
        pipeline, [str(tmp_path)], [("00002", None), ("00004", None), ("00006", None), ("p8", None)],
        [
            ("00001", "read", f"the file declares {len(big):,} bytes, over the limit of 4,096 (--max-image-bytes)"),
            ("00003", "read", f"tar member t/00003.png declares {len(big):,} bytes, over the limit of 4,096"),
            ("00005", "read", "zip member 00005.png ("),
            ("p7", "read", "declares"),
        ],
        max_image_bytes=LIMIT,
    )
    zip_reason = [o.reason for o in plan_shard(str(tmp_path / "s.zip"), max_image_bytes=LIMIT)
                  if isinstance(o, Outcome)][0]
    assert ":1) declares 409,600 bytes, over the limit of 4,096 (--max-image-bytes); none of it was read" in zip_reason


def test_a_parquet_cell_over_the_limit_fails_when_read_and_its_row_group_neighbours_pass(
    tmp_path: Path, pipeline
) -> None:
    """Cells sharing a row group have no declared size of their own: each is checked as it is read."""
    cells = [PNG, bytes(LIMIT + 1), PNG]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "png": pa.array(cells, pa.binary())}), tmp_path / "rg.parquet")
    expect_read(
        pipeline, [str(tmp_path / "rg.parquet")], [("a", None), ("c", None)],
        [("b", "read", f"holds {LIMIT + 1:,} bytes, over the limit of 4,096 (--max-image-bytes)")],
        max_image_bytes=LIMIT,
    )


def test_a_row_group_too_big_to_read_whole_fails_its_images_with_how_to_fix_it(tmp_path: Path) -> None:
    cells = [os.urandom(LIMIT) for _ in range(20)]  # each within the limit, together over 16 x the limit
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(20)], "png": pa.array(cells, pa.binary())}),
                   tmp_path / "one-group.parquet", compression="none")
    items = list(plan_shard(str(tmp_path / "one-group.parquet"), max_image_bytes=LIMIT))
    assert len(items) == 20 and all(isinstance(i, Outcome) for i in items)
    assert "over 16 x --max-image-bytes" in items[0].reason and "smaller row groups" in items[0].reason


def test_a_zip_member_that_inflates_past_its_declared_size_is_cut_off_there(tmp_path: Path, pipeline) -> None:
    """The directory says 100 bytes; the stream holds a megabyte of zeros. Reading stops at 100 bytes."""
    with zipfile.ZipFile(tmp_path / "liar.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("00009.png", bytes(1 << 20))
    data = bytearray((tmp_path / "liar.zip").read_bytes())
    size_at = data.rindex(b"PK\x01\x02") + 24  # the central directory's uncompressed size
    data[size_at : size_at + 4] = (100).to_bytes(4, "little")
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    expect_read(pipeline, [str(tmp_path / "liar.zip")], [], [("00009", "read", "Bad CRC-32")],
                max_image_bytes=LIMIT)


@pytest.mark.parametrize("content, limit, words", [
    (b"image_id,label\n" + b"a,1\n" * 100, ("MAX_LABELS_BYTES", 100), "is 415 bytes, over the 100 a job reads"),
    (b"image_id,label\n" + b"x" * 5000, ("MAX_LABEL_LINE_CHARS", 1000), "line 2 is over 1,000 characters long"),
    (b'image_id,label\na,1\nb,"' + b"x\n" * 70_000, None, "after line 2: field larger than field limit"),
    (b"image_id,label\na,\xff\xfe\n", None, "not a readable CSV text file"),
], ids=["huge", "endless-line", "runaway-quote", "not-utf8"])
def test_huge_or_malformed_label_files_fail_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, limit, words: str
) -> None:
    if limit:
        monkeypatch.setattr(sidefiles, *limit)
    (tmp_path / "labels.csv").write_bytes(content)
    with pytest.raises(InputError, match=re.escape(words)):
        load_labels(LabelFiles((str(tmp_path / "labels.csv"),), "image_id", "label"))


def test_huge_ffhq_metadata_or_an_endless_entry_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ffhq.json").write_text('{"1": {"category": "training", "blob": "' + "x" * 5000 + '"}}')
    monkeypatch.setattr(sidefiles, "MAX_JSON_ENTRY_CHARS", 1000)
    monkeypatch.setattr(sidefiles, "JSON_CHUNK_CHARS", 100)
    with pytest.raises(InputError, match="a value over 1,000 characters long"):
        load_ffhq_categories(str(tmp_path / "ffhq.json"))
    monkeypatch.setattr(sidefiles, "MAX_FFHQ_METADATA_BYTES", 1000)
    with pytest.raises(InputError, match=r"FFHQ metadata .* is 5,\d+ bytes, over the 1,000 a job reads"):
        load_ffhq_categories(str(tmp_path / "ffhq.json"))


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><object><name>&lol3;</name><bndbox><xmin>1</xmin></bndbox></object></annotation>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation><name>&x;</name></annotation>"""


def test_voc_files_that_declare_entities_are_huge_or_malformed_fail_their_image_only(
    tmp_path: Path, pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sidefiles, "MAX_VOC_BYTES", 2000)
    annotations = {
        "laughs": BILLION_LAUGHS, "external": EXTERNAL, "huge": b"<annotation>" + b" " * 3000 + b"</annotation>",
        "broken": b"<annotation><bndbox>", "nan": b"<annotation><bndbox><xmin>left</xmin></bndbox></annotation>",
        "good": b"<annotation><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></annotation>",
    }
    for name, xml in annotations.items():
        (tmp_path / f"{name}.png").write_bytes(PNG)
        (tmp_path / f"{name}.xml").write_bytes(xml)
    with pipeline() as p:
        records, failures, _ = p | ReadImages([str(tmp_path)], voc_annotations=True)
        assert_that(records | beam.Map(lambda r: (r.image_id, r.meta["lesions"])), equal_to([("good", [(1, 2, 5, 9)])]),
                    label="records")
        assert_that(failures | beam.Map(lambda o: (o.image_id, o.stage, o.reason)), failures_like([
            ("broken", "read", "unreadable VOC annotation: ParseError"),
            ("external", "read", "unreadable VOC annotation: DTDForbidden"),
            ("huge", "read", "is over 2,000 bytes"),
            ("laughs", "read", "unreadable VOC annotation: DTDForbidden"),
            ("nan", "read", "unreadable VOC annotation: ValueError"),
        ]), label="failed")
