"""OpenMP must not spin on machines with few cores.

torch and fbgemm's CPU kernels each run OpenMP parallel regions; with the default (active) wait
policy their idle threads spin and starve each other, which made fbgemm's backward pass 30-100x
slower on a 2-core machine (0.6 ms -> 28-68 ms per table-batched backward, measured with
torch 2.13 and fbgemm-gpu-cpu 1.8). OpenMP reads the policy once, when the runtime starts, so it
is set here before torch is imported; processes that import torch first should export
OMP_WAIT_POLICY=PASSIVE themselves (the Makefile does).
"""

import os
import sys


def prefer_passive_openmp() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose one; True if it can still take effect."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules
