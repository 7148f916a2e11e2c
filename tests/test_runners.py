"""Both jobs beyond the in-process runner: separate worker processes must give the same rows.

Runs the jobs on the portable runner (an embedded job service, workers started by a
``worker_pool_main`` pool this test launches) and on the multi-process DirectRunner, and
compares every output table, row for row, with the in-process run. This catches pickling,
module-level state and per-process model loading. A single tar shard must also fan out:
the segmentation of its images is spread over more than one worker process.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import apache_beam as beam
import pytest
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns

from models.dataset import read_manifest, read_table
from pipelines import build_dataset, score
from pipelines.common import prepare
from pipelines.config import DatasetConfig
from pipelines.options import parse
from transforms.decode import DecodeImages
from transforms.plan import PlanShards, input_files
from transforms.read import ReadBytes, pick_unique
from transforms.segment import SegmentSkin, SkinSegmenterHandler
from tests.scale_fixtures import (  # noqa: F401  (pytest fixture)
    JOB_FLAGS,
    PATCH,
    checkpoints,
    free_port,
    image_files,
    port_open,
    python,
    stop,
    tar_bytes,
    venv_env,
    wait_for,
    write_folder,
)

MULTI_PROCESS = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
TABLES = {"build_dataset": ["faces", "errors", "patches/train", "patches/validation", "patches/test"],
          "score": ["faces", "errors", "scores", "patch_scores"]}


@pytest.fixture(scope="module")
def worker_pool() -> Iterator[list[str]]:
    """A Beam worker pool in its own process; yields the PortableRunner flags that use it."""
    port = free_port()
    pool = subprocess.Popen(
        [python(), "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
        env=venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: pool.poll() is not None or port_open(port), 60, "the worker pool to listen")
        if pool.poll() is not None:
            pytest.fail(f"worker_pool_main exited with {pool.returncode}")
        yield ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
               f"--environment_config=localhost:{port}", "--direct_num_workers=2"]
    finally:
        stop(pool)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Loose images (one broken) and a tar shard; local, because memory:// cannot cross processes."""
    root = write_folder(tmp_path_factory.mktemp("runner-inputs") / "loose", image_files(5, broken=1))
    shard = {f"s/{200 + i:05d}.png": b for i, b in enumerate(image_files(4, broken=0).values())}
    tar = root.parent / "shard-000000.tar"
    tar.write_bytes(tar_bytes(shard))
    return [str(root), str(tar)]


def _canonical(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as sorted JSON lines: equal lists mean equal tables, whatever the file layout."""
    return sorted(json.dumps(r, sort_keys=True, default=lambda b: b.hex()) for r in rows)


def _tables(output: str, job: str) -> dict[str, list[str]]:
    read_manifest(output)
    return {t: _canonical(read_table(output, t).to_pylist()) for t in TABLES[job]}


def _run(job: str, inputs: list[str], output: Path, checkpoints: tuple[str, str], beam_flags: list[str]) -> dict:
    argv = ["--input", *inputs, "--output", str(output), "--segmenter-checkpoint", checkpoints[0], *JOB_FLAGS]
    if job == "score":
        return score.run(argv + ["--classifier-checkpoint", checkpoints[1], "--patch-table", *beam_flags])
    return build_dataset.run(argv + beam_flags)


@pytest.fixture(scope="module")
def in_process(inputs: list[str], checkpoints: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both jobs on the default in-process runner: the reference outputs."""
    root = tmp_path_factory.mktemp("in-process")
    found = {}
    for job in TABLES:
        manifest = _run(job, inputs, root / job, checkpoints, [])
        assert manifest["accounting"]["ok"] and manifest["accounting"]["kept"] == 9
        found[job] = _tables(str(root / job), job)
    return found


@pytest.mark.parametrize("job", list(TABLES))
@pytest.mark.parametrize("runner", ["portable", "multi_process"])
def test_separate_worker_processes_write_the_same_rows(
    runner: str, job: str, request: pytest.FixtureRequest, inputs: list[str], checkpoints: tuple[str, str],
    in_process: dict, tmp_path: Path,
) -> None:
    flags = request.getfixturevalue("worker_pool") if runner == "portable" else MULTI_PROCESS
    manifest = _run(job, inputs, tmp_path / "out", checkpoints, flags)

    assert manifest["accounting"]["ok"]
    tables = _tables(str(tmp_path / "out"), job)
    for table, rows in in_process[job].items():
        assert tables[table] == rows, f"{job} {table} differs between {runner} and in-process runs"
    assert sum(map(len, tables.values())) > 50


class _RecordWorker(beam.DoFn):
    """Counts each element under the id of the process that handled it."""

    def process(self, element: Any) -> Iterator[Any]:
        Metrics.counter("pid.segment", str(os.getpid())).inc()
        yield element


def _segmenting_pids(result: Any) -> dict[str, int]:
    counters = result.metrics().query(MetricsFilter().with_namespace("pid.segment"))["counters"]
    found: dict[str, int] = {}
    for c in counters:
        found[c.key.metric.name] = found.get(c.key.metric.name, 0) + c.committed
    return found


def _reachable_without_shuffle(components: Any, start: str) -> set[str]:
    """Names of the transforms fed, directly or through fused steps, by ``start``'s outputs."""
    consumers: dict[str, list[str]] = {}
    for tid, t in components.transforms.items():
        if not t.subtransforms:
            for pcoll in t.inputs.values():
                consumers.setdefault(pcoll, []).append(tid)
    seen: set[str] = set()
    todo = [pc for tid, t in components.transforms.items() if t.unique_name == start for pc in t.outputs.values()]
    while todo:
        for tid in consumers.get(todo.pop(), []):
            t = components.transforms[tid]
            if tid in seen or t.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn:
                continue
            seen.add(tid)
            todo.extend(t.outputs.values())
    return {components.transforms[tid].unique_name for tid in seen}


def test_planning_a_shard_and_segmenting_its_images_are_split_by_a_shuffle(
    checkpoints: tuple[str, str], tmp_path: Path
) -> None:
    """In the real job graph, no heavy stage is fusable with shard planning: a GroupByKey comes first.

    A runner may fuse (run in one worker, on one bundle) only steps not separated by a shuffle;
    so the images of one shard are decoded and segmented wherever their ids land.
    """
    shard = tmp_path / "big-000000.tar"
    shard.write_bytes(tar_bytes({f"x/{i:05d}.png": b for i, b in enumerate(image_files(2, broken=0).values())}))
    p = beam.Pipeline()
    argv = ["--input", str(shard), "--output", str(tmp_path / "out"), "--segmenter-checkpoint", checkpoints[0]]
    flags, _ = parse(argv + JOB_FLAGS, build_dataset.OPTION_GROUPS, build_dataset.PROG, build_dataset.DESCRIPTION)
    config = DatasetConfig.from_flags(flags)
    build_dataset.build(p, config, prepare(config))
    components = p.to_runner_api().components

    fused_with_planning = _reachable_without_shuffle(components, "Read/PlanShards")
    assert "Read/KeyById" in fused_with_planning
    heavy = [n for n in fused_with_planning if n.split("/")[0] in ("Decode", "Segment", "CutPatches", "EncodePatches")]
    assert not heavy, f"heavy stages fuse with shard planning, so one shard would pin one worker: {heavy}"
    assert "Read/ReadFiles" not in fused_with_planning


def test_one_big_shard_is_segmented_in_every_worker(checkpoints: tuple[str, str], tmp_path: Path) -> None:
    """One tar shard of 12 images on two worker processes: both segment a share of its images.

    The steps are ReadImages' own DoFns (plan, shuffle by image id, read bytes) followed by the
    real decode and segment stages and a probe recording each element's process id. The Flatten
    ReadImages puts between the shuffle and the reads (loose files + Parquet row groups) is left
    out: the local runner hands a flattened buffer to its workers in whole chunks, so how it
    splits one depends on thread timing, and says nothing about how a distributed runner spreads
    the shuffled ids. The graph test above checks the real ReadImages for the shuffle.
    """
    shard = tmp_path / "big-000000.tar"
    shard.write_bytes(tar_bytes({f"x/{i:05d}.png": b for i, b in enumerate(image_files(12, broken=0).values())}))
    handler = SkinSegmenterHandler(checkpoints[0], batch_size=2, torch_threads=1)

    p = beam.Pipeline(options=PipelineOptions(MULTI_PROCESS))
    records = (
        p
        | "Shard" >> beam.Create(input_files(str(shard)))
        | "PlanShards" >> beam.ParDo(PlanShards())
        | "KeyById" >> beam.Map(lambda ref: (ref.image_id, ref))
        | "GroupById" >> beam.GroupByKey()
        | "DropDuplicates" >> beam.FlatMapTuple(pick_unique)
        | "ReadFiles" >> beam.ParDo(ReadBytes(None, None, False))
    )
    decoded, _ = records | "Decode" >> DecodeImages(min_size=PATCH)
    segmented, _ = decoded | "Segment" >> SegmentSkin(handler)
    segmented | "WhoSegmented" >> beam.ParDo(_RecordWorker())
    result = p.run()
    result.wait_until_finish()

    pids = _segmenting_pids(result)
    assert sum(pids.values()) == 12, pids
    assert len(pids) == 2, f"the shard's images were not spread over both workers: {pids}"
    assert str(os.getpid()) not in pids, "segmentation ran in the launching process"
