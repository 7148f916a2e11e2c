"""No input can take a worker's memory: a folder of bombs is dead-lettered while the job's RSS stays flat.

The job runs as a user runs it, in its own process, over real files: a zip member that inflates
to 4 GiB, a tar member that declares a terabyte, a Parquet cell of 300 MB and a 2 GB loose file
(each a few MB or less on disk). Its peak RSS comes from the kernel (``os.wait4`` in a launcher).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from models.dataset import FACES_DIR, read_table
from tests.scale_fixtures import (  # noqa: F401  (pytest fixtures)
    JOB_FLAGS,
    ROOT,
    checkpoints,
    image_files,
    python,
    venv_env,
    write_folder,
)

MAX_RSS_BYTES = 2_000_000_000
JOB_TIMEOUT_S = 240
MIB = 1 << 20


def deflate_bomb(path: Path, member: str, size: int) -> None:
    """A zip whose one member inflates to ``size`` zero bytes, from about ``size / 1000`` on disk."""
    block = bytes(MIB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    # After a full flush deflate forgets its history: every further MiB of zeros compresses to the same bytes.
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    stream = first + repeated * (size // MIB - 1) + deflate.flush()
    crc = 0
    for _ in range(size // MIB):
        crc = zlib.crc32(block, crc)
    info = zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.file_size, info.compress_size, info.CRC = size, len(stream), crc
    # zipfile would deflate 4 GiB itself (a minute); the precompressed stream goes in as written,
    # and zipfile writes the directory (zip64) for it.
    with zipfile.ZipFile(path, "w") as archive:
        info.header_offset = archive.fp.tell()
        archive.fp.write(info.FileHeader(zip64=True))
        archive.fp.write(stream)
        archive.filelist.append(info)
        archive.NameToInfo[member] = info
        archive.start_dir = archive.fp.tell()


def terabyte_tar(path: Path, member: str) -> None:
    """A tar whose one member's header declares a terabyte, followed by 4 kB: the stream is cut off."""
    info = tarfile.TarInfo(member)
    info.size = 1 << 40
    path.write_bytes(info.tobuf(format=tarfile.PAX_FORMAT) + bytes(4096))


def parquet_cell(path: Path, image_id: str, size: int) -> None:
    """One row group of one image whose bytes are ``size`` zeros (zstd makes the file small)."""
    pq.write_table(pa.table({"id": [image_id], "png": pa.array([bytes(size)], pa.binary())}), path,
                   compression="zstd")


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


# At exec, Linux folds the high-water RSS of the memory a child started with into the child's
# peak, and subprocess starts children by vfork, borrowing this process's memory (with a 300 MB
# Parquet cell made in it). So a small launcher forks the job and reports the job's own peak.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(f"peak_rss_kib={usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: list[str], timeout: float) -> tuple[int, int, str]:
    """Run ``python -m argv``; return its exit status, its peak RSS in bytes and the end of its output."""
    job = subprocess.Popen([python(), "-c", LAUNCHER, "-m", *argv], cwd=ROOT, env=venv_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
    peak_kib = re.search(r"^peak_rss_kib=(\d+)$", output, re.MULTILINE)
    return job.returncode, int(peak_kib.group(1)) * 1024 if peak_kib else 0, output[-3000:]


def test_a_folder_of_bombs_is_dead_lettered_with_peak_rss_under_2_gb(
    checkpoints: tuple[str, str], tmp_path: Path
) -> None:
    inputs = write_folder(tmp_path / "in", image_files(2, broken=0))
    deflate_bomb(inputs / "bomb.zip", "00010.png", 4 << 30)
    terabyte_tar(inputs / "declares-a-terabyte.tar", "t/00011.png")
    parquet_cell(inputs / "cell.parquet", "00012", 300 * MIB)
    sparse_file(inputs / "00013.png", 2_000_000_000)
    on_disk = sum(f.stat().st_blocks * 512 for f in inputs.rglob("*") if f.is_file())
    assert on_disk < 20 * MIB, on_disk
    output = tmp_path / "out"

    status, peak_rss, log = run_measured(
        ["pipelines.build_dataset", "--input", str(inputs), "--output", str(output),
         "--segmenter-checkpoint", checkpoints[0], *JOB_FLAGS],
        JOB_TIMEOUT_S,
    )

    assert status == 0, log
    print(f"peak RSS of the job over the bombs: {peak_rss / 1e9:.2f} GB")
    assert peak_rss < MAX_RSS_BYTES, f"peak RSS {peak_rss / 1e9:.2f} GB"
    faces = {f["image_id"]: f for f in read_table(str(output), FACES_DIR).to_pylist()}
    assert {i: f["status"] for i, f in faces.items()} == {
        "00000": "kept", "00001": "kept", "00010": "failed", "00011": "failed", "00012": "failed", "00013": "failed",
    }
    declared = {"00010": 4 << 30, "00011": 1 << 40, "00013": 2_000_000_000}
    for image_id in ("00010", "00011", "00012", "00013"):
        face = faces[image_id]
        assert (face["stage"], face["error_type"]) == ("read", "BytesOverLimit"), face
        assert "over the limit of 64,000,000 (--max-image-bytes); none of it was read" in face["reason"], face
        if image_id in declared:
            assert f"declares {declared[image_id]:,} bytes" in face["reason"], face
