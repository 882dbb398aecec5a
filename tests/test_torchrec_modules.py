"""embtab tables behind torchrec's collection interfaces: torchrec's own models (DLRM, DLRM_DCN,
DLRM_Projection, DLRM_Transformer, DeepFM) train on them under `embtab.fuse` for every registered
method; with the full table they train exactly like the same model on torchrec's own collection;
weighted ids pool with their weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection, DLRMTrain
from torchrec.models.experimental.transformerdlrm import DLRM_Transformer
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

import embtab
from embtab.methods.base import SizedSpec
from embtab import CompressedEmbeddingBagCollection, CompressedEmbeddingCollection
from embtab.methods import METHODS
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.managed_collision import ManagedCollision
from embtab.methods.multiplex import Multiplexed
from embtab.methods.multi_hash import MultiHash
from embtab.methods.qr import QREmbedding
from embtab.shard import copy_into_shards, physical_weights, single_process_group
from embtab.testing import random_kjt

DIM = 8
DENSE = 5
BATCH = 6
LR = 0.1


def bag_configs(mean: bool = False) -> list[EmbeddingBagConfig]:
    """Three torchrec tables, one of them with two features (and, if `mean`, mean-pooled)."""
    return [
        EmbeddingBagConfig(name="t_user", embedding_dim=DIM, num_embeddings=40, feature_names=["user", "user_2"]),
        EmbeddingBagConfig(
            name="t_item",
            embedding_dim=DIM,
            num_embeddings=30,
            feature_names=["item"],
            pooling=PoolingType.MEAN if mean else PoolingType.SUM,
        ),
        EmbeddingBagConfig(name="t_city", embedding_dim=DIM, num_embeddings=20, feature_names=["city"]),
    ]


FEATURES = (
    embtab.FeatureSpec("user", 40),
    embtab.FeatureSpec("user_2", 40, table="user"),
    embtab.FeatureSpec("item", 30, required=True),  # mean-pooled in some tests: never an empty bag
    embtab.FeatureSpec("city", 20),
)

MODELS = {
    "dlrm": lambda ebc: DLRM(ebc, DENSE, [16, DIM], [16, 1]),
    "dlrm_dcn": lambda ebc: DLRM_DCN(ebc, DENSE, [16, DIM], [16, 1], dcn_num_layers=2, dcn_low_rank_dim=4),
    "dlrm_projection": lambda ebc: DLRM_Projection(ebc, DENSE, [16, DIM], [16, 1], [16, 2 * DIM], [16, 2 * DIM]),
    "dlrm_transformer": lambda ebc: DLRM_Transformer(ebc, DENSE, [16, DIM], [16, 1], nhead=2, ntransformer_layers=1),
    "deepfm": lambda ebc: SimpleDeepFMNN(DENSE, ebc, hidden_layer_size=16, deep_fm_dimension=4),
}


def method_spec(name: str) -> embtab.MethodSpec:
    """A registered method at a size that compresses these small tables."""
    cls = METHODS[name]
    if not issubclass(cls, SizedSpec):
        return cls()
    return cls(**{cls.size_field: {"qr": 4, "multiplex": 48}.get(name, 16)})


def batch(step: int) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (
        random_kjt(FEATURES, batch=BATCH, seed=step),
        torch.randn(BATCH, DENSE, generator=g),
        torch.randint(0, 2, (BATCH,), generator=g).float(),
    )


def step(model: nn.Module, dense_optimizer: torch.optim.Optimizer, index: int) -> torch.Tensor:
    sparse, dense, labels = batch(index)
    torch.manual_seed(index)  # the same dropout masks in both models (DLRM_Transformer)
    logits = model(dense, sparse).view(-1)
    dense_optimizer.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    dense_optimizer.step()
    return logits.detach()


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_torchrec_models_train_on_every_method(model_name, method):
    torch.manual_seed(0)
    ebc = CompressedEmbeddingBagCollection(tables=bag_configs(), method=method_spec(method))
    model = MODELS[model_name](ebc)
    before = {k: v.clone() for k, v in physical_weights(ebc).items()}
    dmp = embtab.fuse(model, embtab.SparseOptimizer("rowwise_adagrad", lr=LR))
    dense = torch.optim.SGD(embtab.dense_parameters(dmp), lr=LR)
    for index in range(2):
        logits = step(dmp, dense, index)
        assert logits.shape == (BATCH,) and bool(torch.isfinite(logits).all())
    after = physical_weights(dmp)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == list(before), f"{method}: tables that did not train: {set(before) - set(changed)}"


def _torchrec_reference(model: nn.Module) -> DistributedModelParallel:
    """`model` as a torchrec user trains it: fused row-wise Adagrad in the backward, every table
    whole on the one rank."""
    ebc = model.sparse_arch.embedding_bag_collection
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": LR, "eps": 1e-8})
    group = single_process_group()
    constraints = {c.name: ParameterConstraints(sharding_types=["table_wise"]) for c in ebc.embedding_bag_configs()}
    planner = EmbeddingShardingPlanner(Topology(world_size=1, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], group)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(group), device=torch.device("cpu"), plan=plan
    )
    copy_into_shards(dmp, initial)  # DMP initializes the sharded tables anew
    return dmp


def _copy_initial_state(reference: nn.Module, ours: nn.Module, configs: list[EmbeddingBagConfig]) -> None:
    """`ours` starts where `reference` does: the same dense layers, each table's rows copied over
    (embtab names a table after its first feature)."""
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    with torch.no_grad():
        for key, value in reference_state.items():
            if key in ours_state:
                ours_state[key].copy_(value)
        for config in configs:
            theirs = reference_state[f"sparse_arch.embedding_bag_collection.embedding_bags.{config.name}.weight"]
            mine = f"sparse_arch.embedding_bag_collection.groups.0.ebc.embedding_bags.{config.feature_names[0]}.weight"
            ours_state[mine].copy_(theirs)


def _dense_state(dmp: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("module."): v
        for k, v in dmp.state_dict().items()
        if "embedding_bag" not in k and isinstance(v, torch.Tensor)
    }


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_full_table_trains_like_torchrecs_own_collection(model_name):
    torch.manual_seed(0)
    reference = MODELS[model_name](EmbeddingBagCollection(tables=bag_configs(mean=True)))
    ours = MODELS[model_name](CompressedEmbeddingBagCollection(tables=bag_configs(mean=True)))
    _copy_initial_state(reference, ours, bag_configs())
    initial = {k: v.clone() for k, v in physical_weights(reference).items()}
    reference_dmp = _torchrec_reference(reference)
    ours_dmp = embtab.fuse(ours, embtab.SparseOptimizer("rowwise_adagrad", lr=LR))
    optimizers = [torch.optim.SGD(embtab.dense_parameters(m), lr=LR) for m in (reference_dmp, ours_dmp)]
    for index in range(3):
        expected = step(reference_dmp, optimizers[0], index)
        torch.testing.assert_close(step(ours_dmp, optimizers[1], index), expected, rtol=0, atol=1e-6)
    theirs, mine = physical_weights(reference_dmp), physical_weights(ours_dmp)
    for config in bag_configs():
        torch.testing.assert_close(mine[config.feature_names[0]], theirs[config.name], rtol=0, atol=1e-6)
    assert all(not torch.equal(theirs[name], initial[name]) for name in initial)
    dense_theirs, dense_mine = _dense_state(reference_dmp), _dense_state(ours_dmp)
    assert dense_theirs.keys() <= dense_mine.keys() and dense_theirs
    for key, value in dense_theirs.items():
        torch.testing.assert_close(dense_mine[key], value, rtol=0, atol=1e-6, msg=key)


def test_configs_describe_the_logical_tables():
    configs = bag_configs()
    ebc = CompressedEmbeddingBagCollection(tables=configs, table_methods={"t_user": QREmbedding(collisions=4)})
    assert ebc.embedding_bag_configs() == configs and not ebc.is_weighted()
    assert ebc.device == torch.device("cpu")
    assert set(physical_weights(ebc)) == {"user@qr0", "user@qr1", "item", "city"}
    out = ebc(random_kjt(FEATURES, batch=BATCH, seed=1))
    assert isinstance(out, KeyedTensor) and out.keys() == ["user", "user_2", "item", "city"]
    assert out.values().shape == (BATCH, 4 * DIM)


def test_from_spec_describes_its_tables_for_torchrec():
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=HashingTrick(rows=8))
    ebc = CompressedEmbeddingBagCollection(spec=spec)
    described = [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim) for c in ebc.embedding_bag_configs()]
    assert described == [("user", ["user", "user_2"], 40, DIM), ("item", ["item"], 30, DIM), ("city", ["city"], 20, DIM)]
    around = CompressedEmbeddingBagCollection(embeddings=ebc.embedding_tables[0])
    kjt = random_kjt(FEATURES, batch=BATCH, seed=2)
    torch.testing.assert_close(around(kjt).values(), ebc(kjt).values())


def test_mixed_widths_keep_the_configs_order_and_extra_input_features_are_ignored():
    configs = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=10, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=10, feature_names=["fb"]),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=10, feature_names=["fc"]),
    ]
    torch.manual_seed(0)
    reference = EmbeddingBagCollection(tables=configs)
    ours = CompressedEmbeddingBagCollection(tables=configs)
    assert len(ours.embedding_tables) == 2
    table_of = {"fa": "a", "fb": "b", "fc": "c"}
    for group in ours.embedding_tables:
        for name in group.physical_tables:
            group.ebc.embedding_bags[name].weight.data.copy_(reference.embedding_bags[table_of[name]].weight)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["fc", "extra", "fb", "fa"], values=torch.tensor([1, 2, 3, 4, 5, 6, 7]), lengths=torch.tensor([1, 1, 1, 0, 2, 0, 1, 1])
    )
    expected, out = reference(kjt), ours(kjt)
    assert out.keys() == expected.keys() == ["fa", "fb", "fc"] and out.length_per_key() == [8, 4, 8]
    torch.testing.assert_close(out.values(), expected.values())


def test_bad_configs_are_named():
    shared = bag_configs() + [EmbeddingBagConfig(name="t_more", embedding_dim=DIM, num_embeddings=5, feature_names=["city"])]
    with pytest.raises(ValueError, match="feature 'city' is looked up in tables 't_city' and 't_more'"):
        CompressedEmbeddingBagCollection(tables=shared)
    with pytest.raises(ValueError, match="unknown tables \\['t_nope'\\]"):
        CompressedEmbeddingBagCollection(tables=bag_configs(), table_methods={"t_nope": HashingTrick(rows=4)})
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=DIM)
    with pytest.raises(ValueError, match="exactly one of"):
        CompressedEmbeddingBagCollection(bag_configs(), spec=spec)
    sequence = embtab.EmbeddingSpec(features=(embtab.FeatureSpec("hist", 5, pooling="none"),), dim=DIM)
    with pytest.raises(ValueError, match="features \\['hist'\\] have pooling='none'"):
        CompressedEmbeddingBagCollection(spec=sequence)


# ------------------------------------------------------------------------------ EmbeddingCollection
def sequence_configs() -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(name="t_item", embedding_dim=DIM, num_embeddings=30, feature_names=["item", "hist"]),
        EmbeddingConfig(name="t_tag", embedding_dim=DIM, num_embeddings=20, feature_names=["tag"]),
    ]


SEQUENCE_FEATURES = (
    embtab.FeatureSpec("item", 30, pooling="none"),
    embtab.FeatureSpec("hist", 30, pooling="none", table="item"),
    embtab.FeatureSpec("tag", 20, pooling="none"),
)


def test_embedding_collection_full_table_equals_torchrecs():
    torch.manual_seed(0)
    reference = EmbeddingCollection(tables=sequence_configs(), need_indices=True)
    ours = CompressedEmbeddingCollection(tables=sequence_configs(), need_indices=True)
    for config in sequence_configs():
        weight = reference.embeddings[config.name].weight
        ours.tables.ecs[f"dim{DIM}"].embeddings[config.feature_names[0]].weight.data.copy_(weight)
    kjt = random_kjt(SEQUENCE_FEATURES, batch=BATCH, seed=3)
    expected, out = reference(kjt), ours(kjt)
    assert list(out) == list(expected) == ["item", "hist", "tag"]
    for name, jagged in expected.items():
        torch.testing.assert_close(out[name].values(), jagged.values())
        torch.testing.assert_close(out[name].lengths(), jagged.lengths())
        torch.testing.assert_close(out[name].weights(), jagged.weights())
    assert ours.embedding_dim() == DIM and ours.need_indices()
    assert ours.embedding_names_by_table() == reference.embedding_names_by_table()
    described = [(c.name, c.feature_names, c.num_embeddings) for c in ours.embedding_configs()]
    assert described == [("t_item", ["item", "hist"], 30), ("t_tag", ["tag"], 20)]


def test_embedding_collection_compressed_trains_under_fuse():
    ec = CompressedEmbeddingCollection(tables=sequence_configs(), method=QREmbedding(collisions=4, operation="mult"))
    model = nn.Sequential()
    model.ec = ec
    dmp = embtab.fuse(model, embtab.SparseOptimizer("sgd", lr=LR))
    before = physical_weights(dmp)
    out = dmp.module.ec(random_kjt(SEQUENCE_FEATURES, batch=BATCH, seed=4))
    assert out["hist"].values().shape[1] == DIM
    sum(j.values().square().sum() for j in out.values()).backward()
    after = physical_weights(dmp)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(ValueError, match="one width for every table"):
        CompressedEmbeddingCollection(
            tables=[*sequence_configs(), EmbeddingConfig(name="w", embedding_dim=4, num_embeddings=3, feature_names=["w"])]
        )


# ------------------------------------------------------------------------------ weighted ids
WEIGHTED_METHODS = {
    "full": None,
    "hashing_trick": HashingTrick(rows=8),
    "multi_hash": MultiHash(rows=8, hashes=2),
    "qr_add": QREmbedding(collisions=4, operation="add"),
    "qr_concat": QREmbedding(collisions=4, operation="concat"),
    "multiplex": Multiplexed(rows=24),
    "managed_collision": ManagedCollision(rows=16),
}


def _weighted(kjt: KeyedJaggedTensor, seed: int) -> KeyedJaggedTensor:
    weights = torch.rand(kjt.values().numel(), generator=torch.Generator().manual_seed(seed))
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights)


def _direct_weighted_pooling(ebc: nn.Module, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Bag by bag: the sum of each id's own vector (looked up alone, weight 1) times its weight."""
    columns = []
    for name, jagged in kjt.to_dict().items():
        ids, weights = jagged.values(), jagged.weights()
        alone = KeyedJaggedTensor(
            keys=kjt.keys(),
            values=torch.cat([ids if key == name else torch.zeros_like(ids) for key in kjt.keys()]),
            lengths=torch.ones(len(kjt.keys()) * len(ids), dtype=torch.int64),
            weights=torch.ones(len(kjt.keys()) * len(ids)),
        )
        vectors = ebc(alone)[name]
        bags, start = [], 0
        for length in jagged.lengths().tolist():
            bags.append((vectors[start : start + length] * weights[start : start + length, None]).sum(0))
            start += length
        columns.append(torch.stack(bags))
    return torch.cat(columns, 1)


@pytest.mark.parametrize("method", sorted(WEIGHTED_METHODS))
def test_weighted_ids_pool_with_their_weights(method):
    torch.manual_seed(0)
    features = tuple(f for f in FEATURES if f.name != "item")
    configs = [c for c in bag_configs() if c.name != "t_item"]
    ebc = CompressedEmbeddingBagCollection(tables=configs, method=WEIGHTED_METHODS[method], is_weighted=True)
    assert ebc.is_weighted()
    kjt = _weighted(random_kjt(features, batch=BATCH, seed=5), seed=6)
    expected = _direct_weighted_pooling(ebc, kjt)
    torch.testing.assert_close(ebc(kjt).values(), expected, rtol=0, atol=1e-6)
    unweighted = ebc(KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=torch.ones_like(kjt.weights())))
    assert not torch.allclose(unweighted.values(), expected)
    model = nn.Sequential()
    model.ebc = ebc
    dmp = embtab.fuse(model, embtab.SparseOptimizer("sgd", lr=LR))
    fused = dmp.module.ebc(kjt).values()
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
    before = physical_weights(dmp)
    fused.square().sum().backward()
    assert any(not torch.equal(before[n], w) for n, w in physical_weights(dmp).items())


def test_weighted_ids_name_the_method_that_cannot_take_them():
    mult = QREmbedding(collisions=4, operation="mult")
    with pytest.raises(ValueError, match="table 'user': weighted ids need a method whose combine commutes.*QREmbedding\\(.*operation='mult'"):
        CompressedEmbeddingBagCollection(tables=bag_configs(), table_methods={"t_user": mult}, is_weighted=True)
    with pytest.raises(ValueError, match="table 'item': weighted ids need sum pooling; features \\['item'\\] are not"):
        CompressedEmbeddingBagCollection(tables=bag_configs(mean=True), is_weighted=True)
    kjt = random_kjt(FEATURES, batch=BATCH, seed=7)
    weighted = CompressedEmbeddingBagCollection(tables=bag_configs(), is_weighted=True)
    with pytest.raises(ValueError, match="ids came without weights, but the tables were built with weighted=True"):
        weighted(kjt)
    with pytest.raises(ValueError, match="ids came with weights, but the tables were built with weighted=False"):
        CompressedEmbeddingBagCollection(tables=bag_configs())(_weighted(kjt, seed=8))


# ------------------------------------------------------------------------------ train pipeline
def _pipeline_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    ebc = CompressedEmbeddingBagCollection(tables=bag_configs(), method=QREmbedding(collisions=4, operation="add"))
    dmp = embtab.fuse(DLRMTrain(DLRM(ebc, DENSE, [16, DIM], [16, 1])), embtab.SparseOptimizer("rowwise_adagrad", lr=LR))
    return dmp, torch.optim.SGD(embtab.dense_parameters(dmp), lr=LR)


def test_torchrec_train_pipeline_trains_like_a_plain_loop():
    """torchrec's TrainPipelineSparseDist runs a model on embtab tables (CPU) and takes exactly the
    steps of a plain loop. It pipelines nothing: a sharded collection is overlapped only when its
    input is the batch's own KeyedJaggedTensor, and embtab's collections look up remapped ids."""
    batches = [Batch(dense_features=d, sparse_features=s, labels=y) for s, d, y in map(batch, range(4))]
    dmp, optimizer = _pipeline_model()
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
    remaining = iter(batches)
    pipelined = [pipeline.progress(remaining)[0] for _ in batches]
    assert pipeline._pipelined_modules == []

    dmp_plain, optimizer_plain = _pipeline_model()
    plain = []
    for item in batches:
        optimizer_plain.zero_grad()
        loss, _ = dmp_plain(item)
        loss.backward()
        optimizer_plain.step()
        plain.append(loss.detach())
    torch.testing.assert_close(torch.stack(pipelined), torch.stack(plain), rtol=0, atol=1e-6)
    for name, weight in physical_weights(dmp_plain).items():
        torch.testing.assert_close(physical_weights(dmp)[name], weight, rtol=0, atol=1e-6)
