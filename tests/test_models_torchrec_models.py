"""TorchrecDLRM: torchrec's own DLRM on embtab tables; it computes what embtab's DLRM computes."""

import pytest
import torch

import embtab
from embtab.methods.qr import QREmbedding
from embtab.testing import random_kjt
from models import DLRM, MODELS, TorchrecDLRM

FEATURES = (embtab.FeatureSpec("c1", 50), embtab.FeatureSpec("c2", 10), embtab.FeatureSpec("c3", 25))


def _tables(method=None) -> embtab.EmbeddingTables:
    torch.manual_seed(0)
    return embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=8, method=method))


def test_torchrec_dlrm_equals_embtabs_dlrm_with_the_same_weights():
    """Same arches (dense MLP, pairwise dots with the dense vector, over MLP): copying embtab's
    DLRM's dense layers into torchrec's, in order, gives the same logits on the same tables."""
    tables = _tables(QREmbedding(collisions=4))
    ours = DLRM(tables, dense_dim=3, bottom_hidden=(16,), top_hidden=(16,))
    theirs = TorchrecDLRM(tables, dense_dim=3, bottom_hidden=(16,), top_hidden=(16,))
    table_parameters = {id(p) for p in tables.parameters()}
    source = [p for p in ours.parameters() if id(p) not in table_parameters]
    target = [p for p in theirs.parameters() if id(p) not in table_parameters]
    assert [p.shape for p in source] == [p.shape for p in target]
    with torch.no_grad():
        for mine, copy in zip(target, source):
            mine.copy_(copy)
    kjt, dense = random_kjt(FEATURES, batch=5, seed=1), torch.randn(5, 3)
    logits = theirs(kjt, dense)
    assert logits.shape == (5,)
    torch.testing.assert_close(logits, ours(kjt, dense), rtol=0, atol=1e-6)
    assert MODELS["torchrec_dlrm"] is TorchrecDLRM


def test_torchrec_dlrm_needs_dense_features():
    with pytest.raises(ValueError, match="dense_dim=0"):
        TorchrecDLRM(_tables(), dense_dim=0)
