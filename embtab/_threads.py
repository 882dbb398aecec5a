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


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks instead of returning them to the OS after every step.

    A training step allocates and frees the same large activations each time; with glibc's default
    thresholds they are unmapped and page-faulted back in on every step (DIN on MovieLens ran 1.4x
    faster with these settings). Process-wide, so the experiment commands call it, not `import embtab`.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return False
    libc = ctypes.CDLL(name)
    mmap_threshold, trim_threshold, top_pad = -3, -1, -2
    return all(
        libc.mallopt(option, value) == 1
        for option, value in ((mmap_threshold, 32 * 2**20), (trim_threshold, 2**30), (top_pad, 256 * 2**20))
    )
