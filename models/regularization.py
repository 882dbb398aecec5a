"""Mini-batch aware L2 regularization of embeddings (DIN paper, section 4.3).

L2 on every embedding row costs a pass over whole tables each step; DIN's version regularizes only
the rows a batch uses, each scaled by its global frequency:
``lambda * sum_{j in batch} ||w_j||^2 / n_j``. It is computed on the vectors the batch looked up,
so its gradient flows back through the (fused) lookup like the loss's: each occurrence of id ``j``
adds ``||e||^2 / (n_j * c_j)``, ``c_j`` its count in the batch, which sums to ``||w_j||^2 / n_j``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torchrec import JaggedTensor, KeyedJaggedTensor

from embtab import EmbeddingOutput, EmbeddingSpec, FeatureSpec


class MiniBatchAwareL2(nn.Module):
    """The DIN mini-batch aware L2 term for the tables named in `id_counts`.

    Args:
        spec: the embedding spec of the model's `EmbeddingTables`.
        id_counts: per table, the global occurrence count of every id (``[cardinality]``). A key
            may name the table or any feature using it; every feature of that table (candidate
            and history alike) is regularized. Counts below 1 are taken as 1.
        lam: the regularization strength lambda (0.01 in the paper).

    Pooled features must carry at most one id per sample (their pooled vector is then the id's
    vector); sequence features may carry any number. With a compressed table the term applies to
    the logical (combined) vectors.

    Example::

        spec = EmbeddingSpec(
            features=(FeatureSpec("item", 10), FeatureSpec("hist", 10, "none", "item")), dim=4
        )
        tables = EmbeddingTables(spec)
        mba = MiniBatchAwareL2(spec, {"item": torch.arange(1, 11)}, lam=0.01)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item", "hist"], values=torch.tensor([1, 2, 1, 3]), lengths=torch.tensor([1, 1, 2, 0])
        )
        mba(kjt, tables(kjt))   # 0.01 * (|w1|^2 / 2 + |w2|^2 / 3 + |w3|^2 / 4)
    """

    def __init__(self, spec: EmbeddingSpec, id_counts: Mapping[str, torch.Tensor], lam: float) -> None:
        super().__init__()
        self.lam = lam
        self._tables: list[tuple[str, tuple[FeatureSpec, ...]]] = []
        for index, (key, counts) in enumerate(id_counts.items()):
            table = _table_of(spec, key)
            if table in (t for t, _ in self._tables):
                raise ValueError(f"id_counts names table {table!r} twice (key {key!r})")
            features = tuple(f for f in spec.features if f.table_name == table)
            _check_counts(key, counts, features[0].cardinality)
            self.register_buffer(f"counts{index}", counts.float().clamp(min=1), persistent=False)
            self._tables.append((table, features))

    def forward(self, sparse: KeyedJaggedTensor, out: EmbeddingOutput) -> torch.Tensor:
        """The term for batch `sparse`, whose lookup is `out`."""
        total = sparse.values().new_zeros((), dtype=torch.float32)
        for index, (_, features) in enumerate(self._tables):
            pairs = [_ids_and_vectors(f, sparse[f.name], out) for f in features]
            ids = torch.cat([p[0] for p in pairs])
            vectors = torch.cat([p[1] for p in pairs])
            _, inverse, in_batch = torch.unique(ids, return_inverse=True, return_counts=True)
            weight = 1.0 / (getattr(self, f"counts{index}")[ids] * in_batch[inverse])
            total = total + (vectors.square().sum(1) * weight).sum()
        return self.lam * total


def _table_of(spec: EmbeddingSpec, key: str) -> str:
    tables = {f.table_name for f in spec.features}
    if key in tables:
        return key
    try:
        return spec.feature(key).table_name
    except KeyError:
        raise ValueError(
            f"id_counts key {key!r} is neither a table nor a feature; expected one of {sorted(tables)}"
        ) from None


def _check_counts(key: str, counts: torch.Tensor, cardinality: int) -> None:
    if counts.dim() != 1 or counts.numel() != cardinality:
        raise ValueError(
            f"id_counts[{key!r}] has shape {tuple(counts.shape)}; expected ({cardinality},), one count per id"
        )


def _ids_and_vectors(
    feature: FeatureSpec, ids: JaggedTensor, out: EmbeddingOutput
) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature's ids in the batch and one looked-up vector per id, in the same order."""
    if feature.is_sequence:
        return ids.values(), out.sequence[feature.name].values()
    lengths = ids.lengths()
    if lengths.numel() and int(lengths.max()) > 1:
        raise ValueError(
            f"mini-batch aware regularization needs one vector per id, but pooled feature "
            f"{feature.name!r} has a bag of {int(lengths.max())} ids; expected at most 1 per sample"
        )
    return ids.values(), out.pooled[feature.name][lengths == 1]
