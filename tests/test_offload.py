"""Offloaded tables: training through a small cache gives what the in-memory table gives."""

from __future__ import annotations

import pytest
import torch

import embtab
from embtab.config import EmbeddingSpec, FeatureSpec, SparseOptimizer
from embtab.methods.full import FullTable
from embtab.methods.offloaded import Offloaded
from embtab.offload import MmapStore, Prefetcher, RamStore, attach, state_width_of
from embtab.offload.policy import make_policy
from embtab.checkpoint import load_training_state, training_state
from embtab.shard import physical_weights
from embtab.testing import random_kjt

ROWS, DIM, CACHE, STEPS = 2000, 8, 300, 16
FEATURES = (
    FeatureSpec("item", ROWS),
    FeatureSpec("hist", ROWS, pooling="none", table="item"),
    FeatureSpec("user", 500),
)


def zipf_batches(count: int, seed: int = 0, batch: int = 24) -> list:
    """Bags of skewed ids (rows reused across batches, so hits, misses and evictions all occur)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(count):
        kjt = random_kjt(FEATURES, batch=batch, seed=seed * 1000 + step)
        skewed = (torch.rand(kjt.values().numel(), generator=g) ** 3 * ROWS).long()
        is_item = torch.cat([torch.full((n,), k != "user") for k, n in zip(kjt.keys(), kjt.length_per_key())])
        values = torch.where(is_item, skewed, kjt.values())
        out.append(type(kjt).from_lengths_sync(keys=kjt.keys(), values=values, lengths=kjt.lengths()))
    return out


def fused(method, optimizer: SparseOptimizer):
    torch.manual_seed(0)
    spec = EmbeddingSpec(features=FEATURES, dim=DIM, table_methods=(("item", method),))
    return embtab.fuse(embtab.EmbeddingTables(spec), optimizer)


def step(dmp, kjt) -> None:
    out = dmp(kjt)
    (out.pooled.values().square().sum() + out.sequence["hist"].values().square().sum()).backward()


def item_state(dmp, rows: int = ROWS, table: str = "item") -> torch.Tensor:
    state = dmp.fused_optimizer.state_dict()["state"]
    tensors = [v.local_shards()[0].tensor for k, s in state.items() if k.endswith(f".{table}.weight") for v in s.values()]
    return tensors[0].reshape(rows, -1).clone() if tensors else torch.zeros(rows, 0)


def reference(optimizer: SparseOptimizer, batches: list):
    dmp = fused(FullTable(), optimizer)
    initial = physical_weights(dmp)
    for kjt in batches:
        step(dmp, kjt)
    return initial, dmp


def offloaded_model(optimizer: SparseOptimizer, initial: dict, store, policy: str = "lookahead"):
    dmp = fused(Offloaded(cache_rows=CACHE, policy=policy), optimizer)
    user = [v for k, v in dmp.state_dict().items() if k.endswith(".user.weight")][0]
    user.local_shards()[0].tensor.copy_(initial["user"])
    return dmp, attach(dmp, {"item": store})


def ram_store(initial: dict, optimizer: SparseOptimizer) -> RamStore:
    return RamStore(initial["item"].clone(), torch.zeros(ROWS, state_width_of(optimizer.kind, DIM)))


@pytest.mark.parametrize(
    "kind, policy, storage, background",
    [("sgd", "lru", "ram", True), ("rowwise_adagrad", "lookahead", "ram", True),
     ("rowwise_adagrad", "lfu", "mmap", True), ("adagrad", "lookahead", "ram", True),
     ("rowwise_adagrad", "lookahead", "ram", False)],
)
def test_training_through_a_small_cache_matches_the_in_memory_table(kind, policy, storage, background, tmp_path, one_thread):
    optimizer = SparseOptimizer(kind, lr=0.1)
    batches = zipf_batches(STEPS)
    initial, expected = reference(optimizer, batches)
    store = ram_store(initial, optimizer)
    if storage == "mmap":
        store = MmapStore.create(tmp_path / "item.store", ROWS, DIM, store.state_width)
        store.weights.copy_(initial["item"])
    dmp, offload = offloaded_model(optimizer, initial, store, policy)
    with Prefetcher(batches, offload, window=4, ahead=2, background=background) as prefetched:
        for kjt in prefetched:
            step(dmp, kjt)
    stats = offload.stats()["offload_cache"]
    assert stats.batches == STEPS and 0 < stats.hit_rate < 1 and stats.written_rows > 0  # evictions happened
    torch.testing.assert_close(store.weights, physical_weights(expected)["item"], rtol=0, atol=1e-6)
    torch.testing.assert_close(store.state, item_state(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(physical_weights(dmp)["user"], physical_weights(expected)["user"], rtol=0, atol=1e-6)
    if storage == "mmap":
        store.close()
        reopened = MmapStore.open(tmp_path / "item.store", ROWS, DIM, 1)
        torch.testing.assert_close(reopened.weights, physical_weights(expected)["item"], rtol=0, atol=1e-6)
        reopened.close()


class Crash(Exception):
    pass


def test_a_crash_after_a_checkpoint_resumes_without_losing_anything(one_thread):
    optimizer = SparseOptimizer("rowwise_adagrad", lr=0.1)
    batches = zipf_batches(STEPS, seed=1)
    initial, expected = reference(optimizer, batches)
    store = ram_store(initial, optimizer)
    dmp, offload = offloaded_model(optimizer, initial, store)
    checkpoint = None
    with pytest.raises(Crash):
        with Prefetcher(batches, offload, window=4) as prefetched:
            for done, kjt in enumerate(prefetched):
                if done == 11:
                    raise Crash  # after 11 steps; the last checkpoint holds 10
                step(dmp, kjt)
                if (done + 1) % 5 == 0:
                    prefetched.flush()
                    checkpoint = {"model": training_state(dmp), "store": store.state_dict(), "steps": done + 1}
    assert checkpoint is not None and checkpoint["steps"] == 10
    store = ram_store(initial, optimizer)
    store.load_state_dict(checkpoint["store"])
    dmp, offload = offloaded_model(optimizer, initial, store)
    load_training_state(dmp, checkpoint["model"])
    with Prefetcher(batches[checkpoint["steps"] :], offload, window=4) as prefetched:
        for kjt in prefetched:
            step(dmp, kjt)
    torch.testing.assert_close(store.weights, physical_weights(expected)["item"], rtol=0, atol=1e-6)
    torch.testing.assert_close(store.state, item_state(expected), rtol=0, atol=1e-6)


def test_a_cache_smaller_than_one_batch_is_an_error_naming_table_value_and_need():
    optimizer = SparseOptimizer("sgd", lr=0.1)
    torch.manual_seed(0)
    spec = EmbeddingSpec(features=FEATURES, dim=DIM, table_methods=(("item", Offloaded(cache_rows=10)),))
    dmp = embtab.fuse(embtab.EmbeddingTables(spec), optimizer)
    offload = attach(dmp, {"item": RamStore.create(ROWS, DIM, 0)})
    kjt = zipf_batches(1)[0]
    distinct = int(torch.unique(torch.cat([kjt["item"].values(), kjt["hist"].values()])).numel())
    message = (
        rf"offload cache 'offload_cache' \(tables \['item'\], features \['item', 'hist'\]\): batch 0 needs "
        rf"{distinct} distinct rows but cache_rows is 10; expected cache_rows >= the distinct rows of one batch"
    )
    with pytest.raises(ValueError, match=message):
        list(Prefetcher([kjt], offload))


def test_a_store_that_does_not_match_the_table_is_an_error(tmp_path):
    path = tmp_path / "item.store"
    MmapStore.create(path, 100, DIM, 1).close()
    with pytest.raises(ValueError, match=r"holds 100 x 8 float32 rows with 1 optimizer float\(s\) per row .*expected 200 x 8"):
        MmapStore.open(path, 200, DIM, 1)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"is 7692 bytes; expected 7696"):
        MmapStore.open(path, 100, DIM, 1)
    (tmp_path / "other").write_bytes(b"not a store")
    with pytest.raises(ValueError, match="is not an embtab row store"):
        MmapStore.open(tmp_path / "other", 100, DIM, 1)
    dmp = fused(Offloaded(cache_rows=CACHE), SparseOptimizer("rowwise_adagrad", lr=0.1))
    with pytest.raises(ValueError, match=r"offloaded table 'item': the store 'ram' holds 2000 x 8 rows with 0 .*expected 2000 x 8 with 1"):
        attach(dmp, {"item": RamStore.create(ROWS, DIM, 0)})


def test_a_forward_without_the_prefetcher_names_the_row_that_is_not_cached():
    dmp = fused(Offloaded(cache_rows=CACHE), SparseOptimizer("sgd", lr=0.1))
    attach(dmp, {"item": RamStore.create(ROWS, DIM, 0)})
    with pytest.raises(RuntimeError, match=r"offloaded table 'item': id \d+ is not in the cache 'offload_cache'"):
        dmp(zipf_batches(1)[0])


def test_cache_writes_land_in_the_fused_table_and_its_optimizer_state():
    dmp = fused(Offloaded(cache_rows=CACHE), SparseOptimizer("rowwise_adagrad", lr=0.1))
    offload = attach(dmp, {"item": RamStore.create(ROWS, DIM, 1)})
    cache = offload.caches["offload_cache"]
    cache.weights[3] = 7.0
    cache.state[3] = 2.0
    assert torch.all(physical_weights(dmp)["offload_cache"][3] == 7.0)
    assert item_state(dmp, CACHE, "offload_cache")[3, 0] == 2.0


@pytest.mark.parametrize("name", ["lru", "lfu", "lookahead"])
def test_each_policy_chooses_its_victim(name):
    """Slots 0..3 hold rows 0..3, used at steps 0..3 (row 1 twice); the window needs rows 0 and 2."""
    policy = make_policy(name, slots=4, rows=10)
    slot_map = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1, -1, -1], dtype=torch.int32)
    slot_row, evictable = torch.arange(4), torch.ones(4, dtype=torch.bool)
    for when, row in [(0, 0), (1, 1), (1, 1), (2, 2), (3, 3)]:
        policy.touch(torch.tensor([row]), torch.tensor([row]), when)
    window = [torch.tensor([2, 7]), torch.tensor([0])]
    for ids in window:
        policy.enter(ids)
    victim = int(torch.argmax(policy.scores(slot_row, slot_map, 4, window, evictable, 1)))
    assert victim == {"lru": 0, "lfu": 0, "lookahead": 1}[name]  # lookahead: not in the window, oldest
    if name == "lookahead":  # every row is needed soon: the furthest next use goes
        policy.enter(torch.tensor([1]))
        policy.enter(torch.tensor([3]))
        window = [torch.tensor([1]), torch.tensor([3]), torch.tensor([0, 2])]
        scores = policy.scores(slot_row, slot_map, 4, window, evictable, 1)
        assert scores.tolist() == [3, 1, 3, 2]
        for ids in window:
            policy.leave(ids)
        assert policy.in_window.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]


def test_evaluation_does_not_dirty_rows(one_thread):
    optimizer = SparseOptimizer("sgd", lr=0.1)
    initial, _ = reference(optimizer, [])
    store = ram_store(initial, optimizer)
    dmp, offload = offloaded_model(optimizer, initial, store)
    with torch.no_grad(), Prefetcher(zipf_batches(4), offload, train=False) as prefetched:
        for kjt in prefetched:
            dmp(kjt)
    assert offload.stats()["offload_cache"].written_rows == 0
    torch.testing.assert_close(store.weights, initial["item"], rtol=0, atol=0)


def test_an_offloaded_id_out_of_range_is_named_before_any_row_moves():
    """item (2000 rows) and user (500 rows) share one cache: user id 500 would be item's row 0."""
    optimizer = SparseOptimizer("sgd", lr=0.1)
    torch.manual_seed(0)
    spec = EmbeddingSpec(features=FEATURES, dim=DIM, method=Offloaded(cache_rows=CACHE))
    dmp = embtab.fuse(embtab.EmbeddingTables(spec), optimizer)
    offload = attach(dmp, {"item": RamStore.create(ROWS, DIM, 0), "user": RamStore.create(500, DIM, 0)})
    kjt = zipf_batches(1)[0]
    values = kjt.values().clone()
    values[-1] = 500  # the last id is user's
    bad = type(kjt).from_lengths_sync(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    with pytest.raises(ValueError, match=r"feature 'user' \(offloaded\): id 500 is out of range; expected ids in \[0, 500\)"):
        list(Prefetcher([bad], offload))
    assert offload.stats()["offload_cache"].loaded_rows == 0


def test_an_empty_batch_is_a_clear_error():
    dmp = fused(FullTable(), SparseOptimizer("sgd", lr=0.1))
    kjt = zipf_batches(1)[0]
    empty = type(kjt).from_lengths_sync(keys=kjt.keys(), values=kjt.values()[:0], lengths=kjt.lengths()[:0])
    with pytest.raises(ValueError, match=r"empty batch: features \['item', 'hist', 'user'\] hold 0 samples"):
        dmp(empty)
