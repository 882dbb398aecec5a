"""Building blocks of the CTR models: `Dice`, `MLP`, DIN's local activation unit, input checks.

Every layer accepts inputs with any number of leading dimensions (``[B, H]`` or ``[B, L, H]``);
batch statistics (`Dice`, batch norm) are taken over all leading dimensions together.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: tuple[str, ...] = ("dice", "prelu", "relu", "sigmoid")


class Dice(nn.Module):
    """Data-adaptive activation of DIN: ``f(s) = p(s) * s + (1 - p(s)) * alpha * s``.

    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))`` with batch statistics in training and
    moving averages at evaluation, one learnable ``alpha`` per unit (initialized 0, so Dice starts
    as a smooth, data-centred ReLU). As in FuxiCTR the statistics come from a
    ``BatchNorm1d(affine=False, eps=1e-9, momentum=0.01)``. A ``[B, L, H]`` input is normalized
    over all ``B * L`` positions, padded ones included (FuxiCTR's behaviour: simpler, and the
    padded positions get no attention weight downstream anyway).

    Example::

        dice = Dice(8)
        dice(torch.randn(32, 8)).shape      # torch.Size([32, 8])
        dice(torch.randn(32, 5, 8)).shape   # torch.Size([32, 5, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-9, momentum: float = 0.01) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=eps, momentum=momentum)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        p = torch.sigmoid(self.norm(flat)).view_as(x)
        # p * x + (1 - p) * alpha * x, with one multiplication fewer
        return x * (self.alpha + (1 - self.alpha) * p)


def check_dense(dense: torch.Tensor, dense_dim: int) -> None:
    """Reject dense features that are not ``[B, dense_dim]``, naming both shapes."""
    if dense.dim() != 2 or dense.shape[1] != dense_dim:
        raise ValueError(f"dense features have shape {tuple(dense.shape)}; expected [B, {dense_dim}]")


def activation_layer(name: str, dim: int) -> nn.Module:
    """The activation `name` (one of `ACTIVATIONS`) for `dim` units."""
    if name == "dice":
        return Dice(dim)
    if name == "prelu":
        return nn.PReLU(dim)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class MLP(nn.Module):
    """Stack of ``Linear -> [BatchNorm] -> activation -> [Dropout]`` blocks, then an optional
    plain ``Linear`` to `output_dim` (no activation: logits or attention scores).

    Leading dimensions are flattened for the batch statistics of batch norm and `Dice`.

    Example::

        mlp = MLP(10, hidden=(32, 16), activation="dice", dropout=0.1, output_dim=1)
        mlp(torch.randn(4, 10)).shape     # torch.Size([4, 1])
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for units in hidden:
            layers.append(nn.Linear(width, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(activation_layer(activation, units))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        self.layers = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.layers(x.reshape(-1, x.shape[-1])).view(*lead, self.output_dim)


class AttentionUnit(nn.Module):
    """DIN's local activation unit: weights each history item by its relevance to the candidate.

    ``a(q, k_j) = MLP([q, k_j, q - k_j, q * k_j])`` gives one scalar per history position; padded
    positions get weight 0 and the output is ``sum_j a(q, k_j) * k_j``. Without softmax (the
    paper's choice, default) the weights are unnormalized so the pooled vector keeps the
    intensity of the user's interest. With ``softmax=True`` the scores are normalized over the
    valid positions, after division by ``sqrt(key width)`` when ``scale=True`` (the official
    TensorFlow code does both). A row with no valid position pools to zero.

    The first layer is one ``Linear(4E, H)`` but is evaluated as
    ``(W_q + W_d) q + [W_k - W_d, W_p] [k, q * k]`` (the same function), so the query's share is
    computed once per sample instead of once per position.

    Example::

        unit = AttentionUnit(8, hidden=(16, 8))
        q, keys = torch.randn(4, 8), torch.randn(4, 5, 8)
        mask = torch.arange(5) < torch.tensor([5, 3, 0, 1]).unsqueeze(1)
        unit(q, keys, mask).shape          # torch.Size([4, 8])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: str = "sigmoid",
        softmax: bool = False,
        scale: bool = True,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("AttentionUnit needs at least one hidden layer")
        self.dim = dim
        self.softmax = softmax
        self.scale = scale
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_activation = activation_layer(activation, hidden[0])
        self.rest = MLP(hidden[0], hidden[1:], activation, output_dim=1)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Raw activation-unit outputs ``[B, L]`` for query ``[B, E]`` and keys ``[B, L, E]``."""
        w_q, w_k, w_d, w_p = self.first.weight.split(self.dim, dim=1)
        per_query = F.linear(query, w_q + w_d, self.first.bias)
        pairs = torch.cat([keys, keys * query.unsqueeze(1)], dim=-1)
        hidden = F.linear(pairs, torch.cat([w_k - w_d, w_p], dim=1)).add_(per_query.unsqueeze(1))
        flat = hidden.view(-1, hidden.shape[-1])  # [B * L, H]: PReLU takes channels on dim 1
        return self.rest(self.first_activation(flat)).view(keys.shape[:2])

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, L]``; exactly 0 where `mask` (``[B, L]`` bool) is False."""
        scores = self.scores(query, keys)
        if not self.softmax:
            return scores * mask
        if self.scale:
            scores = scores / math.sqrt(keys.shape[-1])
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1) * mask

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weighted sum ``[B, E]`` of `keys` ``[B, L, E]`` for `query` ``[B, E]``."""
        weights = self.weights(query, keys, mask)
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
