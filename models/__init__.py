"""CTR models over embtab tables: DIN, its Embedding&MLP base model, DLRM, torchrec's own DLRM,
and their layers.

Every model takes an `embtab.EmbeddingTables` (built by the caller) and maps
``(sparse: KeyedJaggedTensor, dense: Tensor [B, n_dense])`` to logits ``[B]``; with
``with_aux_loss=True`` to a `ModelOutput` (logits and any auxiliary loss, see `models.output`).

Example::

    model = build_model("din", EmbeddingTables(spec), mlp_hidden=(64, 32))  # spec: see `DIN`
"""

from __future__ import annotations

from typing import Any

from embtab import EmbeddingTables
from models.din import DIN, BehaviourModel, EmbeddingMLP
from models.dlrm import DLRM
from models.layers import MLP, AttentionUnit, Dice
from models.output import CTRModel, ModelOutput
from models.regularization import MiniBatchAwareL2
from models.torchrec_models import TorchrecDLRM

MODELS: dict[str, type[CTRModel]] = {
    "din": DIN,
    "embedding_mlp": EmbeddingMLP,
    "dlrm": DLRM,
    "torchrec_dlrm": TorchrecDLRM,
}


def build_model(name: str, embeddings: EmbeddingTables, **kwargs: Any) -> CTRModel:
    """The model registered as `name` in `MODELS`, on `embeddings`, with constructor `kwargs`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](embeddings, **kwargs)


__all__ = [
    "AttentionUnit",
    "BehaviourModel",
    "CTRModel",
    "DIN",
    "DLRM",
    "Dice",
    "EmbeddingMLP",
    "MLP",
    "MODELS",
    "MiniBatchAwareL2",
    "ModelOutput",
    "TorchrecDLRM",
    "build_model",
]
