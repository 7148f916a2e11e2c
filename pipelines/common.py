"""What both jobs share: up-front checks, the read -> decode -> segment front end, and the finish.

The checks run before the pipeline is built, so a bad pattern, label file, checkpoint or
output location fails in seconds with a message that says what to fix.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

import apache_beam as beam
import torch
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from models.checkpoint import CheckpointError
from models.dataset import (
    ERROR_SCHEMA,
    ERRORS_DIR,
    FACES_DIR,
    MANIFEST,
    SCORE_SCHEMA,
    SCORES_DIR,
    join,
    read_parquet_dir,
)
from models.classifier import Classifier
from models.segmenter import Segmenter
from transforms.card import command
from transforms.decode import DecodeImages
from transforms.finish import Finish, WriteOutcomes, package_versions
from transforms.lock import OutputLock, release, take
from transforms.plan import check_patterns
from transforms.read import ReadImages
from transforms.resolution import ShrinkEnlarged
from transforms.resume import RUN_FLAGS, Families, RunStart, start_run
from transforms.segment import SegmentSkin, SkinSegmenterHandler
from transforms.sidefiles import InputError, LabelFiles, load_ffhq_categories, load_labels
from transforms.sink import OutputError, prepare_output
from transforms.split import AssignSplit
from transforms.storage import EndpointError, check_endpoints, open_file

if TYPE_CHECKING:  # pipelines.config builds on this module's checks and errors
    from pipelines.config import JobConfig

log = logging.getLogger("acne")

CONFIG_ERRORS = (InputError, CheckpointError, OutputError, EndpointError)

# Flags whose values are credentials (Beam's --s3_secret_access_key, --s3_session_token...).
SECRET_FLAG = re.compile(r"^--?[\w-]*(secret|token|password|credential)[\w-]*$", re.IGNORECASE)

# Runners whose workers are processes on the launching machine; any other runner (Dataflow,
# Flink, Spark...) runs the work elsewhere, where the launcher's hardware says nothing.
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "PrismRunner", "InteractiveRunner")


class JobConfigError(ValueError):
    """A flag, input, checkpoint or output cannot be used; nothing has run yet."""


class AccountingError(RuntimeError):
    """The job finished but its outputs do not account for every input exactly once."""


@dataclass
class Prepared:
    """What the up-front checks produced for the pipeline to use: references and hashes, never the data.

    Side files are checked here and loaded again by the workers, so the job graph does not grow
    with them (``transforms.sidefiles``).
    """

    labels: Optional[LabelFiles]
    ffhq_metadata: Optional[str]
    segmenter_sha256: str
    classifier_sha256: Optional[str] = None
    run: RunStart = RunStart(run=1)
    progress: Optional[str] = None  # where workers count progress for the launcher's bar (transforms.progress)
    lock: Optional[OutputLock] = None  # this job's hold on the output; Finish lets it go


def workers_run_here(options: Optional[PipelineOptions]) -> bool:
    """Whether the job's workers run on this machine, so that its CUDA device is theirs."""
    runner = options.view_as(StandardOptions).runner if options is not None else None
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return name is None or name.rsplit(".", 1)[-1] in LOCAL_RUNNERS


def prepare(config: JobConfig, options: Optional[PipelineOptions] = None) -> Prepared:
    """Check everything that can be checked before the job starts; then take the output (its lock) and clear it.

    ``options`` tell where the workers run: ``--device cuda`` is only checked against this
    machine when they run here (a Dataflow launcher has no GPU; its GPU workers do).
    """
    if config.device == "cuda" and workers_run_here(options) and not torch.cuda.is_available():
        raise JobConfigError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    classifier_uri = getattr(config, "classifier_checkpoint", None)
    try:
        check_endpoints([
            *config.input, config.output, config.segmenter_checkpoint, classifier_uri, *config.labels_csv,
            config.ffhq_metadata,
        ])
        segmenter = Segmenter.load(config.segmenter_checkpoint)
        classifier = Classifier.load(classifier_uri) if classifier_uri else None
        files = check_patterns(config.input)
        labels = LabelFiles(config.labels_csv, config.id_column, config.label_column) if config.labels_csv else None
        if labels is not None:
            log.info("labels for %d image id(s) in %s", len(load_labels(labels)), ", ".join(labels.uris))
        if config.ffhq_metadata:
            log.info("FFHQ categories for %d face(s) in %s", len(load_ffhq_categories(config.ffhq_metadata)),
                     config.ffhq_metadata)
        remote = None if workers_run_here(options) else str(options.view_as(StandardOptions).runner)
        lock = take(config.output, takeover=config.overwrite or config.resume, remote_runner=remote)
        try:
            prepare_output(config.output, config.overwrite, config.resume)
        except BaseException:
            release(lock)
            raise
    except CONFIG_ERRORS as exc:
        raise JobConfigError(str(exc)) from exc
    log.info(
        "found %d input file(s); segmenter %s (sha256 %s)", files, config.segmenter_checkpoint, segmenter.sha256[:12]
    )
    classifier_sha256 = classifier.sha256 if classifier else None
    return Prepared(labels, config.ffhq_metadata, segmenter.sha256, classifier_sha256, lock=lock)


class OutputHold:
    """The launcher's part in the output's lock: it releases it when the job failed and has certainly ended.

    A job that ends well releases the lock itself (``Finish``). A job on a local runner ends with
    its launcher; a remote one (Dataflow) only in a terminal state: a launcher that fails or dies
    while its job runs says nothing about the job, which keeps the lock.
    """

    def __init__(self, lock: Optional[OutputLock], options: Optional[PipelineOptions]):
        self._lock, self._local, self._result = lock, workers_run_here(options), None

    def __enter__(self) -> OutputHold:
        return self

    def submit(self, p: beam.Pipeline, run: Callable[[beam.Pipeline], Any] = beam.Pipeline.run) -> Any:
        """``run(p)`` (by default ``p.run()``), remembering the result to ask about the job's state."""
        self._result = run(p)
        return self._result

    def _job_ended(self) -> bool:
        if self._local or self._result is None:
            return True
        try:
            return PipelineState.is_terminal(self._result.state)
        except Exception:
            return False  # the runner cannot be asked: the job may still run

    def __exit__(self, failed: Optional[type], *_: Any) -> None:
        if failed is not None and self._job_ended():
            try:
                release(self._lock)
            except Exception as exc:  # the job's own error matters more
                log.warning("could not release the lock of the failed job: %s: %s", type(exc).__name__, exc)


def start(
    config: JobConfig, prepared: Prepared, job: str, checkpoints: dict[str, dict[str, Any]], families: Families
) -> Prepared:
    """Record this run in the output before any work; on ``--resume``, carry the earlier runs' finished images."""
    record = {
        "job": job,
        "arguments": {k: v for k, v in config.arguments().items() if k not in RUN_FLAGS},
        "checkpoints": {name: c["sha256"] for name, c in checkpoints.items()},
    }
    try:
        run = start_run(config.output, json.loads(json.dumps(record)), config.resume, families)
    except OutputError as exc:
        raise JobConfigError(str(exc)) from exc
    if run.run > 1:
        log.info("run %d: %d images carried over from earlier runs", run.run, run.carried_images)
    return replace(prepared, run=run)


class JobOutputs(NamedTuple):
    """What a job's graph hands to its finish: the input count, every outcome, the committed files, and the
    faces sampled for the QA sheet (``transforms.qa.SampleFaces``)."""

    inputs: beam.PCollection
    outcomes: list[beam.PCollection]
    files: list[beam.PCollection]
    samples: beam.PCollection


def segmented_faces(
    p: beam.Pipeline, config: JobConfig, prepared: Prepared, split: Optional[AssignSplit] = None,
    shrink_enlarged: bool = False,
) -> tuple[beam.PCollection, list[beam.PCollection], beam.PCollection]:
    """Read -> [Split] -> Decode -> [ShrinkEnlarged] -> Segment: the segmented records, the failure
    outcomes so far, the input count.

    ``split`` runs right after the read, on the id, path and metadata alone, so that every
    outcome from then on (decode failures and filtered faces included) carries its split.
    ``shrink_enlarged`` halves enlarged photos before anything looks at them (score's
    ``--working-resolution auto``).
    """
    records, read_failed, inputs = p | "Read" >> ReadImages(
        config.input, prepared.labels, prepared.ffhq_metadata, config.voc_annotations, prepared.run.done_list,
        prepared.progress, config.max_image_bytes,
    )
    failures = [read_failed]
    if split is not None:
        records, split_failed = records | "Split" >> split
        failures.append(split_failed)
    decoded, decode_failed = records | "Decode" >> DecodeImages(config.max_pixels, config.patch_size)
    if shrink_enlarged:
        decoded = decoded | "WorkingResolution" >> ShrinkEnlarged()
    handler = SkinSegmenterHandler(config.segmenter_checkpoint, config.device, config.batch_size, config.torch_threads)
    segmented, segment_failed = decoded | "Segment" >> SegmentSkin(handler)
    return segmented, [*failures, decode_failed, segment_failed], inputs


def finish_job(
    config: JobConfig,
    argv: Optional[Sequence[str]],
    job: str,
    checkpoints: dict[str, Any],
    tables: list[str],
    outputs: JobOutputs,
    prepared: Prepared,
) -> None:
    """Append the last steps: write every outcome, then the checked manifest (which releases the output)."""
    run = prepared.run
    outcome_files, outcomes = tuple(outputs.outcomes) | "WriteOutcomes" >> WriteOutcomes(
        config.output, run.run, prepared.progress
    )
    files = (*outputs.files, outcome_files) | "CommittedFiles" >> beam.Flatten()
    redacted = redact_argv(sys.argv[1:] if argv is None else list(argv))
    base = {
        "job": job,
        "arguments": config.arguments(),
        "argv": redacted,
        "command": command(job, redacted),
        "versions": package_versions(),
        "checkpoints": checkpoints,
    }
    (outputs.inputs, outcomes, files, outputs.samples) | "Finish" >> Finish(
        config.output, base, tables, config.min_face_skin, run, prepared.lock
    )


def complete(result: Any, output: str) -> dict[str, Any]:
    """Wait for the job, then report what its manifest says; unbalanced books are an error."""
    result.wait_until_finish()
    try:
        with open_file(join(output, MANIFEST), "rt") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise AccountingError(f"the job finished but wrote no {join(output, MANIFEST)}") from None
    print_summary(manifest, output)
    books = manifest["accounting"]
    if not books["ok"]:
        raise AccountingError(
            f"accounting does not add up: inputs {books['inputs']} != kept {books['kept']} + filtered "
            f"{books['filtered']} + failed {books['failed']} (outcome rows {books['outcome_rows']})"
        )
    return manifest


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The command line with credential values replaced by ``***``: the manifest is shared."""
    redacted: list[str] = []
    hide_next = False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next and not arg.startswith("-"):
            redacted.append("***")
            hide_next = False
        elif SECRET_FLAG.match(flag):
            redacted.append(f"{flag}=***" if eq else flag)
            hide_next = not eq
        else:
            redacted.append(arg)
    return redacted


def cli(run: Callable[[Sequence[str]], Any]) -> None:
    """Run a job from the command line: configuration problems exit with a message, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        run(sys.argv[1:])
    except (JobConfigError, AccountingError) as exc:
        sys.exit(f"error: {exc}")


def print_summary(manifest: dict[str, Any], output: str) -> None:
    books, run = manifest["accounting"], manifest["run"]
    lines = [
        f"{manifest['job']} finished in {run['seconds']:.1f} s ({run['images_per_second']:.2f} images/s)",
        f"  inputs {books['inputs']}: kept {books['kept']}, filtered {books['filtered']}, failed {books['failed']}"
        + ("" if books["ok"] else "  <-- DOES NOT ADD UP"),
    ]
    if len(manifest["runs"]) > 1:
        latest = manifest["runs"][-1]
        lines.append(f"  run {latest['run']}: {latest['carried_images']} images carried over from earlier runs, "
                     f"{sum(latest['processed'][s] for s in ('kept', 'filtered', 'failed'))} processed now")
    lines += [f"  {table}: {n} rows" for table, n in manifest["rows"].items() if table not in (FACES_DIR, ERRORS_DIR)]
    if manifest["job"] == "score":
        verdicts = Counter(read_parquet_dir(join(output, SCORES_DIR), SCORE_SCHEMA, ["verdict"]).column(0).to_pylist())
        lines.append("  verdicts: " + ", ".join(f"{v} {verdicts[v]}" for v in sorted(verdicts, key=str) if v)
                     + f", no usable skin {verdicts[None]}")
    if books["failed"]:
        errors = read_parquet_dir(join(output, ERRORS_DIR), ERROR_SCHEMA, ["stage", "error_type"]).to_pylist()
        top = Counter(f"{e['stage']}/{e['error_type']}" for e in errors).most_common(5)
        lines.append("  failures: " + ", ".join(f"{k} x{n}" for k, n in top) + f"  (details: {output}/errors/)")
    lines.append(f"  output: {output}  (qa.png to check by eye, report.png, README.md, manifest.json, faces/, errors/)")
    print("\n".join(lines), flush=True)
