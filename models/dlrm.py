"""DLRM (Naumov et al., 2019): dense MLP, pairwise dot interactions, top MLP."""

from __future__ import annotations

from typing import Sequence

import torch
from torchrec import KeyedJaggedTensor

from embtab import EmbeddingTables
from models.layers import MLP, check_dense
from models.output import CTRModel, ModelOutput


class DLRM(CTRModel):
    """Deep Learning Recommendation Model for data with dense features (Criteo-like).

    A bottom MLP maps the dense features to the embedding width; the dot products of every pair of
    vectors among [bottom output, every sparse feature's vector] (no self-products), next to the
    bottom output, feed a top MLP that returns one logit. Sequence features are sum-pooled first,
    like the multi-hot bags of DLRM's ``EmbeddingBag``. Without dense features (``dense_dim=0``)
    only the sparse vectors interact.

    Every sparse feature must have the same output width (``ValueError`` otherwise), the dot
    product needs it.

    Args:
        embeddings: the model's embedding layer.
        dense_dim: number of dense features (13 on Criteo); 0 drops the bottom MLP.
        bottom_hidden: hidden widths of the bottom MLP; its last layer is the embedding width.
        top_hidden: hidden widths of the top MLP, which ends in one logit.
        dropout: after every hidden layer of the top MLP.

    Example::

        spec = EmbeddingSpec(features=(FeatureSpec("c1", 10), FeatureSpec("c2", 20)), dim=8)
        model = DLRM(EmbeddingTables(spec), dense_dim=3, bottom_hidden=(16,), top_hidden=(16,))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["c1", "c2"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])
        )
        model(kjt, torch.randn(2, 3)).shape   # torch.Size([2])
    """

    def __init__(
        self,
        embeddings: EmbeddingTables,
        dense_dim: int = 13,
        bottom_hidden: Sequence[int] = (64, 32),
        top_hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.dense_dim = dense_dim
        self.dim = _common_width(embeddings)
        self.sequence_features = [f.name for f in embeddings.spec.features if f.is_sequence]
        self.bottom = MLP(dense_dim, (*bottom_hidden, self.dim), "relu") if dense_dim else None
        vectors = len(embeddings.spec.features) + (1 if dense_dim else 0)
        if vectors < 2:
            raise ValueError(f"DLRM needs at least two vectors to interact, got {vectors}")
        left, right = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)
        top_input = left.numel() + (self.dim if dense_dim else 0)
        self.top = MLP(top_input, top_hidden, "relu", dropout, output_dim=1)

    def outputs(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> ModelOutput:
        """Logits ``[B]`` for sparse ids `sparse` and dense features `dense` ``[B, dense_dim]``."""
        check_dense(dense, self.dense_dim)
        out = self.embeddings(sparse)
        batch = dense.shape[0]
        vectors = [out.pooled.values().view(batch, -1, self.dim)] if out.pooled is not None else []
        for name in self.sequence_features:
            jagged = out.sequence[name]
            summed = torch.segment_reduce(jagged.values(), "sum", lengths=jagged.lengths())
            vectors.append(summed.unsqueeze(1))
        bottom = [self.bottom(dense)] if self.bottom is not None else []
        stacked = torch.cat([b.unsqueeze(1) for b in bottom] + vectors, dim=1)
        interactions = self.interact(stacked)
        return ModelOutput(self.top(torch.cat(bottom + [interactions], dim=1)).squeeze(-1))

    def interact(self, vectors: torch.Tensor) -> torch.Tensor:
        """Dot products of every pair ``i < j`` of `vectors` ``[B, F, D]``: ``[B, F * (F - 1) / 2]``."""
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        return gram[:, self.left, self.right]


def _common_width(embeddings: EmbeddingTables) -> int:
    widths = {f.name: embeddings.output_dim(f.name) for f in embeddings.spec.features}
    if len(set(widths.values())) != 1:
        raise ValueError(
            f"DLRM's dot interaction needs one width for every sparse feature; got widths {widths}"
        )
    return next(iter(widths.values()))
