"""DIN: the activation unit against a per-sample loop, masking, shared tables, MBA regularization,
end-to-end logits against direct table indexing, and fused training."""

import math

import pytest
import torch
from torch.nn import functional as F
from torchrec import JaggedTensor, KeyedJaggedTensor

import embtab
from models import DIN, build_model
from models.layers import AttentionUnit

FEATURES = (
    embtab.FeatureSpec("user_id", 30, required=True),
    embtab.FeatureSpec("item_id", 40, required=True),
    embtab.FeatureSpec("item_genre", 6, required=True),
    embtab.FeatureSpec("gender", 2, required=True),
    embtab.FeatureSpec("hist_item_ids", 40, pooling="none", table="item_id"),
    embtab.FeatureSpec("hist_genres", 6, pooling="none", table="item_genre"),
)
GENRE = torch.arange(40) % 6  # each item's genre, so histories stay aligned


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(batch: int, seed: int, max_len: int = 5) -> KeyedJaggedTensor:
    """Single-id profile and candidate, a history of 0..max_len items with their genres."""
    g = torch.Generator().manual_seed(seed)
    single = [torch.randint(0, f.cardinality, (batch,), generator=g) for f in FEATURES[:4]]
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    history = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
    single[2] = GENRE[single[1]]
    ones = torch.ones(batch, dtype=torch.long)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in FEATURES],
        values=torch.cat(single + [history, GENRE[history]]),
        lengths=torch.cat([ones] * 4 + [lengths, lengths]),
    )


def make_tables(dim: int = 8) -> embtab.EmbeddingTables:
    torch.manual_seed(0)
    return embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=dim))


def weight(tables: embtab.EmbeddingTables, table: str) -> torch.Tensor:
    if tables.ebc is not None and table in tables.ebc.embedding_bags:
        return tables.ebc.embedding_bags[table].weight
    return next(ec.embeddings[table].weight for ec in tables.ecs.values() if table in ec.embeddings)


def randomize_statistics(module: torch.nn.Module, seed: int) -> None:
    """Give every Dice non-trivial parameters and moving averages, then switch to eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.3)
            if name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
        for name, parameter in module.named_parameters():
            if name.endswith("alpha"):
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    module.eval()


def reference_attention(unit: AttentionUnit, query, keys, lengths):
    """Per sample and position: MLP over [q, k, q - k, q * k], then masked (soft)max pooling."""
    outputs = []
    for b in range(query.shape[0]):
        q, ks = query[b], keys[b, : int(lengths[b])]
        scores = []
        for k in ks:
            hidden = F.linear(torch.cat([q, k, q - k, q * k]), unit.first.weight, unit.first.bias)
            hidden = unit.first_activation(hidden.unsqueeze(0))
            scores.append(unit.rest(hidden)[0, 0])
        if not scores:
            outputs.append(torch.zeros_like(q))
            continue
        scores = torch.stack(scores)
        if unit.softmax:
            scores = torch.softmax(scores / (math.sqrt(q.numel()) if unit.scale else 1.0), dim=0)
        outputs.append((scores.unsqueeze(1) * ks).sum(0))
    return torch.stack(outputs)


@pytest.mark.parametrize(
    "activation,softmax,scale", [("dice", False, True), ("sigmoid", True, True), ("prelu", True, False)]
)
def test_attention_unit_equals_per_sample_loop(activation, softmax, scale):
    torch.manual_seed(0)
    unit = AttentionUnit(6, hidden=(8, 5), activation=activation, softmax=softmax, scale=scale)
    randomize_statistics(unit, seed=1)
    query, keys = torch.randn(7, 6), torch.randn(7, 4, 6)
    lengths = torch.tensor([4, 0, 1, 3, 2, 4, 1])
    mask = torch.arange(4) < lengths.unsqueeze(1)
    torch.testing.assert_close(unit(query, keys, mask), reference_attention(unit, query, keys, lengths))


@pytest.mark.parametrize("softmax", [False, True])
def test_padded_positions_get_no_weight(softmax):
    torch.manual_seed(0)
    unit = AttentionUnit(4, hidden=(6,), softmax=softmax)
    unit.eval()
    query, keys = torch.randn(5, 4), torch.randn(5, 3, 4)
    lengths = torch.tensor([3, 2, 1, 0, 2])
    mask = torch.arange(3) < lengths.unsqueeze(1)
    weights = unit.weights(query, keys, mask)
    assert bool((weights[~mask] == 0).all()) and bool((weights[mask] != 0).all())
    garbage = torch.where(mask.unsqueeze(-1), keys, torch.full_like(keys, 1e3))
    torch.testing.assert_close(unit(query, garbage, mask), unit(query, keys, mask))
    assert torch.equal(unit(query, keys, mask)[3], torch.zeros(4))  # empty history pools to zero
    if softmax:
        torch.testing.assert_close(weights.sum(1), (lengths > 0).float())


def test_din_logits_equal_direct_computation_on_the_tables():
    tables = make_tables()
    model = DIN(tables, attention_hidden=(8, 4), mlp_hidden=(16,), dense_dim=2)
    randomize_statistics(model, seed=2)
    kjt, dense = make_batch(6, seed=0), torch.randn(6, 2)
    ids = kjt.to_dict()
    rows = {name: weight(tables, tables.spec.feature(name).table_name)[jt.values()] for name, jt in ids.items()}
    lengths = ids["hist_item_ids"].lengths()
    expected = []
    for b in range(6):
        query = torch.cat([rows["item_id"][b], rows["item_genre"][b]])
        start, end = int(lengths[:b].sum()), int(lengths[: b + 1].sum())
        keys = torch.cat([rows["hist_item_ids"][start:end], rows["hist_genres"][start:end]], dim=1)
        mask = torch.ones(1, end - start, dtype=torch.bool)
        interest = model.attention(query.unsqueeze(0), keys.unsqueeze(0), mask)[0]
        pooled = [rows[f.name][b] for f in FEATURES if not f.is_sequence]
        expected.append(model.head(torch.cat(pooled + [interest, dense[b]]).unsqueeze(0))[0, 0])
    assert tables(kjt).pooled.keys() == ["user_id", "item_id", "item_genre", "gender"]
    torch.testing.assert_close(model(kjt, dense), torch.stack(expected))


def test_candidate_and_history_share_one_table():
    tables = make_tables()
    assert set(tables.physical_tables) == {"user_id", "item_id", "item_genre", "gender"}
    model = DIN(tables, attention_hidden=(8,), mlp_hidden=(8,))
    kjt = make_batch(8, seed=1)
    model(kjt, torch.empty(8, 0)).sum().backward()
    ids = kjt.to_dict()
    touched = (weight(tables, "item_id").grad.abs().sum(1) > 0).nonzero().flatten()
    used = torch.cat([ids["item_id"].values(), ids["hist_item_ids"].values()]).unique()
    assert torch.equal(touched, used)  # candidate-only and history-only rows of one table
    spec = embtab.EmbeddingSpec(
        features=FEATURES[:4] + (embtab.FeatureSpec("hist_item_ids", 40, pooling="none"), FEATURES[5]), dim=8
    )
    message = r"'hist_item_ids' uses table 'hist_item_ids' but its query 'item_id' uses 'item_id'"
    with pytest.raises(ValueError, match=message):
        DIN(embtab.EmbeddingTables(spec))


def test_bad_inputs_are_clear_errors():
    tables = make_tables()
    model = DIN(tables, attention_hidden=(4,), mlp_hidden=(4,))
    with pytest.raises(ValueError, match=r"dense features have shape \(2, 3\); expected \[B, 0\]"):
        model(make_batch(2, seed=0), torch.zeros(2, 3))
    misaligned = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in FEATURES],
        values=torch.tensor([0, 1, 2, 3, 2, 3, 0, 1, 5, 6, 7, 5, 0, 1]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 2]),
    )
    with pytest.raises(ValueError, match="'hist_item_ids' and 'hist_genres' have different lengths"):
        model(misaligned, torch.empty(2, 0))
    with pytest.raises(ValueError, match=r"sequence features \['hist_genres'\] are not in history_features"):
        DIN(tables, query_features=("item_id",), history_features=("hist_item_ids",))
    with pytest.raises(ValueError, match="mba_lambda > 0 needs id_counts"):
        DIN(tables, mba_lambda=0.1)
    with pytest.raises(ValueError, match=r"id_counts\['item_id'\] has shape \(39,\); expected \(40,\)"):
        DIN(tables, mba_lambda=0.1, id_counts={"item_id": torch.ones(39)})


def test_mini_batch_aware_regularization_equals_direct_computation():
    tables = make_tables()
    counts = {"hist_item_ids": torch.arange(40) % 7 + 1, "item_genre": torch.arange(6) + 2}
    model = DIN(tables, attention_hidden=(4,), mlp_hidden=(4,), mba_lambda=0.05, id_counts=counts)
    kjt = make_batch(16, seed=3)
    ids = kjt.to_dict()
    expected = torch.zeros(())
    for table, features, n in (("item_id", ("item_id", "hist_item_ids"), counts["hist_item_ids"]),
                               ("item_genre", ("item_genre", "hist_genres"), counts["item_genre"])):
        present = torch.cat([ids[f].values() for f in features]).unique()
        w = weight(tables, table)
        expected = expected + (w[present].detach().square().sum(1) / n[present]).sum()
    expected = 0.05 * expected
    lookups = []
    tables.register_forward_hook(lambda *args: lookups.append(1))
    after_forward = model(kjt, torch.empty(16, 0), with_aux_loss=True).aux_loss
    assert len(lookups) == 1  # the forward's own lookup
    torch.testing.assert_close(after_forward, expected)
    fresh = model.regularization(kjt)  # on its own: looks the batch up again
    assert len(lookups) == 2
    torch.testing.assert_close(fresh, expected)
    fresh.backward()
    item = weight(tables, "item_id")
    direct = torch.zeros_like(item)
    present = torch.cat([ids["item_id"].values(), ids["hist_item_ids"].values()]).unique()
    direct[present] = 2 * 0.05 * item.detach()[present] / counts["hist_item_ids"][present].unsqueeze(1)
    torch.testing.assert_close(item.grad, direct)
    assert weight(tables, "user_id").grad is None or not weight(tables, "user_id").grad.any()


def test_regularization_is_zero_without_lambda_and_rejects_multi_hot_pooled():
    tables = make_tables()
    kjt = make_batch(4, seed=0)
    assert float(DIN(tables, attention_hidden=(4,), mlp_hidden=(4,)).regularization(kjt)) == 0.0
    counts = {"user_id": torch.ones(30)}
    model = DIN(tables, attention_hidden=(4,), mlp_hidden=(4,), mba_lambda=0.1, id_counts=counts)
    ids = kjt.to_dict()
    ids["user_id"] = JaggedTensor(values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 1, 1, 1]))
    with pytest.raises(ValueError, match="pooled feature 'user_id' has a bag of 2 ids"):
        model.regularization(KeyedJaggedTensor.from_jt_dict(ids))


def learnable_batches(count: int, batch: int):
    """Label: the candidate's genre appears in the history (learnable through the attention)."""
    batches = []
    for seed in range(count):
        kjt = make_batch(batch, seed=100 + seed)
        ids = kjt.to_dict()
        hist, lengths = ids["hist_genres"].values(), ids["hist_genres"].lengths()
        owner = torch.repeat_interleave(torch.arange(batch), lengths)
        hit = torch.zeros(batch).index_add_(0, owner, (hist == ids["item_genre"].values()[owner]).float())
        batches.append((kjt, torch.empty(batch, 0), (hit > 0).float()))
    return batches


@pytest.mark.parametrize("model_name", ["din"])
def test_fused_training_reduces_loss(model_name):
    tables = make_tables()
    counts = {"item_id": torch.ones(40), "item_genre": torch.ones(6)}
    model = build_model(
        model_name, tables, attention_hidden=(16, 8), mlp_hidden=(32,), mba_lambda=1e-4, id_counts=counts
    )
    dmp = embtab.fuse(model, embtab.SparseOptimizer("rowwise_adagrad", lr=0.1))
    dense = torch.optim.Adam(embtab.dense_parameters(dmp), lr=0.01)
    batches = learnable_batches(4, 128)

    def mean_loss() -> float:
        dmp.eval()
        with torch.no_grad():
            losses = [F.binary_cross_entropy_with_logits(dmp(k, d), y) for k, d, y in batches]
        dmp.train()
        return float(torch.stack(losses).mean())

    before = mean_loss()
    item_key = "embeddings.ecs.dim8.embeddings.item_id.weight"
    item_before = dmp.state_dict()[item_key].local_shards()[0].tensor.clone()
    for _ in range(8):
        for kjt, d, y in batches:
            dense.zero_grad()
            out = dmp(kjt, d, with_aux_loss=True)
            loss = out.loss(F.binary_cross_entropy_with_logits(out.logits, y))
            loss.backward()
            dense.step()
    after = mean_loss()
    item_after = dmp.state_dict()[item_key].local_shards()[0].tensor
    assert after < 0.8 * before, (before, after)
    assert not torch.equal(item_after, item_before)  # the fused optimizer updated the shared table
