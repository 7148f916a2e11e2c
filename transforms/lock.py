"""One job per output: a marker a job creates atomically before it touches the output, and removes when it ends.

``_lock.json`` says who holds the output: the host, process and PID namespace, when, and a token.
It is only ever created where none exists (``storage.create_exclusive``: one atomic request on a
local disk, S3 and GCS), so of two jobs started on one output the second finds it and refuses,
before it deletes or writes anything.

A job that is killed leaves its marker. Where the marker was written on this machine, in this
PID namespace, by a job whose workers ran in its own process tree (a local runner), a process
that is gone proves it stale: ``--resume`` or ``--overwrite`` take it over, and without them the
refusal says so. Nothing else can be proven stale (another machine; a Dataflow job outlives its
launcher), so nothing takes it over: the refusal names its holder and says how to clear it by
hand. The job's last step (``Finish``) removes the marker after the manifest; a launcher removes
it when its job failed and has certainly ended (``pipelines.common.OutputHold``).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from models.dataset import join
from transforms.sink import LOCK, OutputError
from transforms.storage import bucket_refusal, create_exclusive, makedirs, open_file, remove

log = logging.getLogger("acne")


@dataclass(frozen=True)
class OutputLock:
    """This job's hold on an output: the marker's location and the token that makes it this job's."""

    root: str
    token: str

    @property
    def uri(self) -> str:
        return join(self.root, LOCK)


def _pid_namespace() -> Optional[str]:
    """Which PID namespace this process lives in (containers on one host each have their own)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _read(uri: str) -> Optional[dict[str, Any]]:
    """The marker's holder; None where it is gone or unreadable (a writer killed mid-write)."""
    try:
        with open_file(uri, "rt") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _holder_state(holder: Optional[dict[str, Any]]) -> str:
    """``running``, ``gone`` (provably stale) or ``unknown`` (elsewhere, a remote runner, an unreadable marker)."""
    if (holder is None or holder.get("runner") is not None or holder.get("host") != socket.gethostname()
            or holder.get("pid_namespace") != _pid_namespace()):
        return "unknown"
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # another user's live process
    return "running"


def _refusal(root: str, uri: str, holder: Optional[dict[str, Any]], state: str) -> str:
    who = "a job whose marker cannot be read"
    if holder:
        who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}"
        if holder.get("runner"):
            who += f", its workers on {holder['runner']}"
    if state == "running":
        return (f"output {root} is in use by another job ({who}), which is still running. Wait for it to finish or "
                "choose another --output; --overwrite does not take an output from a running job.")
    if state == "gone":
        return (f"output {root} is not empty and was left by a job that is no longer running ({who}): pass --resume "
                f"to finish its work, --overwrite to replace it, or delete {uri}.")
    return (f"output {root} is in use by another job, or was left by one that was killed ({who}); this machine "
            f"cannot tell which. If no job is writing it, delete {uri} and rerun (with --resume to keep its work).")


def take(root: str, takeover: bool, remote_runner: Optional[str] = None) -> OutputLock:
    """Hold ``root`` for this job, or raise ``OutputError`` saying who holds it.

    ``takeover`` (``--resume`` or ``--overwrite``) takes a marker whose job is provably gone.
    ``remote_runner`` names the runner when the job's workers run elsewhere: this process's
    death will then say nothing about the job's.
    """
    try:
        return _take(root, takeover, remote_runner)
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"cannot take output {root} for this job: {type(exc).__name__}: {exc}") from exc


def _take(root: str, takeover: bool, remote_runner: Optional[str]) -> OutputLock:
    refusal = bucket_refusal(root, "output")
    if refusal:
        raise OutputError(refusal)  # before makedirs, which would create a missing S3 bucket
    makedirs(root)
    lock = OutputLock(root, uuid.uuid4().hex)
    body = json.dumps({
        "token": lock.token, "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
        "runner": remote_runner, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }).encode()
    try:
        create_exclusive(lock.uri, body)
        return lock
    except FileExistsError:
        holder = _read(lock.uri)
    state = _holder_state(holder)
    if state != "gone" or not takeover:
        raise OutputError(_refusal(root, lock.uri, holder, state))
    log.warning("taking over %s from a job that is no longer running (pid %s, started %s)",
                root, holder.get("pid"), holder.get("started_at"))
    remove(lock.uri)
    try:
        create_exclusive(lock.uri, body)
    except FileExistsError:
        raise OutputError(f"output {root} was taken by another job while this one took it over") from None
    return lock


def release(lock: Optional[OutputLock]) -> None:
    """Remove the marker if it is still this job's (someone may have cleared it and started another job)."""
    if lock is not None and (_read(lock.uri) or {}).get("token") == lock.token:
        remove(lock.uri)
