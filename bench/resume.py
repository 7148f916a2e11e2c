"""Kill and resume at scale: what a preempted build_dataset costs with ``--resume``.

Generates N FFHQ-sized faces, runs build_dataset on the multi-process DirectRunner once
uninterrupted, then again killed with SIGKILL partway (by default at half the uninterrupted
wall time) and rerun with ``--resume``. It reports the total work of the killed run plus the
resume against the uninterrupted run (wall and CPU), each run's peak RSS per worker process,
how many images the resume carried over, and whether the two outputs hold the same rows.

    python -m bench.resume --images 5000 --workdir /tmp/resume-bench [--kill-at 0.5]

The figures go to the "Kill and resume" section of bench/RESULTS.md (and --json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.inputs import make_inputs
from bench.report import RESUME_SECTION, replace_section
from bench.throughput import REPO, TreeSampler, measure
from models import defaults
from models.dataset import read_manifest, read_table

log = logging.getLogger("bench.resume")
WORKERS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


def killed(cmd: Sequence[str], after_s: float, log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` and SIGKILL its whole process tree after ``after_s`` seconds."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    with open(log_path, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            proc.wait(after_s)
            raise RuntimeError(f"the job finished before the kill at {after_s:.0f} s; log {log_path}")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _, _, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop()
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the launcher's own; its workers died with it, unreaped
        "peak_rss_per_process_mb": sorted((round(kb / 1024, 1) for kb in sampler.hwm_kb.values()), reverse=True)[:8],
    }


def table_digest(output: Path) -> dict[str, str]:
    """A digest of each table's rows in a fixed order: equal digests mean equal rows, file names aside."""
    digests = {}
    for table, order in (("faces", ["image_id", "source_uri"]), ("errors", ["image_id", "source_uri"]),
                         *((f"patches/{s}", ["patch_id"]) for s in ("train", "validation", "test"))):
        rows = read_table(str(output), table).sort_by([(c, "ascending") for c in order]).to_pylist()
        digests[table] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return digests


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir)
    images = work / "in"
    if len(list(images.rglob("*.png"))) != args.images:
        log.info("writing %d faces to %s", args.images, images)
        make_inputs(images, args.images)
    job = [sys.executable, "-m", "pipelines.build_dataset", "--input", str(images), "--torch-threads", "1",
           "--segmenter-checkpoint", args.segmenter_checkpoint, "--overwrite", *WORKERS]
    one_shot, resumed = work / "one_shot", work / "resumed"
    whole = measure([*job, "--output", str(one_shot)], work / "one_shot.log")
    log.info("uninterrupted: %.0f s", whole["wall_s"])
    first = killed([*job, "--output", str(resumed)], args.kill_at * whole["wall_s"], work / "killed.log")
    log.info("killed after %.0f s", first["wall_s"])
    second = measure([*[a for a in job if a != "--overwrite"], "--output", str(resumed), "--resume"],
                     work / "resume.log")
    manifest = read_manifest(str(resumed))
    carried = manifest["runs"][-1]["carried_images"]
    same = table_digest(one_shot) == table_digest(resumed)
    result = {
        "images": args.images,
        "kill_at": args.kill_at,
        "uninterrupted": whole,
        "killed": first,
        "resume": second,
        "carried_images": carried,
        "work_wall_ratio": (first["wall_s"] + second["wall_s"]) / whole["wall_s"],
        "same_rows": same,
        "accounting_ok": manifest["accounting"]["ok"],
    }
    log.info("work ratio %.2f, carried %d of %d, same rows: %s", result["work_wall_ratio"], carried, args.images, same)
    return result


def _peaks(run: dict[str, Any]) -> str:
    return ", ".join(f"{mb:.0f}" for mb in run["peak_rss_per_process_mb"][:4])


def section(result: dict[str, Any]) -> str:
    """The RESULTS.md section for one kill-and-resume run."""
    whole, first, second = result["uninterrupted"], result["killed"], result["resume"]
    return f"""\
`python -m bench.resume --images {result['images']} --kill-at {result['kill_at']}`: build_dataset on the
multi-process DirectRunner (2 workers), {result['images']} generated 1024x1024 faces. The killed run is
SIGKILLed (its whole process tree) at {result['kill_at']:.0%} of the uninterrupted wall time, then
rerun with `--resume`.

| run | wall s | peak RSS per process (launcher and workers, largest first), MB |
|---|---|---|
| uninterrupted | {whole['wall_s']:.0f} | {_peaks(whole)} |
| killed | {first['wall_s']:.0f} | {_peaks(first)} |
| resume | {second['wall_s']:.0f} | {_peaks(second)} |

- Total work, killed + resume against uninterrupted: **{result['work_wall_ratio']:.2f}x** wall time
  (target <= 1.6x).
- The resume carried over {result['carried_images']} of {result['images']} images and processed the rest.
- Same rows as the uninterrupted run (faces, errors, every patch split; file names aside):
  **{'yes' if result['same_rows'] else 'NO'}**; accounting balanced: {result['accounting_ok']}.
"""


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="generated faces (default: %(default)s)")
    parser.add_argument("--kill-at", type=float, default=0.5,
                        help="kill after this fraction of the uninterrupted wall time (default: %(default)s)")
    parser.add_argument("--workdir", default="/tmp/acne-resume-bench", help="inputs and outputs go here")
    parser.add_argument("--segmenter-checkpoint", default=defaults.SEGMENTER)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--markdown", default=str(REPO / "bench" / "RESULTS.md"),
                        help="the report whose 'Kill and resume' section to replace ('-' for none)")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown != "-":
        path = Path(args.markdown)
        path.write_text(replace_section(path.read_text(), RESUME_SECTION, section(result)))
    print(section(result))
    return result


if __name__ == "__main__":
    main()
