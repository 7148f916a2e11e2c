"""Bad input and faults: fail fast before the job, dead-letter what breaks during it, never look complete when killed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import apache_beam as beam
import fsspec
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from models.dataset import IncompleteDatasetError, read_manifest, read_patches, read_table
from pipelines import build_dataset
from pipelines.common import JobConfigError
from transforms.plan import plan_shard
from transforms.read import ReadBytes
from transforms.records import ImageRef
from transforms.storage import is_transient, with_retries
from tests.scale_fixtures import (  # noqa: F401  (pytest fixtures)
    IMAGE_SIDE,
    JOB_FLAGS,
    PATCH,
    GcsServer,
    S3Server,
    checkpoints,
    free_port,
    gcs_server,
    image_files,
    kill_midway,
    monkeypatch_module,
    put_files,
    s3_server,
    tar_bytes,
    write_folder,
)
from tests.scale_fixtures import _forget_filesystems

# Generous: the point is seconds, not the minute-plus of client retries against a dead endpoint.
FAIL_FAST_S = 20.0


@pytest.fixture(scope="module", params=["s3", "gs"])
def server(request: pytest.FixtureRequest) -> S3Server | GcsServer:
    return request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")


@pytest.fixture(scope="module")
def bucket(server: S3Server | GcsServer) -> str:
    """A bucket with a few images in it."""
    root = server.make_bucket("faults-inputs")
    put_files(f"{root}/images", image_files(2, broken=0))
    return root


def _scheme(server: S3Server | GcsServer) -> str:
    return "s3" if isinstance(server, S3Server) else "gs"


def _refused(inputs: list[str], output: str, segmenter: str) -> tuple[str, float]:
    """Run build_dataset expecting a configuration error; return its message and how long it took."""
    started = time.monotonic()
    with pytest.raises(JobConfigError) as caught:
        build_dataset.run(["--input", *inputs, "--output", output, "--segmenter-checkpoint", segmenter, *JOB_FLAGS])
    return str(caught.value), time.monotonic() - started


def test_missing_input_bucket_fails_before_the_job(
    server: S3Server | GcsServer, bucket: str, checkpoints: tuple[str, str]
) -> None:
    scheme = _scheme(server)
    message, elapsed = _refused([f"{scheme}://no-such-bucket-in/images/*.png"], f"{bucket}/out-a", checkpoints[0])
    assert f"bucket {scheme}://no-such-bucket-in does not exist" in message
    assert elapsed < FAIL_FAST_S
    assert not fsspec.filesystem(scheme).exists("faults-inputs/out-a")


def test_missing_output_bucket_is_refused_not_created(
    server: S3Server | GcsServer, bucket: str, checkpoints: tuple[str, str]
) -> None:
    scheme = _scheme(server)
    message, _ = _refused([f"{bucket}/images"], f"{scheme}://no-such-bucket-out/dataset", checkpoints[0])
    assert f"output bucket {scheme}://no-such-bucket-out does not exist" in message
    _forget_filesystems()
    assert not fsspec.filesystem(scheme).exists("no-such-bucket-out")


def test_unreachable_endpoint_fails_in_seconds(
    server: S3Server | GcsServer, bucket: str, checkpoints: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("STORAGE_EMULATOR_HOST" if _scheme(server) == "gs" else "AWS_ENDPOINT_URL_S3", dead)
    _forget_filesystems()
    try:
        message, elapsed = _refused([f"{bucket}/images"], f"{bucket}/out-c", checkpoints[0])
    finally:
        monkeypatch.undo()
        _forget_filesystems()
    assert f"cannot reach the storage endpoint {dead}" in message
    assert elapsed < FAIL_FAST_S


def test_permission_denied_is_reported_up_front(
    s3_server: S3Server, checkpoints: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto enforcing IAM: a user with no S3 permission is refused with a clear message."""
    import boto3
    from moto import settings

    root = s3_server.make_bucket("faults-private")
    put_files(f"{root}/images", image_files(1, broken=0))
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="no-s3")
    key = iam.create_access_key(UserName="no-s3")["AccessKey"]
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    _forget_filesystems()
    try:
        message, _ = _refused([f"{root}/images"], f"{root}/out", checkpoints[0])
    finally:
        monkeypatch.undo()
        _forget_filesystems()
    assert "cannot list input 's3://faults-private/images'" in message and "AccessDenied" in message.replace(" ", "")
    assert key["SecretAccessKey"] not in message


def test_shard_deleted_after_planning_is_dead_lettered(s3_server: S3Server) -> None:
    """Refs are planned, then the objects vanish: each image becomes a failed outcome, nothing is lost."""
    root = s3_server.make_bucket("faults-vanishing")
    images = image_files(3, broken=0)
    put_files(f"{root}/loose", {"00000/00000.png": images["00000/00000.png"]})
    put_files(f"{root}/shards", {"a.tar": tar_bytes({f"t/{k}.png": v for k, v in enumerate(images.values())})})
    refs = list(plan_shard(f"{root}/loose/00000/00000.png")) + list(plan_shard(f"{root}/shards/a.tar"))
    assert len(refs) == 4 and all(isinstance(r, ImageRef) for r in refs)
    fs = fsspec.filesystem("s3")
    fs.rm(["faults-vanishing/loose/00000/00000.png", "faults-vanishing/shards/a.tar"])

    with BeamTestPipeline() as p:
        out = (
            p
            | beam.Create(refs)
            | beam.ParDo(ReadBytes(None, None, False, attempts=3, base_delay=0)).with_outputs("outcome", main="records")
        )
        assert_that(out.records, equal_to([]), label="NoRecords")
        failed = out.outcome | beam.Map(lambda o: (o.image_id, o.status, o.stage, o.error_type))
        expected = [(r.image_id, "failed", "read", "FileNotFoundError") for r in refs]
        assert_that(failed, equal_to(expected), label="AllDeadLettered")


def test_transient_errors_are_retried_with_backoff_then_raised() -> None:
    calls: list[int] = []
    waits: list[float] = []

    def flaky() -> bytes:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    assert with_retries(flaky, attempts=3, base_delay=0) == b"ok" and len(calls) == 3

    def always_down() -> bytes:
        calls.append(1)
        raise TimeoutError("read timed out")

    calls.clear()
    with pytest.raises(TimeoutError):
        with_retries(always_down, attempts=3, base_delay=0, on_retry=lambda: waits.append(0))
    assert len(calls) == 3 and len(waits) == 2

    def gone() -> bytes:
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(gone, attempts=3, base_delay=0)
    assert len(calls) == 1
    assert is_transient(ConnectionError()) and is_transient(OSError("EIO"))
    assert not any(is_transient(e) for e in (FileNotFoundError(), PermissionError(), ValueError(), EOFError()))


def _temporary_files(output: Path) -> list[Path]:
    return [f for f in (output / "_temporary").rglob("*") if f.is_file()] if (output / "_temporary").exists() else []


def test_killed_job_never_looks_complete_and_a_rerun_repairs_it(checkpoints: tuple[str, str], tmp_path: Path) -> None:
    inputs = write_folder(tmp_path / "in", image_files(20, broken=1))
    output = tmp_path / "out"
    argv = ["--input", str(inputs), "--output", str(output), "--segmenter-checkpoint", checkpoints[0], *JOB_FLAGS]
    kill_midway(["pipelines.build_dataset", *argv], lambda: _temporary_files(output), timeout=120)

    assert not (output / "manifest.json").exists()
    with pytest.raises(IncompleteDatasetError, match="Rerun it with --resume"):
        read_patches(str(output))
    with pytest.raises(IncompleteDatasetError):
        read_manifest(str(output))

    with pytest.raises(JobConfigError, match="not empty"):
        build_dataset.run(argv)
    manifest = build_dataset.run(argv + ["--overwrite"])

    books = dict(manifest["accounting"])
    patch_count = books.pop("patches")
    assert books == {"inputs": 21, "kept": 20, "filtered": 0, "failed": 1, "outcome_rows": 21, "ok": True}
    faces = read_table(str(output), "faces", ["image_id"]).column(0).to_pylist()
    assert sorted(faces) == sorted(set(faces)) and len(faces) == 21
    patches = read_patches(str(output), columns=["patch_id"]).column(0).to_pylist()
    assert len(patches) == patch_count
    assert len(patches) == len(set(patches)) == 20 * (IMAGE_SIDE // PATCH) ** 2
    assert not (output / "_temporary").exists()
    assert json.loads((output / "manifest.json").read_text())["accounting"]["ok"]
