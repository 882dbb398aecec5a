"""Feature multiplexing: one shared table, salted probes per logical table, concatenated chunks."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.testing import random_kjt
from embtab.hashing import hash_to_range, salt_of
from embtab.methods import METHODS, method_from_dict
from embtab.methods.multiplex import Multiplexed, multiplex

ROWS = 97

FEATURES = (
    embtab.FeatureSpec("user", 1000),
    embtab.FeatureSpec("item", 500),
    embtab.FeatureSpec("recent", 500, pooling="mean", table="item"),
    embtab.FeatureSpec("hist", 500, pooling="none", table="item", required=True),
)
POOLED = tuple(f for f in FEATURES if f.name in ("user", "item")) + (embtab.FeatureSpec("tags", 300),)




def reference_per_id(weight: torch.Tensor, table: str, chunks: int, ids: torch.Tensor) -> torch.Tensor:
    """Each id's vector straight from the shared weight: chunk j is row h(id, salt(table, j))."""
    return torch.cat(
        [weight[hash_to_range(ids, weight.shape[0], salt_of(table, j))] for j in range(chunks)], dim=1
    )


def reference_pooled(per_key, weight, table, chunks, name, mean=False):
    jt = per_key[name]
    bags = [reference_per_id(weight, table, chunks, ids).sum(0) for ids in jt.to_dense()]
    pooled = torch.stack(bags)
    return pooled / jt.lengths().unsqueeze(1) if mean else pooled


def test_registered_and_built_from_dict():
    assert METHODS["multiplex"] is Multiplexed
    assert method_from_dict({"name": "multiplex", "rows": 10, "chunk_dim": 4}) == Multiplexed(10, 4)


def test_shared_table_outputs_equal_direct_indexing_with_per_table_widths():
    torch.manual_seed(0)
    spec = multiplex(embtab.EmbeddingSpec(features=FEATURES, dim=8), rows=ROWS, chunk_dim=4, chunks={"user": 3})
    tables = embtab.EmbeddingTables(spec)
    assert tables.physical_tables == {"unified": embtab.methods.PhysicalTable("unified", ROWS, 4)}
    assert tables.output_dim("user") == 12 and tables.output_dim("item") == 8
    # hist is a sequence feature, so the one shared table is looked up per id
    assert tables.ebc is None and list(tables.ecs) == ["dim4"]
    weight = tables.ecs["dim4"].embeddings["unified"].weight.detach()
    kjt = random_kjt(FEATURES, batch=6, seed=1)
    out, per_key = tables(kjt), kjt.to_dict()
    assert out.pooled.keys() == ["user", "item", "recent"]
    assert out.pooled.length_per_key() == [12, 8, 8]
    expected = torch.cat(
        [
            reference_pooled(per_key, weight, "user", 3, "user"),
            reference_pooled(per_key, weight, "item", 2, "item"),
            reference_pooled(per_key, weight, "item", 2, "recent", mean=True),
        ],
        dim=1,
    )
    torch.testing.assert_close(out.pooled.values(), expected)
    hist = out.sequence["hist"]
    torch.testing.assert_close(hist.values(), reference_per_id(weight, "item", 2, per_key["hist"].values()))


def test_features_sharing_a_logical_table_read_the_same_rows_and_tables_differ():
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=8, method=Multiplexed(ROWS, 4)))
    ids = torch.arange(200)
    user, item = tables.methods["user"].remap(ids), tables.methods["item"].remap(ids)
    assert user.shape == item.shape == (2, 200)
    assert int(user.min()) >= 0 and int(user.max()) < ROWS
    # different logical tables and different probes use different salts
    assert (user != item).float().mean() > 0.9 and (item[0] != item[1]).float().mean() > 0.9
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "recent", "hist"], values=torch.tensor([7, 7, 7, 7]),
        lengths=torch.tensor([1, 1, 1, 1]),
    )
    out = tables(kjt)
    user_vec, item_vec, recent_vec = out.pooled.values().split(8, dim=1)
    torch.testing.assert_close(item_vec, recent_vec)
    torch.testing.assert_close(item_vec[0], out.sequence["hist"].values()[0])
    assert not torch.equal(user_vec, item_vec)


def test_pooled_only_uses_the_fused_bag_and_counts_the_table_once():
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(features=POOLED, dim=16, method=Multiplexed(ROWS, chunk_dim=8))
    tables = embtab.EmbeddingTables(spec)
    assert list(tables.ecs) == [] and list(tables.ebc.embedding_bags) == ["unified"]
    weight = tables.ebc.embedding_bags["unified"].weight.detach()
    kjt = random_kjt(POOLED, batch=5, seed=2)
    per_key = kjt.to_dict()
    expected = torch.cat([reference_pooled(per_key, weight, f.name, 2, f.name) for f in POOLED], dim=1)
    torch.testing.assert_close(tables(kjt).pooled.values(), expected)
    report = tables.memory_bytes(embtab.SparseOptimizer("rowwise_adagrad"))
    assert report.total == ROWS * 8 * 4 + ROWS * 4  # one table, one momentum float per row


def test_fused_sgd_step_equals_autograd_on_the_shared_weight():
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(features=POOLED, dim=8, method=Multiplexed(ROWS, chunk_dim=4))
    tables = embtab.EmbeddingTables(spec)
    weight = tables.ebc.embedding_bags["unified"].weight.detach().clone().requires_grad_(True)
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.5))
    kjt = random_kjt(POOLED, batch=8, seed=3)
    target = torch.randn(8, 24, generator=torch.Generator().manual_seed(4))
    ((dmp(kjt).pooled.values() - target) ** 2).sum().backward()
    per_key = kjt.to_dict()
    reference = torch.cat([reference_pooled(per_key, weight, f.name, 2, f.name) for f in POOLED], dim=1)
    ((reference - target) ** 2).sum().backward()
    after = dmp.state_dict()["ebc.embedding_bags.unified.weight"].local_shards()[0].tensor
    torch.testing.assert_close(after, weight.detach() - 0.5 * weight.grad, rtol=0, atol=1e-5)
    assert int((weight.grad != 0).any(1).sum()) > 10


def test_any_non_negative_id_is_accepted():
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=POOLED, dim=8, method=Multiplexed(ROWS, 8)))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "tags"], values=torch.tensor([10**12, 2**62, 5]), lengths=torch.tensor([1, 1, 1])
    )
    assert tables(kjt).pooled.values().shape == (1, 24)
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "tags"], values=torch.tensor([1, -3, 5]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(ValueError, match=r"'item': id -3 is out of range; expected 0 <= id"):
        tables(bad)


def test_multiplex_helper_on_a_subset_keeps_other_tables():
    base = embtab.EmbeddingSpec(features=POOLED, dim=8)
    spec = multiplex(base, rows=50, chunk_dim=4, features=["user", "tags"], chunks={"tags": 1})
    assert spec.method == embtab.FullTable()
    assert dict(spec.table_methods) == {
        "user": Multiplexed(50, 4), "tags": Multiplexed(50, 4, chunks=1)
    }
    tables = embtab.EmbeddingTables(spec)
    assert set(tables.physical_tables) == {"unified", "item"}
    assert tables.output_dim("tags") == 4 and tables.output_dim("item") == 8
    with pytest.raises(ValueError, match="unknown feature 'nope'"):
        multiplex(base, rows=50, features=["nope"])
    with pytest.raises(ValueError, match="chunks names table 'item', which is not multiplexed"):
        multiplex(base, rows=50, chunk_dim=4, features=["user"], chunks={"item": 2})


@pytest.mark.parametrize(
    "method,message",
    [
        (Multiplexed(ROWS, chunk_dim=6, chunks=2), r"table 'user' \(multiplex\): chunk_dim=6; expected a multiple of 4"),
        (Multiplexed(ROWS, chunk_dim=12), r"table 'user' \(multiplex\): width 16 is not a multiple of chunk_dim=12"),
        (Multiplexed(ROWS, chunks=3), r"width 16 does not split into chunks=3"),
        (Multiplexed(0, 4), r"table 'user' \(multiplex\): rows must be an integer >= 1, got 0"),
        (Multiplexed(ROWS, 4, chunks=0), r"chunks must be an integer >= 1 or None, got 0"),
    ],
)
def test_bad_parameters_name_the_table_and_value(method, message):
    with pytest.raises(ValueError, match=message):
        embtab.EmbeddingTables(embtab.EmbeddingSpec(features=POOLED, dim=16, method=method))


def test_one_shared_name_must_mean_one_shape():
    spec = embtab.EmbeddingSpec(
        features=POOLED, dim=8, method=Multiplexed(ROWS, 4), table_methods=(("item", Multiplexed(ROWS + 1, 4)),)
    )
    with pytest.raises(ValueError, match="physical table 'unified' is declared as"):
        embtab.EmbeddingTables(spec)
