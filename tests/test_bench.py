"""The benchmark harness runs end to end and reports what it promises; it asserts no timings."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench import batching, throughput
from bench.inputs import make_inputs
from bench.reference import STAGES, StageClock, segment
from models.classifier import Classifier, ClassifierConfig
from models.classifier import build_network as build_classifier
from models.segmenter import Segmenter, SegmenterConfig, build_network

SMALL_SEGMENTER = SegmenterConfig(input_size=64, model_kwargs={"decoder_channels": [16, 16, 16, 16, 16]})
SMALL_CLASSIFIER = ClassifierConfig.untrained(input_size=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    Segmenter(build_network(SMALL_SEGMENTER), SMALL_SEGMENTER).save(str(root / "segmenter"))
    Classifier(build_classifier(SMALL_CLASSIFIER), SMALL_CLASSIFIER).save(str(root / "classifier"))
    return str(root / "segmenter"), str(root / "classifier")


def test_inputs_are_distinct_ffhq_sized_pngs_in_ffhq_layout(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path, 4, seed=1)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [f"00000/0000{i}.png" for i in range(4)]
    images = [cv2.imread(str(p)) for p in paths]
    assert all(im.shape == (1024, 1024, 3) for im in images)
    assert len({im.tobytes() for im in images}) == 4


def test_reference_segmentation_is_predict_masks(checkpoints: tuple[str, str]) -> None:
    model = Segmenter.load(checkpoints[0])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 200, 3), dtype=np.uint8) for _ in range(2)]
    clock = StageClock()
    for ours, theirs in zip(segment(model, images, clock), model.predict_masks(images)):
        np.testing.assert_array_equal(ours, theirs)
    assert set(clock.by_stage()) == set(STAGES)


def test_quick_run_reports_every_figure(tmp_path: Path, checkpoints: tuple[str, str]) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    throughput.main([
        "--images", "2", "--quick", "--json", str(out_json), "--markdown", str(out_md),
        "--segmenter-checkpoint", checkpoints[0], "--classifier-checkpoint", checkpoints[1],
        "--workdir", str(tmp_path / "work"),
    ])
    result = json.loads(out_json.read_text())
    assert {"machine", "settings", "checkpoints", "runs", "jobs", "targets", "levers"} <= set(result)
    assert result["machine"]["torch_threads"] >= 1 and result["machine"]["usable_cores"] >= 1
    assert {(r["job"], r["kind"]) for r in result["runs"]} == {
        ("build_dataset", "reference"), ("build_dataset", "pipeline"), ("score", "reference"), ("score", "pipeline"),
    }
    for run in result["runs"]:
        counts = run["counts"]
        assert run["images"] == counts["inputs"] == 2
        assert counts["kept"] + counts["filtered"] + counts["failed"] == 2
        assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["images_per_s"] > 0
        assert 0 < run["peak_rss_mb"] and run["peak_rss_per_process_mb"]
        assert run["output_bytes"] > 0 and (run["bytes_per_patch"] is None or run["bytes_per_patch"] > 0)
    for summary in result["jobs"].values():
        stages = summary["stages"]["reference loop"]
        assert set(stages["ms_per_image"]) == set(STAGES) and all(v >= 0 for v in stages["ms_per_image"].values())
        assert 0 <= summary["non_inference_share"] <= 1
        assert summary["ratios"]["in-process"]["reference"] == "reference loop"
        assert summary["ratios"]["in-process"]["wall"] > 0 and summary["best_ratio"] > 0
    # The same images, checkpoints and settings: each job and its reference loop reach the same outcomes
    # (patch counts may differ by a tile if batching moves a near-threshold pixel, so they are left out).
    by_key = {(r["job"], r["kind"]): r for r in result["runs"]}
    for job in throughput.JOBS:
        ours, theirs = (by_key[(job, kind)]["counts"] for kind in ("reference", "pipeline"))
        assert {k: v for k, v in ours.items() if k != "patches"} == {k: v for k, v in theirs.items() if k != "patches"}
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    report = out_md.read_text()
    for heading in ("## Machine", "## Targets", "## Runs", "## Per-stage time per image", "## How to run"):
        assert heading in report
    assert not (tmp_path / "work").exists()
    assert not throughput.partial_path(str(out_json)).exists()  # the whole result replaced the runs-so-far file


def _peers(tmp_path: Path, checkpoints: tuple[str, str], job: str, configs: list[str]) -> list[dict]:
    """The loop and each of ``configs`` on the same three images, through the harness."""
    inputs = tmp_path / "inputs"
    make_inputs(inputs, 3, seed=2)
    args = argparse.Namespace(segmenter_checkpoint=checkpoints[0], classifier_checkpoint=checkpoints[1], device="cpu")
    bench = throughput.Bench(args, tmp_path / "work")
    runs = [bench.reference(job, throughput.DEFAULTS_REFERENCE, inputs, 3)]
    for config in configs:
        runs.append(bench.ray(job, inputs, 3) if config == throughput.RAY else bench.reference(job, config, inputs, 3))
    return runs


FORKED_SHARING = """
import os, sys
import numpy as np
held = np.ones(200 * 2**20, np.uint8)  # touched, so resident before the fork
if os.fork() == 0:
    print("ready", flush=True)
    sys.stdin.readline()
    os._exit(0)
os.wait()
"""


def test_memory_a_forked_child_shares_with_its_parent_is_split_between_them() -> None:
    proc = subprocess.Popen([sys.executable, "-c", FORKED_SHARING], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        sampler = throughput.TreeSampler(proc.pid)
        sampler.sample()
    finally:
        proc.communicate("go\n", timeout=60)
    rss = sorted(sampler.hwm_kb.values())
    pss = sorted(sampler.pss_kb.values())
    # RSS counts the 200 MB in both processes; PSS gives each half, so the tree holds it once.
    assert len(rss) == 2 and rss[0] > 200 * 1024
    assert all(p < r - 80 * 1024 for p, r in zip(pss, rss))
    assert sampler.peak_total_kb - sampler.peak_pss_total_kb > 150 * 1024


BUSY_ONE_CORE = "import time\nend = time.process_time() + 1.5\nwhile time.process_time() < end:\n    pass\n"


def test_a_run_says_where_the_machines_cores_went(tmp_path: Path) -> None:
    run = throughput.measure([sys.executable, "-c", BUSY_ONE_CORE], tmp_path / "busy.log")
    cores = run["machine_cores"]
    assert 0.5 < cores["ours"] <= 1.05
    # Every core of the machine is accounted for: ours, others', waiting, stolen or idle.
    machine = sum(1 for line in Path("/proc/stat").read_text().splitlines() if line[:3] == "cpu" and line[3].isdigit())
    assert sum(cores.values()) == pytest.approx(machine, rel=0.1)


def _assert_same_work(job: str, runs: list[dict]) -> None:
    assert len({(r["result_rows"], r["result_digest"]) for r in runs}) == 1
    assert len({json.dumps(r["counts"], sort_keys=True) for r in runs}) == 1
    assert all(r["counts"]["inputs"] == 3 and r["cpu_s"] > 0 and r["peak_rss_per_process_mb"] for r in runs)
    assert all(0 < r["peak_pss_tree_mb"] <= r["peak_rss_tree_mb"] for r in runs)
    summary = throughput.peer_summary(job, runs, 3)
    assert all(row["same_rows_as_loop"] and row["vs_loop"] > 0 for row in summary["rows"].values())


@pytest.mark.parametrize("job", list(throughput.JOBS))
def test_multi_process_loop_writes_the_loops_rows(tmp_path: Path, checkpoints: tuple[str, str], job: str) -> None:
    _assert_same_work(job, _peers(tmp_path, checkpoints, job, [throughput.MULTI_LOOP]))


@pytest.mark.parametrize("job", list(throughput.JOBS))
def test_ray_data_peer_writes_the_loops_rows(tmp_path: Path, checkpoints: tuple[str, str], job: str) -> None:
    pytest.importorskip("ray", reason="the Ray Data peer is a bench-only extra: pip install -e .[bench]")
    _assert_same_work(job, _peers(tmp_path, checkpoints, job, [throughput.RAY]))


def test_multi_only_peers_are_summarised_without_the_single_process_pair() -> None:
    # The committed N=480 peer measurements, as --peers --multi-only would have left them: no runs in one process.
    measured = json.loads((throughput.REPO / "bench" / "PEERS_480.json").read_text())
    runs = [r for r in measured["runs"] if r["config"] not in throughput.SINGLE_PROCESS]
    n = measured["settings"]["images"]
    jobs = {job: throughput.summarise(job, runs, n) for job in throughput.JOBS}
    peers = {job: throughput.peer_summary(job, runs, n) for job in throughput.JOBS}

    multi = {throughput.MULTI_LOOP, throughput.MULTI_CONFIG, throughput.RAY}
    for job in throughput.JOBS:
        assert set(peers[job]["rows"]) == multi
        for row in peers[job]["rows"].values():
            assert row["vs_loop"] is None and row["vs_multi_loop"] > 0 and row["startup_s"] is not None
        assert set(jobs[job]["ratios"]) == {throughput.MULTI_CONFIG}
        assert "non_inference_share" not in jobs[job]
    # The targets against the left-out pair are absent, not failed.
    found = throughput.targets(jobs) + throughput.peer_targets(peers)
    names = " ".join(t["target"] for t in found)
    assert "in-process" not in names and "non-inference" not in names
    assert all(isinstance(t["met"], bool) for t in found)


def test_decode_floor_decodes_every_input_and_keeps_nothing(tmp_path: Path, checkpoints: tuple[str, str]) -> None:
    from bench import reference

    inputs, out = tmp_path / "inputs", tmp_path / "out"
    make_inputs(inputs, 3, seed=3)
    (inputs / "00000" / "00099.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = reference.main(["decode", "--input", str(inputs), "--output", str(out), "--workers", "2",
                             "--segmenter-checkpoint", checkpoints[0]])
    assert result["counts"] == {"inputs": 4, "kept": 3, "filtered": 0, "failed": 1, "patches": 0}
    assert result["stages_s"]["decode"] > 0 and result["stages_s"]["inference"] == 0
    assert not list(out.rglob("*.parquet"))


def test_inputs_are_made_once_per_count_and_seed(tmp_path: Path) -> None:
    first = make_inputs(tmp_path / "n3", 3, seed=4, workers=2)
    stamps = [p.stat().st_mtime_ns for p in first]
    assert make_inputs(tmp_path / "n3", 3, seed=4, workers=2) == first
    assert [p.stat().st_mtime_ns for p in first] == stamps
    # Another seed rewrites them, the same in one process as in several.
    again = [cv2.imread(str(p)) for p in make_inputs(tmp_path / "n3", 3, seed=5)]
    serial = [cv2.imread(str(p)) for p in make_inputs(tmp_path / "other", 3, seed=5, workers=2)]
    assert all(np.array_equal(a, b) for a, b in zip(again, serial))
    assert [p.stat().st_mtime_ns for p in first] != stamps


def test_gpu_figures_come_from_the_window_in_which_the_gpu_worked() -> None:
    from bench.gpu import gpu_summary

    # Idle while the workers start, busy with one gap, idle while the last files are written.
    figures = gpu_summary([0, 1, 60, 100, 2, 80, 0, 0], [500, 900, 2000, 2100, 2100, 2000, 900, 500])
    assert figures["active_samples"] == 4 and figures["util_mean_active"] == pytest.approx(60.5)
    assert figures["idle_share_active"] == pytest.approx(0.25)
    assert figures["util_mean"] == pytest.approx(243 / 8) and figures["util_max"] == 100
    assert figures["memory_peak_mb"] == 2100
    assert gpu_summary([0, 0], [10, 10])["util_mean_active"] == 0.0


def _as_gpu_run(measured: dict, job: str, workers: int) -> dict:
    """The committed CPU peer runs of ``job``, relabelled as a GPU host with ``workers`` cores would record them,
    with a GPU that worked half the time and a decode floor: the report's input, not a measurement."""
    old, new = throughput.multi_names(measured["settings"]["workers"]), throughput.multi_names(workers)
    runs = [dict(r, config=new[old.index(r["config"])], gpu={
        "gpu": "NVIDIA H200", "every_s": 0.2, "samples": 100, "util_mean": 40.0, "util_max": 95.0,
        "active_samples": 80, "util_mean_active": 50.0, "idle_share_active": 0.1, "memory_peak_mb": 9000.0})
        for r in measured["runs"] if r["job"] == job and r["kind"] != "ray"]
    floor = {"job": throughput.FLOOR_JOB, "config": "decode floor", "kind": "floor", "images": 7000,
             "wall_s": 12.0, "run_seconds": 10.0, "images_per_s": 7000 / 12, "images_per_s_run": 700.0}
    settings = dict(measured["settings"], device="cuda", workers=workers, jobs=[job], ray=None, repeats=1)
    return dict(measured, settings=settings, runs=runs + [floor], command=f"python -m bench.throughput --jobs {job}")


def test_gpu_host_results_merge_into_their_own_section(tmp_path: Path) -> None:
    measured = json.loads((throughput.REPO / "bench" / "PEERS.json").read_text())
    files = []
    for job in throughput.JOBS:
        files.append(tmp_path / f"gpu_{job}.json")
        files[-1].write_text(json.dumps(_as_gpu_run(measured, job, 16)))
    report = tmp_path / "RESULTS.md"
    original = (throughput.REPO / "bench" / "RESULTS.md").read_text()
    report.write_text(original)
    from bench.report import GPU_SECTION, PEERS_SECTION, section_of

    result = throughput.main(["--rereport", *map(str, files), "--markdown", str(report)])
    text = report.read_text()
    assert section_of(text, PEERS_SECTION) == section_of(original, PEERS_SECTION)
    gpu = section_of(text, GPU_SECTION)
    assert "NVIDIA H200" in gpu and "16-process loop" in gpu and "16 workers" in gpu and "700 images/s" in gpu
    for job in throughput.JOBS:
        row = result["peers"][job]["rows"]["16 workers"]
        assert row["vs_multi_loop"] > 0 and row["vs_decode_floor"] == pytest.approx(row["images_per_s"] / 700)
        assert "inference" in result["peers"][job]["rows"]["16-process loop"]["stages_ms_per_image"]
    names = [t["target"] for t in result["targets"]]
    assert sum("decode floor" in t for t in names) == 2 and sum("not the bottleneck" in t for t in names) == 2
    # Files from different N are not one measurement.
    files[1].write_text(json.dumps(dict(_as_gpu_run(measured, "score", 16),
                                        settings=dict(measured["settings"], images=480, device="cuda"))))
    with pytest.raises(ValueError, match="images"):
        throughput.main(["--rereport", *map(str, files), "--markdown", "-"])


def test_a_benchmark_stopped_early_leaves_the_runs_it_finished(tmp_path: Path, checkpoints: tuple[str, str]) -> None:
    inputs = tmp_path / "inputs"
    make_inputs(inputs, 3, seed=2)
    args = argparse.Namespace(
        segmenter_checkpoint=checkpoints[0], classifier_checkpoint=checkpoints[1], device="cpu", images=3, seed=2,
        repeats=1, quick=False, peers=True, multi_only=False, jobs=["score"], argv=["--peers", "--images", "3"])
    partial = throughput.partial_path(str(tmp_path / "peers.json"))
    header = throughput.run_header(args, [throughput.DEFAULTS_REFERENCE], ["in-process"], False, {})
    bench = throughput.Bench(args, tmp_path / "work", partial, header)
    bench.reference("score", throughput.DEFAULTS_REFERENCE, inputs, 3)
    assert [r["config"] for r in json.loads(partial.read_text())["runs"]] == [throughput.DEFAULTS_REFERENCE]
    bench.pipeline("score", "in-process", inputs, 3)
    # Stopped here, before the 16-image runs and the report: the partial file is what is left.
    report = tmp_path / "RESULTS.md"
    report.write_text((throughput.REPO / "bench" / "RESULTS.md").read_text())
    result = throughput.main(["--rereport", str(partial), "--markdown", str(report)])
    assert result["partial"] and set(result["jobs"]) == {"score"}
    assert result["peers"]["score"]["rows"]["in-process"]["same_rows_as_loop"]
    assert "stopped before its end" in report.read_text()


def test_the_batching_check_compares_every_grouping_with_each_input_alone(
    tmp_path: Path, checkpoints: tuple[str, str]
) -> None:
    out = tmp_path / "batching.json"
    result = batching.main(["--images", "3", "--patches", "12", "--segmenter-checkpoint", checkpoints[0],
                            "--classifier-checkpoint", checkpoints[1], "--json", str(out)])
    assert json.loads(out.read_text()) == result
    # A CPU has no TF32: one setting, where batching moves outputs by float32 rounding at most.
    assert [k for k in result if k.startswith("tf32 ")] == ["tf32 off"]
    for model, judged in (("segmenter", "mask_pixels_changed"), ("classifier", "patch_lesions_changed")):
        for variant in ("fixed passes", "as given"):
            rows = result["tf32 off"][model][variant]
            assert set(rows) == {"all at once", "random sizes", "random sizes again"}
            assert all(row["max_abs_diff"] < 1e-4 and judged in row for row in rows.values())


def test_the_severity_pass_is_timed_against_the_verdict_network_alone(tmp_path: Path,
                                                                       checkpoints: tuple[str, str]) -> None:
    from bench import severity_pass
    from models.classifier.bundle import bundle

    segmenter, classifier = checkpoints
    bundle(classifier, classifier, str(tmp_path / "bundle"))
    result = severity_pass.measure(2, 1, str(tmp_path / "bundle"), segmenter, str(tmp_path / "work"))
    alone, both = (result["runs"][name][0] for name in ("verdict network alone", "with the severity network"))
    assert alone["counts"] == both["counts"] and both["counts"]["inputs"] == 2
    assert result["ratio"] == both["seconds"] / alone["seconds"] > 0
    with pytest.raises(ValueError, match="has no severity network to measure"):
        severity_pass.verdict_network_alone(classifier, str(tmp_path / "alone"))
