"""Offloaded tables: training throughput through a small cache, as a ratio to the in-memory table.

For each trace x cache size x eviction policy, the same model is trained twice on the same batches,
in alternating rounds (in-memory first, then offloaded, then the reverse order), so machine
contention cancels out of the ratio:

- in memory: every table a full fused table (`embtab.fuse`, fused row-wise Adagrad);
- offloaded: the trace's big tables are `Offloaded(cache_rows)`, sharing one cache of ``--caches``
  times their rows, over `RamStore`s (or, with ``--store mmap``, `MmapStore` files), fed by
  `embtab.offload.Prefetcher`.

The model is the pooled embeddings -> MLP [256, 64, 1] -> BCE (dense part on SGD). Traces:

- ``zipf<a>``: ``--tables`` tables of ``--rows`` rows, bags of ``--bag`` ids drawn Zipf(a) and
  randomly permuted so the hot rows are scattered (as FBGEMM's TBE benchmark generator does);
- ``criteo``: `data.synthetic.make_synthetic` (Criteo-like: one Zipf(1.1) id per field, hot ids
  scattered by a seeded bijection); ``--tables`` fields of ``--rows`` ids;
- ``movielens``: the real MovieLens-100K training split (offline copy) in loader order, batch
  ``--movielens-batch``; the user and item tables are offloaded (the item table also serves the
  history). Its tables are tiny (944 and 1683 rows), so small caches cannot hold one batch: those
  cells report the error instead of figures.

Per cell (after ``--warmup`` steps that fill the cache): samples/s of both and their ratio (median
over rounds), cache hit rate, bytes moved per step (rows loaded + rows written back, with their
optimizer state), time a step waited on the prefetcher and steps that waited over 1 ms ("stalls"),
peak RSS (VmHWM, reset before the cell; the process holds both models) and its rise over the RSS
before the cell (models dropped by earlier cells are not all returned to the OS), the largest
anonymous and file-backed (mapped store pages) RSS seen after a timed round, and major page faults.

    python -m experiments.bench_offload --out results/bench_offload.json
    python -m experiments.bench_offload --quick --out /tmp/offload.json          # seconds

``--only-offloaded`` skips the in-memory model (tables larger than RAM: ``--store mmap``).
"""

from __future__ import annotations

import gc
import re
import resource
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

import embtab
from data.synthetic import make_synthetic, permute, zipf_ranks
from embtab.config import EmbeddingSpec, FeatureSpec, SparseOptimizer
from embtab.methods.offloaded import Offloaded
from embtab.offload import MmapStore, Prefetcher, RamStore, attach, state_width_of
from embtab.testing import rss_bytes
from experiments.common import parser, write_json
from experiments.timing import time_steps

GOAL = {"trace": "zipf1.05", "cache": 0.1, "ratio_to_in_memory": 0.7}
STALL_SECONDS = 1e-3
OPTIMIZER = SparseOptimizer("rowwise_adagrad", lr=0.05)


@dataclass(frozen=True)
class Trace:
    """Batches of ids, the features they carry and the tables to offload."""

    name: str
    features: tuple[FeatureSpec, ...]
    offloaded: tuple[str, ...]
    batches: list[KeyedJaggedTensor]


def zipf_trace(a: float, tables: int, rows: int, bag: int, batch: int, count: int, seed: int) -> Trace:
    """Bags of `bag` Zipf(`a`) ids per table and sample; ranks scattered by a seeded bijection."""
    rng = np.random.default_rng(seed)
    keys = [f"t{i}" for i in range(tables)]
    batches = []
    for _ in range(count):
        ids = [permute(zipf_ranks(rng.random(batch * bag), rows, a), rows, seed + t) for t in range(tables)]
        batches.append(
            KeyedJaggedTensor.from_lengths_sync(
                keys=keys,
                values=torch.from_numpy(np.concatenate(ids)),
                lengths=torch.full((tables * batch,), bag, dtype=torch.int64),
            )
        )
    return Trace(f"zipf{a:g}", tuple(FeatureSpec(k, rows) for k in keys), tuple(keys), batches)


def criteo_trace(tables: int, rows: int, batch: int, count: int, seed: int) -> Trace:
    """`data.synthetic`'s Criteo-like ids (train split), one id per field and sample."""
    splits = make_synthetic(int(count * batch / 0.8) + 1, num_fields=tables, cardinalities=rows, dense_dim=0, seed=seed)
    batches = [splits.train.batch(torch.arange(i * batch, (i + 1) * batch)).sparse for i in range(count)]
    features = splits.feature_specs()
    return Trace("criteo", features, tuple(f.name for f in features), batches)


def movielens_trace(batch: int, count: int, seed: int) -> Trace:
    """The real MovieLens-100K training split in loader order (epochs repeat as needed);
    sequence features are sum-pooled so the model sees one vector per feature."""
    from data import load_dataset
    from data.loader import make_dataloader

    splits = load_dataset("movielens")
    loader = make_dataloader(splits.train, batch, shuffle=True, seed=seed, drop_last=True)
    batches: list[KeyedJaggedTensor] = []
    epoch = 0
    while len(batches) < count:
        loader.batch_sampler.set_epoch(epoch)
        batches.extend(b.sparse for b in loader)
        epoch += 1
    features = tuple(replace(f, pooling="sum") for f in splits.feature_specs())
    return Trace("movielens", features, ("user_id", "item_id"), batches[:count])


class Net(nn.Module):
    """Pooled embeddings -> MLP -> one logit per sample."""

    def __init__(self, spec: EmbeddingSpec, width: int) -> None:
        super().__init__()
        self.embeddings = embtab.EmbeddingTables(spec)
        self.mlp = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(self.embeddings(kjt).pooled.values()).squeeze(1)


class Trainer:
    """One fused model and its dense optimizer; `step` trains one batch."""

    def __init__(self, trace: Trace, dim: int, methods: tuple = ()) -> None:
        torch.manual_seed(0)
        spec = EmbeddingSpec(features=trace.features, dim=dim, table_methods=methods)
        self.dmp = embtab.fuse(Net(spec, dim * len(trace.features)), OPTIMIZER)
        self.dense = torch.optim.SGD(embtab.dense_parameters(self.dmp), lr=0.01)
        self.loss = nn.BCEWithLogitsLoss()

    def step(self, kjt: KeyedJaggedTensor) -> None:
        logits = self.dmp(kjt)
        labels = (torch.arange(logits.numel()) % 2).to(logits.dtype)
        self.loss(logits, labels).backward()
        self.dense.step()
        self.dense.zero_grad(set_to_none=True)


def _peak_rss_bytes() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _rss_split() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes now: the cache and bookkeeping vs mapped store pages."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("RssAnon", "RssFile"))


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def make_stores(trace: Trace, rows_of: dict[str, int], dim: int, kind: str, folder: Path) -> dict:
    width = state_width_of(OPTIMIZER.kind, dim)
    if kind == "ram":
        return {t: RamStore.create(rows_of[t], dim, width, seed=i) for i, t in enumerate(trace.offloaded)}
    return {
        t: MmapStore.create(folder / f"{t}.store", rows_of[t], dim, width, seed=i, overwrite=True)  # scratch
        for i, t in enumerate(trace.offloaded)
    }


def run_cell(
    trace: Trace, reference: Trainer | None, fraction: float, policy: str, args: Any, folder: Path
) -> dict[str, Any]:
    """Train the offloaded model (and the in-memory one, alternating) on the trace's batches."""
    rows_of = {f.table_name: f.cardinality for f in trace.features}
    offloaded_rows = sum(rows_of[t] for t in trace.offloaded)
    caches = {"offloaded_rows": offloaded_rows, "cache_rows": max(1, int(fraction * offloaded_rows))}
    method = Offloaded(cache_rows=caches["cache_rows"], policy=policy)
    methods = tuple((t, method) for t in trace.offloaded)
    gc.collect()  # the previous cell's model and stores sit in reference cycles until collected
    _reset_peak_rss()
    rss_start = rss_bytes()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    trainer = Trainer(trace, args.dim, methods)
    stores = make_stores(trace, rows_of, args.dim, args.store, folder)
    offload = attach(trainer.dmp, stores)
    warm, steps = args.warmup, args.steps
    off_times, ref_times, waits, split = [], [], [], [0, 0]
    try:
        with Prefetcher(trace.batches, offload, window=args.window, ahead=args.ahead, nice=args.nice,
                        background=args.prefetch == "thread") as batches:
            for _ in range(warm):
                trainer.step(next(batches))
            before = {t: replace(s) for t, s in offload.stats().items()}
            for r in range(args.rounds):
                chunk = trace.batches[warm + r * steps : warm + (r + 1) * steps]
                order = ("ref", "off") if r % 2 == 0 else ("off", "ref")
                for who in order:
                    if who == "ref" and reference is not None:
                        ref_times.append(time_steps(reference.step, chunk, collect_garbage=False))
                    elif who == "off":
                        first = len(batches.waits)
                        off_times.append(time_steps(lambda _: trainer.step(next(batches)), chunk, collect_garbage=False))
                        waits.extend(batches.waits[first:])
                        split = [max(pair) for pair in zip(split, _rss_split())]
    except ValueError as error:
        return {"caches": caches, "error": str(error)}
    finally:
        for store in stores.values():
            store.close()
    after = offload.stats()
    lookups = sum(after[t].lookups - before[t].lookups for t in after)
    hits = sum(after[t].hits - before[t].hits for t in after)
    moved = sum(after[t].bytes_moved - before[t].bytes_moved for t in after)
    batch = trace.batches[0].stride()
    cell = {
        "caches": caches,
        "store_bytes": sum(s.rows * s.row_bytes for s in stores.values()),
        "samples_per_s": batch * steps / statistics.median(off_times),
        "hit_rate": hits / max(lookups, 1),
        "bytes_moved_per_step": moved / (steps * args.rounds),
        "wait_ms_per_step": 1000 * sum(waits) / len(waits),
        "stalls": sum(w > STALL_SECONDS for w in waits),
        "timed_steps": len(waits),
        "peak_rss_bytes": _peak_rss_bytes(),
        "cell_peak_rss_bytes": _peak_rss_bytes() - rss_start,
        "rss_anon_bytes": split[0],
        "rss_file_bytes": split[1],
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
    }
    if reference is not None:
        cell["in_memory_samples_per_s"] = batch * steps / statistics.median(ref_times)
        cell["ratio_to_in_memory"] = statistics.median(r / o for r, o in zip(ref_times, off_times))
    return cell


def traces(args: Any) -> list[Trace]:
    count = args.warmup + args.rounds * args.steps
    out = []
    for name in args.traces.split(","):
        if name == "zipf":
            out += [zipf_trace(a, args.tables, args.rows, args.bag, args.batch, count, args.seed) for a in args.zipf]
        elif name == "criteo":
            out.append(criteo_trace(args.tables, args.rows, args.batch, count, args.seed))
        elif name == "movielens":
            out.append(movielens_trace(args.movielens_batch, count, args.seed))
        else:
            raise ValueError(f"unknown trace {name!r}; expected zipf, criteo or movielens")
    return out


def best_policies(cells: dict[str, dict[str, dict[str, Any]]], figure: str) -> dict[str, str]:
    """Per trace and cache size, the policy with the highest `figure` (cells that ran)."""
    best = {}
    for key, per_policy in cells.items():
        ok = {p: c[figure] for p, c in per_policy.items() if figure in c}
        if ok:
            best[key] = max(ok, key=ok.__getitem__)
    return best


def build_parser():
    p = parser(__doc__.splitlines()[0], "results/bench_offload.json")
    p.add_argument("--traces", default="zipf,criteo,movielens", help="comma-separated: zipf, criteo, movielens")
    p.add_argument("--zipf", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 1.05, 1.15])
    p.add_argument("--caches", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.1, 0.5])
    p.add_argument("--policies", default="lru,lfu,lookahead")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--bag", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--movielens-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--ahead", type=int, default=2)
    p.add_argument("--nice", type=int, default=0, help="niceness of the prefetch thread")
    p.add_argument("--prefetch", choices=("thread", "inline"), default="thread",
                   help="admit in a background thread, or on the training thread when a batch is requested")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the training step (both models)")
    p.add_argument("--store", choices=("ram", "mmap"), default="ram")
    p.add_argument("--store-dir", default=None, help="folder of the mmap store files (default: a temporary one)")
    p.add_argument("--only-offloaded", action="store_true", help="no in-memory model (tables larger than RAM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: runs in seconds (tests)")
    return p


QUICK = {"traces": "zipf,criteo", "zipf": [1.05], "caches": [0.1, 0.5], "policies": "lru,lookahead", "tables": 2,
         "rows": 20_000, "dim": 16, "bag": 4, "batch": 128, "steps": 3, "rounds": 2, "warmup": 3}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = build_parser()
    if p.parse_args(argv).quick:  # tiny defaults; options given explicitly still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(dir=args.store_dir) as folder:
        for trace in traces(args):
            reference = None if args.only_offloaded else Trainer(trace, args.dim)
            if reference is not None:
                for kjt in trace.batches[: args.warmup]:
                    reference.step(kjt)
            for fraction in args.caches:
                key = f"{trace.name}/cache{fraction:g}"
                results[key] = {}
                for policy in args.policies.split(","):
                    cell = run_cell(trace, reference, fraction, policy, args, Path(folder))
                    results[key][policy] = cell
                    print(key, policy, _summary(cell), flush=True)
    goal_key = f"{GOAL['trace']}/cache{GOAL['cache']:g}"
    goal_cells = [c for c in results.get(goal_key, {}).values() if "ratio_to_in_memory" in c]
    payload = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "optimizer": OPTIMIZER.kind,
        "cells": results,
        "best_policy": {
            "by_ratio_to_in_memory": best_policies(results, "ratio_to_in_memory"),
            "by_hit_rate": best_policies(results, "hit_rate"),
        },
        "goal": {**GOAL, "best_ratio": max((c["ratio_to_in_memory"] for c in goal_cells), default=None)},
    }
    write_json(args.out, payload)
    print(f"best policy per cell: {payload['best_policy']}\ngoal: {payload['goal']}\nwrote {args.out}")
    return payload


def _summary(cell: dict[str, Any]) -> str:
    if "error" in cell:
        return f"error: {cell['error']}"
    ratio = f"{cell['ratio_to_in_memory']:.2f}x" if "ratio_to_in_memory" in cell else "-"
    return (
        f"{cell['samples_per_s']:.0f} samples/s ratio {ratio} hit {cell['hit_rate']:.3f} "
        f"{cell['bytes_moved_per_step'] / 2**20:.2f} MiB/step wait {cell['wait_ms_per_step']:.2f} ms/step "
        f"stalls {cell['stalls']}/{cell['timed_steps']} rss {cell['peak_rss_bytes'] / 2**30:.2f} GiB "
        f"(anon {cell['rss_anon_bytes'] / 2**30:.2f}, file {cell['rss_file_bytes'] / 2**30:.2f}) "
        f"majflt {cell['major_faults']}"
    )


if __name__ == "__main__":
    main()
