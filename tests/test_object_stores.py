"""Both jobs against real object-store servers on loopback: S3 (moto) and GCS (the emulator).

Inputs (loose images and a tar shard), checkpoints and outputs all live in buckets; the
outputs are read back through ``models.dataset`` and must account for every input once.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fsspec
import pytest

from models.checkpoint import CheckpointError
from models.classifier import Classifier
from models.dataset import SPLITS, read_manifest, read_patches, read_table
from models.segmenter import Segmenter
from pipelines import build_dataset, score
from pipelines.common import JobConfigError
from tests.scale_fixtures import (  # noqa: F401  (pytest fixtures)
    IMAGE_SIDE,
    JOB_FLAGS,
    PATCH,
    S3_SECRET,
    S3Server,
    checkpoints,
    copy_checkpoint,
    gcs_server,
    image_files,
    monkeypatch_module,
    put_files,
    s3_server,
    tar_bytes,
)
from transforms.lock import release, take
from transforms.sink import LOCK

LOOSE, IN_TAR = 4, 4
PATCHES_PER_FACE = (IMAGE_SIDE // PATCH) ** 2


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request: pytest.FixtureRequest, checkpoints: tuple[str, str]) -> dict[str, str]:
    """A bucket layout on one store: inputs, checkpoints, and an empty output bucket."""
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    data = server.make_bucket("scale-inputs")
    out = server.make_bucket("scale-outputs")
    models = server.make_bucket("scale-models")
    files = image_files(LOOSE, broken=1)
    put_files(f"{data}/loose", files)
    shard = {f"faces/{100 + i:05d}.png": b for i, b in enumerate(image_files(IN_TAR, broken=0).values())}
    put_files(f"{data}/shards", {"shard-000000.tar": tar_bytes(shard)})
    copy_checkpoint(checkpoints[0], f"{models}/segmenter")
    copy_checkpoint(checkpoints[1], f"{models}/classifier")
    return {
        "scheme": request.param,
        "inputs": [f"{data}/loose", f"{data}/shards/*.tar"],
        "out": out,
        "segmenter": f"{models}/segmenter",
        "classifier": f"{models}/classifier",
    }


def _argv(store: dict[str, str], output: str) -> list[str]:
    return ["--input", *store["inputs"], "--output", output, "--segmenter-checkpoint", store["segmenter"], *JOB_FLAGS]


def test_build_dataset_reads_and_writes_buckets(store: dict[str, str]) -> None:
    output = f"{store['out']}/dataset"
    manifest = build_dataset.run(_argv(store, output))

    good = LOOSE + IN_TAR
    books = {k: v for k, v in manifest["accounting"].items() if k != "patches"}
    assert books == {"inputs": good + 1, "kept": good, "filtered": 0, "failed": 1, "outcome_rows": good + 1, "ok": True}
    assert manifest["accounting"]["patches"] == len(read_patches(output, columns=["patch_id"]))
    assert read_manifest(output) == json.loads(json.dumps(manifest, default=str))
    faces = read_table(output, "faces").to_pylist()
    assert len({f["image_id"] for f in faces}) == len(faces) == good + 1
    patches = read_patches(output, columns=["patch_id", "split", "source_uri", "segmenter_sha256"]).to_pylist()
    assert len(patches) == len({p["patch_id"] for p in patches}) == good * PATCHES_PER_FACE
    assert {p["split"] for p in patches} <= set(SPLITS)
    assert all(p["source_uri"].startswith(f"{store['scheme']}://scale-inputs/") for p in patches)
    assert sum("shard-000000.tar#faces/" in p["source_uri"] for p in patches) == IN_TAR * PATCHES_PER_FACE
    assert {p["segmenter_sha256"] for p in patches} == {manifest["checkpoints"]["segmenter"]["sha256"]}
    errors = read_table(output, "errors").to_pylist()
    assert [(e["stage"], e["error_type"]) for e in errors] == [("decode", "DecodeError")]
    # Only committed files remain: the temporary folder went before the manifest was written.
    fs, path = fsspec.core.url_to_fs(output)
    assert not fs.exists(f"{path}/_temporary")


def test_score_reads_and_writes_buckets(store: dict[str, str]) -> None:
    output = f"{store['out']}/scores"
    manifest = score.run(_argv(store, output) + ["--classifier-checkpoint", store["classifier"], "--patch-table"])

    good = LOOSE + IN_TAR
    assert manifest["accounting"]["ok"] and manifest["accounting"]["kept"] == good
    rows = read_table(output, "scores").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted({r["image_id"] for r in rows}) and len(rows) == good
    assert {r["status"] for r in rows} == {"scored"}
    assert all(abs(sum(p["probability"] for p in r["probabilities"]) - 1) < 1e-4 for r in rows)
    sha = Classifier.load(store["classifier"]).sha256
    assert {r["classifier_sha256"] for r in rows} == {sha} == {manifest["checkpoints"]["classifier"]["sha256"]}
    assert manifest["rows"]["patch_scores"] == good * PATCHES_PER_FACE


def test_checkpoints_load_from_the_bucket_with_their_hash(store: dict[str, str], checkpoints: tuple[str, str]) -> None:
    assert Segmenter.load(store["segmenter"]).sha256 == Segmenter.load(checkpoints[0]).sha256
    assert Classifier.load(store["classifier"]).sha256 == Classifier.load(checkpoints[1]).sha256


def test_tampered_remote_weights_are_refused(store: dict[str, str], checkpoints: tuple[str, str]) -> None:
    tampered = f"{store['out']}/tampered-segmenter"
    copy_checkpoint(checkpoints[0], tampered)
    weights = bytearray(Path(checkpoints[0], "weights.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    put_files(tampered, {"weights.safetensors": bytes(weights)})

    with pytest.raises(CheckpointError, match="sha256"):
        Segmenter.load(tampered)
    # The job refuses it up front, before anything is written.
    output = f"{store['out']}/never-written"
    with pytest.raises(JobConfigError, match="do not belong together"):
        build_dataset.run(_argv(dict(store, segmenter=tampered), output))
    fs, path = fsspec.core.url_to_fs(output)
    assert not fs.exists(path)


def test_credentials_are_never_logged_or_recorded(
    s3_server: S3Server,
    checkpoints: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    root = s3_server.make_bucket("secret-check")
    put_files(f"{root}/images", image_files(2, broken=1))
    output = f"{root}/out"
    # As a user might launch it: the key in the environment and Beam's own S3 flags on the command line.
    argv = ["--input", f"{root}/images", "--output", output, "--segmenter-checkpoint", checkpoints[0], *JOB_FLAGS,
            "--s3_access_key_id", "AKIDSCALETESTS000001", f"--s3_secret_access_key={S3_SECRET}"]
    monkeypatch.setattr(sys, "argv", ["python -m pipelines.build_dataset", *argv])
    caplog.set_level(logging.INFO)
    manifest = build_dataset.run(argv)

    assert manifest["accounting"]["ok"] and manifest["accounting"]["failed"] == 1
    with fsspec.open(f"{output}/manifest.json", "rt") as f:
        written = f.read()
    out, err = capfd.readouterr()
    for where, text in {"manifest": written, "logs": caplog.text, "stdout": out, "stderr": err}.items():
        assert S3_SECRET not in text, f"the secret key appears in the {where}"
    assert "--s3_secret_access_key=***" in written
    errors = read_table(output, "errors").to_pylist()
    assert errors and all(S3_SECRET not in json.dumps(e) for e in errors)


def test_one_job_per_output_in_a_bucket(store: dict[str, str]) -> None:
    """A job holding a bucket output (here, this process) makes a second one refuse; released, the output is free."""
    output = f"{store['out']}/held"
    held = take(output, takeover=False)
    with pytest.raises(JobConfigError, match="is in use by another job"):
        build_dataset.run(_argv(store, output) + ["--overwrite"])
    release(held)
    assert build_dataset.run(_argv(store, output))["accounting"]["ok"]
    fs, path = fsspec.core.url_to_fs(output)
    assert not fs.exists(f"{path}/{LOCK}")


def test_the_marker_is_created_by_one_conditional_write(store: dict[str, str]) -> None:
    """What makes taking an output atomic on S3: the store itself refuses a second exclusive create."""
    if store["scheme"] == "gs":
        pytest.skip("the GCS emulator ignores ifGenerationMatch=0, which gcsfs sends and real GCS enforces")
    fs, path = fsspec.core.url_to_fs(f"{store['out']}/exclusive/{LOCK}")
    with fs.open(path, "xb") as f:
        f.write(b"first")
    with pytest.raises(FileExistsError):
        with fs.open(path, "xb") as f:
            f.write(b"second")
    assert fs.cat_file(path) == b"first"
