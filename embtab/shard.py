"""Fused kernels and sharding: wrap a model with torchrec's `DistributedModelParallel`.

`fuse` is the one way embtab trains embedding tables: it registers the sparse optimizer as an
in-backward optimizer on every `EmbeddingTables` collection and lets DMP replace the collections by
fbgemm's table-batched kernels (TBE) with the optimizer fused into the backward pass. With one
process (the default) it opens a private one-rank gloo group, so the same code path serves a laptop
and a cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
import torch.fx._symbolic_trace
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim.apply_optimizer_in_backward import (
    param_to_acc_grad_map,
    param_to_optim_hook_handle_map,
)
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embtab.collection import EmbeddingTables
from embtab.config import SparseOptimizer
from embtab.fused_state import bind_after_fusing, sparse_optimizer_state
from embtab.quiet import quiet_torchrec
from embtab.fused_state import physical_weights as physical_weights  # re-exported: its old home
from embtab.quant.training import attach as attach_low_precision

DENSE_RESERVATION = 0.15  # share of each rank's memory the planner leaves to the dense model


class _NoDataParallel(DataParallelWrapper):
    """A single process needs no gradient all-reduce for the dense part, only to be on `device`."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        dmp._dmp_wrapped_module.to(device)


class _DataParallel(DefaultDataParallelWrapper):
    """torchrec's DDP wrapper for the dense part, except dense parameters that carry an optimizer
    of their own in the backward (OptEmbed's thresholds): DDP would step those on an accelerator
    stream, which a CPU lacks, so DDP ignores them and their own hook averages the gradient over
    the ranks before stepping."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        module = dmp._dmp_wrapped_module
        sharded = set(DistributedModelParallel._sharded_parameter_names(module))
        own = {
            name: p
            for name, p in module.named_parameters()
            if name not in sharded and hasattr(p, "_in_backward_optimizers")
        }
        self._additional_params_to_ignore.update(own)
        super().wrap(dmp, env, device)
        for parameter in own.values():
            _average_then_step(parameter, env.process_group)


def _average_then_step(parameter: nn.Parameter, group: dist.ProcessGroup) -> None:
    """Replace the in-backward optimizer hook of `parameter` by one that first averages its
    gradient over the ranks of `group`, so every rank takes the same step."""
    for handle in param_to_optim_hook_handle_map.pop(parameter, []):
        handle.remove()
    world = dist.get_world_size(group)

    def step(*_unused) -> None:
        dist.all_reduce(parameter.grad, group=group)
        parameter.grad.div_(world)
        for optimizer in parameter._in_backward_optimizers:  # type: ignore[attr-defined]
            optimizer.step()
        parameter.grad = None

    handle = param_to_acc_grad_map[parameter].register_hook(step)
    param_to_optim_hook_handle_map[parameter] = [handle]


def embedding_tables_of(model: nn.Module) -> list[EmbeddingTables]:
    tables = [m for m in model.modules() if isinstance(m, EmbeddingTables)]
    if not tables:
        raise ValueError(f"{type(model).__name__} contains no embtab.EmbeddingTables to fuse")
    return tables


def single_process_group() -> dist.ProcessGroup:
    """The default process group, opening a one-rank gloo group in memory if none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.GroupMember.WORLD  # type: ignore[return-value]


SHARDING_TYPES: tuple[str, ...] = tuple(t.value for t in ShardingType if t.value in (
    "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel"
))


@dataclass(frozen=True)
class ShardingConstraints:
    """What the planner may do with each physical table, and how much memory each rank has.

    Args:
        sharding_types: allowed torchrec sharding types (``"table_wise"``, ``"row_wise"``,
            ``"column_wise"``, ``"table_column_wise"``, ``"data_parallel"``, ...) per table; a key
            is a physical table name (``"item_id@qr0"``) or a logical table name, which applies to
            all of that table's physical tables.
        default_types: the allowed types of every table not named in `sharding_types`.
        column_shard_width: the narrowest column shard (torchrec's ``min_partition``) for the
            column-wise types; None keeps torchrec's default.
        rank_memory_bytes: memory per rank the planner may fill (HBM on GPUs, DDR on CPUs);
            None keeps torchrec's default topology.

    Example::

        constraints = ShardingConstraints(sharding_types={"item_id": ("row_wise",)})
        dmp = embtab.fuse(model, optimizer, process_group=group, constraints=constraints)
    """

    sharding_types: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_types: tuple[str, ...] = ("table_wise",)
    column_shard_width: int | None = None
    rank_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for table, types in [("default_types", self.default_types), *self.sharding_types.items()]:
            unknown = [t for t in types if t not in SHARDING_TYPES]
            if unknown or not types:
                raise ValueError(
                    f"sharding types for {table!r} are {list(types)}; expected a non-empty "
                    f"subset of {list(SHARDING_TYPES)}"
                )

    def types_of(self, physical_table: str) -> tuple[str, ...]:
        logical = physical_table.split("@")[0]
        named = self.sharding_types.get(physical_table, self.sharding_types.get(logical))
        return named or self.default_types

    def check_tables(self, names: list[str]) -> None:
        """Every table named in the constraints must exist (a typo would silently be ignored)."""
        known = set(names) | {n.split("@")[0] for n in names}
        unknown = sorted(set(self.sharding_types) - known)
        if unknown:
            raise ValueError(
                f"sharding constraints name unknown tables {unknown}; the model's tables are {sorted(known)}"
            )

    def parameter_constraints(self, names: list[str]) -> dict[str, ParameterConstraints]:
        self.check_tables(names)
        return {
            n: ParameterConstraints(
                sharding_types=list(self.types_of(n)), min_partition=self.column_shard_width
            )
            for n in names
        }


def plan_sharding(
    model: nn.Module,
    process_group: dist.ProcessGroup,
    device: torch.device,
    constraints: ShardingConstraints | None = None,
) -> ShardingPlan:
    """torchrec's planner run over every physical table of `model` with `constraints`
    (by default every table whole on one rank); the same plan on every rank."""
    constraints = constraints or ShardingConstraints()
    names = [n for t in embedding_tables_of(model) for n in t.physical_tables]
    if device.type == "cpu":
        _check_cpu_pooled_types(model, constraints)
    world = dist.get_world_size(process_group)
    memory = constraints.rank_memory_bytes
    topology = Topology(
        world_size=world,
        compute_device=device.type,
        hbm_cap=memory if device.type == "cuda" else None,
        ddr_cap=memory if device.type == "cpu" else None,
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints.parameter_constraints(names),
        storage_reservation=FixedPercentageStorageReservation(DENSE_RESERVATION),
    )
    with quiet_torchrec():
        return planner.collective_plan(model, _sharders(), process_group)


ROW_SPLITTING = ("row_wise", "table_row_wise")


def _check_cpu_pooled_types(model: nn.Module, constraints: ShardingConstraints) -> None:
    """torchrec offers no row-wise sharding of pooled tables on CPU (its output reduce-scatter has
    no gloo kernel, torchrec #1252): say so, instead of the planner's 'no available sharding type'."""
    for tables in embedding_tables_of(model):
        bags = [c for c in (tables.ebc, tables.per_id_ebc) if c is not None]
        pooled = [t.name for c in bags for t in c.embedding_bag_configs()]
        for name in pooled:
            types = constraints.types_of(name)
            if all(t in ROW_SPLITTING for t in types):
                raise ValueError(
                    f"pooled table {name!r} may only be sharded {list(types)}, which torchrec does "
                    "not offer for pooled tables on CPU (gloo has no reduce-scatter); use "
                    "table_wise, column_wise, table_column_wise or data_parallel for it, or a "
                    "GPU (NCCL), where row-wise pooled sharding works"
                )


def format_plan(plan: ShardingPlan) -> str:
    """The plan as a readable table: one line per physical table, with its shards and their ranks."""
    rows = [("table", "sharding", "kernel", "shards (rank: rows x cols @ offset)")]
    for module_path, module_plan in sorted(plan.plan.items()):
        for table, sharding in sorted(module_plan.items()):  # type: ignore[union-attr]
            shards = sharding.sharding_spec.shards if sharding.sharding_spec else []
            placed = ", ".join(
                f"{s.placement.rank()}: {s.shard_sizes[0]}x{s.shard_sizes[1]}"
                f" @ ({s.shard_offsets[0]},{s.shard_offsets[1]})"
                for s in shards
            ) or f"all ranks: {sharding.ranks}"
            rows.append((table, sharding.sharding_type, sharding.compute_kernel, placed))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + " | " + r[3] for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * len(rows[0][3]))
    return "\n".join(lines)


def _sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def fuse(
    model: nn.Module,
    optimizer: SparseOptimizer,
    device: torch.device | str = "cpu",
    process_group: dist.ProcessGroup | None = None,
    constraints: ShardingConstraints | None = None,
    plan: ShardingPlan | None = None,
) -> DistributedModelParallel:
    """Put every embtab table of `model` on fbgemm's fused kernels with `optimizer` in the backward,
    sharded over `process_group` (default: a one-process group) by `plan` or, when None, by
    torchrec's planner under `constraints`.

    Methods bound after fusing (`embtab.methods.base.BoundAfterFusing`: managed collisions' row
    reset and process group) are bound to the fused tables before it returns.

    Returns the `DistributedModelParallel` wrapper to train and evaluate with; its
    `fused_optimizer` holds the sparse optimizer state, `dense_parameters(dmp)` the rest. With more
    than one rank, gradients are averaged across ranks (DDP for dense parameters, torchrec's
    gradient division for sharded tables): a rank's loss is its share of the global batch's mean,
    `global_mean`, to train exactly as one process would on the global batch. Tables planned
    ``data_parallel`` become replicated dense parameters: give them to the dense optimizer (they
    are among `dense_parameters`), as torchrec does.

    Example::

        dmp = embtab.fuse(model, embtab.SparseOptimizer("rowwise_adagrad", lr=0.05))
        dense = torch.optim.Adam(embtab.dense_parameters(dmp), lr=1e-3)
    """
    with quiet_torchrec():
        _silence_fx_tracing_notice()
        return _fuse(model, optimizer, torch.device(device), process_group, constraints, plan)


def _silence_fx_tracing_notice() -> None:
    """torch.fx logs once per process, at the first forward of a torchrec module, that
    `is_fx_tracing` also covers torch.export; nothing here traces, so the notice says nothing to
    embtab users. Emitting it here, under a filter of its logger, uses up its one time."""
    notice = getattr(torch.fx._symbolic_trace, "is_fx_tracing_warning", None)
    if notice is None:
        return
    fx_log, mute = logging.getLogger(torch.fx._symbolic_trace.__name__), _Mute()
    fx_log.addFilter(mute)
    try:
        notice()
    finally:
        fx_log.removeFilter(mute)


class _Mute(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _fuse(
    model: nn.Module,
    optimizer: SparseOptimizer,
    device: torch.device,
    process_group: dist.ProcessGroup | None,
    constraints: ShardingConstraints | None,
    plan: ShardingPlan | None,
) -> DistributedModelParallel:
    optimizer.check_device(device.type)
    group = process_group or single_process_group()
    for tables in embedding_tables_of(model):
        tables.fuse_optimizer(optimizer)
    plan = plan or plan_sharding(model, group, device, constraints)
    single = dist.get_world_size(group) == 1
    initial = _materialized_state(model)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(group),
        device=device,
        plan=plan,
        sharders=_sharders(),
        data_parallel_wrapper=_NoDataParallel() if single else _DataParallel(),
    )
    copy_into_shards(dmp, initial)
    bind_after_fusing(dmp, group)
    attach_low_precision(dmp, optimizer)
    return dmp


def global_mean(local_losses: torch.Tensor, global_batch: int, world_size: int) -> torch.Tensor:
    """This rank's loss such that the gradients averaged over ranks are those of the global batch's
    mean loss: ``world_size * sum(local losses) / global_batch`` (the local mean when every rank
    holds the same number of samples, as torchrec's examples assume)."""
    return local_losses.sum() * (world_size / global_batch)


def _materialized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as built (skipped on the meta device, where DMP initializes them)."""
    return {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}


def copy_into_shards(dmp: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole (unsharded) tensors into the shards this rank holds, keeping the model's init;
    replicated tensors (data-parallel tables, dense layers) are copied whole."""
    target = dmp.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            destination = target.get(key)
            if isinstance(destination, ShardedTensor):
                for shard in destination.local_shards():
                    shard.tensor.copy_(value[shard_window(shard.metadata)])
            elif destination is not None and destination.shape == value.shape:
                destination.copy_(value)


def shard_window(meta) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(meta.shard_offsets, meta.shard_sizes))


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
    with quiet_torchrec():
        tensors = dmp.state_dict()
    weights = sum(_local_bytes(t) for t in tensors.values() if isinstance(t, ShardedTensor))
    state = sum(_local_bytes(t) for t in sparse_optimizer_state(dmp).values())
    return {"parameter_bytes": weights, "optimizer_bytes": state}


Pieces = dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], torch.Tensor]]]]


def _local_pieces(tensors: dict[str, torch.Tensor]) -> Pieces:
    """For every tensor: its whole size and the (offsets, values) of the parts this rank holds."""
    pieces: Pieces = {}
    for key, value in tensors.items():
        if isinstance(value, ShardedTensor):
            parts = [
                (tuple(s.metadata.shard_offsets), s.tensor.detach().cpu().clone())
                for s in value.local_shards()
            ]
            pieces[key] = (tuple(value.size()), parts)
        else:
            pieces[key] = (tuple(value.shape), [((0,) * value.dim(), value.detach().cpu().clone())])
    return pieces


def gathered(tensors: dict[str, torch.Tensor], group: dist.ProcessGroup) -> dict[str, torch.Tensor] | None:
    """The whole tensors, assembled on rank 0 from every rank's parts (None on other ranks).

    A collective: every rank calls it, each with the tensors it has (a rank may lack a key)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    every_rank: list[Pieces] | None = [{}] * world if rank == 0 else None  # filled on rank 0 only
    dist.gather_object(_local_pieces(tensors), every_rank, dst=dist.get_global_rank(group, 0), group=group)
    if every_rank is None:
        return None
    whole: dict[str, torch.Tensor] = {}
    for pieces in every_rank:
        for key, (size, parts) in pieces.items():
            for offsets, part in parts:
                target = whole.setdefault(key, torch.empty(size, dtype=part.dtype))
                target[tuple(slice(o, o + n) for o, n in zip(offsets, part.shape))] = part
    return whole


def union_sizes(tensors: dict[str, torch.Tensor], group: dist.ProcessGroup) -> dict[str, tuple[int, ...]]:
    """Whole sizes of the tensors any rank has (the fused optimizer lists only local tables)."""
    sizes = {k: tuple(v.size()) for k, v in tensors.items()}
    every_rank: list[dict[str, tuple[int, ...]]] = [{}] * dist.get_world_size(group)
    dist.all_gather_object(every_rank, sizes, group=group)
    return {k: v for per_rank in every_rank for k, v in per_rank.items()}
