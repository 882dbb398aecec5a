"""Inputs for tests and examples: random `KeyedJaggedTensor`s that respect a feature spec."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torchrec import KeyedJaggedTensor

from embtab.config import EmbeddingSpec, FeatureSpec

if TYPE_CHECKING:
    from embtab.collection import EmbeddingTables


def random_kjt(
    features: Sequence[FeatureSpec],
    batch: int,
    seed: int,
    max_len: int = 3,
    hot_ids: Sequence[int] = (),
    hot_tables: Sequence[str] = (),
) -> KeyedJaggedTensor:
    """Bags of 0..`max_len` random valid ids per feature and sample (at least one id where the
    feature rejects empty bags); every third id of a table in `hot_tables` is one of `hot_ids`."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for feature in features:
        low = 1 if feature.rejects_empty else 0
        feature_lengths = torch.randint(low, max_len + 1, (batch,), generator=g)
        ids = torch.randint(0, feature.cardinality, (int(feature_lengths.sum()),), generator=g)
        if feature.table_name in hot_tables:
            picks = torch.randint(0, len(hot_ids), (len(ids[::3]),), generator=g)
            ids[::3] = torch.tensor(hot_ids, dtype=ids.dtype)[picks]
        lengths.append(feature_lengths)
        values.append(ids)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features], values=torch.cat(values), lengths=torch.cat(lengths)
    )


def reference_pooled(
    features: Sequence[FeatureSpec],
    kjt: KeyedJaggedTensor,
    vectors_of: Callable[[str, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The pooled features of `kjt` computed bag by bag, an independent reference for tests:
    `vectors_of(table_name, ids)` gives the ``[n, dim]`` vectors of `ids`; sums, or means."""
    per_key, pooled = kjt.to_dict(), []
    for feature in (f for f in features if not f.is_sequence):
        bags = per_key[feature.name].to_dense()
        sums = torch.stack([vectors_of(feature.table_name, ids).sum(0) for ids in bags])
        if feature.pooling == "mean":
            sums = sums / torch.tensor([len(ids) for ids in bags]).unsqueeze(1)
        pooled.append(sums)
    return torch.cat(pooled, 1)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux); torch's allocations are invisible to tracemalloc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_ranks(fn: Callable[..., None], world_size: int, *args: object) -> None:
    """Run ``fn(rank, world_size, *args)`` in `world_size` spawned processes joined in one gloo
    process group (the default group); re-raises the first rank's exception here. A rank that
    returns exits at once, without the interpreter's teardown (nor atexit handlers)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _rank_main,
            args=(world_size, f"{folder}/store", fn, args),
            nprocs=world_size,
            start_method="spawn",
        )


def _rank_main(rank: int, world_size: int, store_path: str, fn: Callable[..., None], args: tuple) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # The rank's work is done and written: skip the interpreter's teardown, in which gloo's worker
    # threads, destroyed with tensors they still hold, now and then abort the process (SIGABRT,
    # "terminate called without an active exception") after a run that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def slice_batch(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Samples ``start:stop`` of every feature of `kjt` (a rank's part of a global batch), with
    their weights if `kjt` has them."""
    batch = kjt.stride()
    lengths = kjt.lengths().view(len(kjt.keys()), batch)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.flatten().cumsum(0)])
    spans = [(offsets[k * batch + start], offsets[k * batch + stop]) for k in range(len(kjt.keys()))]
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(),
        values=torch.cat([kjt.values()[a:b] for a, b in spans]),
        lengths=lengths[:, start:stop].flatten(),
        weights=None if weights is None else torch.cat([weights[a:b] for a, b in spans]),
    )


def assert_groups_match_per_table(
    spec: EmbeddingSpec, grouped: set[str], max_len: int, steps: int = 2
) -> None:
    """Train `spec`'s tables twice from one initialization, like tables combined in groups and
    one by one: the grouped tables must be `grouped`, and the pooled outputs and the weights after
    fused SGD steps must agree to 1e-6."""
    import embtab
    from embtab.shard import physical_weights

    models = []
    for combine_groups in (True, False):
        torch.manual_seed(0)
        tables = embtab.EmbeddingTables(spec)
        if not combine_groups:
            tables.layout = tables.layout.ungrouped()
        models.append(embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.5)))
    assert set(models[0].module.layout.group_of) == grouped
    for step in range(steps):
        kjt = random_kjt(spec.features, batch=5, seed=step, max_len=max_len)
        outputs = [m(kjt).pooled for m in models]
        torch.testing.assert_close(outputs[0].values(), outputs[1].values(), rtol=0, atol=1e-6)
        assert outputs[0].keys() == outputs[1].keys() == [f.name for f in spec.features]
        for out in outputs:
            out.values().square().sum().backward()
    for name, weight in physical_weights(models[1]).items():
        torch.testing.assert_close(physical_weights(models[0])[name], weight, rtol=0, atol=1e-6)


def assert_fused_step_matches_reference(
    tables: EmbeddingTables,
    kjt: KeyedJaggedTensor,
    vectors_of: Callable[[dict[str, torch.Tensor], str, torch.Tensor], torch.Tensor],
    lr: float = 0.5,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Check `tables` against an independent reference of its method's formula, forward and one
    fused SGD step: ``vectors_of(weights, table, ids)`` gives the ``[n, dim]`` vectors of `ids`
    from leaf copies of the physical weights (by physical table name). The loss weighs every
    output element by a fixed random coefficient, so each id's gradient differs. Returns the fused
    model and the reference leaves (their ``.grad`` set) for further checks."""
    import embtab
    from embtab.shard import physical_weights

    features = tables.spec.features
    weights = {name: w.requires_grad_() for name, w in physical_weights(tables).items()}
    per_key = kjt.to_dict()
    expected = reference_pooled(features, kjt, lambda table, ids: vectors_of(weights, table, ids))
    sequences = {
        f.name: vectors_of(weights, f.table_name, per_key[f.name].values()) for f in features if f.is_sequence
    }
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=lr))
    out = dmp(kjt)
    torch.testing.assert_close(out.pooled.values(), expected, atol=1e-6, rtol=1e-5)
    for name, rows in sequences.items():
        torch.testing.assert_close(out.sequence[name].values(), rows, atol=1e-6, rtol=1e-5)

    def loss(pooled: torch.Tensor, sequence: dict[str, torch.Tensor]) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        total = (pooled * torch.randn(pooled.shape, generator=g)).sum()
        for name in sorted(sequence):
            total = total + (sequence[name] * torch.randn(sequence[name].shape, generator=g)).sum()
        return total

    loss(out.pooled.values(), {n: out.sequence[n].values() for n in sequences}).backward()
    loss(expected, sequences).backward()
    after = physical_weights(dmp)
    for name, weight in weights.items():
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        torch.testing.assert_close(after[name], weight.detach() - lr * grad, atol=1e-6, rtol=1e-5, msg=name)
    return dmp, weights
