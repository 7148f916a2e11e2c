"""The dataset card: ``OUTPUT/README.md``, so that Hugging Face tools open an output as it is.

``datasets.load_dataset(OUTPUT)`` and the Hub viewer read the card's YAML header: one config per
table (the first, the default, is build_dataset's patches with their splits, or score's scores),
their files, and their features, derived from the schemas in ``models.dataset`` like the
features every Parquet file carries. The body says what a person asks first: how many rows,
which checkpoints, under which licences the input photos were published, and the command.
"""
from __future__ import annotations

import shlex
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import yaml

from models.dataset import ERRORS_DIR, FACES_DIR, OUTCOME_SCHEMA, hf_features, join, read_parquet_dir, schema_of
from transforms.records import KEPT
from transforms.sidefiles import load_ffhq_licences
from transforms.storage import open_file

CARD = "README.md"
UNKNOWN = "unknown"
# A table without splits of its own is one split, named as Hugging Face names the split of unsplit data.
ONE_SPLIT = "train"


def command(job: str, argv: Sequence[str]) -> str:
    """The command line that ran the job, as a shell would take it."""
    return shlex.join(["python", "-m", f"pipelines.{job}", *argv])


def yaml_feature(name: Optional[str], feature: Mapping[str, Any]) -> dict[str, Any]:
    """A feature in the card's YAML form (``datasets.Features._to_yaml_list``) from its JSON form."""
    out: dict[str, Any] = {} if name is None else {"name": name}
    kind = feature.get("_type")
    if kind == "Value":
        out["dtype"] = feature["dtype"]
    elif kind == "Image":
        out["dtype"] = "image"
    elif kind == "List":
        inner = yaml_feature(None, feature["feature"])
        out["list"] = inner.get("struct", inner.get("dtype"))
    else:
        out["struct"] = [yaml_feature(n, f) for n, f in feature.items()]
    return out


def configs(tables: Sequence[str], rows: Mapping[str, int], sizes: Mapping[str, int]) -> list[dict[str, Any]]:
    """One config per table family with rows (``patches/<split>`` tables are one config's splits), in order."""
    families: dict[str, list[str]] = {}
    for table in tables:
        if rows.get(table):
            families.setdefault(table.split("/")[0], []).append(table)
    out = []
    for name, members in families.items():
        splits = [(t.split("/")[1] if "/" in t else ONE_SPLIT, t) for t in members]
        out.append({
            "config_name": name,
            "data_files": [{"split": split, "path": f"{table}/*.parquet"} for split, table in splits],
            "features": [yaml_feature(n, f) for n, f in hf_features(schema_of(name)).items()],
            "splits": [{"name": split, "num_bytes": sizes[table], "num_examples": rows[table]}
                       for split, table in splits],
        })
    return out


def input_licences(root: str, ffhq_metadata: Optional[str]) -> Counter[str]:
    """Kept images by the licence their photo was published under (FFHQ's metadata), else ``unknown``."""
    kept = [r["image_id"] for r in read_parquet_dir(join(root, FACES_DIR), OUTCOME_SCHEMA, ["image_id", "status"])
            .to_pylist() if r["status"] == KEPT]
    licences = load_ffhq_licences(ffhq_metadata) if ffhq_metadata else {}
    return Counter(licences.get(image_id) or UNKNOWN for image_id in kept)


def card_text(
    manifest: Mapping[str, Any], tables: Sequence[str], sizes: Mapping[str, int], licences: Counter[str]
) -> str:
    """The card: YAML configs and features, then counts, checkpoints, licences and the command.

    ``sizes`` are each table's uncompressed bytes, which Hugging Face records per split.
    """
    found = configs(tables, manifest["rows"], sizes)
    known = sorted(set(licences) - {UNKNOWN})
    header = {
        "pretty_name": f"acne-pipeline {manifest['job']} output",
        # Photos keep their own licences; the body lists them. Hub licence ids name one licence.
        "license": "other" if known else UNKNOWN,
        "tags": ["acne", "skin", "faces"],
        "configs": [
            {"config_name": c["config_name"], "data_files": c["data_files"], **({"default": True} if i == 0 else {})}
            for i, c in enumerate(found)
        ],
        "dataset_info": [
            {"config_name": c["config_name"], "features": c["features"], "splits": c["splits"]} for c in found
        ],
    }
    books = manifest["accounting"]
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
        f"# {header['pretty_name']}", "",
        f"{books['inputs']} input images: {books['kept']} kept, {books['filtered']} filtered, {books['failed']} "
        f"failed{'' if books['ok'] else ' (THE COUNTS DO NOT ADD UP)'}. `manifest.json` has every argument and "
        "count; `report.png` and `qa.png` show the run at a glance.", "",
        "| config | split | rows |", "| --- | --- | --- |",
        *(f"| {c['config_name']} | {s['name']} | {s['num_examples']:,} |" for c in found for s in c["splits"]), "",
        "```python", "from datasets import load_dataset", "",
        f'ds = load_dataset("path/to/this/folder")  # the {found[0]["config_name"] if found else "first"} config',
        *(f'{c["config_name"]} = load_dataset("path/to/this/folder", "{c["config_name"]}")' for c in found[1:]),
        "```", "",
        "## Checkpoints", "",
        *(f"- {name}: sha256 `{c['sha256']}` (`{c['uri']}`)" for name, c in manifest["checkpoints"].items()), "",
        "## Licences of the input photos", "",
    ]
    if known:
        lines += ["Each kept image's photo, by the licence it was published under (from the FFHQ metadata):", "",
                  "| licence | images |", "| --- | --- |",
                  *(f"| {name} | {n:,} |" for name, n in licences.most_common()), ""]
    else:
        lines += ["unknown: the inputs came without licence metadata (pass `--ffhq-metadata` for FFHQ photos). "
                  "Check the licence of your source before you share this dataset.", ""]
    lines += ["## The command", "", "```bash", manifest["command"], "```", ""]
    return "\n".join(lines)


def write_card(root: str, manifest: Mapping[str, Any], tables: Sequence[str], sizes: Mapping[str, int]) -> str:
    """Write ``OUTPUT/README.md`` for a finished run's ``manifest`` (its rows, books, checkpoints, command)."""
    licences = input_licences(root, manifest["arguments"].get("ffhq_metadata"))
    path = join(root, CARD)
    with open_file(path, "wt") as f:
        f.write(card_text(manifest, [*tables, FACES_DIR, ERRORS_DIR], sizes, licences))
    return path
