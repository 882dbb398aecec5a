"""Embedding&MLP and DLRM: logits against direct table indexing, interactions against a pair loop,
errors, the registry, and fused DLRM training."""

import pytest
import torch
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor

import embtab
from models import DLRM, MODELS, EmbeddingMLP, build_model

SEQUENCE_FEATURES = (
    embtab.FeatureSpec("user_id", 20, required=True),
    embtab.FeatureSpec("item_id", 30, required=True),
    embtab.FeatureSpec("hist_item_ids", 30, pooling="none", table="item_id"),
)
CRITEO_LIKE = (
    embtab.FeatureSpec("c1", 50),
    embtab.FeatureSpec("c2", 10, required=True),
    embtab.FeatureSpec("c3", 25),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_kjt(features, batch: int, seed: int, max_len: int = 3) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = [
        torch.ones(batch, dtype=torch.long) if f.required else torch.randint(0, max_len + 1, (batch,), generator=g)
        for f in features
    ]
    values = [torch.randint(0, f.cardinality, (int(n.sum()),), generator=g) for f, n in zip(features, lengths)]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features], values=torch.cat(values), lengths=torch.cat(lengths)
    )


def tables_of(features, dim: int = 8) -> embtab.EmbeddingTables:
    torch.manual_seed(0)
    return embtab.EmbeddingTables(embtab.EmbeddingSpec(features=features, dim=dim))


def weight(tables: embtab.EmbeddingTables, table: str) -> torch.Tensor:
    if tables.ebc is not None and table in tables.ebc.embedding_bags:
        return tables.ebc.embedding_bags[table].weight
    return next(ec.embeddings[table].weight for ec in tables.ecs.values() if table in ec.embeddings)


def bag_sums(tables: embtab.EmbeddingTables, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    """Per feature, the sum of its bag's rows for every sample, by a loop over samples."""
    sums = {}
    for name, jt in kjt.to_dict().items():
        w = weight(tables, tables.spec.feature(name).table_name).detach()
        sums[name] = torch.stack([w[ids].sum(0) for ids in jt.to_dense()])
    return sums


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_embedding_mlp_logits_equal_direct_computation(pooling):
    tables = tables_of(SEQUENCE_FEATURES)
    model = EmbeddingMLP(tables, ("item_id",), ("hist_item_ids",), mlp_hidden=(16, 8), activation="prelu",
                         history_pooling=pooling)
    model.eval()
    kjt = random_kjt(SEQUENCE_FEATURES, batch=9, seed=0, max_len=4)
    sums = bag_sums(tables, kjt)
    history = sums["hist_item_ids"]
    if pooling == "mean":
        history = history / kjt.to_dict()["hist_item_ids"].lengths().clamp(min=1).unsqueeze(1)
    expected = model.head(torch.cat([sums["user_id"], sums["item_id"], history], dim=1)).squeeze(1)
    logits = model(kjt, torch.empty(9, 0))
    assert logits.shape == (9,)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="history_pooling must be 'sum' or 'mean'"):
        EmbeddingMLP(tables, ("item_id",), ("hist_item_ids",), history_pooling="max")


def test_dlrm_interaction_equals_pair_loop():
    model = DLRM(tables_of(CRITEO_LIKE), dense_dim=4, bottom_hidden=(8,), top_hidden=(8,))
    torch.manual_seed(1)
    vectors = torch.randn(5, 4, 8)
    expected = torch.stack([
        torch.stack([vectors[b, i] @ vectors[b, j] for i in range(4) for j in range(i + 1, 4)]) for b in range(5)
    ])
    torch.testing.assert_close(model.interact(vectors), expected)


def test_dlrm_logits_equal_direct_computation():
    tables = tables_of(CRITEO_LIKE)
    model = DLRM(tables, dense_dim=4, bottom_hidden=(16,), top_hidden=(16, 8))
    kjt, dense = random_kjt(CRITEO_LIKE, batch=6, seed=2), torch.randn(6, 4)
    sums = bag_sums(tables, kjt)
    bottom = model.bottom(dense)
    vectors = [bottom] + [sums[f.name] for f in CRITEO_LIKE]
    pairs = [(vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4)]
    expected = model.top(torch.cat([bottom, torch.stack(pairs, 1)], dim=1)).squeeze(1)
    logits = model(kjt, dense)
    assert logits.shape == (6,) and bottom.shape == (6, 8)
    torch.testing.assert_close(logits, expected)


def test_dlrm_sum_pools_sequences_and_runs_without_dense():
    tables = tables_of(SEQUENCE_FEATURES)
    model = DLRM(tables, dense_dim=0, top_hidden=(8,))
    kjt = random_kjt(SEQUENCE_FEATURES, batch=5, seed=3)
    sums = bag_sums(tables, kjt)
    vectors = [sums["user_id"], sums["item_id"], sums["hist_item_ids"]]
    pairs = [(vectors[i] * vectors[j]).sum(1) for i in range(3) for j in range(i + 1, 3)]
    torch.testing.assert_close(model(kjt, torch.empty(5, 0)), model.top(torch.stack(pairs, 1)).squeeze(1))
    assert model.bottom is None
    with pytest.raises(ValueError, match=r"dense features have shape \(5, 2\); expected \[B, 0\]"):
        model(kjt, torch.zeros(5, 2))


def test_dlrm_rejects_mixed_widths(monkeypatch):
    tables = tables_of(CRITEO_LIKE)
    monkeypatch.setattr(tables, "output_dim", lambda name: 4 if name == "c2" else 8)
    message = r"one width for every sparse feature; got widths \{'c1': 8, 'c2': 4, 'c3': 8\}"
    with pytest.raises(ValueError, match=message):
        DLRM(tables, dense_dim=2)


def test_registry_builds_each_model_and_rejects_unknown_names():
    assert set(MODELS) == {"din", "embedding_mlp", "dlrm", "torchrec_dlrm"}
    tables = tables_of(CRITEO_LIKE)
    assert isinstance(build_model("dlrm", tables, dense_dim=3), DLRM)
    seq = tables_of(SEQUENCE_FEATURES)
    model = build_model("embedding_mlp", seq, query_features=("item_id",), history_features=("hist_item_ids",))
    assert isinstance(model, EmbeddingMLP)
    message = r"unknown model 'dien'; expected one of \['din', 'dlrm', 'embedding_mlp', 'torchrec_dlrm'\]"
    with pytest.raises(ValueError, match=message):
        build_model("dien", tables)


def test_fused_dlrm_training_reduces_loss():
    tables = tables_of(CRITEO_LIKE)
    model = DLRM(tables, dense_dim=4, bottom_hidden=(16,), top_hidden=(16,))
    dmp = embtab.fuse(model, embtab.SparseOptimizer("rowwise_adagrad", lr=0.1))
    optimizer = torch.optim.Adam(embtab.dense_parameters(dmp), lr=0.01)
    g = torch.Generator().manual_seed(5)
    batches = []
    for seed in range(4):
        kjt, dense = random_kjt(CRITEO_LIKE, batch=128, seed=10 + seed), torch.randn(128, 4, generator=g)
        labels = ((kjt.to_dict()["c2"].values() % 2 == 0) ^ (dense[:, 0] > 0)).float()  # id x dense interaction
        batches.append((kjt, dense, labels))

    def mean_loss() -> float:
        with torch.no_grad():
            losses = [F.binary_cross_entropy_with_logits(dmp(k, d), y) for k, d, y in batches]
            return float(torch.stack(losses).mean())

    before = mean_loss()
    for _ in range(10):
        for kjt, dense, labels in batches:
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(dmp(kjt, dense), labels).backward()
            optimizer.step()
    assert mean_loss() < 0.7 * before
