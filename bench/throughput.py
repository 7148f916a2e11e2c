"""Throughput benchmark: both Beam jobs against plain Python loops doing the same work.

    python -m bench.throughput [--images N] [--json OUT] [--markdown bench/RESULTS.md]
                               [--quick | --peers [--multi-only]]

In one run, on the same images, checkpoints and settings, it times the reference loop of
each job (``bench.reference``: the same work without Beam), the job on DirectRunner
in-process, with one worker process per core and with one thread per core in one process,
the job at 2N images, and each performance lever on its own (``bench.levers``). ``--peers``
adds the loop in one process per core, Ray Data, and the host's CPU decode floor. Every
measurement is its own subprocess, timed from interpreter start, with its peak RSS from
``wait4`` (the largest process of its tree) and per process from ``/proc``, and, where NVML
sees a GPU, that GPU's utilisation (``bench.gpu``). Nothing is subtracted: the jobs' own
``run.seconds`` is recorded beside the wall time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow.parquet as pq

from bench.gpu import BOTTLENECK_PERCENT, GpuSampler
from bench.inputs import REPO, make_inputs
from models import defaults
from models.dataset import PATCHES_DIR, SCORES_DIR
from pipelines import build_dataset, score
from pipelines.config import DatasetConfig, ScoreConfig
from pipelines.options import job_parser

log = logging.getLogger("bench")

DEFAULT_IMAGES = 96
JOBS = {"build_dataset": "build", "score": "score"}
# One process per usable core, for the multi-process pipelines and their peers alike.
WORKERS = len(os.sched_getaffinity(0))
MULTI = ["--direct_num_workers", str(WORKERS), "--direct_running_mode", "multi_processing"]
# The jobs default to one torch thread per process; this is the alternative the default was chosen over.
TORCH_DEFAULT = ["--torch-threads", "0"]
# Every configuration produces the same output; only how the work is run differs.
DEFAULTS_REFERENCE = "reference loop"  # the loop at the jobs' own default settings


def multi_names(workers: int) -> tuple[str, str, str]:
    """The multi-process configurations' names at ``workers`` processes, as runs record them: the
    hand-written loop, the job, and the other engine's peer (bench.ray_peer, when ray is installed)."""
    return f"{workers}-process loop", f"{workers} workers", f"Ray Data, {workers} actors"


MULTI_LOOP, MULTI_CONFIG, RAY = multi_names(WORKERS)
# One process with a thread per core, all sharing one model: on a GPU host one CUDA context, not one per core.
THREADED_CONFIG = f"1 process, {WORKERS} threads"
THREADED = ["--direct_num_workers", str(WORKERS), "--direct_running_mode", "multi_threading"]
# With --peers: the host's CPU decode floor (bench.reference decode), which no job on any accelerator can outrun.
FLOOR_JOB = "decode"
FLOOR = f"decode floor, {WORKERS} processes"
# The GPU bar: a job keeps up with this share of the decode floor.
TARGET_FLOOR_SHARE = 0.70
REFERENCES: dict[str, list[str]] = {
    DEFAULTS_REFERENCE: [],
    "reference loop, torch default threads": TORCH_DEFAULT,
    MULTI_LOOP: ["--workers", str(WORKERS)],
}
CONFIGS: dict[str, list[str]] = {
    "in-process": [],
    "in-process, torch default threads": TORCH_DEFAULT,
    MULTI_CONFIG: MULTI,
    THREADED_CONFIG: THREADED,
    f"{MULTI_CONFIG}, torch default threads": [*MULTI, *TORCH_DEFAULT],
}
QUICK_REFERENCES = (DEFAULTS_REFERENCE,)
QUICK_CONFIGS = ("in-process",)
# --peers: the issue's comparison alone, at the jobs' defaults (one torch thread per process).
PEER_REFERENCES = (DEFAULTS_REFERENCE, MULTI_LOOP)
PEER_CONFIGS = ("in-process", MULTI_CONFIG, THREADED_CONFIG)
# --multi-only leaves these out: at the N that makes start-up negligible they would take most of the time.
SINGLE_PROCESS = (DEFAULTS_REFERENCE, "in-process")
# A second, small N: the line through both sizes gives each configuration's fixed start-up cost.
PEER_SMALL_N = 16
TARGET_PEER_RATIO = 1.0
TARGET_IN_PROCESS_RATIO = 0.95
PEER_RSS_LIMIT_MB = 1.5 * 1024
STAGES = ("read", "decode", "resize", "inference", "upsample", "patch", "encode", "write")
RSS_LIMIT_MB = 3 * 1024
TARGET_RATIO = 0.90
TARGET_NON_INFERENCE = 0.25
TARGET_SCALING = 2.1


class TreeSampler(threading.Thread):
    """Samples the RSS and PSS of a process and all its descendants from /proc until stopped.

    RSS counts every page a process maps; PSS splits a page shared by k processes k ways. A forked
    child shares its parent's pages of torch and the other libraries (its RSS starts some 350 MB
    below a spawned process's), so the tree's PSS total is what a set of processes really holds.
    """

    def __init__(self, root: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self._root, self._every_s = root, every_s
        self._stop_event = threading.Event()
        self.hwm_kb: dict[int, int] = {}
        self.pss_kb: dict[int, int] = {}
        self.peak_pss_total_kb = 0
        self.cpu_ticks: dict[int, int] = {}
        self.peak_total_kb = 0

    def run(self) -> None:
        while not self._stop_event.wait(self._every_s):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def sample(self) -> None:
        children: dict[int, list[int]] = defaultdict(list)
        ticks: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    ppid, ticks[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
                except (OSError, IndexError, ValueError):
                    continue
                children[ppid].append(int(entry))
        total, pss_total, todo = 0, 0, [self._root]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, ()))
            status = _status_kb(pid)
            if status:
                total += status.get("VmRSS", 0)
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), status.get("VmHWM", 0))
            pss = _pss_kb(pid)
            pss_total += pss
            self.pss_kb[pid] = max(self.pss_kb.get(pid, 0), pss)
            if pid in ticks:
                self.cpu_ticks[pid] = ticks[pid]
        self.peak_total_kb = max(self.peak_total_kb, total)
        self.peak_pss_total_kb = max(self.peak_pss_total_kb, pss_total)


def _status_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_ticks() -> dict[str, int]:
    """The whole machine's CPU time so far, in clock ticks, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return {"busy": user + nice + system + irq + softirq, "idle": idle, "iowait": iowait, "steal": steal}


def machine_cores(before: dict[str, int], after: dict[str, int], wall_s: float, tree_cpu_s: float) -> dict[str, float]:
    """Where the machine's cores went during a run, in cores on average: this run's process tree,
    every other process, waiting on I/O, taken by the hypervisor (steal), and idle.

    A run that leaves cores idle with no one else busy is waiting on itself (a straggling worker,
    a serial step); one whose cores went to others or to steal was slowed by the machine.
    """
    tick = os.sysconf("SC_CLK_TCK") * wall_s
    spent = {key: (after[key] - before[key]) / tick for key in before}
    ours = tree_cpu_s / wall_s
    return {"ours": ours, "others": max(0.0, spent["busy"] - ours), "iowait": spent["iowait"],
            "steal": spent["steal"], "idle": spent["idle"]}


def measure(cmd: Sequence[str], log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion; wall time, CPU time and peak RSS of its whole process tree, and
    what the rest of the machine did meanwhile."""
    env = dict(os.environ)
    # Beam's worker pool starts `python` from PATH: it must be this interpreter's venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    load_before = os.getloadavg()[0]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        ticks_before = machine_ticks()
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        sampler, gpu = TreeSampler(proc.pid), GpuSampler()
        sampler.start()
        gpu.start()
        # wait4's rusage covers the child and every descendant it reaped: the tree's CPU and largest RSS.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        ticks_after = machine_ticks()
        sampler.stop()
        gpu.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; log {log_path}:\n{tail}")
    per_process = sorted((kb / 1024 for kb in sampler.hwm_kb.values()), reverse=True)
    # wait4 misses descendants that were reparented before they were reaped (Ray's workers, when
    # its daemons are killed at shutdown); the samples miss each process's last half second.
    sampled = sum(sampler.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
    cpu_s = max(usage.ru_utime + usage.ru_stime, sampled)
    return {
        "wall_s": wall,
        "cpu_s": cpu_s,
        "cpu_s_wait4": usage.ru_utime + usage.ru_stime,
        "cpu_s_sampled": sampled,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_rss_per_process_mb": [round(v, 1) for v in per_process[:8]],
        "peak_rss_tree_mb": sampler.peak_total_kb / 1024,
        "peak_pss_per_process_mb": sorted((round(kb / 1024, 1) for kb in sampler.pss_kb.values()), reverse=True)[:8],
        "peak_pss_tree_mb": sampler.peak_pss_total_kb / 1024,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine_cores": {k: round(v, 3) for k, v in machine_cores(ticks_before, ticks_after, wall, cpu_s).items()},
        "gpu": gpu.summary(),
    }


def _slug(config: str) -> str:
    return config.replace(",", "").replace(" ", "_")


def tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# Each job's result table and the columns that identify its rows.
RESULT_KEYS = {"build_dataset": (PATCHES_DIR, ["image_id", "patch_id"]),
               "score": (SCORES_DIR, ["image_id", "status", "patches_used"])}


def result_rows(job: str, out: Path) -> tuple[int, str]:
    """How many result rows a run wrote, and a digest of their keys: equal whatever the file layout."""
    folder, columns = RESULT_KEYS[job]
    keys = sorted(tuple(row.values()) for f in sorted((out / folder).rglob("*.parquet"))
                  for row in pq.read_table(f, columns=columns).to_pylist())
    return len(keys), hashlib.sha256(repr(keys).encode()).hexdigest()[:16]


class Bench:
    """Runs the measurements of one benchmark and collects their results."""

    def __init__(self, args: argparse.Namespace, work: Path, partial: Optional[Path] = None,
                 header: Optional[dict[str, Any]] = None):
        """``partial``: where every run so far is saved as it ends, under ``header`` (the result's
        fields other than runs and summaries), so a benchmark stopped early still leaves what it
        measured for ``--rereport``."""
        self.args, self.work = args, work
        self.python = sys.executable
        self.runs: list[dict[str, Any]] = []
        self.partial, self.header = partial, header or {}
        self._recorded: list[dict[str, Any]] = []
        self._started = time.perf_counter()

    def _keep(self, run: dict[str, Any]) -> None:
        self.runs.append(run)
        self._recorded.append(run)
        if self.partial:
            threads = next((r["torch_threads"] for r in self._recorded if r["kind"] == "reference"), None)
            saved = dict(self.header, machine=machine(threads), runs=median_runs(self._recorded), partial=True,
                         total_wall_s=time.perf_counter() - self._started)
            self.partial.write_text(json.dumps(saved, indent=2, default=str) + "\n")

    def job_flags(self, job: str) -> list[str]:
        """The flags every run of ``job`` shares, whoever runs it: checkpoints and device."""
        flags = ["--segmenter-checkpoint", self.args.segmenter_checkpoint, "--device", self.args.device]
        return flags + (["--classifier-checkpoint", self.args.classifier_checkpoint] if job == "score" else [])

    def _record(self, run: dict[str, Any], out: Path) -> dict[str, Any]:
        run["output_bytes"] = tree_bytes(out)
        run["result_rows"], run["result_digest"] = result_rows(run["job"], out)
        run["images_per_s"] = run["images"] / run["wall_s"]
        run["images_per_s_run"] = run["images"] / run["run_seconds"]
        run["cpu_s_per_image"] = run["cpu_s"] / run["images"]
        run["bytes_per_image"] = run["output_bytes"] / run["images"]
        run["bytes_per_patch"] = run["output_bytes"] / run["patches"] if run["patches"] else None
        shutil.rmtree(out, ignore_errors=True)
        log.info(
            "%-14s %-28s N=%-4d wall %6.1f s  run %6.1f s  %5.2f img/s  peak RSS %6.0f MB  load %s",
            run["job"], run["config"], run["images"], run["wall_s"], run["run_seconds"], run["images_per_s"],
            run["peak_rss_mb"], run["load_average"],
        )
        self._keep(run)
        return run

    def reference(self, job: str, config: str, inputs: Path, images: int) -> dict[str, Any]:
        name = f"{job}-{_slug(config)}-{images}"
        out, result = self.work / "out" / name, self.work / "out" / f"{name}.json"
        cmd = [self.python, "-m", "bench.reference", JOBS[job], "--input", str(inputs), "--output", str(out),
               "--json", str(result), *self.job_flags(job), *REFERENCES[config]]
        run = measure(cmd, self.work / "logs" / f"{name}.log")
        loop = json.loads(result.read_text())
        result.unlink()
        run.update(
            job=job, config=config, kind="reference", flags=REFERENCES[config], images=loop["counts"]["inputs"],
            run_seconds=loop["seconds"], patches=loop["counts"]["patches"], counts=loop["counts"],
            stages_s=loop["stages_s"], detail_s=loop["detail_s"], torch_threads=loop["torch_threads"],
            loop_peak_rss_mb=loop["peak_rss_mb"],
        )
        return self._record(run, out)

    def pipeline(self, job: str, config: str, inputs: Path, images: int) -> dict[str, Any]:
        name = f"{job}-{_slug(config)}-{images}"
        out = self.work / "out" / name
        cmd = [self.python, "-m", f"pipelines.{job}", "--input", str(inputs), "--output", str(out), "--overwrite",
               *self.job_flags(job), *CONFIGS[config]]
        run = measure(cmd, self.work / "logs" / f"{name}.log")
        manifest = json.loads((out / "manifest.json").read_text())
        books = manifest["accounting"]
        run.update(
            job=job, config=config, kind="pipeline", flags=CONFIGS[config], images=books["inputs"],
            run_seconds=manifest["run"]["seconds"], patches=manifest["accounting"]["patches"],
            counts={"inputs": books["inputs"], "kept": books["kept"], "filtered": books["filtered"],
                    "failed": books["failed"], "patches": manifest["accounting"]["patches"]},
        )
        return self._record(run, out)

    def floor(self, inputs: Path, images: int) -> dict[str, Any]:
        """The CPU decode floor: ``WORKERS`` processes reading and decoding the inputs, nothing else."""
        name = f"decode-floor-{images}"
        out, result = self.work / "out" / name, self.work / "out" / f"{name}.json"
        cmd = [self.python, "-m", "bench.reference", "decode", "--input", str(inputs), "--output", str(out),
               "--json", str(result), "--workers", str(WORKERS), *self.job_flags("build_dataset")]
        run = measure(cmd, self.work / "logs" / f"{name}.log")
        loop = json.loads(result.read_text())
        result.unlink()
        run.update(job=FLOOR_JOB, config=FLOOR, kind="floor", flags=[], images=loop["counts"]["inputs"],
                   run_seconds=loop["seconds"], counts=loop["counts"], stages_s=loop["stages_s"])
        run["images_per_s"] = run["images"] / run["wall_s"]
        run["images_per_s_run"] = run["images"] / run["run_seconds"]
        run["cpu_s_per_image"] = run["cpu_s"] / run["images"]
        log.info("decode floor   N=%-4d wall %6.1f s  run %6.1f s  %5.2f img/s (run)", run["images"], run["wall_s"],
                 run["run_seconds"], run["images_per_s_run"])
        self._keep(run)
        return run

    def ray(self, job: str, inputs: Path, images: int) -> dict[str, Any]:
        name = f"{job}-ray-{images}"
        out, result = self.work / "out" / name, self.work / "out" / f"{name}.json"
        cmd = [self.python, "-m", "bench.ray_peer", JOBS[job], "--input", str(inputs), "--output", str(out),
               "--json", str(result), "--workers", str(WORKERS), *self.job_flags(job)]
        run = measure(cmd, self.work / "logs" / f"{name}.log")
        peer = json.loads(result.read_text())
        result.unlink()
        run.update(
            job=job, config=RAY, kind="ray", flags=[], images=peer["counts"]["inputs"], run_seconds=peer["seconds"],
            patches=peer["counts"]["patches"], counts=peer["counts"],
        )
        return self._record(run, out)

    def levers(self, inputs: Path) -> dict[str, Any]:
        result = self.work / "levers.json"
        # One thread: on a shared machine a second one mostly measures contention (the thread lever shows it).
        cmd = [self.python, "-m", "bench.levers", "--input", str(inputs), "--json", str(result), "--torch-threads", "1",
               "--segmenter-checkpoint", self.args.segmenter_checkpoint,
               "--classifier-checkpoint", self.args.classifier_checkpoint]
        run = measure(cmd, self.work / "logs" / "levers.log")
        levers = json.loads(result.read_text())
        levers["wall_s"] = run["wall_s"]
        log.info("levers measured in %.0f s", run["wall_s"])
        return levers


def _threads(run: dict[str, Any]) -> Optional[str]:
    flags = run["flags"]
    return flags[flags.index("--torch-threads") + 1] if "--torch-threads" in flags else None


def summarise(job: str, runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """References vs pipelines of one job: ratios, per-stage split, best config, scaling.

    Each pipeline is compared with the reference loop at the same torch thread setting
    (like for like), and the best pipeline with the best reference (the target's ratio).
    """
    at_n = [r for r in runs if r["job"] == job and r["images"] == n]
    refs = {r["config"]: r for r in at_n if r["kind"] == "reference"}
    pipes = [r for r in at_n if r["kind"] == "pipeline"]
    ratios = {}
    for r in pipes:
        ref = next(x for x in refs.values() if _threads(x) == _threads(r))
        ratios[r["config"]] = {
            "reference": ref["config"],
            "wall": ref["wall_s"] / r["wall_s"],
            "run_seconds": ref["run_seconds"] / r["run_seconds"],
            "cpu": ref["cpu_s"] / r["cpu_s"],
        }
    best = max(pipes, key=lambda r: r["images_per_s"])
    best_ref = max(refs.values(), key=lambda r: r["images_per_s"])
    stages = {}
    for name, ref in refs.items():
        timed = sum(ref["stages_s"].values())
        stages[name] = {
            "ms_per_image": {st: 1e3 * ref["stages_s"][st] / ref["images"] for st in STAGES},
            "detail_ms_per_image": {k: 1e3 * v / ref["images"] for k, v in ref["detail_s"].items()},
            "non_inference_share": (timed - ref["stages_s"]["inference"]) / timed if timed else None,
        }
    summary: dict[str, Any] = {
        "n": n,
        "ratios": ratios,
        "best_config": best["config"],
        "best_reference": best_ref["config"],
        "best_ratio": best["images_per_s"] / best_ref["images_per_s"],
        "stages": stages,
        "patches_per_image": best_ref["patches"] / best_ref["images"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs if r["job"] == job),
    }
    if DEFAULTS_REFERENCE in stages:  # not run with --multi-only
        # The issue sets this target "at default settings": the loop with the jobs' own defaults.
        summary["non_inference_share"] = stages[DEFAULTS_REFERENCE]["non_inference_share"]
    double = {r["config"]: r for r in runs if r["job"] == job and r["images"] == 2 * n}
    if best["config"] in double:
        twice, ref_twice = double[best["config"]], double.get(best_ref["config"])
        summary["scaling"] = {
            "config": best["config"],
            "wall_2n_over_n": twice["wall_s"] / best["wall_s"],
            "run_seconds_2n_over_n": twice["run_seconds"] / best["run_seconds"],
            "peak_rss_mb_n": best["peak_rss_mb"],
            "peak_rss_mb_2n": twice["peak_rss_mb"],
        }
        if ref_twice:
            # The extra N images alone: start-up and other fixed costs cancel out. On a busy machine
            # a 2N run can finish sooner than its N run; such a difference is noise, not a rate.
            extra, ref_extra = twice["wall_s"] - best["wall_s"], ref_twice["wall_s"] - best_ref["wall_s"]
            cpu = (twice["cpu_s"] - best["cpu_s"]) / n
            ref_cpu = (ref_twice["cpu_s"] - best_ref["cpu_s"]) / n
            marginal = n / extra if extra > 0 else None
            ref_marginal = n / ref_extra if ref_extra > 0 else None
            summary["scaling"].update(
                reference=best_ref["config"],
                ratio_2n=ref_twice["wall_s"] / twice["wall_s"],
                reference_wall_2n_over_n=ref_twice["wall_s"] / best_ref["wall_s"],
                marginal_images_per_s=marginal,
                reference_marginal_images_per_s=ref_marginal,
                marginal_ratio=marginal / ref_marginal if marginal and ref_marginal else None,
                # CPU time is what a busy machine distorts least.
                marginal_cpu_s_per_image=cpu,
                reference_marginal_cpu_s_per_image=ref_cpu,
                marginal_cpu_ratio=ref_cpu / cpu if cpu > 0 and ref_cpu > 0 else None,
            )
    return summary


def targets(jobs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of the issue, its measured value, and whether it is met."""
    rows = []
    for job, s in jobs.items():
        rows.append({"target": f"{job}: best config ({s['best_config']}) >= {TARGET_RATIO:.2f}x the best "
                               f"reference ({s['best_reference']}) images/s",
                     "value": s["best_ratio"], "met": s["best_ratio"] >= TARGET_RATIO})
        if s.get("non_inference_share") is not None:
            rows.append({"target": f"{job}: non-inference work <= {TARGET_NON_INFERENCE:.0%} of per-image time "
                                   f"({DEFAULTS_REFERENCE}, job defaults)",
                         "value": s["non_inference_share"], "met": s["non_inference_share"] <= TARGET_NON_INFERENCE})
        rows.append({"target": f"{job}: peak RSS <= {RSS_LIMIT_MB} MB per process",
                     "value": s["peak_rss_mb"], "met": s["peak_rss_mb"] <= RSS_LIMIT_MB})
        if "scaling" in s:
            sc = s["scaling"]
            rows.append({"target": f"{job}: 2N takes <= {TARGET_SCALING}x the time of N ({sc['config']})",
                         "value": sc["wall_2n_over_n"], "met": sc["wall_2n_over_n"] <= TARGET_SCALING})
            if sc.get("ratio_2n") is not None:
                rows.append({"target": f"{job}: the same at 2N images (fixed start-up costs weigh half as much)",
                             "value": sc["ratio_2n"], "met": sc["ratio_2n"] >= TARGET_RATIO})
            for key, how in (("marginal_ratio", "wall"), ("marginal_cpu_ratio", "CPU seconds")):
                if sc.get(key) is not None:
                    rows.append({"target": f"{job}: best vs best on the marginal N images (2N run minus N run), {how}",
                                 "value": sc[key], "met": sc[key] >= TARGET_RATIO})
            growth = sc["peak_rss_mb_2n"] / sc["peak_rss_mb_n"]
            rows.append({"target": f"{job}: peak RSS does not grow with N (2N/N <= 1.10)",
                         "value": growth, "met": growth <= 1.10})
    return rows


def peer_summary(job: str, runs: list[dict[str, Any]], n: int, workers: int = WORKERS) -> dict[str, Any]:
    """One job against its peers at N: rate, ratios, CPU, memory, start-up, and whether the rows agree.

    Ratios are images/s over the peer's images/s. The start-up is where the line through the
    runs at ``PEER_SMALL_N`` and at N meets zero images; its share is of the wall time at N.
    Against the decode floor, the floor's rate is over its own run time (no interpreter start),
    which makes the ratio a conservative one. ``workers``: the process count the runs used.
    """
    multi_loop, _, ray = multi_names(workers)
    at = {r["config"]: r for r in runs if r["job"] == job and r["images"] == n}
    floor = next((r for r in runs if r["kind"] == "floor" and r["images"] == n), None)
    floor_rate = floor["images_per_s_run"] if floor else None
    small = {r["config"]: r for r in runs if r["job"] == job and r["images"] == PEER_SMALL_N and n > PEER_SMALL_N}
    bases = {"vs_loop": at.get(DEFAULTS_REFERENCE), "vs_multi_loop": at.get(multi_loop), "vs_ray": at.get(ray)}
    rows = {}
    for config, r in at.items():
        pss = r.get("peak_pss_per_process_mb")  # runs recorded before PSS was sampled have none
        row = {
            "kind": r["kind"], "wall_s": r["wall_s"], "images_per_s": r["images_per_s"],
            "cpu_s_per_image": r["cpu_s_per_image"], "peak_rss_mb": r["peak_rss_mb"],
            "peak_rss_tree_mb": r["peak_rss_tree_mb"], "processes": len(r["peak_rss_per_process_mb"]),
            "peak_pss_mb": max(pss) if pss else None,
            "peak_pss_tree_mb": r.get("peak_pss_tree_mb"), "result_rows": r["result_rows"],
            "machine_cores": r.get("machine_cores"),  # runs recorded before it was measured have none
            "repeats_wall_s": r.get("repeats_wall_s"),
            "vs_decode_floor": r["images_per_s"] / floor_rate if floor_rate else None,
            "gpu": r.get("gpu"),
        }
        if "stages_s" in r:
            row["stages_ms_per_image"] = {st: 1e3 * r["stages_s"][st] / r["images"] for st in STAGES}
        row.update({key: r["images_per_s"] / base["images_per_s"] if base else None for key, base in bases.items()})
        loop = bases["vs_loop"] or bases["vs_multi_loop"]
        row["same_rows_as_loop"] = r["result_digest"] == loop["result_digest"] if loop else None
        if config in small:
            per_image = (r["wall_s"] - small[config]["wall_s"]) / (n - PEER_SMALL_N)
            row["startup_s"] = small[config]["wall_s"] - PEER_SMALL_N * per_image
            row["startup_share"] = row["startup_s"] / r["wall_s"]
            # The rate once started: what a long job converges to. A small run slower than N's is noise.
            row["marginal_images_per_s"] = 1 / per_image if per_image > 0 else None
            if floor_rate and row["marginal_images_per_s"]:
                row["marginal_vs_decode_floor"] = row["marginal_images_per_s"] / floor_rate
        rows[config] = row
    return {"n": n, "workers": workers, "rows": rows, "decode_floor_images_per_s": floor_rate}


def peer_targets(peers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against the peers, for those that were run."""
    out = []
    for job, p in peers.items():
        rows = p["rows"]
        multi_loop, multi_config, ray = multi_names(p.get("workers", WORKERS))
        checks = [(multi_config, "vs_multi_loop", multi_loop, TARGET_PEER_RATIO),
                  (multi_config, "vs_ray", ray, TARGET_PEER_RATIO),
                  ("in-process", "vs_loop", DEFAULTS_REFERENCE, TARGET_IN_PROCESS_RATIO)]
        for config, key, peer, target in checks:
            value = rows.get(config, {}).get(key)
            if value is not None:
                out.append({"target": f"{job}: {config} >= {target:.2f}x the {peer} (images/s)",
                            "value": value, "met": value >= target})
        on_gpu = {config: r for config, r in rows.items() if r["kind"] == "pipeline" and r.get("gpu")}
        if on_gpu:
            config = max(on_gpu, key=lambda c: on_gpu[c]["images_per_s"])
            share, active = on_gpu[config]["vs_decode_floor"], on_gpu[config]["gpu"]["util_mean_active"]
            if share is not None:
                out.append({"target": f"{job}: the job on the GPU ({config}) >= {TARGET_FLOOR_SHARE:.0%} of the CPU "
                                      "decode floor (images/s)", "value": share, "met": share >= TARGET_FLOOR_SHARE})
            out.append({"target": f"{job}: the GPU is not the bottleneck ({config}: utilisation while active < "
                                  f"{BOTTLENECK_PERCENT:.0f} %)", "value": active, "met": active < BOTTLENECK_PERCENT})
        pipelines = [r for r in rows.values() if r["kind"] == "pipeline"]
        if pipelines:
            rss = max(r["peak_rss_mb"] for r in pipelines)
            out.append({"target": f"{job}: pipelines' peak RSS per process <= {PEER_RSS_LIMIT_MB:.0f} MB",
                        "value": rss, "met": rss <= PEER_RSS_LIMIT_MB})
        shares = [r["startup_share"] for r in rows.values() if r.get("startup_share") is not None]
        if shares:
            out.append({"target": f"{job}: start-up < 5% of the wall time at N={p['n']} (the largest share)",
                        "value": max(shares), "met": max(shares) < 0.05})
        agree = all(r["same_rows_as_loop"] for r in rows.values())
        out.append({"target": f"{job}: every configuration wrote the loop's result rows",
                    "value": agree, "met": agree})
    return [dict(row, group="peers") for row in out]


def ray_installed() -> bool:
    try:
        metadata.version("ray")
    except metadata.PackageNotFoundError:
        return False
    return True


def machine(reference_threads: Optional[int]) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    except (OSError, IndexError, ValueError):
        mem_gb = None
    versions = {}
    for name in ("torch", "apache-beam", "opencv-python-headless", "pyarrow", "segmentation-models-pytorch", "timm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "torch_threads": reference_threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def resolve_checkpoints(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Use the flags or the shipped checkpoints; if none are there yet, random-init ones (said loudly)."""
    info: dict[str, Any] = {}
    for kind in ("segmenter", "classifier"):
        flag = f"{kind}_checkpoint"
        path = getattr(args, flag)
        if path is None:
            shipped = getattr(defaults, kind.upper())
            if (Path(shipped) / "config.json").is_file():
                path, origin = shipped, "shipped"
            else:
                path, origin = str(work / "checkpoints" / kind), "random init (no shipped checkpoint yet)"
                _random_checkpoint(kind, path)
                log.warning("no shipped %s checkpoint: using a random-init one; figures are not final", kind)
        else:
            origin = "given"
        setattr(args, flag, path)
        config = json.loads((Path(path) / "config.json").read_text()) if Path(path).is_dir() else {}
        info[kind] = {"path": path, "origin": origin, "arch": config.get("arch"), "encoder": config.get("encoder"),
                      "input_size": config.get("input_size")}
    return info


def _random_checkpoint(kind: str, path: str) -> None:
    import torch

    torch.manual_seed(0)
    if kind == "segmenter":
        from models.segmenter import Segmenter, SegmenterConfig, build_network

        Segmenter(build_network(SegmenterConfig()), SegmenterConfig()).save(path)
    else:
        from models.classifier import Classifier, ClassifierConfig
        from models.classifier import build_network as build_classifier

        cfg = ClassifierConfig.untrained()
        Classifier(build_classifier(cfg), cfg).save(path)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="acne-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        checkpoints = resolve_checkpoints(args, work)
        n = args.images
        inputs_n = work / "inputs" / f"n{n}"
        make_inputs(inputs_n, n, args.seed, WORKERS)
        if args.peers:
            references = [c for c in PEER_REFERENCES if not args.multi_only or c not in SINGLE_PROCESS]
            configs = [c for c in PEER_CONFIGS if not args.multi_only or c not in SINGLE_PROCESS]
        else:
            references = [c for c in REFERENCES if not args.quick or c in QUICK_REFERENCES]
            configs = [c for c in CONFIGS if not args.quick or c in QUICK_CONFIGS]
        with_ray = not args.quick and ray_installed()
        if not with_ray and not args.quick:
            log.warning("ray is not installed (pip install -e .[bench]): no Ray Data peer in this run")
        load_start = os.getloadavg()
        header = run_header(args, references, configs, with_ray, checkpoints)
        bench = Bench(args, work, partial_path(args.json), header)

        def run_all(inputs: Path, images: int, reverse: bool) -> None:
            for job in args.jobs:
                # References and pipelines interleaved, and the order reversed between repeats,
                # so that drifting background load hits every configuration alike.
                order = []
                step = -(-len(configs) // len(references))
                for i, reference in enumerate(references):
                    order += [("reference", reference)] + [("pipeline", c) for c in configs[i * step : (i + 1) * step]]
                order += [("ray", RAY)] if with_ray else []
                for kind, config in reversed(order) if reverse else order:
                    if kind == "reference":
                        bench.reference(job, config, inputs, images)
                    elif kind == "pipeline":
                        bench.pipeline(job, config, inputs, images)
                    else:
                        bench.ray(job, inputs, images)

        for repeat in range(args.repeats):
            run_all(inputs_n, n, repeat % 2 == 1)
        if args.peers:
            bench.floor(inputs_n, n)
        runs = median_runs(bench.runs)
        jobs = {job: summarise(job, runs, n) for job in args.jobs}
        if args.peers:
            if n > PEER_SMALL_N:
                inputs_small = work / "inputs" / f"n{PEER_SMALL_N}"
                make_inputs(inputs_small, PEER_SMALL_N, args.seed)
                bench.runs = []
                run_all(inputs_small, PEER_SMALL_N, False)
                runs += bench.runs
        elif not args.quick:
            inputs_2n = work / "inputs" / f"n{2 * n}"
            make_inputs(inputs_2n, 2 * n, args.seed, WORKERS)
            for job in args.jobs:
                runs.append(bench.reference(job, jobs[job]["best_reference"], inputs_2n, 2 * n))
                runs.append(bench.pipeline(job, jobs[job]["best_config"], inputs_2n, 2 * n))
            jobs = {job: summarise(job, runs, n) for job in args.jobs}
        levers = {} if args.quick or args.peers else bench.levers(inputs_n)
        peers = {job: peer_summary(job, runs, n) for job in args.jobs}
        reference_threads = next((r["torch_threads"] for r in runs if r["kind"] == "reference"), None)
        result = {
            **header,
            "machine": machine(reference_threads),
            "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "runs": runs,
            "jobs": jobs,
            "peers": peers,
            "targets": targets(jobs) + peer_targets(peers),
            "levers": levers,
            "total_wall_s": time.perf_counter() - started,
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def run_header(args: argparse.Namespace, references: Sequence[str], configs: Sequence[str], with_ray: bool,
               checkpoints: dict[str, Any]) -> dict[str, Any]:
    """A result's fields that are known before the first run: when, how, with what settings."""
    return {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bench.throughput " + " ".join(args.argv),
        "load_average_start_end": [round(os.getloadavg()[0], 2), None],
        "settings": {
            "images": args.images, "seed": args.seed, "repeats": args.repeats, "quick": args.quick,
            "peers": args.peers, "multi_only": args.multi_only, "jobs": args.jobs, "device": args.device,
            "workers": WORKERS, "startup_images": PEER_SMALL_N if args.peers else None,
            "ray": metadata.version("ray") if with_ray else None,
            "job_defaults": job_defaults(args.device),
            "references": {c: REFERENCES[c] for c in references},
            "configs": {c: CONFIGS[c] for c in configs},
        },
        "checkpoints": checkpoints,
    }


def partial_path(json_path: Optional[str]) -> Optional[Path]:
    """Where a run with ``--json OUT.json`` keeps its runs so far: ``OUT.partial.json``, removed once OUT is written."""
    if not json_path:
        return None
    path = Path(json_path)
    return path.with_name(f"{path.stem}.partial.json")


def job_defaults(device: str = "cpu") -> str:
    """The jobs' defaults on ``device`` for the flags that matter to speed, as their own parsers and configs
    settle them."""
    placeholders = ["--input", "inputs", "--output", "out", "--device", device]
    configs = [
        config.from_flags(job_parser(job.OPTION_GROUPS, job.PROG, job.DESCRIPTION).parse_args(placeholders))
        for job, config in ((build_dataset, DatasetConfig), (score, ScoreConfig))
    ]
    values = {**asdict(configs[0]), **asdict(configs[1])}
    flags = ("device", "batch_size", "classifier_batch_size", "patch_format", "png_compression", "torch_threads")
    return ", ".join(f"{flag.replace('_', '-')} {values[flag]}" for flag in flags)


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of the harness as one: the first's machine and settings, everyone's runs.

    Each file must come from the same N and device; a run measured twice (the decode floor,
    once per file) keeps its median, as repeats do.
    """
    first = results[0]
    for other in results[1:]:
        for key in ("images", "device"):
            if other["settings"].get(key) != first["settings"].get(key):
                raise ValueError(f"cannot merge runs with different {key}: "
                                 f"{first['settings'].get(key)} and {other['settings'].get(key)}")
    if len(results) == 1:
        return first
    merged = dict(first, settings=dict(first["settings"]))
    merged["command"] = " ; ".join(r["command"] for r in results)
    merged["total_wall_s"] = sum(r["total_wall_s"] for r in results)
    merged["partial"] = any(r.get("partial") for r in results)
    merged["settings"]["jobs"] = [job for job in JOBS if any(job in r["settings"]["jobs"] for r in results)]
    runs = [run for r in results for run in r["runs"]]
    floors = median_runs([run for run in runs if run["kind"] == "floor"])
    merged["runs"] = [run for run in runs if run["kind"] != "floor"] + floors
    return merged


def median_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per (job, config, images): the repeat with the median wall time."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["job"], r["config"], r["images"])].append(r)
    chosen = []
    for group in groups.values():
        walls = sorted(r["wall_s"] for r in group)
        middle = statistics.median_low(walls)
        pick = next(r for r in group if r["wall_s"] == middle)
        chosen.append(dict(pick, repeats_wall_s=[round(w, 2) for w in walls]))
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from bench.report import (
        GPU_SECTION, PEERS_SECTION, RESUME_SECTION, gpu_section, markdown, peers_section, replace_section, section_of,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="N, images per run (default: %(default)s).")
    parser.add_argument("--json", default=None, help="Write the full results here.")
    parser.add_argument("--markdown", default=str(REPO / "bench" / "RESULTS.md"),
                        help="Write the Markdown report here (default: %(default)s); '-' to skip.")
    parser.add_argument("--quick", action="store_true",
                        help="In-process runs only: no multi-process, no 2N scaling run, no levers (a smoke test).")
    parser.add_argument("--peers", action="store_true",
                        help=f"Only the comparison with the peers: the loop in 1 and {WORKERS} processes, Ray Data, "
                             f"each job in-process, with {WORKERS} worker processes and with {WORKERS} threads in one "
                             f"process, at N and at {PEER_SMALL_N} images (for the start-up), and the host's CPU decode "
                             "floor; writes only the report's peers section (with --device cuda: its GPU section).")
    parser.add_argument("--multi-only", action="store_true",
                        help=f"With --peers: only the configurations that use every core (the {WORKERS}-process "
                             f"loop, {WORKERS} workers, {WORKERS} threads, Ray Data), without the single-threaded loop "
                             "and job, which take most of the time at a large N; the targets that need those two are "
                             "left out.")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS),
                        help="Which jobs to measure (default: both).")
    parser.add_argument("--repeats", type=int, default=1, help="Repeat the N runs, alternating order; median kept.")
    parser.add_argument("--seed", type=int, default=0, help="Input jitter seed (default: %(default)s).")
    parser.add_argument("--segmenter-checkpoint", default=None, help="Default: the shipped segmenter.")
    parser.add_argument("--classifier-checkpoint", default=None, help="Default: the shipped classifier.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="Inference device of every job and peer; the batch sizes follow it as in the jobs "
                             "(default: %(default)s).")
    parser.add_argument("--workdir", default=None, help="Where inputs and outputs go (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (inputs, logs) afterwards.")
    parser.add_argument("--rereport", nargs="+", default=None, metavar="JSON",
                        help="Run nothing: recompute the summaries and the report from earlier --json files "
                             "(several: their runs merged, e.g. one file per job).")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be positive")
    if args.quick and args.peers:
        parser.error("--quick and --peers are different selections; choose one")
    if args.multi_only and not args.peers:
        parser.error("--multi-only selects among the peers; use it with --peers")
    # force: where apache_beam's import has configured the root logger already, progress would go unseen.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if args.rereport:
        result = merge_results([json.loads(Path(p).read_text()) for p in args.rereport])
        n = result["settings"]["images"]
        # A partial file may hold a job's loop without its pipeline yet: such a job has no summary.
        ran = [job for job in JOBS if {"reference", "pipeline"} <= {r["kind"] for r in result["runs"]
                                                                    if r["job"] == job and r["images"] == n}]
        result["jobs"] = {job: summarise(job, result["runs"], n) for job in ran}
        # Runs from before the peers existed carry no row digests.
        has_peers = all("result_digest" in r for r in result["runs"] if r["kind"] != "floor")
        workers = result["settings"].get("workers", WORKERS)
        result["peers"] = {job: peer_summary(job, result["runs"], n, workers) for job in ran} if has_peers else {}
        result["targets"] = targets(result["jobs"]) + peer_targets(result["peers"])
    else:
        result = run_bench(args)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
        if not args.rereport:
            partial_path(args.json).unlink(missing_ok=True)
    if args.markdown != "-":
        path = Path(args.markdown)
        if result["settings"].get("peers") and path.exists():
            # A GPU host's peers have their own section: the CPU peers' figures stay as they were.
            if result["settings"].get("device") == "cuda":
                text = replace_section(path.read_text(), GPU_SECTION, gpu_section(result))
            else:
                text = replace_section(path.read_text(), PEERS_SECTION, peers_section(result))
        else:
            # Sections other commands and hosts wrote survive a CPU run's rewrite.
            old = path.read_text() if path.exists() else ""
            text = markdown(result)
            for title in (RESUME_SECTION, GPU_SECTION):
                kept = section_of(old, title)
                if kept:
                    text = replace_section(text, title, kept)
        path.write_text(text)
        log.info("report written to %s", args.markdown)
    for row in result["targets"]:
        log.info("%s %-70s %s", "MET " if row["met"] else "MISS", row["target"], _fmt(row["value"]))
    return result


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
