"""Split: deterministic per face, with the asked-for fractions, or from metadata and paths."""
from __future__ import annotations

from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from transforms.records import ImageRecord
from transforms.split import AssignSplit, SplitError, hash_split, parse_fractions, split_for


def test_hash_split_is_stable_and_close_to_the_fractions() -> None:
    ids = [f"{i:05d}" for i in range(20000)]
    first = [hash_split(i, (0.8, 0.1, 0.1)) for i in ids]
    assert first == [hash_split(i, (0.8, 0.1, 0.1)) for i in ids]
    share = Counter(first)
    assert abs(share["train"] / 20000 - 0.8) < 0.01 and abs(share["test"] / 20000 - 0.1) < 0.01


def test_ffhq_category_and_folder_names_choose_the_split() -> None:
    ffhq = ImageRecord("00001", "gs://b/00000/00001.png", meta={"category": "validation"})
    assert split_for(ffhq, "ffhq", (1, 0, 0)) == "validation"
    acne = ImageRecord("levle0_1", "/data/acne04/valid/levle0_1.jpg")
    assert split_for(acne, "path", (1, 0, 0)) == "validation"
    assert split_for(acne, "test", (1, 0, 0)) == "test"


def test_missing_metadata_is_a_per_image_error() -> None:
    with pytest.raises(SplitError, match="--ffhq-metadata"):
        split_for(ImageRecord("00001", "x.png"), "ffhq", (1, 0, 0))
    with pytest.raises(SplitError, match="no train/valid/test folder"):
        split_for(ImageRecord("a", "/data/a.png"), "path", (1, 0, 0))


@pytest.mark.parametrize("text", ["0.8,0.1", "0.5,0.5,0.5", "a,b,c", "-0.1,0.6,0.5"])
def test_bad_fractions_are_refused(text: str) -> None:
    with pytest.raises(SplitError):
        parse_fractions(text)


def test_split_stage_sets_splits_and_fails_records_it_cannot_place(pipeline) -> None:
    records = [ImageRecord("a", "/d/train/a.png"), ImageRecord("b", "/d/valid/b.png"), ImageRecord("c", "/d/c.png")]
    with pipeline() as p:
        placed, failed = p | beam.Create(records) | AssignSplit("path", (1, 0, 0))
        assert_that(placed | beam.Map(lambda r: (r.image_id, r.split)),
                    equal_to([("a", "train"), ("b", "validation")]), label="placed")
        assert_that(failed | beam.Map(lambda o: (o.image_id, o.stage)), equal_to([("c", "split")]), label="failed")
