"""What every experiment command shares: the `--out` argument and writing its figures as JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """An argument parser with the `--out PATH` every experiment takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help=f"where to write the results (default {default_out})")
    return p


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**payload, "machine": machine()}, indent=2))
    os.replace(tmp, path)
    return path
