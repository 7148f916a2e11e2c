"""Checkpoints are data: a folder holding ``weights.safetensors`` and ``config.json``.

The config travels with the weights and pins them by sha256, so a checkpoint whose
files were mixed up or truncated is refused before any work starts. The checkpoint's
identity (the hash written into every output row) is the sha256 of ``config.json``,
which in turn names the weights' hash.

Checkpoints load from any fsspec URL: a local path, ``gs://``, ``s3://``, ``memory://``.
Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or not the kind the caller needs."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its config, its tensors and its identity."""

    uri: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    sha256: str


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def save_checkpoint(uri: str, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """Write weights and config under ``uri``; return the checkpoint's sha256."""
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    full = dict(config, format_version=FORMAT_VERSION, weights_sha256=hashlib.sha256(weights).hexdigest())
    config_bytes = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    with fsspec.open(_join(uri, WEIGHTS_FILE), "wb") as f:
        f.write(weights)
    with fsspec.open(_join(uri, CONFIG_FILE), "wb") as f:
        f.write(config_bytes)
    return hashlib.sha256(config_bytes).hexdigest()


def _read(uri: str, what: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {what} not found at {uri}: pass a folder that holds "
            f"{WEIGHTS_FILE} and {CONFIG_FILE}"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {what} at {uri}: {exc}") from exc


def read_config(uri: str, kind: str) -> tuple[dict[str, Any], str]:
    """Read and check a checkpoint's config only; return it with the checkpoint sha256."""
    config_bytes = _read(_join(uri, CONFIG_FILE), "config")
    try:
        config = json.loads(config_bytes)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint config {_join(uri, CONFIG_FILE)} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("kind") != kind:
        found = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(
            f"checkpoint at {uri} is a {found!r} checkpoint, but a {kind!r} checkpoint is needed: "
            f"check which --{kind}-checkpoint you passed"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint at {uri} has format_version {config.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    return config, hashlib.sha256(config_bytes).hexdigest()


def load_checkpoint(uri: str, kind: str) -> Checkpoint:
    """Load a checkpoint of ``kind`` from ``uri``, verifying the weights against the config."""
    config, sha = read_config(uri, kind)
    weights = _read(_join(uri, WEIGHTS_FILE), "weights")
    actual = hashlib.sha256(weights).hexdigest()
    if actual != config.get("weights_sha256"):
        raise CheckpointError(
            f"checkpoint at {uri}: {WEIGHTS_FILE} has sha256 {actual[:12]}…, but {CONFIG_FILE} "
            f"expects {str(config.get('weights_sha256'))[:12]}…; the files do not belong together "
            "or the download is incomplete"
        )
    try:
        state_dict = load_safetensors(weights)
    except Exception as exc:
        raise CheckpointError(f"checkpoint weights at {uri} are not valid safetensors: {exc}") from exc
    return Checkpoint(uri=uri, config=config, state_dict=state_dict, sha256=sha)
