"""Outputs open in Hugging Face ``datasets`` as they are: images as images, every table a config, a card."""
from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard
from PIL import Image

from models.dataset import (
    FACES_DIR, OUTCOME_SCHEMA, SCHEMAS, hf_features, read_manifest, read_patches, read_table,
)
from transforms.card import write_card


def test_every_parquet_file_carries_its_features_with_image_and_mask_as_images(sample_output: Path) -> None:
    files = sorted(sample_output.rglob("*.parquet"))
    assert any("patches" in f.parts for f in files)
    for path in files:
        features = datasets.Features.from_arrow_schema(pq.read_schema(path))
        table = path.relative_to(sample_output).parts[0]
        assert features == datasets.Features.from_dict(hf_features(SCHEMAS[table])), path
        if table == "patches":
            assert isinstance(features["image"], datasets.Image) and isinstance(features["mask"], datasets.Image)


def test_load_dataset_on_the_output_gives_the_splits_and_the_stored_patches(
        sample_output: Path, tmp_path: Path) -> None:
    rows = read_manifest(str(sample_output))["rows"]
    ds = datasets.load_dataset(str(sample_output), cache_dir=str(tmp_path))
    assert {split: len(ds[split]) for split in ds} == {
        table.split("/")[1]: n for table, n in rows.items() if table.startswith("patches/") and n
    }
    first = ds["train"][0]
    stored = read_patches(str(sample_output), "train").to_pylist()
    [row] = [r for r in stored if r["patch_id"] == first["patch_id"]]
    assert isinstance(first["image"], Image.Image) and isinstance(first["mask"], Image.Image)
    for column in ("image", "mask"):
        assert np.array_equal(np.asarray(first[column]), np.asarray(Image.open(io.BytesIO(row[column]["bytes"]))))
    faces = datasets.load_dataset(str(sample_output), "faces", cache_dir=str(tmp_path))
    written = read_table(str(sample_output), FACES_DIR, ["image_id"]).column(0).to_pylist()
    assert sorted(faces["train"]["image_id"]) == sorted(written)


def test_the_patch_folder_alone_also_decodes_as_images(sample_output: Path, tmp_path: Path) -> None:
    ds = datasets.load_dataset("parquet", data_dir=str(sample_output / "patches"), cache_dir=str(tmp_path))
    assert isinstance(ds["train"][0]["image"], Image.Image)


def test_a_score_output_opens_table_by_table(sample_score_output: Path, tmp_path: Path) -> None:
    rows = read_manifest(str(sample_score_output))["rows"]
    scores = datasets.load_dataset(str(sample_score_output), cache_dir=str(tmp_path))["train"]
    assert len(scores) == rows["scores"]
    expected = read_table(str(sample_score_output), "scores").to_pylist()
    by_id = {r["image_id"]: r for r in expected}
    for row in scores:
        assert row["verdict"] == by_id[row["image_id"]]["verdict"]
        assert [p["name"] for p in row["probabilities"]] == ["clear", "mild", "moderate", "severe", "very_severe"]
        assert row["top_patches"] == by_id[row["image_id"]]["top_patches"]
    for config in ("faces", "errors", "patch_scores"):
        table = datasets.load_dataset(str(sample_score_output), config, cache_dir=str(tmp_path))["train"]
        assert len(table) == rows[config], config


def test_the_card_tells_counts_checkpoints_licence_and_command(sample_output: Path) -> None:
    manifest = read_manifest(str(sample_output))
    card = DatasetCard.load(sample_output / "README.md")
    assert card.data.license == "unknown" and card.data.configs[0]["config_name"] == "patches"
    assert card.data.configs[0]["default"]
    [info] = [c for c in card.data.dataset_info if c["config_name"] == "patches"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {
        t.split("/")[1]: n for t, n in manifest["rows"].items() if t.startswith("patches/") and n
    }
    assert manifest["checkpoints"]["segmenter"]["sha256"] in card.text
    assert manifest["command"] in card.text and manifest["command"].startswith("python -m pipelines.build_dataset ")
    assert f"{manifest['accounting']['inputs']} input images" in card.text


def test_the_card_counts_the_licences_of_ffhq_photos(tmp_path: Path) -> None:
    (tmp_path / FACES_DIR).mkdir()
    faces = [{"image_id": i, "status": s} for i, s in
             [("00001", "kept"), ("00002", "kept"), ("00003", "kept"), ("00004", "filtered")]]
    pq.write_table(pa.Table.from_pylist(faces, OUTCOME_SCHEMA), tmp_path / FACES_DIR / "part-0.parquet")
    metadata = {str(i): {"category": "training", "metadata": {"license": lic}}
                for i, lic in [(1, "Attribution License"), (2, "Attribution License"), (4, "Public Domain Mark")]}
    (tmp_path / "ffhq.json").write_text(json.dumps(metadata))
    manifest = {
        "job": "build_dataset", "arguments": {"ffhq_metadata": str(tmp_path / "ffhq.json")}, "checkpoints": {},
        "command": "python -m pipelines.build_dataset", "rows": {FACES_DIR: 4},
        "accounting": {"inputs": 4, "kept": 3, "filtered": 1, "failed": 0, "ok": True},
    }
    write_card(str(tmp_path), manifest, [], {FACES_DIR: 100})
    card = DatasetCard.load(tmp_path / "README.md")
    assert card.data.license == "other"
    assert "| Attribution License | 2 |" in card.text and "| unknown | 1 |" in card.text
    assert "Public Domain Mark" not in card.text, "only the photos in the output count"
