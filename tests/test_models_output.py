"""Every registered model follows the model -> trainer contract: logits, or logits and aux loss."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from models import MODELS, CTRModel, ModelOutput, build_model

POOLED = (embtab.FeatureSpec("c1", 20), embtab.FeatureSpec("c2", 10))
BEHAVIOUR = (
    embtab.FeatureSpec("item_id", 30),
    embtab.FeatureSpec("hist_item_ids", 30, pooling="none", table="item_id"),
)
PAIRS = {"query_features": ("item_id",), "history_features": ("hist_item_ids",)}
SETTINGS = {
    "din": (BEHAVIOUR, {**PAIRS, "mlp_hidden": (4,), "attention_hidden": (4,), "mba_lambda": 0.1,
                        "id_counts": {"item_id": torch.ones(30)}}),
    "embedding_mlp": (BEHAVIOUR, {**PAIRS, "mlp_hidden": (4,)}),
    "dlrm": (POOLED, {"dense_dim": 2, "bottom_hidden": (4,), "top_hidden": (4,)}),
    "torchrec_dlrm": (POOLED, {"dense_dim": 2, "bottom_hidden": (4,), "top_hidden": (4,)}),
}


def batch(features) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    lengths = torch.tensor([1, 1, 2, 3])  # two samples, two features
    return KeyedJaggedTensor.from_lengths_sync([f.name for f in features], ids, lengths), torch.ones(2, 2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_returns_logits_and_any_aux_loss_as_values(name):
    assert set(SETTINGS) == set(MODELS)
    features, kwargs = SETTINGS[name]
    torch.manual_seed(0)
    model = build_model(name, embtab.EmbeddingTables(embtab.EmbeddingSpec(features=features, dim=4)), **kwargs)
    assert isinstance(model, CTRModel)
    kjt, dense = batch(features)
    dense = dense if kwargs.get("dense_dim") else torch.empty(2, 0)
    model.eval()
    logits = model(kjt, dense)
    out = model(kjt, dense, with_aux_loss=True)
    assert isinstance(out, ModelOutput) and out.aux_loss is None and torch.equal(out.logits, logits)
    model.train()
    out = model(kjt, dense, with_aux_loss=True)
    if name == "din":  # the regularizer is the forward's auxiliary loss, as `regularization` computes it
        torch.testing.assert_close(out.aux_loss, model.regularization(kjt))
        assert float(out.loss(torch.tensor(1.0))) == pytest.approx(1.0 + float(out.aux_loss))
    else:
        assert out.aux_loss is None and out.loss(torch.tensor(1.0)) == 1.0
