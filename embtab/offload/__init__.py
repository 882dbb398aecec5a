"""Offloaded tables: the whole table in a backing store, a fused cache of its rows, look-ahead prefetch.

fbgemm's CPU build has no UVM cache, no `TBE.prefetch` and no SSD/KV tables, so this tier is
embtab's own, built on the plain fused kernel:

- `embtab.methods.offloaded.Offloaded`: the method; its physical table is the cache (``cache_rows``).
- `RamStore` / `MmapStore`: the whole table and its optimizer state (host RAM or an mmap file).
- `attach(model, stores)`: binds the stores to the fused caches, returns an `Offload`.
- `Prefetcher(loader, offload)`: caches each batch's rows in a background thread before handing it over.
- `OffloadedTraining`: all of that wired for a training run (RAM stores, prefetched batches, checkpoints).
"""

from embtab.offload.attach import Offload, attach
from embtab.offload.cache import CacheStats, RowCache
from embtab.offload.policy import POLICIES
from embtab.offload.prefetch import Prefetcher
from embtab.offload.store import MmapStore, RamStore, RowStore
from embtab.offload.training import OffloadedTraining
from embtab.optimizers import state_width_of

__all__ = [
    "POLICIES",
    "CacheStats",
    "MmapStore",
    "Offload",
    "OffloadedTraining",
    "Prefetcher",
    "RamStore",
    "RowCache",
    "RowStore",
    "attach",
    "state_width_of",
]
