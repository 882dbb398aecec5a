"""Deep Interest Network (Zhou et al., KDD 2018) and its Embedding&MLP base model.

Both read a user's behaviour history (sequence features such as ``hist_item_ids``,
``hist_genres``) next to pooled features (the candidate ``item_id``/``item_genre`` and the user
profile). The base model sum- (or mean-) pools the history; DIN weights every history item by its
relevance to the candidate with the local activation unit. The pooled history, every pooled
feature and the dense features go to an MLP head that returns one logit per sample.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torchrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtab import EmbeddingTables
from models.layers import MLP, AttentionUnit, check_dense
from models.output import CTRModel, ModelOutput
from models.regularization import MiniBatchAwareL2


class BehaviourModel(CTRModel):
    """Shared skeleton of DIN and Embedding&MLP: history features, MLP head, MBA regularization.

    Subclasses implement `pool_history`. History feature ``i`` pairs with query feature ``i``: it
    must share the query's table (``FeatureSpec(table=...)``), so both have one width.
    """

    def __init__(
        self,
        embeddings: EmbeddingTables,
        query_features: Sequence[str],
        history_features: Sequence[str],
        mlp_hidden: Sequence[int],
        activation: str,
        dropout: float,
        dense_dim: int,
        mba_lambda: float,
        id_counts: Mapping[str, torch.Tensor] | None,
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.query_features = tuple(query_features)
        self.history_features = tuple(history_features)
        self.dense_dim = dense_dim
        _check_pairs(embeddings, self.query_features, self.history_features)
        self.history_dim = sum(embeddings.output_dim(f) for f in self.history_features)
        pooled_dim = sum(embeddings.output_dim(f.name) for f in embeddings.spec.features if not f.is_sequence)
        head_input = pooled_dim + self.history_dim + dense_dim
        self.head = MLP(head_input, mlp_hidden, activation, dropout, output_dim=1)
        self.regularizer = _regularizer(embeddings, mba_lambda, id_counts)

    def pool_history(self, pooled: KeyedTensor, history: JaggedTensor) -> torch.Tensor:
        """One interest vector ``[B, history_dim]`` from the history (values ``[N, history_dim]``)."""
        raise NotImplementedError

    def outputs(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> ModelOutput:
        """Logits ``[B]`` for sparse ids `sparse` and dense features `dense` ``[B, dense_dim]``, and
        in training the mini-batch aware L2 term of the batch (from this forward's lookup, so its
        gradient reaches the tables through the same fused backward)."""
        check_dense(dense, self.dense_dim)
        out = self.embeddings(sparse)
        interest = self.pool_history(out.pooled, self._history(out.sequence))
        logits = self.head(torch.cat([out.pooled.values(), interest, dense], dim=1)).squeeze(-1)
        aux_loss = self.regularizer(sparse, out) if self.regularizer is not None and self.training else None
        return ModelOutput(logits, aux_loss)

    def regularization(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """The mini-batch aware L2 term of batch `sparse` on its own lookup (0 when ``mba_lambda``
        is 0); training gets it from ``model(sparse, dense, with_aux_loss=True).aux_loss``."""
        if self.regularizer is None:
            return self.head.layers[0].weight.new_zeros(())
        return self.regularizer(sparse, self.embeddings(sparse))

    def _history(self, sequence: dict[str, JaggedTensor]) -> JaggedTensor:
        """The history features' vectors side by side: one ``history_dim`` row per history item."""
        jagged = [sequence[name] for name in self.history_features]
        lengths = jagged[0].lengths()
        for name, other in zip(self.history_features[1:], jagged[1:]):
            if not torch.equal(other.lengths(), lengths):
                raise ValueError(
                    f"history features {self.history_features[0]!r} and {name!r} have different lengths; "
                    "expected one aligned entry per history item"
                )
        values = torch.cat([jt.values() for jt in jagged], dim=1) if len(jagged) > 1 else jagged[0].values()
        return JaggedTensor(values=values, lengths=lengths, offsets=jagged[0].offsets())


class DIN(BehaviourModel):
    """Deep Interest Network: the candidate attends over the user's behaviour history.

    The candidate's vectors (``item_id`` ⊕ ``item_genre``) query the history's vectors
    (``hist_item_ids`` ⊕ ``hist_genres``), looked up in the same tables, through `AttentionUnit`;
    the weighted sum, every pooled feature (candidate and user profile) and the dense features feed
    an MLP head.

    Args:
        embeddings: the model's embedding layer; query features pooled, history features
            sequences (``pooling="none"``) sharing the query's table. No other sequence feature.
        query_features / history_features: paired by position.
        attention_hidden: hidden widths of the activation unit (the official code's 80, 40).
        mlp_hidden: hidden widths of the head (200, 80).
        activation: of the head, ``"dice"`` (the paper's best, default), ``"prelu"``, ``"relu"``.
        attention_activation: of the activation unit. ``"sigmoid"`` (default) as in the
            authors' released code (``din/model.py`` and ``model_dice.py``, which put Dice only
            in the head); ``"dice"`` follows the paper's figure 2 and FuxiCTR, at about 1.4x the
            training step time, since the unit runs on every history position.
        attention_softmax: normalize the weights with a masked softmax (see `AttentionUnit`);
            off by default as in the paper. `attention_scale` divides the scores by
            ``sqrt(history width)`` first, as the official code does.
        dropout: after every hidden layer of the head.
        dense_dim: number of dense features (columns of ``dense``).
        mba_lambda, id_counts: mini-batch aware L2 (`MiniBatchAwareL2`) on the tables named in
            `id_counts`; a training forward returns it as its auxiliary loss.

    Example::

        spec = EmbeddingSpec(features=(
            FeatureSpec("user_id", 10), FeatureSpec("item_id", 20), FeatureSpec("item_genre", 5),
            FeatureSpec("hist_item_ids", 20, pooling="none", table="item_id"),
            FeatureSpec("hist_genres", 5, pooling="none", table="item_genre"),
        ), dim=8)
        model = DIN(EmbeddingTables(spec), attention_hidden=(16,), mlp_hidden=(32,))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "item_id", "item_genre", "hist_item_ids", "hist_genres"],
            values=torch.tensor([1, 2, 3, 4, 0, 1, 7, 8, 9, 1, 1, 2]),
            lengths=torch.tensor([1, 1, 1, 1, 1, 1, 2, 1, 2, 1]),
        )
        model(kjt, torch.empty(2, 0)).shape   # torch.Size([2])
    """

    def __init__(
        self,
        embeddings: EmbeddingTables,
        query_features: Sequence[str] = ("item_id", "item_genre"),
        history_features: Sequence[str] = ("hist_item_ids", "hist_genres"),
        attention_hidden: Sequence[int] = (80, 40),
        mlp_hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        attention_activation: str = "sigmoid",
        attention_softmax: bool = False,
        attention_scale: bool = True,
        dropout: float = 0.0,
        dense_dim: int = 0,
        mba_lambda: float = 0.0,
        id_counts: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(
            embeddings, query_features, history_features, mlp_hidden, activation, dropout, dense_dim,
            mba_lambda, id_counts,
        )
        self.attention = AttentionUnit(
            self.history_dim, attention_hidden, attention_activation, attention_softmax, attention_scale
        )
        self._query_columns: dict[tuple[str, ...], torch.Tensor] = {}

    def pool_history(self, pooled: KeyedTensor, history: JaggedTensor) -> torch.Tensor:
        keys, mask = padded(history)
        return self.attention(self.query(pooled), keys, mask)

    def query(self, pooled: KeyedTensor) -> torch.Tensor:
        """The candidate's vectors, concatenated in `query_features` order: ``[B, history_dim]``."""
        layout = tuple(pooled.keys())
        if layout not in self._query_columns:
            offsets = pooled.offset_per_key()
            spans = [(offsets[layout.index(f)], offsets[layout.index(f) + 1]) for f in self.query_features]
            columns = torch.cat([torch.arange(a, b) for a, b in spans])
            self._query_columns[layout] = columns.to(pooled.values().device)
        return pooled.values().index_select(1, self._query_columns[layout])


class EmbeddingMLP(BehaviourModel):
    """The Embedding&MLP base model of the DIN paper: the history is sum-pooled, not attended.

    Takes DIN's arguments minus the attention ones, plus `history_pooling` (``"sum"``, the paper's,
    or ``"mean"``). `query_features` only fixes the pairing checked at construction, so one
    configuration serves both models.

    Example::

        spec = EmbeddingSpec(features=(
            FeatureSpec("item_id", 20), FeatureSpec("hist_item_ids", 20, pooling="none", table="item_id"),
        ), dim=8)
        model = EmbeddingMLP(EmbeddingTables(spec), ("item_id",), ("hist_item_ids",), mlp_hidden=(16,))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "hist_item_ids"], values=torch.tensor([1, 2, 3, 4, 5]),
            lengths=torch.tensor([1, 1, 3, 0]),
        )
        model(kjt, torch.empty(2, 0)).shape   # torch.Size([2])
    """

    def __init__(
        self,
        embeddings: EmbeddingTables,
        query_features: Sequence[str] = ("item_id", "item_genre"),
        history_features: Sequence[str] = ("hist_item_ids", "hist_genres"),
        mlp_hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        history_pooling: str = "sum",
        dropout: float = 0.0,
        dense_dim: int = 0,
        mba_lambda: float = 0.0,
        id_counts: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if history_pooling not in ("sum", "mean"):
            raise ValueError(f"history_pooling must be 'sum' or 'mean', got {history_pooling!r}")
        super().__init__(
            embeddings, query_features, history_features, mlp_hidden, activation, dropout, dense_dim,
            mba_lambda, id_counts,
        )
        self.history_pooling = history_pooling

    def pool_history(self, pooled: KeyedTensor, history: JaggedTensor) -> torch.Tensor:
        summed = torch.segment_reduce(history.values(), "sum", lengths=history.lengths())
        if self.history_pooling == "sum":
            return summed
        return summed / history.lengths().clamp(min=1).unsqueeze(1)


def padded(history: JaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged vectors zero-padded to the longest row, ``[B, L, E]``, and the valid mask ``[B, L]``."""
    lengths = history.lengths()
    longest = max(int(lengths.max()), 1) if lengths.numel() else 1
    keys = torch.ops.fbgemm.jagged_to_padded_dense(history.values(), [history.offsets()], [longest], 0.0)
    mask = torch.arange(longest, device=lengths.device) < lengths.unsqueeze(1)
    return keys, mask


def _check_pairs(embeddings: EmbeddingTables, queries: tuple[str, ...], histories: tuple[str, ...]) -> None:
    spec = embeddings.spec
    if not queries or len(queries) != len(histories):
        raise ValueError(
            f"query_features {queries} and history_features {histories} must pair up one to one"
        )
    for query, history in zip(queries, histories):
        q, h = spec.feature(query), spec.feature(history)
        if q.is_sequence or not h.is_sequence:
            raise ValueError(
                f"query feature {query!r} must be pooled and history feature {history!r} a sequence "
                f"(pooling='none'); got pooling {q.pooling!r} and {h.pooling!r}"
            )
        if q.table_name != h.table_name:
            raise ValueError(
                f"history feature {history!r} uses table {h.table_name!r} but its query {query!r} uses "
                f"{q.table_name!r}; declare FeatureSpec({history!r}, ..., table={q.table_name!r})"
            )
    unpaired = [f.name for f in spec.features if f.is_sequence and f.name not in histories]
    if unpaired:
        raise ValueError(f"sequence features {unpaired} are not in history_features {histories}")


def _regularizer(
    embeddings: EmbeddingTables, lam: float, id_counts: Mapping[str, torch.Tensor] | None
) -> MiniBatchAwareL2 | None:
    if lam < 0:
        raise ValueError(f"mba_lambda must be >= 0, got {lam}")
    if lam == 0:
        return None
    if not id_counts:
        raise ValueError(
            "mba_lambda > 0 needs id_counts: the global count of every id of the tables to regularize"
        )
    return MiniBatchAwareL2(embeddings.spec, id_counts, lam)
