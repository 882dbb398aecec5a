"""Where fused tables keep their state: weights and optimizer state by physical table.

torchrec stores a physical table's weight under ``...embedding_bags.<table>.weight`` (pooled
collections) or ``...embeddings.<table>.weight`` (per-id collections) in `state_dict`, as a plain
tensor on an unfused module or a `ShardedTensor` once `DistributedModelParallel` shards it; the
fused optimizer (`FusedOptimizerModule.fused_optimizer`) keys its state by the same weight key.
This module is the one place that reads those keys and unwraps local shards, for sharding,
offloading, export and the methods bound after fusing (`BoundAfterFusing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torchrec
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.fused import FusedOptimizerModule

from embtab.collection import EmbeddingTables
from embtab.methods.base import BoundAfterFusing
from embtab.quiet import quiet_torchrec

TABLE_CONTAINERS: tuple[str, ...] = (".embedding_bags.", ".embeddings.")


@dataclass(frozen=True)
class Shard:
    """A part of a table this process holds: a view of the stored rows, from row `first_row` and
    column `first_column` on (column-wise shards hold a band of the columns)."""

    tensor: torch.Tensor
    first_row: int
    first_column: int = 0


@dataclass(frozen=True)
class StoredTable:
    """One physical table as stored: its weight and fused optimizer state (plain or sharded).

    Attributes:
        key: the weight's `state_dict` key (the fused optimizer's key for its state too).
        weight: the weight, a tensor or a `ShardedTensor`.
        states: the fused optimizer's state tensors of the table, by state name (none unfused).
    """

    name: str
    key: str
    weight: torch.Tensor
    states: dict[str, torch.Tensor] = field(default_factory=dict)

    def weight_shards(self) -> list[Shard]:
        return local_shards(self.weight)

    def state_shards(self) -> list[Shard]:
        """Every local shard of every optimizer state tensor of the table."""
        return [shard for state in self.states.values() for shard in local_shards(state)]


@dataclass(frozen=True)
class FusedTables:
    """What `embtab.fuse` hands each method bound after fusing: the stored tables of its
    collection, by physical table name, and the ranks they were fused over."""

    tables: dict[str, StoredTable]
    process_group: dist.ProcessGroup | None

    def table(self, name: str) -> StoredTable:
        if name not in self.tables:
            raise ValueError(f"physical table {name!r} is not among the fused tables {sorted(self.tables)}")
        return self.tables[name]


def table_of(key: str) -> str | None:
    """The physical table whose weight a `state_dict` key names, or None for any other key."""
    if not key.endswith(".weight") or not any(c in f".{key}" for c in TABLE_CONTAINERS):
        return None
    return key.split(".")[-2]


def local_shards(tensor: torch.Tensor) -> list[Shard]:
    """(view, first row) of each part of `tensor` this process holds: the whole of a plain tensor."""
    if isinstance(tensor, ShardedTensor):
        with quiet_torchrec():
            return [
                Shard(s.tensor, int(s.metadata.shard_offsets[0]), _first_column(s.metadata.shard_offsets))
                for s in tensor.local_shards()
            ]
    return [Shard(tensor, 0)]


def _first_column(offsets: list[int]) -> int:
    return int(offsets[1]) if len(offsets) > 1 else 0


def whole_local(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The tensor this process holds, which must be all of it (a table-wise shard or unsharded)."""
    if isinstance(tensor, ShardedTensor):
        with quiet_torchrec():
            shards, size = tensor.local_shards(), tuple(tensor.size())
        if len(shards) != 1 or tuple(shards[0].tensor.shape) != size:
            raise ValueError(f"{what} must be whole on one rank (table-wise sharding)")
        return shards[0].tensor
    return tensor


def table_weights(module: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """(state_dict key, weight) of every physical table in `module`'s state, by table name (the
    last one where a model holds several collections with a table of one name)."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    with quiet_torchrec():
        state = module.state_dict()
    for key, value in state.items():
        name = table_of(key)
        if name is not None:
            out[name] = (key, value)
    return out


def weight_keys(module: nn.Module) -> dict[str, list[str]]:
    """Every `state_dict` key of a physical table's weight in `module`, by table name (a name may
    have several keys when a model holds several collections with a table of that name)."""
    out: dict[str, list[str]] = {}
    with quiet_torchrec():
        keys = list(module.state_dict())
    for key in keys:
        name = table_of(key)
        if name is not None:
            out.setdefault(name, []).append(key)
    return out


def optimizer_states(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The fused optimizer's state tensors of every physical table in `module`, by table name and
    state name (empty for tables without a fused optimizer)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for fused in (m for m in module.modules() if isinstance(m, FusedOptimizerModule)):
        with quiet_torchrec():
            state = fused.fused_optimizer.state_dict()["state"]
        for key, per_param in state.items():
            name = table_of(str(key))
            if name is None:
                continue
            tensors = {k: v for k, v in per_param.items() if isinstance(v, torch.Tensor)}
            out.setdefault(name, {}).update(tensors)
    return out


def sparse_optimizer_state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Every state tensor of a fused model's fused optimizer, flat: ``"<weight key>/<state name>"``
    (the layout checkpoints store)."""
    with quiet_torchrec():
        state = dmp.fused_optimizer.state_dict()["state"]
    return {
        f"{param}/{name}": value
        for param, per_param in state.items()
        for name, value in per_param.items()
        if isinstance(value, torch.Tensor)
    }


def stored_tables(module: nn.Module) -> dict[str, StoredTable]:
    """Every physical table of `module` (an `EmbeddingTables`, fused or not) as stored."""
    states = optimizer_states(module)
    return {
        name: StoredTable(name, key, weight, states.get(name, {}))
        for name, (key, weight) in table_weights(module).items()
    }


def physical_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every physical table's weights (this process's first shard) by table name."""
    return {
        name: local_shards(weight)[0].tensor.detach().clone()
        for name, (_, weight) in table_weights(module).items()
    }


def table_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The weight parameter of every physical table of an unfused module, by table name (wherever
    it keeps its torchrec collections); trainable, unlike the `state_dict` tensors."""
    out = {}
    for collection in module.modules():
        if isinstance(collection, torchrec.EmbeddingBagCollection):
            out.update({name: bag.weight for name, bag in collection.embedding_bags.items()})
        elif isinstance(collection, torchrec.EmbeddingCollection):
            out.update({name: emb.weight for name, emb in collection.embeddings.items()})
    return out


def stored_tables_of(model: nn.Module) -> list[tuple[EmbeddingTables, dict[str, StoredTable]]]:
    """Every `EmbeddingTables` in `model` (fused or not) with its stored tables."""
    return [(m, stored_tables(m)) for m in model.modules() if isinstance(m, EmbeddingTables)]


def bind_after_fusing(model: nn.Module, process_group: dist.ProcessGroup | None) -> int:
    """Call `bind_fused` on every method of `model` that is `BoundAfterFusing` (with its
    collection's stored tables and `process_group`); returns how many. `embtab.fuse` calls it."""
    count = 0
    for tables, stored in stored_tables_of(model):
        fused = FusedTables(stored, process_group)
        for method in tables.methods.values():
            if isinstance(method, BoundAfterFusing):
                method.bind_fused(fused)
                count += 1
    return count


def attach_row_reset(model: nn.Module) -> int:
    """Bind every method of `model` that is bound after fusing (managed collisions: reset the rows
    they evict) to the stored tables; returns how many.

    `embtab.fuse` does this itself. On an unfused module it binds the weights only (an external
    torch optimizer's state is not reset); on a `DistributedModelParallel` again, with its group.
    """
    group = model._env.process_group if isinstance(model, DistributedModelParallel) else None
    return bind_after_fusing(model, group)
