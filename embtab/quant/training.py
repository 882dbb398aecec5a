"""Low-precision training on fbgemm's fused kernels: stochastic fp16 rounding, LPT and ALPT.

`attach` is called by `embtab.fuse` on the fused model. For the tables that need it, a
`RowRecorder` reports every step's touched rows after the fused update, and:

- fp16 tables (``fp16_rounding="stochastic"``): the fused CPU kernel rounds the updated rows to
  nearest, losing any update below half an fp16 ulp. The update is recomputed in fp32 from the
  rows' old values, their gradient and the fused optimizer's (fp32) state, exactly as fbgemm
  computes it, and stochastically rounded to fp16 in place of the kernel's result. No fp32 master
  copy is kept.
- LPT (quantization-aware, fixed step per table): the updated rows are stochastically rounded onto
  the grid ``step * {-2^(b-1) .. 2^(b-1) - 1}``; stored weights are always on it, so the forward
  (the fused lookup) is the dequantized integer model, and the backward passes straight through.
- ALPT (Li et al., AAAI 2023): as LPT with a learnable step per row. The step's gradient is the
  LSQ gradient of ``step * clip(round(w / step))`` at the updated rows, scaled by
  ``1 / sqrt(batch * dim * (2^(b-1) - 1))``, stepped by its own (lazy, row-sparse) Adam before the
  rows are rounded onto their new grid. Hetu's implementation runs a second forward pass at the
  updated rows for the loss gradient; here the step's own gradient of the rows is used (one
  forward and backward per step).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from embtab.collection import EmbeddingTables
from embtab.config import SparseOptimizer
from embtab.fused_state import StoredTable, stored_tables_of, whole_local
from embtab.optimizers import optimizer_kind
from embtab.quant.rows import RowRecorder, TouchedRows
from embtab.quant.spec import LowPrecision

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MIN_STEP = 1e-8


def stochastic_round_fp16(values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 `values` rounded to one of their two fp16 neighbours with probability given by the
    distance (unbiased): 13 random bits are added below fp16's mantissa, then truncated."""
    bits = values.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 13, bits.shape, dtype=torch.int32, generator=generator)
    truncated = ((bits + noise) & ~((1 << 13) - 1)).view(torch.float32)
    normal = values.abs() >= torch.finfo(torch.float16).tiny
    return torch.where(normal, truncated, values.float()).to(torch.float16)


def stochastic_round_to_grid(
    values: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``step * clip(floor(values / step + U[0, 1)), qmin, qmax)``: unbiased inside the range."""
    noise = torch.rand(values.shape, generator=generator)
    return step * torch.clamp(torch.floor(values / step + noise), qmin, qmax)


def round_to_grid(values: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``step * clip(round(values / step), qmin, qmax)`` (round to nearest)."""
    return step * torch.clamp(torch.round(values / step), qmin, qmax)


def lsq_step_grad(grad: torch.Tensor, values: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per row, d loss / d step of ``step * clip(round(values / step))`` given d loss / d output
    (LSQ, Esser et al. 2020): ``round(v) - v`` inside the range, the bound outside."""
    scaled = values / step
    local = torch.where(
        scaled < qmin,
        torch.full_like(scaled, qmin),
        torch.where(scaled > qmax, torch.full_like(scaled, qmax), torch.round(scaled) - scaled),
    )
    return (grad * local).sum(1)


class LowPrecisionState(nn.Module):
    """QAT steps of one `EmbeddingTables` (buffers, so checkpoints carry them) and ALPT's Adam."""

    def __init__(self, steps: dict[str, torch.Tensor], settings: LowPrecision) -> None:
        super().__init__()
        self.settings = settings
        self.names = list(steps)
        for index, (name, step) in enumerate(steps.items()):
            self.register_buffer(f"step{index}", step)
            if settings.qat == "alpt":
                self.register_buffer(f"adam_m{index}", torch.zeros_like(step), persistent=False)
                self.register_buffer(f"adam_v{index}", torch.zeros_like(step), persistent=False)
        self.adam_steps = {name: 0 for name in steps}

    def step_of(self, table: str) -> torch.Tensor:
        """The step of `table`: ``[rows]`` (ALPT) or ``[1]`` (LPT)."""
        return getattr(self, f"step{self.names.index(table)}")

    def adam(self, table: str, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One lazy Adam step (only `rows` move) of `table`'s steps with learning rate step_lr."""
        index = self.names.index(table)
        step, m, v = (getattr(self, f"{n}{index}") for n in ("step", "adam_m", "adam_v"))
        beta1, beta2 = ADAM_BETAS
        self.adam_steps[table] += 1
        count = self.adam_steps[table]
        m[rows] = beta1 * m[rows] + (1 - beta1) * grad
        v[rows] = beta2 * v[rows] + (1 - beta2) * grad * grad
        m_hat = m[rows] / (1 - beta1**count)
        v_hat = v[rows] / (1 - beta2**count)
        step[rows] = torch.clamp(step[rows] - self.settings.step_lr * m_hat / (v_hat.sqrt() + ADAM_EPS), min=MIN_STEP)


def fp32_update(touched: TouchedRows, optimizer: SparseOptimizer, state: torch.Tensor | None) -> torch.Tensor:
    """The touched rows after the fused optimizer's update, computed in fp32 as fbgemm's CPU kernel
    does, given the rows' optimizer `state` after the update (fp32; None for SGD). torchrec leaves
    fbgemm's ``weight_decay_mode`` at NONE, so the kernel applies no weight decay, nor does this."""
    states = optimizer_kind(optimizer.kind).states
    if not states:
        return touched.before - optimizer.lr * touched.grad
    if state is None:
        raise ValueError(f"table {touched.table!r}: {optimizer.kind} needs its optimizer state")
    scale = state.unsqueeze(1) if states[0].per == "row" else state
    return touched.before - optimizer.lr * touched.grad / (scale.sqrt() + optimizer.eps)


def default_step(rows: int, init: tuple[float, float] | None, bits: int) -> float:
    """The init bound (torchrec's sqrt(1/rows) unless set) over 2^(bits-2): the grid spans twice
    the initialization range."""
    bound = max(abs(init[0]), abs(init[1])) if init else math.sqrt(1.0 / rows)
    return bound / 2 ** (bits - 2)


class LowPrecisionTraining:
    """The per-step work of one fused `EmbeddingTables`; see the module docstring."""

    def __init__(
        self,
        tables: EmbeddingTables,
        weights: dict[str, torch.Tensor],
        momentum: dict[str, torch.Tensor],
        optimizer: SparseOptimizer,
    ) -> None:
        settings: LowPrecision = tables.spec.low_precision
        self.settings, self.optimizer = settings, optimizer
        self.weights, self.momentum = weights, momentum
        physical = tables.physical_tables
        owners = _owners(tables)
        self.quantized = sorted(n for n in physical if any(settings.quantizes(o) for o in owners[n]))
        self.rounded = sorted(
            n for n in physical if physical[n].precision == "fp16" and settings.fp16_rounding == "stochastic"
        )
        for name in self.quantized:
            if physical[name].precision != "fp32":
                raise ValueError(
                    f"table {name!r}: quantization-aware training keeps its grid in fp32 tables; "
                    f"got precision {physical[name].precision!r}, expected 'fp32'"
                )
        steps = {
            n: torch.full(
                (physical[n].rows if settings.qat == "alpt" else 1,),
                _configured_step(settings, owners[n])
                or default_step(physical[n].rows, physical[n].init, settings.bits),
            )
            for n in self.quantized
        }
        self.state = LowPrecisionState(steps, settings)
        tables.add_module("low_precision", self.state)
        with torch.no_grad():
            for name in self.quantized:
                step = self.state.step_of(name).unsqueeze(1)
                weights[name].copy_(round_to_grid(weights[name], step, settings.qmin, settings.qmax))
        watched = set(self.quantized) | set(self.rounded)
        self.recorder = (
            RowRecorder(watched_collections(tables, watched), weights, self.on_update, batch_from=tables)
            if watched
            else None
        )

    def on_update(self, touched: list[TouchedRows]) -> None:
        for rows in touched:
            if rows.table in self.rounded:
                state = self.momentum.get(rows.table)
                updated = fp32_update(rows, self.optimizer, None if state is None else state[rows.rows])
                self.weights[rows.table][rows.rows] = stochastic_round_fp16(updated)
            elif rows.table in self.quantized:
                self._requantize(rows)

    def _requantize(self, touched: TouchedRows) -> None:
        settings, name = self.settings, touched.table
        updated = self.weights[name][touched.rows].float()
        step = self.state.step_of(name)
        if settings.qat == "alpt":
            row_steps = step[touched.rows].unsqueeze(1)
            dim = updated.shape[1]
            scale = 1.0 / math.sqrt(touched.batch_size * dim * settings.qmax)
            grad = lsq_step_grad(touched.grad, updated, row_steps, settings.qmin, settings.qmax) * scale
            self.state.adam(name, touched.rows, grad)
            row_steps = step[touched.rows].unsqueeze(1)
        else:
            row_steps = step
        self.weights[name][touched.rows] = stochastic_round_to_grid(
            updated, row_steps, settings.qmin, settings.qmax
        )


def _configured_step(settings: LowPrecision, owners: list[str]) -> float | None:
    """The step configured for a physical table (the smallest over the logical tables using it)."""
    steps = [s for s in (settings.step_of(o) for o in owners) if s is not None]
    return min(steps) if steps else None


def _owners(tables: EmbeddingTables) -> dict[str, list[str]]:
    """Logical tables that use each physical table."""
    owners: dict[str, list[str]] = {}
    for name, method in tables.methods.items():
        for physical in method.physical_tables:  # type: ignore[union-attr]
            owners.setdefault(physical.name, []).append(name)
    return owners


def watched_collections(tables: EmbeddingTables, watched: set[str]) -> list[tuple[nn.Module, dict[str, list[str]]]]:
    """Each fused collection with the feature keys of the watched tables it holds."""
    out = []
    for module in tables.collections():
        configs = getattr(module, "_embedding_bag_configs", None) or getattr(module, "_embedding_configs", None)
        if configs is None:
            configs = getattr(module, "embedding_bag_configs", getattr(module, "embedding_configs", list))()
        keys = {c.name: list(c.feature_names) for c in configs if c.name in watched}
        if keys:
            out.append((module, keys))
    return out


def _row_state(stored: StoredTable, optimizer: SparseOptimizer) -> torch.Tensor | None:
    """The table's first optimizer state tensor (what `fp32_update` reads), whole on this process."""
    states = optimizer_kind(optimizer.kind).states
    if not states:
        return None
    named = [v for k, v in stored.states.items() if k.rsplit(".", 1)[-1] == states[0].name]
    return whole_local(named[0], f"optimizer state of {stored.name!r}") if named else None


def attach(dmp: nn.Module, optimizer: SparseOptimizer) -> list[LowPrecisionTraining]:
    """Start low-precision training on every `EmbeddingTables` of a fused model that needs it."""
    out = []
    for tables, stored in stored_tables_of(dmp):
        settings: LowPrecision = tables.spec.low_precision
        physical = tables.physical_tables
        needs = settings.qat is not None or (
            settings.fp16_rounding == "stochastic" and any(t.precision == "fp16" for t in physical.values())
        )
        if not needs:
            continue
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "stochastic fp16 rounding and quantization-aware training run on one process; "
                "train on one process, or use fp16_rounding='nearest' without QAT"
            )
        own = {n: whole_local(stored[n].weight, f"table {n!r}") for n in physical if n in stored}
        states = {n: _row_state(stored[n], optimizer) for n in physical if n in stored}
        own_state = {n: state for n, state in states.items() if state is not None}
        out.append(LowPrecisionTraining(tables, own, own_state, optimizer))
    return out
