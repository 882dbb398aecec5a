"""torchrec's own models over embtab tables, with embtab's model signature for `experiments.ctr`.

The model is torchrec's (`torchrec.models.dlrm.DLRM`, unchanged); only its collection is embtab's
`CompressedEmbeddingBagCollection` around the given `EmbeddingTables`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchrec import KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

from embtab import CompressedEmbeddingBagCollection, EmbeddingTables
from models.output import CTRModel, ModelOutput


class TorchrecDLRM(CTRModel):
    """torchrec's DLRM on `embeddings`: ``(sparse, dense [B, dense_dim]) -> logits [B]``.

    Args:
        embeddings: the model's tables; every feature pooled, all of one width.
        dense_dim: number of dense features (torchrec's DLRM needs at least one).
        bottom_hidden: hidden widths of the dense arch; its last layer is the embedding width.
        top_hidden: hidden widths of the over arch, which ends in one logit.

    Example::

        spec = EmbeddingSpec(features=(FeatureSpec("c1", 10), FeatureSpec("c2", 20)), dim=8)
        model = TorchrecDLRM(EmbeddingTables(spec), dense_dim=3, bottom_hidden=(16,), top_hidden=(16,))
    """

    def __init__(
        self,
        embeddings: EmbeddingTables,
        dense_dim: int = 13,
        bottom_hidden: Sequence[int] = (64, 32),
        top_hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        if dense_dim < 1:
            raise ValueError(f"torchrec's DLRM needs dense features; got dense_dim={dense_dim}, expected >= 1")
        collection = CompressedEmbeddingBagCollection(embeddings=embeddings)
        width = collection.embedding_bag_configs()[0].embedding_dim
        self.dlrm = DLRM(
            embedding_bag_collection=collection,
            dense_in_features=dense_dim,
            dense_arch_layer_sizes=[*bottom_hidden, width],
            over_arch_layer_sizes=[*top_hidden, 1],
        )

    def outputs(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.dlrm(dense_features=dense, sparse_features=sparse).squeeze(-1))
