"""The rows a training step touched: their ids, gradient and values before the fused update.

fbgemm fuses the sparse optimizer into the backward pass, so the gradient of a table never exists
as a tensor. Low-precision training needs it for the touched rows (to round an fp16 update
stochastically, to learn ALPT's steps), so `RowRecorder` rebuilds it from the gradient of the fused
lookup's output: a forward hook on each fused collection keeps the physical ids of the batch, a
gradient hook on its output adds each bag's (or id's) gradient to its rows, and when the backward
pass has finished (after the fused update) `on_update` receives one `TouchedRows` per table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor


@dataclass(frozen=True)
class TouchedRows:
    """One physical table's rows touched by a step (unique, ascending), their gradient summed over
    the step's occurrences ``[U, dim]`` (fp32), their values before the update ``[U, dim]`` and
    the step's batch size (samples)."""

    table: str
    rows: torch.Tensor
    grad: torch.Tensor
    before: torch.Tensor
    batch_size: int


@dataclass
class _Record:
    """What a forward pass saw of one watched table."""

    table: str
    ids: torch.Tensor  # physical row of every occurrence
    keys: torch.Tensor  # index of each occurrence's feature key
    bags: torch.Tensor  # bag (output row) of each occurrence, for pooled lookups
    key_names: list[str]
    table_keys: list[str]
    batch_size: int
    rows: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    before: torch.Tensor | None = None


class RowRecorder:
    """Hooks on fused torchrec collections that report every step's touched rows of `tables`.

    Args:
        collections: the (sharded) torchrec collections holding the tables, with the feature keys of
            each table: ``[(module, {table: [keys]}), ...]``.
        weights: each watched table's fused weights (a writable view), by table name.
        on_update: called once per backward pass, after the fused update, with the touched rows.
        batch_from: the module whose input's samples are the step's batch (the `EmbeddingTables`,
            whose per-id lookups of distinct ids or rows hold fewer bags than the batch has
            samples); by default each lookup's own number of bags.

    A step is one training forward (module in training mode, gradients enabled) and its backward;
    the latest forward's ids are the ones reported.
    """

    def __init__(
        self,
        collections: list[tuple[nn.Module, dict[str, list[str]]]],
        weights: dict[str, torch.Tensor],
        on_update: Callable[[list[TouchedRows]], None],
        batch_from: nn.Module | None = None,
    ) -> None:
        self.weights = weights
        self.on_update = on_update
        self._records: dict[int, list[_Record]] = {}
        self._queued = False
        self._batch: int | None = None
        self.handles = [
            module.register_forward_hook(self._forward_hook(index, tables))
            for index, (module, tables) in enumerate(collections)
        ]
        if batch_from is not None:
            self.handles.append(batch_from.register_forward_pre_hook(self._note_batch))

    def _note_batch(self, module: nn.Module, inputs: tuple) -> None:
        self._batch = inputs[0].stride()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _forward_hook(self, index: int, tables: dict[str, list[str]]):
        def hook(module: nn.Module, inputs: tuple, output: object) -> object:
            if not (module.training and torch.is_grad_enabled()):
                return output
            records = self._record(inputs[0], tables)
            self._records[index] = records
            if hasattr(output, "callbacks"):
                output.callbacks.append(lambda result: self._watch(result, records))  # type: ignore[union-attr]
                return output
            return self._watch(output, records)

        return hook

    @torch.no_grad()
    def _record(self, kjt: KeyedJaggedTensor, tables: dict[str, list[str]]) -> list[_Record]:
        keys, stride = kjt.keys(), kjt.stride()
        batch = stride if self._batch is None else self._batch
        lengths = kjt.lengths()
        key_of = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(kjt.length_per_key()))
        bag_of = torch.repeat_interleave(torch.arange(lengths.numel()) % max(stride, 1), lengths)
        records = []
        for table, table_keys in tables.items():
            wanted = torch.tensor([keys.index(k) for k in table_keys if k in keys], dtype=torch.int64)
            chosen = torch.isin(key_of, wanted)
            ids = kjt.values()[chosen].to(torch.int64)
            rows, inverse = torch.unique(ids, return_inverse=True)
            record = _Record(
                table, ids, key_of[chosen], bag_of[chosen], keys, list(table_keys), batch, rows, inverse
            )
            record.before = self.weights[table][rows].float()
            records.append(record)
        return records

    def _watch(self, result: object, records: list[_Record]) -> object:
        """Attach the gradient hooks to a lookup's output (a pooled `KeyedTensor` or per-key
        `JaggedTensor`s)."""
        if isinstance(result, KeyedTensor):
            values = result.values()
            if values.requires_grad:
                offsets = dict(zip(result.keys(), result.offset_per_key()))
                values.register_hook(lambda grad: self._pooled_grad(grad, offsets, records))
        else:
            for key, jagged in result.items():  # type: ignore[union-attr]
                values = jagged.values() if isinstance(jagged, JaggedTensor) else jagged
                if values.requires_grad:
                    values.register_hook(lambda grad, key=key: self._per_id_grad(grad, key, records))
        return result

    def _pooled_grad(self, grad: torch.Tensor, offsets: dict[str, int], records: list[_Record]) -> None:
        with torch.no_grad():
            for record in records:
                dim = self.weights[record.table].shape[1]
                starts = torch.tensor([offsets[k] for k in record.key_names])[record.keys]
                columns = starts.unsqueeze(1) + torch.arange(dim)
                self._add(record, grad[record.bags.unsqueeze(1), columns], slice(None))
        self._queue()

    def _per_id_grad(self, grad: torch.Tensor, key: str, records: list[_Record]) -> None:
        with torch.no_grad():
            for record in records:
                if key in record.table_keys:
                    mine = record.keys == record.key_names.index(key)
                    self._add(record, grad, mine)
        self._queue()

    @staticmethod
    def _add(record: _Record, grad: torch.Tensor, occurrences: slice | torch.Tensor) -> None:
        if record.grad is None:
            record.grad = torch.zeros(record.rows.numel(), grad.shape[1], dtype=torch.float32)  # type: ignore[union-attr]
        record.grad.index_add_(0, record.inverse[occurrences], grad.float())  # type: ignore[index]

    def _queue(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """Runs when the backward pass is over, i.e. after every fused update of the step."""
        self._queued = False
        records = [r for per_module in self._records.values() for r in per_module]
        self._records = {}
        touched = [
            TouchedRows(r.table, r.rows, r.grad, r.before, r.batch_size)  # type: ignore[arg-type]
            for r in records
            if r.grad is not None and r.rows.numel()  # type: ignore[union-attr]
        ]
        with torch.no_grad():
            self.on_update(touched)
