"""The model -> trainer contract: a CTR model returns its logits and any auxiliary loss.

Like torchrec's `DLRMTrain`, which returns the loss it adds, a model's forward hands its extra loss
term back as a value (`ModelOutput`), so nothing is left on the model for a trainer to fetch.
Called plainly, a model returns only the logits, so it still drops in where torchrec expects them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, NamedTuple, overload

import torch
from torch import nn
from torchrec import KeyedJaggedTensor


class ModelOutput(NamedTuple):
    """A forward's result. `aux_loss`: a term the model adds to the data loss (e.g. DIN's
    mini-batch aware L2), None when it adds none. A named tuple, so that data-parallel wrappers
    (DDP flattens a forward's output with torch's pytree) see its tensors."""

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None

    def loss(self, data_loss: torch.Tensor) -> torch.Tensor:
        """The training loss: `data_loss` plus the model's auxiliary loss, if any."""
        return data_loss if self.aux_loss is None else data_loss + self.aux_loss


class CTRModel(nn.Module, ABC):
    """A CTR model: ``(sparse: KeyedJaggedTensor, dense [B, n_dense]) -> logits [B]``.

    Subclasses implement `outputs`. ``model(sparse, dense)`` returns the logits;
    ``model(sparse, dense, with_aux_loss=True)`` returns the `ModelOutput` (a trainer calls this,
    through `DistributedModelParallel`'s forward, so data-parallel wrappers see the call).
    """

    @abstractmethod
    def outputs(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> ModelOutput:
        """Logits ``[B]`` and the auxiliary loss of this forward."""

    @overload
    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor: ...

    @overload
    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, with_aux_loss: Literal[True]
    ) -> ModelOutput: ...

    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, with_aux_loss: bool = False
    ) -> torch.Tensor | ModelOutput:
        out = self.outputs(sparse, dense)
        return out if with_aux_loss else out.logits
