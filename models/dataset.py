"""The on-disk dataset format: layout, Arrow schemas and the manifest.

This module is the single contract between the jobs that write datasets
(``pipelines.build_dataset``, ``pipelines.score``) and everything that reads them
(trainers, evaluators, users). It is plain pyarrow, so readers need no Beam.

Layout under a job's ``--output``::

    patches/<split>/part-*.parquet   PATCH_SCHEMA (build_dataset)
    faces/part-*.parquet             OUTCOME_SCHEMA: one row per input image
    errors/part-*.parquet            ERROR_SCHEMA: the failed inputs, with stage and reason
    scores/part-*.parquet            SCORE_SCHEMA (score): one row per scored or skin-less image:
                                     verdict (clear/acne), acne_probability, lesion_count,
                                     severity (a Hayashi grade, null unless acne), probabilities
                                     (a list of {name, probability}: clear, then each grade,
                                     summing to 1), the top patches
    patch_scores/part-*.parquet      PATCH_SCORE_SCHEMA (score --patch-table)
    README.md                        the dataset card: configs and features for Hugging Face ``datasets``
    report.png, qa.png               the run at a glance: charts, and a sheet of sample faces
    manifest.json                    written last; its presence marks the output complete
    _run.json                        the job, arguments and checkpoint hashes a --resume must match

Every schema carries its Hugging Face features in its Arrow metadata (``hf_features``), so every
Parquet file it writes opens in ``datasets`` with ``image`` and ``mask`` as Image features.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds

MANIFEST = "manifest.json"
PATCHES_DIR = "patches"
FACES_DIR = "faces"
ERRORS_DIR = "errors"
SCORES_DIR = "scores"
PATCH_SCORES_DIR = "patch_scores"
SPLITS = ("train", "validation", "test")

# Hugging Face ``datasets`` stores an Image feature as this struct; a column of this type is an image.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# The Arrow schema metadata key ``datasets`` reads features from.
HF_METADATA = "huggingface"
HF_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.float32(): "float32", pa.binary(): "binary"}


def hf_feature(arrow_type: pa.DataType) -> dict[str, Any]:
    """One column's Hugging Face feature, in the JSON form ``datasets.Features.from_dict`` reads."""
    if arrow_type == IMAGE_STRUCT:
        return {"_type": "Image"}
    if pa.types.is_struct(arrow_type):
        return {f.name: hf_feature(f.type) for f in arrow_type}
    if pa.types.is_list(arrow_type):
        return {"feature": hf_feature(arrow_type.value_type), "_type": "List"}
    return {"dtype": HF_DTYPES[arrow_type], "_type": "Value"}


def hf_features(schema: pa.Schema) -> dict[str, dict[str, Any]]:
    """The schema's Hugging Face features, column by column."""
    return {f.name: hf_feature(f.type) for f in schema}


def _with_hf_features(schema: pa.Schema) -> pa.Schema:
    """``schema`` carrying its features as ``datasets`` writes them, so every file written with it says them."""
    return schema.with_metadata({HF_METADATA: json.dumps({"info": {"features": hf_features(schema)}})})


PATCH_SCHEMA = _with_hf_features(pa.schema(
    [
        ("image_id", pa.string()),
        ("patch_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("size", pa.int32()),
        ("skin_fraction", pa.float32()),
        ("lesion_count", pa.int32()),
        ("image", IMAGE_STRUCT),
        ("mask", IMAGE_STRUCT),
        ("source_uri", pa.string()),
        ("segmenter_sha256", pa.string()),
    ]
))

OUTCOME_SCHEMA = _with_hf_features(pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("error_type", pa.string()),
        ("skin_fraction", pa.float32()),
        ("patch_count", pa.int32()),
        ("split", pa.string()),
        ("label", pa.string()),
    ]
))

ERROR_SCHEMA = _with_hf_features(pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
))

BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("size", pa.int32()), ("score", pa.float32())])
# One class of a face's distribution (clear, then each grade), in order. A list of structs, not a
# map: Hugging Face ``datasets`` has no map feature and refuses to load a file with one.
CLASS_PROBABILITY = pa.struct([("name", pa.string()), ("probability", pa.float32())])

SCORE_SCHEMA = _with_hf_features(pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("skin_fraction", pa.float32()),
        ("patches_used", pa.int32()),
        ("working_scale", pa.float32()),
        ("verdict", pa.string()),
        ("acne_probability", pa.float32()),
        ("lesion_count", pa.float32()),
        ("severity", pa.string()),
        ("probabilities", pa.list_(CLASS_PROBABILITY)),
        ("top_patches", pa.list_(BOX)),
        ("label", pa.string()),
        ("segmenter_sha256", pa.string()),
        ("classifier_sha256", pa.string()),
    ]
))

PATCH_SCORE_SCHEMA = _with_hf_features(pa.schema(
    [
        ("image_id", pa.string()),
        ("patch_id", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("size", pa.int32()),
        ("skin_fraction", pa.float32()),
        ("lesions", pa.float32()),
    ]
))
# Each table's schema by its folder; the patch splits' folders are ``patches/<split>``.
SCHEMAS: Mapping[str, pa.Schema] = {
    PATCHES_DIR: PATCH_SCHEMA, FACES_DIR: OUTCOME_SCHEMA, ERRORS_DIR: ERROR_SCHEMA, SCORES_DIR: SCORE_SCHEMA,
    PATCH_SCORES_DIR: PATCH_SCORE_SCHEMA,
}


def schema_of(table: str) -> pa.Schema:
    """The schema of a table folder: ``faces``, ``scores``, ``patches/train``..."""
    return SCHEMAS[table.split("/")[0]]


class IncompleteDatasetError(RuntimeError):
    """The folder has no manifest: a job is still writing it, or died before finishing."""


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def read_manifest(root: str) -> dict[str, Any]:
    """Return a finished output's manifest, or raise if the output is not complete and sound."""
    try:
        with fsspec.open(join(root, MANIFEST), "rt") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise IncompleteDatasetError(
            f"{root} has no {MANIFEST}: the job that writes it has not finished (or was killed). "
            "Rerun it with --resume to finish it, or with --overwrite to start again."
        ) from None
    if not manifest.get("accounting", {}).get("ok", False):
        raise IncompleteDatasetError(f"{root}/{MANIFEST} reports that its inputs do not add up: {manifest.get('accounting')}")
    return manifest


def read_parquet_dir(uri: str, schema: pa.Schema, columns: Iterable[str] | None = None) -> pa.Table:
    """Every Parquet file under ``uri`` as one table (empty, with ``schema``, if there are none)."""
    fs, path = fsspec.core.url_to_fs(uri)
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet")) if fs.isdir(path) else []
    cols = list(columns) if columns is not None else None
    if not files:
        return schema.empty_table().select(cols) if cols else schema.empty_table()
    # pyarrow wraps the fsspec filesystem itself, so every URL fsspec reads (memory://, gs://, s3://) works.
    return ds.dataset(files, format="parquet", filesystem=fs).to_table(columns=cols)


def read_table(root: str, subdir: str, columns: Iterable[str] | None = None) -> pa.Table:
    """Read one table of a finished output (``patches/train``, ``faces``, ``scores``...)."""
    read_manifest(root)
    return read_parquet_dir(join(root, subdir), schema_of(subdir), columns)


def read_patches(root: str, split: str = "all", columns: Iterable[str] | None = None) -> pa.Table:
    """Read a build_dataset output's patches, of one split or ``all``."""
    splits = SPLITS if split == "all" else (split,)
    return pa.concat_tables([read_table(root, f"{PATCHES_DIR}/{s}", columns) for s in splits])


def write_manifest(root: str, manifest: dict[str, Any]) -> None:
    """Write the manifest: the last file a job writes, marking its output complete."""
    with fsspec.open(join(root, MANIFEST), "wt") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
