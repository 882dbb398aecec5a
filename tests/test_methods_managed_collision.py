"""Managed collisions through torchrec's MCH module: zero collisions, eviction, state, row reset."""

import pytest
import torch
from torchrec import KeyedJaggedTensor
from torchrec.modules.mc_modules import MCHManagedCollisionModule

import embtab
from embtab.fused_state import attach_row_reset
from embtab.methods import METHODS, method_from_dict
from embtab.methods.managed_collision import ManagedCollision, ManagedCollisionMethod
from embtab.checkpoint import load_training_state, training_state

FEATURES = (
    embtab.FeatureSpec("user", 1000),
    embtab.FeatureSpec("item", 1000),
    embtab.FeatureSpec("hist", 1000, pooling="none", table="item"),
)


def tables_for(rows: int, eviction: str = "lfu", interval: int = 1, dim: int = 4) -> embtab.EmbeddingTables:
    torch.manual_seed(0)
    method = ManagedCollision(rows=rows, eviction=eviction, eviction_interval=interval)
    return embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=dim, method=method))


def kjt_of(user: list[int], item: list[int], hist: list[int]) -> KeyedJaggedTensor:
    """One sample per id of `user` (and of `item`, as many), all of `hist` in the first sample."""
    batch = len(user)
    assert len(item) == batch
    hist_lengths = [len(hist)] + [0] * (batch - 1)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "hist"],
        values=torch.tensor(user + item + hist),
        lengths=torch.tensor([1] * batch + [1] * batch + hist_lengths),
    )


def test_registered_and_wraps_torchrec_module():
    assert METHODS["managed_collision"] is ManagedCollision
    assert method_from_dict({"name": "managed_collision", "rows": 8, "eviction": "lru"}) == ManagedCollision(8, "lru")
    method = tables_for(16).methods["item"]
    assert isinstance(method, ManagedCollisionMethod) and isinstance(method.mch, MCHManagedCollisionModule)
    assert method.mch.output_size() == 16 and method.miss_row == 15 and method.max_id == 1000


def test_distinct_hot_ids_get_distinct_rows_and_outputs_read_them():
    tables = tables_for(rows=16)
    tables.train()
    items = [100, 101, 102, 103, 104, 105, 106, 107]
    hist = [108, 109, 110, 111, 112, 113, 114, 100]  # 15 distinct ids on item's table in all
    out = tables(kjt_of([1] * 8, items, hist))
    mapped = tables.methods["item"].mapped_ids()
    assert sorted(mapped) == list(range(100, 115))
    assert len(set(mapped.values())) == 15 and set(mapped.values()) <= set(range(15))  # no collision
    weight = tables.ecs["dim4"].embeddings["item"].weight.detach()
    rows = torch.tensor([mapped[i] for i in items])
    item_columns = out.pooled.values()[:, 4:8]
    torch.testing.assert_close(item_columns, weight[rows])
    torch.testing.assert_close(out.sequence["hist"].values(), weight[torch.tensor([mapped[i] for i in hist])])
    # user has its own map: one id, one row
    assert len(tables.methods["user"].mapped_ids()) == 1
    # an id never admitted reads the miss row (eval mode: no admission)
    tables.eval()
    assert tables.methods["item"].remap(torch.tensor([999, 100])).tolist() == [[15, mapped[100]]]


def remap_steps(method: ManagedCollisionMethod, batches: list[list[int]]) -> list[list[int]]:
    method.train()
    return [method.remap(torch.tensor(b)).flatten().tolist() for b in batches]


def test_lfu_evicts_the_least_frequent_id_once_rows_are_exhausted():
    method = tables_for(rows=5).methods["item"]  # 4 ids hold rows, row 4 is the miss row
    first = remap_steps(method, [[10] * 4 + [11] * 3 + [12] * 2 + [13]])[0]
    before = method.mapped_ids()
    assert sorted(before) == [10, 11, 12, 13] and 4 not in before.values()
    assert first == [before[10]] * 4 + [before[11]] * 3 + [before[12]] * 2 + [before[13]]
    assert remap_steps(method, [[14] * 5]) == [[before[13]] * 5]  # 14 (5 uses) takes 13's row
    after = method.mapped_ids()
    assert after == {10: before[10], 11: before[11], 12: before[12], 14: before[13]}
    assert method.mch.evict() is None  # consumed inside remap
    assert remap_steps(method, [[13]]) == [[4]]  # 1 use cannot beat 12's 2: the miss row


def test_lru_evicts_the_least_recently_used_id():
    method = tables_for(rows=4, eviction="lru").methods["item"]  # 3 ids hold rows
    remap_steps(method, [[10], [11], [12]])
    rows = method.mapped_ids()
    remap_steps(method, [[11], [13]])  # 10 is the least recent
    assert method.mapped_ids() == {11: rows[11], 12: rows[12], 13: rows[10]}
    remap_steps(method, [[14]])  # now 12 is
    assert method.mapped_ids() == {11: rows[11], 13: rows[10], 14: rows[12]}


def test_eviction_interval_admits_ids_only_at_updates():
    method = tables_for(rows=5, interval=2).methods["item"]
    assert remap_steps(method, [[1, 2]]) == [[4, 4]]  # no update yet: the miss row
    second = remap_steps(method, [[3, 3]])[0]
    assert sorted(method.mapped_ids()) == [1, 2, 3] and second == [method.mapped_ids()[3]] * 2


def test_remap_is_deterministic_and_eval_mode_leaves_state_alone():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 40, (30,), generator=g).tolist() for _ in range(6)]
    a, b = tables_for(rows=16).methods["item"], tables_for(rows=16).methods["item"]
    assert remap_steps(a, batches) == remap_steps(b, batches)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    a.eval()
    first = a.remap(torch.arange(40))
    assert torch.equal(first, a.remap(torch.arange(40)))
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in state.items())
    held = a.mapped_ids()
    expected = [held.get(i, 15) for i in range(40)]
    assert first.flatten().tolist() == expected and len(held) == 15


def test_state_dict_round_trip_restores_the_map_and_continues_identically():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 60, (3,), generator=g).tolist() for _ in range(8)]
    trained = tables_for(rows=12)
    trained.train()
    for users in batches[:5]:
        trained(kjt_of(users, users, users))
    state = trained.state_dict()
    assert "methods.item.mch._mch_sorted_raw_ids" in state and "methods.item.mch._mch_counts" in state
    restored = tables_for(rows=12)
    assert restored.methods["item"].mapped_ids() == {}
    restored.load_state_dict(state)
    assert restored.methods["item"].mapped_ids() == trained.methods["item"].mapped_ids()
    restored.train()
    for users in batches[5:]:
        ours, theirs = restored(kjt_of(users, users, users)), trained(kjt_of(users, users, users))
        torch.testing.assert_close(ours.pooled.values(), theirs.pooled.values())
    for name in ("user", "item"):
        assert restored.methods[name].mapped_ids() == trained.methods[name].mapped_ids()
        assert torch.equal(restored.methods[name].mch._mch_counts, trained.methods[name].mch._mch_counts)


def test_fused_training_resets_evicted_rows_and_checkpoints_the_map():
    tables = tables_for(rows=5, dim=8)  # item: 4 rows of its own
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("rowwise_adagrad", lr=0.5))
    assert attach_row_reset(dmp) == 2
    method = tables.methods["item"]
    state = dmp.state_dict()
    weight = state["ecs.dim8.embeddings.item.weight"].local_shards()[0].tensor
    momentum = dmp.fused_optimizer.state_dict()["state"]["ecs.dim8.embeddings.item.weight"]["item.momentum1"]
    momentum = momentum.local_shards()[0].tensor
    dmp.train()
    out = dmp(kjt_of([1, 1, 1, 1], [10, 10, 11, 12], [13]))
    (out.pooled.values().sum() + out.sequence["hist"].values().sum()).backward()
    rows = method.mapped_ids()
    assert sorted(rows) == [10, 11, 12, 13] and bool((momentum[list(rows.values())] > 0).all())
    trained = weight.clone()
    dmp(kjt_of([1, 1], [14, 14], [14]))  # 14 (3 uses) evicts 13 (1 use); no backward
    evicted = rows[13]
    assert method.mapped_ids()[14] == evicted
    bound = (1 / 5) ** 0.5
    assert not torch.equal(weight[evicted], trained[evicted])
    assert bool((weight[evicted].abs() <= bound).all()) and float(momentum[evicted]) == 0.0
    kept = [r for r in range(5) if r != evicted]
    assert torch.equal(weight[kept], trained[kept]) and bool((momentum[[rows[i] for i in (10, 11, 12)]] > 0).all())
    # checkpoint: weights, optimizer state and the id map travel together
    saved = training_state(dmp)
    assert "methods.item.mch._mch_sorted_raw_ids" in saved["model"]
    other = tables_for(rows=5, dim=8)
    other_dmp = embtab.fuse(other, embtab.SparseOptimizer("rowwise_adagrad", lr=0.5))
    load_training_state(other_dmp, saved)
    assert other.methods["item"].mapped_ids() == method.mapped_ids()
    other_dmp.eval(), dmp.eval()
    probe = kjt_of([1, 2], [14, 13], [10, 11, 12])
    torch.testing.assert_close(other_dmp(probe).pooled.values(), dmp(probe).pooled.values())


@pytest.mark.parametrize(
    "method,message",
    [
        (ManagedCollision(rows=1), r"table 'user' \(managed_collision\): rows must be an integer >= 2, got 1"),
        (ManagedCollision(rows=8, eviction="fifo"), r"eviction must be one of \('lfu', 'lru'\), got 'fifo'"),
        (ManagedCollision(rows=8, eviction_interval=0), r"eviction_interval must be an integer >= 1, got 0"),
        (ManagedCollision(rows=8, input_hash_size=2**63), r"input_hash_size must be an integer in \[1, 2\*\*63 - 1\]"),
    ],
)
def test_bad_parameters_name_the_table_and_value(method, message):
    with pytest.raises(ValueError, match=message):
        embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=4, method=method))


def test_ids_are_checked_against_the_input_hash_size_and_state_is_counted():
    tables = tables_for(rows=8)
    with pytest.raises(ValueError, match=r"'item': id 1000 is out of range; expected 0 <= id < 1000"):
        tables(kjt_of([1], [1000], []))
    wide = embtab.EmbeddingTables(
        embtab.EmbeddingSpec(features=FEATURES, dim=4, method=ManagedCollision(8, input_hash_size=2**63 - 1))
    )
    assert wide(kjt_of([2**62], [5 * 10**17], [3])).pooled.values().shape == (1, 8)
    # id map + mapping + counts (3 x 8 int64) + torchrec's segment table (1025) + iteration (1)
    assert tables.memory_bytes().method_bytes == 2 * (3 * 8 + 1025 + 1) * 8
