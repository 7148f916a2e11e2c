"""Resume: carry what earlier runs committed into the next run, and skip the images they finished.

Every run writes ``_run.json`` before any work: the job, its arguments, its checkpoints and the
runs so far. ``--resume`` on the same output reads it back and refuses a run whose job, arguments
or checkpoints differ. It then *salvages* the earlier runs' rows: every readable Parquet file,
whether committed or still in ``_temporary/`` (a killed run commits nothing). An image is carried
over only when all of its rows are there: its ``faces/`` row, its ``errors/`` row if it failed,
and every patch or score row the job writes for it. Each carried row is kept exactly once; the
other images are processed again. The carried images go to a done list, and the read stage skips
them. Files added to the input since the last run are new images, so ``--resume`` on a grown
input is an incremental run.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from models.dataset import ERRORS_DIR, FACES_DIR, MANIFEST, join
from transforms.records import FAILED, FILTERED, KEPT
from transforms.sink import LOCK, TEMP_DIR, OutputError
from transforms.storage import find_files, is_file, makedirs, move, open_file, remove

RUN_RECORD = "_run.json"
DONE_LIST = f"{TEMP_DIR}/done.parquet"
# Flags that say how to treat the output, not what to compute: they may change between runs.
RUN_FLAGS = frozenset({"resume", "overwrite"})

# Rows a face needs in a table family (``patches`` covers patches/train, patches/test...), from its faces/ row.
Expected = Callable[[Mapping[str, Any]], int]
Families = Mapping[str, Expected]

Image = tuple[str, str]  # (image_id, source_uri): one input; duplicate ids differ by source


@dataclass(frozen=True)
class RunStart:
    """What this run inherits: its number, the earlier runs, and the images already done."""

    run: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    carried: dict[str, int] = field(default_factory=dict)
    done_list: Optional[str] = None

    @property
    def carried_images(self) -> int:
        return sum(self.carried.get(s, 0) for s in (KEPT, FILTERED, FAILED))


def start_run(root: str, record: Mapping[str, Any], resume: bool, families: Families) -> RunStart:
    """Write this run's record; with ``resume``, salvage the earlier runs first.

    ``record`` holds the job, its arguments and checkpoints: what must match between runs.
    """
    started = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    previous = read_run_record(root) if resume else None
    if previous is None:
        _write_run_record(root, {**record, "runs": [{"run": 1, **started}]})
        return RunStart(run=1)
    refuse_changes(previous, record, root)
    runs = _finished_runs(root, previous["runs"])
    run = runs[-1]["run"] + 1
    # The finished runs' records move from the manifest into _run.json before the manifest goes.
    _write_run_record(root, {**record, "runs": [*runs, {"run": run, **started}]})
    remove(join(root, MANIFEST))  # the output is incomplete again until this run finishes
    done, carried = salvage(root, families, run - 1)
    _write_done_list(root, done)
    return RunStart(run=run, runs=runs, carried=carried, done_list=join(root, DONE_LIST))


def read_run_record(root: str) -> Optional[dict[str, Any]]:
    """The output's run record; None for an empty output; an error for an output we did not write."""
    path = join(root, RUN_RECORD)
    if not is_file(path):
        if any(not f.endswith(f"/{LOCK}") for f in find_files(root, "")):
            raise OutputError(
                f"--resume: {root} holds files but no {RUN_RECORD}, so there is no run to resume. Pass --overwrite to "
                "replace it, or choose another --output."
            )
        return None
    with open_file(path, "rt") as f:
        return json.load(f)


def refuse_changes(previous: Mapping[str, Any], record: Mapping[str, Any], root: str) -> None:
    """Resuming with another job, other arguments or other checkpoints would mix two datasets."""
    changes = [f"job {record['job']} (was {previous['job']})"] if previous["job"] != record["job"] else []
    for section in ("arguments", "checkpoints"):
        old, new = previous[section], record[section]
        changes += [f"{key} {new.get(key)!r} (was {old.get(key)!r})"
                    for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if changes:
        raise OutputError(
            f"--resume: this run differs from the one that started {root}: {'; '.join(changes)}. Rerun with the "
            "first run's arguments and checkpoints, or pass --overwrite to start again."
        )


def _write_run_record(root: str, record: Mapping[str, Any]) -> None:
    with open_file(join(root, RUN_RECORD), "wt") as f:
        json.dump(record, f, indent=2)


def _finished_runs(root: str, started: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each earlier run as the manifest (or an earlier resume) recorded it, or as started if it never finished."""
    path = join(root, MANIFEST)
    finished = {}
    if is_file(path):
        with open_file(path, "rt") as f:
            finished = {r["run"]: r for r in json.load(f).get("runs", [])}
    return [finished.get(r["run"], r if "finished" in r else {**r, "finished": False}) for r in started]


def _readable(uri: str) -> Optional[pq.ParquetFile]:
    """A Parquet file whose footer is intact; None for one a killed writer left half-written."""
    try:
        return pq.ParquetFile(open_file(uri, "rb").open())
    except Exception:
        return None


def _files(root: str, family: str) -> Iterator[tuple[str, str, pq.ParquetFile]]:
    """(uri, table dir, file) for every readable file of ``family``, committed or temporary."""
    for base in (root, join(root, TEMP_DIR)):
        for uri in find_files(join(base, family), ".parquet"):
            table = uri[uri.rindex(f"/{family}/") + 1 : uri.rindex("/")]
            pf = _readable(uri)
            if pf is not None:
                yield uri, table, pf


def _key_columns(schema: pa.Schema) -> list[str]:
    """What identifies a row: its patch, or its input image."""
    return ["patch_id"] if "patch_id" in schema.names else ["image_id", "source_uri"]


def salvage(root: str, families: Families, last_run: int) -> tuple[set[Image], dict[str, int]]:
    """Keep every complete image's rows once, in committed files; return the done images and their tally."""
    faces = {}
    for _, _, pf in _files(root, FACES_DIR):
        for row in pf.read(columns=["image_id", "source_uri", "status", "patch_count"]).to_pylist():
            faces.setdefault((row["image_id"], row["source_uri"]), row)
    errors = {(r["image_id"], r["source_uri"]) for _, _, pf in _files(root, ERRORS_DIR)
              for r in pf.read(columns=["image_id", "source_uri"]).to_pylist()}
    counts = {family: _rows_per_image(root, family) for family in families}
    done = {
        image for image, row in faces.items()
        if (row["status"] != FAILED or image in errors)
        and all(counts[family][row["image_id"]] == (expected(row) if row["status"] != FAILED else 0)
                for family, expected in families.items())
    }
    # Patch rows name no source: they belong to the one image of their id that was not a failed duplicate.
    owners = {image_id for image_id, uri in done if faces[(image_id, uri)]["status"] != FAILED}
    for table in (FACES_DIR, ERRORS_DIR, *families):
        _keep_done_rows(root, table, done, owners, last_run)
    remove(join(root, TEMP_DIR))
    tally = Counter(faces[image]["status"] for image in done)
    patches = sum(faces[image]["patch_count"] or 0 for image in done if faces[image]["status"] == KEPT)
    return done, {KEPT: tally[KEPT], FILTERED: tally[FILTERED], FAILED: tally[FAILED], "patches": patches}


def _rows_per_image(root: str, family: str) -> Counter[str]:
    """Distinct rows per image id in a table family (a retried bundle may have written some twice)."""
    seen: dict[tuple[Any, ...], str] = {}
    for _, _, pf in _files(root, family):
        columns = ["image_id", *_key_columns(pf.schema_arrow)]
        for row in pf.read(columns=list(dict.fromkeys(columns))).to_pylist():
            seen.setdefault(tuple(row[c] for c in columns[1:]), row["image_id"])
    return Counter(seen.values())


def _keep_done_rows(root: str, family: str, done: set[Image], owners: set[str], last_run: int) -> None:
    """Leave each row of a done image once, in a committed file; drop the rest.

    Committed files of finished runs hold only done images and stay as they are. A temporary
    file whose rows are all new and done is renamed into place; any other is rewritten without
    the rows it must not keep.
    """
    seen: set[tuple[Any, ...]] = set()
    numbers: Counter[str] = Counter()
    for uri, table, pf in sorted(_files(root, family), key=lambda f: (TEMP_DIR in f[0], f[0])):
        keys = _key_columns(pf.schema_arrow)
        per_patch = keys == ["patch_id"]
        keep = []
        for row in pf.read(columns=list(dict.fromkeys(["image_id", *keys]))).to_pylist():
            key = tuple(row[k] for k in keys)
            is_done = row["image_id"] in owners if per_patch else key in done
            keep.append(is_done and key not in seen)
            if keep[-1]:
                seen.add(key)
        if TEMP_DIR not in uri and all(keep):
            continue
        target = _free_name(root, table, last_run, numbers)
        makedirs(join(root, table))
        if all(keep):
            move(uri, target)
        elif any(keep):
            rows = pf.read().filter(pa.array(keep))
            with open_file(target, "wb", auto_mkdir=True) as f:
                pq.write_table(rows, f)
        if TEMP_DIR not in uri and not all(keep):
            remove(uri)


def _free_name(root: str, table: str, run: int, numbers: Counter[str]) -> str:
    """The next unused ``part-rNN-salvaged-NNNNN.parquet`` name of a table for rows ``run`` wrote."""
    while True:
        name = join(root, table, f"part-r{run:02d}-salvaged-{numbers[table]:05d}.parquet")
        numbers[table] += 1
        if not is_file(name):
            return name


def _write_done_list(root: str, done: set[Image]) -> None:
    ordered = sorted(done)
    table = pa.table({"image_id": [i for i, _ in ordered], "source_uri": [s for _, s in ordered]})
    with open_file(join(root, DONE_LIST), "wb", auto_mkdir=True) as f:
        pq.write_table(table, f)


class SkipDone(beam.DoFn):
    """Drops what an earlier run finished; the list is read on the worker.

    Refs and outcomes match by id and source (duplicate ids differ by source); a patch
    dataset's ``(image_id, rows)`` faces match by id, which a dataset holds once.
    """

    def __init__(self, done_list: str):
        self._uri = done_list
        self.skipped = beam.metrics.Metrics.counter("acne", "resumed_images_skipped")

    def setup(self) -> None:
        with open_file(self._uri, "rb") as f:
            rows = pq.read_table(f).to_pylist()
        self._done = {(r["image_id"], r["source_uri"]) for r in rows} | {r["image_id"] for r in rows}

    def process(self, element: Any) -> Iterator[Any]:
        key = element[0] if isinstance(element, tuple) else (element.image_id, element.source_uri)
        if key in self._done:
            self.skipped.inc()
            return
        yield element
