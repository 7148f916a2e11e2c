"""Shared pieces of the run-at-scale tests: loopback object stores, tiny checkpoints, small inputs.

The S3 (moto) and GCS (gcp-storage-emulator) servers run in this process on free loopback
ports, started and stopped by the fixtures. Nothing here talks to anything beyond 127.0.0.1.
Test modules import the fixtures they use from here (``tests/conftest.py`` is not ours).
"""
from __future__ import annotations

import io
import logging
import os
import socket
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
S3_KEY_ID = "AKIDSCALETESTS000001"
S3_SECRET = "scale-tests-secret-key-never-logged"
IMAGE_SIDE = 96
PATCH = 32

# gcsfs reads this once, when first imported, and otherwise probes for gRPC endpoints for about a
# minute before each emulator session. Set at collection time, before any test can import it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Flags every test job shares: small patches for small images, one torch thread so runs are
# bit-identical across processes (different thread counts may reorder float reductions).
JOB_FLAGS = ["--patch-size", str(PATCH), "--torch-threads", "1", "--batch-size", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- data ---------------------------------------------------------------------------------


def face_like(seed: int, side: int = IMAGE_SIDE) -> np.ndarray:
    """A deterministic, smooth RGB image (skin-ish tones) so PNG/JPEG decoding is realistic."""
    rng = np.random.default_rng(seed)
    small = rng.integers(90, 230, size=(6, 6, 3), dtype=np.uint8)
    return cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)


def png_bytes(pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def image_files(count: int, broken: int = 1) -> dict[str, bytes]:
    """``{relative path: bytes}``: ``count`` good PNGs in FFHQ layout plus ``broken`` bad ones."""
    files = {f"00000/{i:05d}.png": png_bytes(face_like(i)) for i in range(count)}
    for j in range(broken):
        files[f"00000/{count + j:05d}.png"] = b"this is not an image\n"
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A webdataset-style tar shard holding ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_files(url_root: str, files: dict[str, bytes]) -> None:
    """Upload ``files`` under an fsspec URL root."""
    import fsspec

    for name, data in files.items():
        with fsspec.open(f"{url_root.rstrip('/')}/{name}", "wb") as f:
            f.write(data)


# --- checkpoints --------------------------------------------------------------------------


def make_checkpoints(root: Path) -> tuple[str, str]:
    """Small real checkpoints (random init), written once per folder: (segmenter, classifier).

    The segmenter's output bias is set high so every pixel is skin: faces are kept and cut into
    patches whatever the untrained weights say, which gives the mechanics tests rows to compare.
    """
    import torch

    from models.classifier import Classifier, ClassifierConfig
    from models.classifier import build_network as build_classifier
    from models.segmenter import Segmenter, SegmenterConfig
    from models.segmenter import build_network as build_segmenter

    seg_uri, cls_uri = str(root / "segmenter"), str(root / "classifier")
    if not (root / "classifier" / "config.json").exists():
        torch.manual_seed(0)
        seg_cfg = SegmenterConfig(input_size=64)
        network = build_segmenter(seg_cfg)
        with torch.no_grad():
            for module in network.segmentation_head.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.weight.zero_()
                    module.bias.fill_(8.0)
        Segmenter(network, seg_cfg).save(seg_uri)
        cls_cfg = ClassifierConfig.untrained(input_size=64)
        Classifier(build_classifier(cls_cfg), cls_cfg).save(cls_uri)
    return seg_uri, cls_uri


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Local (segmenter, classifier) checkpoint folders."""
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def copy_checkpoint(local: str, url: str) -> None:
    """Upload a checkpoint folder to an object-store URL."""
    put_files(url, {name: (Path(local) / name).read_bytes() for name in ("config.json", "weights.safetensors")})


# --- servers ------------------------------------------------------------------------------


def _quiet_http_logs() -> None:
    # moto's werkzeug and the GCS emulator log every request; the tests report what matters.
    for name in ("werkzeug", "gcp_storage_emulator", "botocore", "aiobotocore", "s3fs", "gcsfs"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _forget_filesystems() -> None:
    """fsspec caches filesystem instances with their endpoint and credentials; start afresh."""
    import fsspec

    # Only classes already imported: importing gcsfs here would fix its mode too early.
    for protocol in ("s3", "gs"):
        if protocol in fsspec.registry:
            fsspec.registry[protocol].clear_instance_cache()


class S3Server:
    """moto in server mode on a loopback port, with the environment s3fs needs to reach it."""

    def __init__(self, port: int, server: Any):
        self.port = port
        self.server = server
        self.endpoint = f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        """What a process needs to use this server: standard AWS variables, nothing bespoke."""
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def make_bucket(self, name: str) -> str:
        import fsspec

        fsspec.filesystem("s3").mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_server(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1, and the environment pointing s3fs at it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    _quiet_http_logs()
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_for(lambda: port_open(port), 10, "moto to listen")
    s3 = S3Server(port, server)
    for key, value in s3.env().items():
        monkeypatch_module.setenv(key, value)
    _forget_filesystems()
    try:
        yield s3
    finally:
        server.stop()
        _forget_filesystems()


class GcsServer:
    """gcp-storage-emulator on a loopback port."""

    def __init__(self, port: int, server: Any):
        self.port = port
        self.server = server
        self.endpoint = f"http://127.0.0.1:{port}"

    def make_bucket(self, name: str) -> str:
        import fsspec

        fsspec.filesystem("gs").mkdir(name)
        return f"gs://{name}"


def _add_move_endpoint(monkeypatch: pytest.MonkeyPatch, server_module: Any) -> None:
    """Give the emulator GCS's ``objects.move`` endpoint, which gcsfs's ``mv`` calls first.

    The emulator answers it with 501, which gcsfs retries with backoff for about 30 s per
    file before falling back to copy + delete; real GCS implements it.
    """
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import Conflict, NotFound
    from gcp_storage_emulator.handlers import objects

    def move(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
        bucket, source, dest = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
        try:
            moved = objects._copy(request.base_url, storage, bucket, source, bucket, dest)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        except Conflict:
            response.status = HTTPStatus.CONFLICT
            return
        objects._delete(storage, bucket, source)
        response.json(moved)

    route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
             {"POST": move})
    monkeypatch.setattr(server_module, "HANDLERS", (route, *server_module.HANDLERS))


@pytest.fixture(scope="module")
def gcs_server(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[GcsServer]:
    """The GCS emulator on 127.0.0.1; gcsfs finds it through STORAGE_EMULATOR_HOST."""
    emulator = pytest.importorskip("gcp_storage_emulator.server", reason="gcp-storage-emulator is not installed")
    gcsfs = pytest.importorskip("gcsfs", reason="gcsfs is not installed")
    if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        pytest.skip("gcsfs was imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on; it stalls against the emulator")
    import fsspec

    _quiet_http_logs()
    _add_move_endpoint(monkeypatch_module, emulator)
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    wait_for(lambda: port_open(port), 10, "the GCS emulator to listen")
    monkeypatch_module.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    # Anonymous: the emulator needs no token, and looking for one would probe the metadata server.
    monkeypatch_module.setitem(fsspec.config.conf, "gs", {"token": "anon", "project": "scale-tests"})
    _forget_filesystems()
    try:
        yield GcsServer(port, server)
    finally:
        server.stop()
        _forget_filesystems()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    """A module-scoped ``monkeypatch`` (pytest's own is function-scoped)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# --- processes ----------------------------------------------------------------------------


def venv_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment for subprocesses: the project venv first on PATH, the checkout importable."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def python() -> str:
    """The interpreter Beam workers must share with the test (the venv's)."""
    candidate = VENV_BIN / "python"
    return str(candidate) if candidate.exists() else sys.executable


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a process we started, then kill it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def kill_midway(job_argv: list[str], ready: Callable[[], Any], timeout: float = 300) -> None:
    """Start ``python -m <job_argv>`` and SIGKILL it once ``ready()`` holds, as a preempted worker dies."""
    job = subprocess.Popen([python(), "-m", *job_argv], cwd=ROOT, env=venv_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ready() or job.poll() is not None, timeout, "the job to reach the point of the kill")
        assert job.poll() is None, f"the job ended before it could be killed: {job.stderr.read().decode()[-2000:]}"
        job.send_signal(signal.SIGKILL)
        job.wait(10)
    finally:
        stop(job)
        job.stderr.close()
