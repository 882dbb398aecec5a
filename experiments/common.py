"""What every experiment command shares: the `--out` argument and writing its figures as JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from embtab.files import atomic_write_text


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """An argument parser with the `--out PATH` every experiment takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help=f"where to write the results (default {default_out})")
    return p


def join_torchrun(device: str = "cpu") -> dist.ProcessGroup:
    """Join the process group `torchrun` describes in the environment: gloo on CPUs, NCCL on GPUs
    (each rank on the GPU of its LOCAL_RANK)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise SystemExit(
            f"--distributed runs under torchrun (e.g. torchrun --nproc_per_node 2 -m experiments.ctr "
            f"--distributed ...); the environment lacks {missing}"
        )
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.group.WORLD  # type: ignore[return-value]


def is_writer() -> bool:
    """True on the process that writes outputs: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus the machine it ran on) atomically to `path`."""
    return atomic_write_text(path, json.dumps({**payload, "machine": machine()}, indent=2))
