"""Fused kernels and sharding: wrap a model with torchrec's `DistributedModelParallel`.

`fuse` is the one way embtab trains embedding tables: it registers the sparse optimizer as an
in-backward optimizer on every `EmbeddingTables` collection and lets DMP replace the collections by
fbgemm's table-batched kernels (TBE) with the optimizer fused into the backward pass. With one
process (the default) it opens a private one-rank gloo group, so the same code path serves a laptop
and a cluster.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embtab.collection import EmbeddingTables
from embtab.config import SparseOptimizer

_OPTIMIZER_CLASSES = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}


DENSE_RESERVATION = 0.15  # share of each rank's memory the planner leaves to the dense model


class _PlannerNoise(logging.Filter):
    """Drops the planner's warning that the topology is built directly: every plan we make
    triggers it (we build it from the process group) and it tells users nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "TopologyFactory" not in message


logging.getLogger("torchrec.distributed.planner.types").addFilter(_PlannerNoise())


class _NoDataParallel(DataParallelWrapper):
    """A single process needs no gradient all-reduce for the dense part."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


def embedding_tables_of(model: nn.Module) -> list[EmbeddingTables]:
    tables = [m for m in model.modules() if isinstance(m, EmbeddingTables)]
    if not tables:
        raise ValueError(f"{type(model).__name__} contains no embtab.EmbeddingTables to fuse")
    return tables


def _optimizer_kwargs(optimizer: SparseOptimizer) -> dict[str, float]:
    kwargs = {"lr": optimizer.lr}
    if optimizer.kind != "sgd":
        kwargs["eps"] = optimizer.eps
    if optimizer.weight_decay:
        kwargs["weight_decay"] = optimizer.weight_decay
    return kwargs


def single_process_group() -> dist.ProcessGroup:
    """The default process group, opening a one-rank gloo group in memory if none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.GroupMember.WORLD  # type: ignore[return-value]


def table_wise_plan(
    model: nn.Module, process_group: dist.ProcessGroup, device: torch.device
) -> ShardingPlan:
    """A plan that keeps every physical table whole on one rank (the default on one process)."""
    names = [n for t in embedding_tables_of(model) for n in t.physical_tables]
    constraints = {
        n: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for n in names
    }
    topology = Topology(world_size=dist.get_world_size(process_group), compute_device=device.type)
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(DENSE_RESERVATION),
    )
    return planner.collective_plan(model, _sharders(), process_group)


def _sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def fuse(
    model: nn.Module,
    optimizer: SparseOptimizer,
    device: torch.device | str = "cpu",
    process_group: dist.ProcessGroup | None = None,
    plan: ShardingPlan | None = None,
) -> DistributedModelParallel:
    """Put every embtab table of `model` on fbgemm's fused kernels with `optimizer` in the backward.

    Returns the `DistributedModelParallel` wrapper to train and evaluate with; its
    `fused_optimizer` holds the sparse optimizer state, `dense_parameters(dmp)` the rest.

    Example::

        dmp = embtab.fuse(model, embtab.SparseOptimizer("rowwise_adagrad", lr=0.05))
        dense = torch.optim.Adam(embtab.dense_parameters(dmp), lr=1e-3)
    """
    device = torch.device(device)
    optimizer.check_device(device.type)
    optimizer_class, kwargs = _OPTIMIZER_CLASSES[optimizer.kind], _optimizer_kwargs(optimizer)
    for tables in embedding_tables_of(model):
        tables.sparse_optimizer = optimizer
        for collection in [tables.ebc, *tables.ecs.values()]:
            if collection is not None:
                apply_optimizer_in_backward(optimizer_class, collection.parameters(), kwargs)
    group = process_group or single_process_group()
    plan = plan or table_wise_plan(model, group, device)
    single = dist.get_world_size(group) == 1
    initial = _materialized_state(model)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(group),
        device=device,
        plan=plan,
        sharders=_sharders(),
        data_parallel_wrapper=_NoDataParallel() if single else None,
    )
    copy_into_shards(dmp, initial)
    return dmp


def _materialized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as built (skipped on the meta device, where DMP initializes them)."""
    return {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}


def copy_into_shards(dmp: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole (unsharded) tables into the shards this rank holds, keeping the model's init."""
    target = dmp.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            destination = target.get(key)
            if isinstance(destination, ShardedTensor):
                for shard in destination.local_shards():
                    meta = shard.metadata
                    window = tuple(
                        slice(o, o + s) for o, s in zip(meta.shard_offsets, meta.shard_sizes)
                    )
                    shard.tensor.copy_(value[window])


def dense_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters not updated by a fused in-backward optimizer: give these to a torch optimizer."""
    for _, parameter in in_backward_optimizer_filter(model.named_parameters()):
        yield parameter


def _local_bytes(tensor: torch.Tensor) -> int:
    if isinstance(tensor, ShardedTensor):
        return sum(_local_bytes(s.tensor) for s in tensor.local_shards())
    return tensor.numel() * tensor.element_size()


def allocated_bytes(dmp: DistributedModelParallel) -> dict[str, int]:
    """Bytes this rank really holds for fused tables: weights and fused optimizer state."""
    weights = sum(
        _local_bytes(t) for t in dmp.state_dict().values() if isinstance(t, ShardedTensor)
    )
    state = sum(_local_bytes(t) for t in _sparse_state(dmp).values())
    return {"parameter_bytes": weights, "optimizer_bytes": state}


def _whole(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """This rank's copy of a tensor that one process holds whole (table-wise on one rank, dense)."""
    if not isinstance(tensor, ShardedTensor):
        return tensor.detach().clone()
    shards = tensor.local_shards()
    if len(shards) != 1 or tuple(shards[0].tensor.shape) != tuple(tensor.size()):
        raise ValueError(
            f"{key!r} is split across ranks ({len(shards)} local shard(s) of {tuple(tensor.size())}); "
            "whole-tensor checkpoints need every table on one rank"
        )
    return shards[0].tensor.detach().clone()


def _local_target(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.local_shards()[0].tensor if isinstance(tensor, ShardedTensor) else tensor


def _sparse_state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    return {
        f"{param}/{name}": value
        for param, per_param in dmp.fused_optimizer.state_dict()["state"].items()
        for name, value in per_param.items()
        if isinstance(value, torch.Tensor)
    }


def training_state(dmp: DistributedModelParallel) -> dict[str, dict[str, torch.Tensor]]:
    """Weights and fused optimizer state as plain tensors, for `torch.save`."""
    return {
        "model": {k: _whole(v, k) for k, v in dmp.state_dict().items()},
        "sparse_optimizer": {k: _whole(v, k) for k, v in _sparse_state(dmp).items()},
    }


def load_training_state(dmp: DistributedModelParallel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Restore `training_state` into a model of the same configuration, in place.

    Every key and shape is checked before anything is copied: a mismatched checkpoint changes nothing.
    """
    pairs = [
        (_matched(dmp.state_dict(), state["model"], "weights"), state["model"]),
        (_matched(_sparse_state(dmp), state["sparse_optimizer"], "sparse optimizer state"), state["sparse_optimizer"]),
    ]
    with torch.no_grad():
        for targets, saved in pairs:
            for key, value in saved.items():
                targets[key].copy_(value)


def _matched(
    current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """The local tensors to copy `saved` into, after checking keys and shapes."""
    if set(current) != set(saved):
        missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise ValueError(
            f"checkpoint does not match the model's {what}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    targets = {k: _local_target(v) for k, v in current.items()}
    for key, value in saved.items():
        if tuple(targets[key].shape) != tuple(value.shape):
            raise ValueError(
                f"checkpoint entry {key!r} has shape {tuple(value.shape)}; "
                f"the model expects {tuple(targets[key].shape)}"
            )
    return targets


def physical_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every physical table's weights by table name, from `EmbeddingTables` or a fused model."""
    out = {}
    for key, value in module.state_dict().items():
        if key.endswith(".weight") and (".embedding_bags." in key or ".embeddings." in key):
            tensor = value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value
            out[key.split(".")[-2]] = tensor.detach().clone()
    return out
