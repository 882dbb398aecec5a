"""EmbeddingTables with the full table: torchrec-equal outputs and updates, bytes, bad input."""

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad

import embtab
from embtab.testing import random_kjt
from embtab.shard import allocated_bytes

POOLED = (
    embtab.FeatureSpec("user", 100),
    embtab.FeatureSpec("item", 60),
    embtab.FeatureSpec("tags", 30),
)


def fused_reference(tables: embtab.EmbeddingTables, optimizer, kwargs) -> FusedEmbeddingBagCollection:
    """torchrec's own unsharded fused EBC over the same tables, initialized with the same weights."""
    configs = [
        EmbeddingBagConfig(
            name=c.name,
            num_embeddings=c.num_embeddings,
            embedding_dim=c.embedding_dim,
            feature_names=c.feature_names,
        )
        for c in tables.ebc.embedding_bag_configs()
    ]
    reference = FusedEmbeddingBagCollection(configs, optimizer_type=optimizer, optimizer_kwargs=kwargs)
    with torch.no_grad():
        for name, bag in tables.ebc.embedding_bags.items():
            reference.embedding_bags[name].weight.copy_(bag.weight)
    return reference


@pytest.mark.parametrize(
    "kind,torch_optimizer", [("rowwise_adagrad", RowWiseAdagrad), ("sgd", torch.optim.SGD)]
)
def test_full_table_matches_torchrec_fused_ebc(kind, torch_optimizer):
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=POOLED, dim=8))
    kwargs = {"lr": 0.3} if kind == "sgd" else {"lr": 0.3, "eps": 1e-8}
    reference = fused_reference(tables, torch_optimizer, kwargs)
    initial = {n: b.weight.detach().clone() for n, b in tables.ebc.embedding_bags.items()}
    dmp = embtab.fuse(tables, embtab.SparseOptimizer(kind, lr=0.3))
    target = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        kjt = random_kjt(POOLED, batch=16, seed=step)
        ours, theirs = dmp(kjt).pooled, reference(kjt)
        assert ours.keys() == theirs.keys()
        torch.testing.assert_close(ours.values(), theirs.values(), rtol=0, atol=1e-6)
        ((ours.values() - target) ** 2).sum().backward()
        ((theirs.values() - target) ** 2).sum().backward()
    state = dmp.state_dict()
    for name, bag in reference.embedding_bags.items():
        ours = state[f"ebc.embedding_bags.{name}.weight"].local_shards()[0].tensor
        torch.testing.assert_close(ours, bag.weight, rtol=0, atol=1e-6)
        assert not torch.equal(ours, initial[name])


SHARED = (
    embtab.FeatureSpec("user", 40),
    embtab.FeatureSpec("item", 30),
    embtab.FeatureSpec("hist", 30, pooling="none", table="item", required=True),
    embtab.FeatureSpec("recent", 30, pooling="mean", table="item"),
)


def test_shared_table_sequence_and_pooled_outputs_equal_direct_indexing():
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=SHARED, dim=4))
    assert tables.ebc is not None and list(tables.ecs) == ["dim4"]
    item = tables.ecs["dim4"].embeddings["item"].weight.detach()
    user = tables.ebc.embedding_bags["user"].weight.detach()
    kjt = random_kjt(SHARED, batch=5, seed=3)
    out = tables(kjt)
    per_key = kjt.to_dict()
    assert out.pooled.keys() == ["user", "item", "recent"]
    expected_pooled = []
    for name, weight, mean in (("user", user, False), ("item", item, False), ("recent", item, True)):
        jt = per_key[name]
        rows = [weight[ids].sum(0) for ids in jt.to_dense()]
        pooled = torch.stack(rows)
        if mean:
            pooled = pooled / jt.lengths().unsqueeze(1)
        expected_pooled.append(pooled)
    torch.testing.assert_close(out.pooled.values(), torch.cat(expected_pooled, 1))
    hist = out.sequence["hist"]
    torch.testing.assert_close(hist.values(), item[per_key["hist"].values()])
    assert torch.equal(hist.lengths(), per_key["hist"].lengths())


def test_shared_table_is_one_allocation_and_fused_training_updates_it():
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=SHARED, dim=4))
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=1.0))
    before = {k: v.local_shards()[0].tensor.clone() for k, v in dmp.state_dict().items()}
    assert sorted(before) == ["ebc.embedding_bags.user.weight", "ecs.dim4.embeddings.item.weight"]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "hist", "recent"],
        values=torch.tensor([1, 2, 5, 6, 7]),
        lengths=torch.tensor([1, 0, 1, 0, 1, 1, 1, 0]),
    )
    with pytest.raises(ValueError, match="'recent': sample 1 has an empty bag"):
        dmp(kjt)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "hist", "recent"],
        values=torch.tensor([1, 5, 6, 7]),
        lengths=torch.tensor([1, 0, 0, 0, 1, 0, 1, 1]),
    )
    with pytest.raises(ValueError, match="'hist': sample 1 has an empty bag"):
        dmp(kjt)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "hist", "recent"],
        values=torch.tensor([1, 5, 6, 7]),
        lengths=torch.tensor([1, 1, 1, 1]),
    )
    out = dmp(kjt)
    (out.pooled.values().sum() + out.sequence["hist"].values().sum()).backward()
    after = dmp.state_dict()["ecs.dim4.embeddings.item.weight"].local_shards()[0].tensor
    changed = (after != before["ecs.dim4.embeddings.item.weight"]).any(1).nonzero().flatten()
    assert changed.tolist() == [5, 6, 7]
    torch.testing.assert_close(after[5], before["ecs.dim4.embeddings.item.weight"][5] - 1.0)


def test_input_key_order_does_not_matter():
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=POOLED, dim=8))
    kjt = random_kjt(POOLED, batch=6, seed=0)
    reordered = kjt.permute([2, 0, 1])
    torch.testing.assert_close(tables(reordered).pooled.values(), tables(kjt).pooled.values())


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad"])
def test_memory_bytes_matches_the_fused_allocation(kind):
    spec = embtab.EmbeddingSpec(features=SHARED + (embtab.FeatureSpec("big", 1000),), dim=8)
    tables = embtab.EmbeddingTables(spec)
    optimizer = embtab.SparseOptimizer(kind, lr=0.1)
    predicted = tables.memory_bytes(optimizer)
    assert predicted.tables["big"].parameter_bytes == 1000 * 8 * 4
    assert set(predicted.tables) == {"user", "item", "big"}
    dmp = embtab.fuse(tables, optimizer)
    measured = allocated_bytes(dmp)
    assert measured["parameter_bytes"] == predicted.parameter_bytes
    assert measured["optimizer_bytes"] == predicted.optimizer_bytes
    assert tables.memory_bytes().total == predicted.total


def _kjt(keys, values, lengths):
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths))


@pytest.mark.parametrize(
    "kjt,message",
    [
        (
            _kjt(["user", "item", "tags"], [3, -1, 2], [1, 1, 1]),
            r"'item': id -1 is out of range; expected 0 <= id < 60",
        ),
        (
            _kjt(["user", "item", "tags"], [100, 1, 2], [1, 1, 1]),
            r"'user': id 100 is out of range; expected 0 <= id < 100",
        ),
        (_kjt(["user", "item", "tags", "zip"], [1, 1, 2, 0], [1, 1, 1, 1]), r"unknown feature 'zip'"),
        (_kjt(["user", "item"], [1, 1], [1, 1]), r"feature 'tags' is missing"),
        (_kjt(["user", "item", "tags"], [1, 1, 2], [1, 1, 2]), r"lengths add up to 4 ids but 3 values"),
        (_kjt(["user", "item", "tags"], [1, 1], [1, 1]), r"2 lengths cannot be split evenly over 3"),
        (_kjt(["user", "item", "tags"], [1.0, 1.0, 2.0], [1, 1, 1]), r"ids must be integers"),
    ],
)
def test_bad_input_names_feature_value_and_range(kjt, message):
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=POOLED, dim=8))
    with pytest.raises(ValueError, match=message):
        tables(kjt)


def test_adam_on_cpu_is_a_clear_error_and_width_must_fit_fbgemm():
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=POOLED, dim=8))
    with pytest.raises(ValueError, match="'adam' runs only on CUDA"):
        embtab.fuse(tables, embtab.SparseOptimizer("adam", lr=0.1))
    with pytest.raises(ValueError, match="width 6; fbgemm's fused kernels need a multiple of 4"):
        embtab.EmbeddingTables(embtab.EmbeddingSpec(features=POOLED, dim=6))


def test_spec_errors_and_toml_round_trip(tmp_path):
    with pytest.raises(ValueError, match="shares table 'item', but no feature of that name"):
        embtab.EmbeddingSpec(features=(embtab.FeatureSpec("hist", 5, table="item"),))
    with pytest.raises(ValueError, match="cardinality 6 but shares table 'item' of cardinality 5"):
        embtab.EmbeddingSpec(
            features=(embtab.FeatureSpec("item", 5), embtab.FeatureSpec("hist", 6, table="item"))
        )
    with pytest.raises(ValueError, match="unknown embedding method 'nope'"):
        embtab.EmbeddingSpec.from_dict({"features": [], "method": {"name": "nope"}})
    import tomllib

    path = tmp_path / "tables.toml"
    path.write_text(
        '[embedding]\ndim = 8\nmethod = { name = "full" }\n'
        '[[embedding.features]]\nname = "item"\ncardinality = 10\n'
        '[[embedding.features]]\nname = "hist"\ncardinality = 10\npooling = "none"\ntable = "item"\n'
    )
    spec = embtab.EmbeddingSpec.from_dict(tomllib.loads(path.read_text())["embedding"])
    assert spec == embtab.EmbeddingSpec(
        features=(embtab.FeatureSpec("item", 10), embtab.FeatureSpec("hist", 10, "none", "item")), dim=8
    )


def test_a_combine_that_takes_the_ids_must_combine_per_id_on_its_own():
    from dataclasses import dataclass

    from embtab.methods.full import FullTable, FullTableMethod

    class PooledWithIds(FullTableMethod):
        combine_uses_ids = True  # but pooling_commutes stays True: the ids of a bag are gone

    @dataclass(frozen=True)
    class Spec(FullTable):
        def build(self, table):
            return PooledWithIds(table)

    spec = embtab.EmbeddingSpec(features=(embtab.FeatureSpec("x", 10),), dim=4, method=Spec())
    with pytest.raises(ValueError, match=r"table 'x': a combine that takes the ids needs per-id lookups"):
        embtab.EmbeddingTables(spec)
