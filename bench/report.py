"""The benchmark's JSON as a Markdown report (bench/RESULTS.md)."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

STAGE_NOTES = {
    "read": "file bytes",
    "decode": "header probe + one cv2 decode",
    "resize": "INTER_AREA to the model's input (+ classifier's patch resize)",
    "inference": "network forward passes",
    "upsample": "probabilities back to full resolution, threshold",
    "patch": "integral-image tiling",
    "encode": "patch PNG + mask PNG (build); lesions to verdicts, rows (score)",
    "write": "Arrow tables, Parquet",
}

# Written by bench.resume; bench.throughput keeps it when it rewrites the report.
RESUME_SECTION = "Kill and resume"
# Written by bench.throughput; with --peers it replaces only this section.
PEERS_SECTION = "Against the peers: a hand-written multi-process loop and Ray Data"

# Written by bench.throughput --peers --device cuda, on a GPU host; kept when a CPU run rewrites the report.
GPU_SECTION = "On a GPU"

GPU_NOTES = """\
Not measured on this machine (no GPU): `python -m bench.throughput --peers --multi-only --device cuda`
on a GPU host replaces this section with the measurement. On a GPU the forward passes shrink by one to two orders of magnitude, and what is left on
the Python critical path is everything else in the per-stage table. To keep the device busy:

- **Decode off the critical path**: PNG decode is the largest non-inference stage. Run it in
  more worker threads/processes than there are GPUs (Beam: more `--direct_num_workers` or
  Dataflow workers per GPU; in a hand loop, a thread pool: cv2 releases the GIL), or decode on
  the GPU (nvJPEG via `torchvision.io.decode_jpeg(device="cuda")` for JPEG inputs).
- **Larger batches** (done: `--device cuda` defaults to 32 images per segmenter pass and 512
  patches per classifier pass) amortise launch overhead; memory is no constraint at these sizes.
- **Pinned memory and async copies** (done: `CheckpointedNetwork.to_device`): each batch goes
  to the GPU in one pinned, non-blocking copy, so the worker's other threads prepare their
  batches while the GPU runs this one; one copy back per batch, none per image.
- **Upsample and threshold on the device**: resizing the probabilities to full resolution
  with `torch.nn.functional.interpolate` before the copy back saves host time; patch encoding
  (PNG) stays on the CPU and then dominates build_dataset, so `--png-compression 0` or more
  CPU workers per GPU are the levers there.
"""

HOW_TO_RUN = """\
## How to run

    PYTHONPATH=. .venv/bin/python -m bench.throughput                     # default N, writes bench/RESULTS.md
    PYTHONPATH=. .venv/bin/python -m bench.throughput --images 48 --repeats 3 --json out.json
    PYTHONPATH=. .venv/bin/python -m bench.throughput --images 2 --quick --markdown -   # smoke test
    PYTHONPATH=. .venv/bin/python -m bench.throughput --peers --multi-only --images 7000  # against the peers
    N=8000 bash bench/gpu_host.sh                                         # on a GPU host (bench/README.md)

Flags: `--segmenter-checkpoint` / `--classifier-checkpoint` (default: the shipped ones),
`--workdir DIR --keep` to keep the inputs and each run's log. The reference loops and the
lever micro-benchmarks also run alone: `python -m bench.reference build|score|decode --input DIR
--output OUT [job flags]`, `python -m bench.levers --input DIR`. With `--json OUT.json` the runs
so far are kept in `OUT.partial.json` until the end; `--rereport` rebuilds a report from either. Storage and input-format
measurements (bytes fetched per shard, job-graph size, raw TFRecord pixels) are in bench/IO.md.
"""


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ms_table(title: str, values: dict[str, float], unit: str, base: str | dict[str, str] | None = None) -> str:
    """Variants and their cost against the default: one name, or {model family: its default's name}."""
    rows = []
    for name, ms in values.items():
        default = base.get(name.split(", ")[0]) if isinstance(base, dict) else base
        reference = values.get(default) if default else None
        rows.append([name, _f(ms, 2), _f(ms / reference, 2) + "x" if reference else "-"])
    return f"**{title}**\n\n" + table(["variant", f"ms per {unit}", "vs default"], rows)


def _families(fmt: str, segmenter: Any, classifier: Any) -> dict[str, str]:
    return {"segmenter": f"segmenter, {fmt.format(segmenter)}", "classifier": f"classifier, {fmt.format(classifier)}"}


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    parts = [
        "# Throughput benchmark results\n",
        f"Generated {result['created_utc']} by `{result['command']}` in {result['total_wall_s'] / 60:.1f} min.\n",
        "## Machine\n",
        table(["", ""], [
            ["CPU", m["cpu_model"]],
            ["cores (usable)", f"{m['cpu_count']} ({m['usable_cores']})"],
            ["memory", f"{m['memory_gb']} GB"],
            ["torch threads (default, per process)", str(m["torch_threads"])],
            ["python / torch / beam", f"{m['python']} / {m['versions']['torch']} / {m['versions']['apache-beam']}"],
            ["load average at start / end", " / ".join(str(v) for v in result["load_average_start_end"])],
        ]),
    ]
    # Judged before the first run: during the runs the load average also counts the
    # benchmark's own processes (up to four busy threads), and lags by a minute.
    before = result["load_average_start_end"][0]
    if before > m["usable_cores"] - 1:
        parts.append(
            f"**The machine was shared**: 1-minute load average {before:.1f} on {m['usable_cores']} cores before "
            "the first run (other processes were busy). Wall times are noisy and inflated; compare ratios "
            "measured in this run, and the CPU-seconds columns, which contention distorts less.\n"
        )
    else:
        parts.append(
            f"1-minute load average {before:.1f} on {m['usable_cores']} cores before the first run. The load "
            "column below also counts the benchmark's own runs (up to four busy threads in the 2-worker, "
            "2-thread configuration) and lags by about a minute.\n"
        )
    ck = result["checkpoints"]
    parts.append(
        "Checkpoints: " + "; ".join(f"{k} `{v['path']}` ({v['origin']})" for k, v in ck.items()) + ". "
        f"N = {s['images']} images of 1024x1024 PNG, repeats {s['repeats']}; job settings at their defaults "
        f"({s['job_defaults']}).\n"
    )
    parts += ["## Targets\n", table(["target", "measured", "met"], [
        [t["target"], _f(t["value"], 3), "yes" if t["met"] else "**no**"] for t in result["targets"]
    ])]
    parts += ["## Runs\n",
              "Wall time is from interpreter start to exit, nothing subtracted; `run s` is the job's own "
              "manifest `run.seconds` (the reference loop: from model load to last file closed). Ratio = "
              "reference wall / pipeline wall at the same N, against the reference loop with the same torch "
              "thread setting. CPU s/img: user + system time of the whole process tree. Peak RSS: the largest single process of the run's "
              "process tree (wait4), and the tree's sampled total.\n",
              table(
                  ["job", "config", "N", "wall s", "run s", "img/s", "ratio (wall)", "ratio (run s)",
                   "CPU s/img", "peak RSS MB", "tree RSS MB", "patches", "KB/img", "KB/patch", "load"],
                  [_run_row(r, result["jobs"]) for r in result["runs"]],
              )]
    parts += ["## Per-stage time per image (reference loops)\n",
              "Measured with `time.perf_counter` around each stage of the reference loop: the honest split, "
              "since the pipeline fuses stages. Share = fraction of the timed stages.\n",
              _stage_table(result["jobs"])]
    scaling = [(job, j["scaling"]) for job, j in result["jobs"].items() if "scaling" in j]
    if scaling:
        parts += ["## Scaling (N vs 2N)\n",
                  "Marginal img/s = N / (wall at 2N - wall at N): the rate on the extra images, with start-up "
                  "and the other fixed costs cancelled out; what a long job converges to. Being a difference of "
                  "two wall times it is noisy on a busy machine; the marginal CPU seconds per image (whole "
                  "process tree) are the steadier measure.\n",
                  table(
            ["job", "config", "wall 2N / N", "run s 2N / N", "peak RSS MB at N", "at 2N", "marginal img/s",
             "marginal CPU s/img", "reference", "reference wall 2N / N", "reference marginal img/s",
             "reference marginal CPU s/img", "marginal ratio (wall)", "marginal ratio (CPU)"],
            [[job, sc["config"], _f(sc["wall_2n_over_n"]), _f(sc["run_seconds_2n_over_n"]),
              _f(sc["peak_rss_mb_n"], 0), _f(sc["peak_rss_mb_2n"], 0), sc.get("marginal_images_per_s"),
              _f(sc.get("marginal_cpu_s_per_image"), 3), sc.get("reference", "-"), sc.get("reference_wall_2n_over_n"),
              sc.get("reference_marginal_images_per_s"), _f(sc.get("reference_marginal_cpu_s_per_image"), 3),
              sc.get("marginal_ratio"), sc.get("marginal_cpu_ratio")] for job, sc in scaling],
        )]
    if result.get("peers"):
        parts += [f"## {PEERS_SECTION}\n", peers_section(result)]
    if result["levers"]:
        parts.append(_levers(result["levers"], result["runs"]))
    parts += [f"## {GPU_SECTION}\n", GPU_NOTES, HOW_TO_RUN]
    return "\n".join(parts)


def gpu_section(result: dict[str, Any]) -> str:
    """The body of the GPU section: each job and its peers against the host's CPU decode floor, with the
    GPU's utilisation and where each process's time went."""
    m, s = result["machine"], result["settings"]
    gpus = [r["gpu"] for p in result["peers"].values() for r in p["rows"].values() if r.get("gpu")]
    floor = next((p["decode_floor_images_per_s"] for p in result["peers"].values()), None)
    parts = [
        f"Generated {result['created_utc']} by `{result['command']}` in {result['total_wall_s'] / 60:.1f} min"
        f"{_stopped(result)} on **{gpus[0]['gpu'] if gpus else 'no GPU seen by NVML'}**, {m['cpu_model']}, {m['usable_cores']} usable "
        f"cores, python {m['python']}, torch {m['versions']['torch']}, beam {m['versions']['apache-beam']}. "
        f"N = {s['images']} images of 1024x1024 PNG, repeats {s['repeats']}, job defaults ({s['job_defaults']}); "
        f"every multi-process configuration runs {s.get('workers')} processes, one per core, all sharing the one "
        f"GPU. Ray {s.get('ray') or 'not installed there: no Ray Data peer'}.\n",
        f"**CPU decode floor: {_f(floor, 0)} images/s** (`bench.reference decode`: each file read and decoded as "
        "the jobs do, nothing else, over its own run time). vs floor: a configuration's images/s (wall, from "
        "interpreter start) over the floor's. Start-up: the wall time at zero images on the line through the "
        f"runs at {s.get('startup_images', '-')} images and at N; once started: the rate along that line, the "
        "extra images over the extra time, which is what a long job converges to. GPU: NVML's utilisation, the share of each 0.2 s sample in which "
        "a kernel ran, averaged from the first to the last busy sample (active) and over the whole run; "
        "idle: the share of active-window samples with nothing running; memory: peak used on the device.\n",
        table(
            ["job", "config", "wall s", "img/s", "vs floor", "vs multi-process loop", "start-up s",
             "img/s once started", "vs floor once started", "CPU s/img",
             "cores: ours / others / waiting", "GPU util active / whole run", "GPU idle (active)",
             "GPU memory MB", "peak RSS MB per process", "rows equal"],
            [[job, config, r["wall_s"], r["images_per_s"], _x(r.get("vs_decode_floor")), _x(r["vs_multi_loop"]),
              _f(r.get("startup_s"), 1), _f(r.get("marginal_images_per_s"), 1), _x(r.get("marginal_vs_decode_floor")),
              _f(r["cpu_s_per_image"], 3), _cores(r.get("machine_cores")),
              f"{r['gpu']['util_mean_active']:.0f} % / {r['gpu']['util_mean']:.0f} %" if r.get("gpu") else "-",
              _pct(r["gpu"]["idle_share_active"]) if r.get("gpu") else "-",
              _f(r["gpu"]["memory_peak_mb"], 0) if r.get("gpu") else "-", _f(r["peak_rss_mb"], 0),
              {True: "yes", False: "**no**", None: "-"}[r["same_rows_as_loop"]]]
             for job, p in result["peers"].items() for config, r in p["rows"].items()],
        ),
    ]
    stages = [(job, config, r["stages_ms_per_image"]) for job, p in result["peers"].items()
              for config, r in p["rows"].items() if r.get("stages_ms_per_image")]
    if stages:
        names = list(stages[0][2])
        parts += [
            "Where each process's time went, per image, in the hand-written loop (`time.perf_counter` around each "
            "stage, summed over its processes: process time, not wall time). With the forward passes on the GPU, "
            "`inference` is the wait for the shared device, copies included; everything else is CPU work, which "
            "sets the pace.\n",
            table(["job", "config", *names, "total"],
                  [[job, config, *(_f(ms[n], 1) for n in names), _f(sum(ms.values()), 1)]
                   for job, config, ms in stages]),
        ]
    parts.append(table(["target", "measured", "met"], [
        [t["target"], _f(t["value"], 3), "yes" if t["met"] else "**no**"]
        for t in result["targets"] if t.get("group") == "peers"
    ]))
    return "\n".join(parts)


def peers_section(result: dict[str, Any]) -> str:
    """The body of the peers section: every configuration of each job against the loops and Ray Data."""
    m, s = result["machine"], result["settings"]
    workers = s.get("workers", m["usable_cores"])
    before = result["load_average_start_end"][0]
    parts = [
        f"Generated {result['created_utc']} by `{result['command']}` in {result['total_wall_s'] / 60:.1f} min"
        f"{_stopped(result)}; {m['cpu_model']}, {m['usable_cores']} usable cores, 1-minute load average {before:.1f} before the "
        f"first run. N = {s['images']} images of 1024x1024 PNG, repeats {s['repeats']}, job defaults "
        f"({s['job_defaults']}); the multi-process configurations run {workers} processes, one per core. "
        f"Ray {s.get('ray') or 'not installed: no Ray Data peer'}.\n",
        "Every configuration does the same work with the project's own per-record functions and writes "
        "the same result rows (the last column compares the keys of every patch or score row with the "
        "loop's). img/s is N over the wall time from interpreter start to exit. Ratios: images/s over the "
        "peer's. CPU s/img: user + system time of the whole process tree (the larger of wait4's count and the "
        "0.5 s /proc samples: wait4 misses processes reparented before they were reaped, such as Ray's "
        "workers). Peak RSS per process: the largest "
        "single process; tree: the sampled total of all of them. PSS splits each page shared by k processes "
        "k ways, so a forked loop's children, which share their parent's pages of torch, are compared fairly "
        "with spawned workers; the tree's PSS is what the run really holds (empty: not sampled). Cores: where the "
        "machine's cores went during the run, on average: this run's processes / every other process / waiting on I/O "
        "+ taken by the hypervisor (from /proc/stat; empty: not measured); cores the run left idle while no one else "
        "was busy were lost to the run itself. vs decode floor: images/s over the host's CPU decode floor "
        "(`bench.reference decode` in as many processes: read and decode only, over its own run time; empty: "
        "not measured). Repeats: every repeat's wall time (the median is shown). Start-up: the "
        "wall time at zero images "
        "on the line through the runs at "
        f"{s.get('startup_images', '-')} images and at N (measured with --peers only); its share is of the wall time at N.\n",
        table(
            ["job", "config", "wall s", "img/s", "vs 1-process loop", f"vs {workers}-process loop", "vs Ray Data",
             "vs decode floor", "CPU s/img", "peak RSS MB per process", "tree RSS MB", "peak PSS MB per process", "tree PSS MB",
             "processes", "cores: ours / others / waiting", "repeats wall s", "start-up s", "start-up share",
             "rows equal"],
            [[job, config, r["wall_s"], r["images_per_s"], _x(r["vs_loop"]), _x(r["vs_multi_loop"]), _x(r["vs_ray"]),
              _x(r.get("vs_decode_floor")), _f(r["cpu_s_per_image"], 3), _f(r["peak_rss_mb"], 0), _f(r["peak_rss_tree_mb"], 0),
              _f(r.get("peak_pss_mb"), 0), _f(r.get("peak_pss_tree_mb"), 0), r["processes"],
              _cores(r.get("machine_cores")), " / ".join(f"{w:.0f}" for w in r.get("repeats_wall_s") or []) or "-",
              _f(r.get("startup_s"), 1), _pct(r.get("startup_share")),
              {True: "yes", False: "**no**", None: "-"}[r["same_rows_as_loop"]]]
             for job, p in result["peers"].items() for config, r in p["rows"].items()],
        ),
    ]
    parts.append(table(["target", "measured", "met"], [
        [t["target"], _f(t["value"], 3), "yes" if t["met"] else "**no**"]
        for t in result["targets"] if t.get("group") == "peers"
    ]))
    return "\n".join(parts)


def _stopped(result: dict[str, Any]) -> str:
    return " (stopped before its end: the runs it finished)" if result.get("partial") else ""


def _cores(cores: Optional[dict[str, float]]) -> str:
    if not cores:
        return "-"
    return f"{cores['ours']:.2f} / {cores['others']:.2f} / {cores['iowait'] + cores['steal']:.2f}"


def _x(value: Optional[float]) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _pct(value: Optional[float]) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def _run_row(r: dict[str, Any], jobs: dict[str, Any]) -> list[Any]:
    summary = jobs[r["job"]]
    ratio = summary["ratios"].get(r["config"]) if r["kind"] == "pipeline" and r["images"] == summary["n"] else None
    own = "1.00" if r["kind"] == "reference" and r["images"] == summary["n"] else "-"
    return [
        r["job"], r["config"], r["images"], r["wall_s"], r["run_seconds"], r["images_per_s"],
        _f(ratio["wall"]) if ratio else own, _f(ratio["run_seconds"]) if ratio else own,
        r["cpu_s_per_image"], _f(r["peak_rss_mb"], 0), _f(r["peak_rss_tree_mb"], 0), r["patches"],
        _f(r["bytes_per_image"] / 1024, 0), _f(r["bytes_per_patch"] / 1024, 1) if r["bytes_per_patch"] else "-",
        "/".join(str(v) for v in r["load_average"]),
    ]


def _stage_table(jobs: dict[str, Any]) -> str:
    columns = [(job, ref) for job, j in jobs.items() for ref in j["stages"]]
    label = {c: f"{c[0]}, {c[1].replace('reference loop', 'ref').replace('torch ', '')}" for c in columns}
    stages = {c: jobs[c[0]]["stages"][c[1]] for c in columns}
    totals = {c: sum(stages[c]["ms_per_image"].values()) for c in columns}
    header = ["stage", *[f"{label[c]} ms/img" for c in columns], *[f"{label[c]} share" for c in columns], "what"]
    rows = []
    for stage, note in STAGE_NOTES.items():
        ms = [stages[c]["ms_per_image"][stage] for c in columns]
        share = [f"{100 * v / totals[c]:.1f}%" if totals[c] else "-" for v, c in zip(ms, columns)]
        rows.append([stage, *ms, *share, note])
    rows.append(["**non-inference**", *[totals[c] - stages[c]["ms_per_image"]["inference"] for c in columns],
                 *[f"**{100 * stages[c]['non_inference_share']:.1f}%**" for c in columns], "target <= 25%"])
    rows.append(["total timed", *[totals[c] for c in columns], *["100%" for _ in columns],
                 "patches/img: " + ", ".join(f"{j} {jobs[j]['patches_per_image']:.1f}" for j in jobs)])
    return table(header, rows)


def _levers(levers: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    parts = [
        "## Levers\n",
        f"Each lever alone, on {levers['images']} of the benchmark images ({levers['patches']} patches), "
        f"variants interleaved, median of {levers['repeats']}, in one process at "
        f"{levers['inference']['measured_at_torch_threads']} torch thread(s) except the thread lever itself. "
        "The pipeline-level thread lever is in the Runs table (each config with and without `--torch-threads 1`).\n",
        _ms_table("One decode per image", levers["decode_ms_per_image"], "image",
                  "decode_image (probe + one cv2 decode)"),
    ]
    rz = levers["resize"]
    parts.append(_ms_table("Resize before inference (1024 -> model input)", rz["ms_per_image"], "image",
                           "INTER_AREA (default)"))
    parts.append(f"Masks from INTER_AREA and INTER_LINEAR inputs agree on {100 * rz['mask_agreement_area_vs_linear']:.2f}% "
                 "of pixels. Inference cost against input size (batch 1), i.e. what resizing down saves:\n")
    first = next(iter(rz["inference_ms_per_image"]))
    parts.append(_ms_table("Segmenter input size", rz["inference_ms_per_image"], "image", first))
    enc = levers["encode"]
    base = enc.get("png level 1 (default)", {}).get("ms_per_patch")
    parts.append("**Patch encoders** (`--patch-format`, `--png-compression`)\n\n" + table(
        ["encoder", "ms per patch", "vs default", "KB per patch"],
        [[k, v["ms_per_patch"], f"{v['ms_per_patch'] / base:.2f}x" if base else "-", v["bytes_per_patch"] / 1024]
         for k, v in enc.items()],
    ))
    inf = levers["inference"]
    threads = inf["default_torch_threads"]
    parts.append(_ms_table("torch threads (in one process)", inf["torch_threads_ms_per_item"], "image or patch",
                           _families("{} thread(s)", threads, threads)))
    parts.append(_ms_table("channels_last", inf["channels_last_ms_per_item"], "image or patch",
                           _families("{}", "contiguous (default)", "contiguous (default)")))
    parts.append(_ms_table("Batch size", inf["batch_size_ms_per_item"], "image or patch",
                           _families("batch {}", 8, 64)))
    return "\n".join(parts)


def section_of(text: str, title: str) -> Optional[str]:
    """The body of ``text``'s ``## title`` section, or None."""
    head = f"## {title}\n"
    if head not in text:
        return None
    body = text.split(head, 1)[1]
    return body.split("\n## ", 1)[0].strip("\n") + "\n"


def replace_section(text: str, title: str, body: str) -> str:
    """``text`` with its ``## title`` section set to ``body``; a new one goes before "How to run"."""
    head = f"## {title}\n"
    old = section_of(text, title)
    if old is not None:
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        return text[:start] + head + "\n" + body + ("\n" + text[end + 1 :] if end >= 0 else "")
    at = text.index("## How to run")
    return text[:at] + head + "\n" + body + "\n" + text[at:]
