"""What every model CLI shares: how its parser looks and where torch runs."""
from __future__ import annotations

import argparse

import torch


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A ``python -m`` parser whose ``--help`` shows every default."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def add_torch_args(p: argparse.ArgumentParser, threads: int, device: bool = True) -> None:
    """``--threads`` (with its default) and, where the command can run on an accelerator, ``--device``."""
    p.add_argument("--threads", type=int, default=threads,
                   help="torch CPU threads (0 = torch default); 1 is fastest when other jobs share the cores (two "
                        "threads on a busy 2-core machine measured 5-10x slower), raise it on a dedicated machine")
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def set_threads(threads: int) -> None:
    """Apply ``--threads``; 0 leaves torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)
