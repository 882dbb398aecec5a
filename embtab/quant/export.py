"""Export any method's tables to fp32 / fp16 / int8 / int4 / int2, served by fbgemm's CPU kernels.

`export` copies a trained model's `EmbeddingTables` (fused or not) into an inference copy whose
torchrec collections are torchrec's quantized ones (fbgemm's `IntNBitTableBatchedEmbeddingBagsCodegen`),
with rows aligned to 4 bytes (torchrec's default 16 makes an int8 width-16 row 32 bytes instead of
20). Remap and combine are the method's own, unchanged. A row of an IntN table holds its fp16 scale
and bias; fbgemm computes them from the row's min and max, except for tables trained
quantization-aware at the exported bit width: their integer codes, step (scale) and offset (bias)
are written as trained, so the served model reproduces the QAT model's evaluation outputs up to the
fp16 rounding of the step.

`served_bytes` reads the bytes from the kernels' own buffers (each table is padded to a 128-byte
cache line by fbgemm), not from the state dict (which shows int4 rows at twice their size).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
import torchrec
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from embtab.collection import EmbeddingTables
from embtab.quant.precision import ROW_ALIGNMENT, SERVED_PRECISIONS, check_served_precision
from embtab.quant.spec import LowPrecision

EXPORT_PRECISIONS: tuple[str, ...] = SERVED_PRECISIONS
_DTYPES = {
    "fp32": torch.float,
    "fp16": torch.half,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "int2": torch.quint2x4,
}
BITS = {"int8": 8, "int4": 4, "int2": 2}


def embedding_tables(model: nn.Module) -> EmbeddingTables:
    """The one `EmbeddingTables` of `model` (a fused model, a CTR model, or the tables themselves)."""
    found = [m for m in model.modules() if isinstance(m, EmbeddingTables)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__} holds {len(found)} EmbeddingTables; expected exactly one")
    return found[0]


def trained_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every physical table's weights (fp32 copies) by table name, from plain or fused tables."""
    from embtab.shard import physical_weights

    return {name: w.float() for name, w in physical_weights(model).items()}


def precisions_of(
    tables: EmbeddingTables, precision: str, table_precisions: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The export precision of each physical table: `precision` unless `table_precisions` names
    the physical table or its logical table."""
    overrides = dict(table_precisions or {})
    owners = {p.name: name for name, m in tables.methods.items() for p in m.physical_tables}  # type: ignore[union-attr]
    known = set(owners) | set(owners.values())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"export precisions name unknown tables {unknown}; expected some of {sorted(known)}")
    out = {
        name: overrides.get(name, overrides.get(owners[name], precision)) for name in tables.physical_tables
    }
    for name, value in out.items():
        check_served_precision(value, f"table {name!r}")
    return out


def export(
    model: nn.Module, precision: str = "int8", table_precisions: Mapping[str, str] | None = None
) -> EmbeddingTables:
    """An inference copy of `model`'s tables served at `precision` (per-table `table_precisions`).

    Example::

        served = export(dmp, "int4")          # after training with embtab.fuse
        served(kjt).pooled                    # fbgemm's INT4 CPU kernel
        served_bytes(served)
    """
    source = embedding_tables(model)
    chosen = precisions_of(source, precision, table_precisions)
    plain_spec = replace(source.spec, precision="fp32", table_precisions=(), low_precision=LowPrecision())
    served = EmbeddingTables(plain_spec)
    served.methods.load_state_dict(source.methods.state_dict())
    weights = trained_weights(model)
    targets = _table_weights(served)
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(weights[name])
    grids = _qat_grids(source, weights, chosen)
    quantize_in_place(served, chosen)
    for name, (codes, step, qmin) in grids.items():
        write_codes(served, name, codes, step, qmin, BITS[chosen[name]])
    return served.eval()


def quantize_in_place(tables: EmbeddingTables, precisions: Mapping[str, str]) -> EmbeddingTables:
    """Swap `tables`' collections for torchrec's quantized ones: each physical table at its
    precision in `precisions`, rows aligned to 4 bytes."""
    for name, value in precisions.items():
        check_served_precision(value, f"table {name!r}")
    quant_prep_customize_row_alignment(
        tables, [torchrec.EmbeddingBagCollection, torchrec.EmbeddingCollection], ROW_ALIGNMENT
    )
    return quantize_embeddings(
        tables,
        dtype=torch.qint8,
        inplace=True,
        additional_qconfig_spec_keys=[torchrec.EmbeddingCollection],
        additional_mapping={torchrec.EmbeddingCollection: QuantEmbeddingCollection},
        per_table_weight_dtype={name: _DTYPES[value] for name, value in precisions.items()},
    )


def _table_weights(tables: EmbeddingTables) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for collection in tables.collections():
        if isinstance(collection, torchrec.EmbeddingBagCollection):
            out.update({n: bag.weight for n, bag in collection.embedding_bags.items()})
        else:
            out.update({n: e.weight for n, e in collection.embeddings.items()})  # type: ignore[union-attr]
    return out


def _qat_grids(
    source: EmbeddingTables, weights: Mapping[str, torch.Tensor], chosen: Mapping[str, str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """(integer codes, step per row, qmin) of every table trained quantized at its export bits."""
    state = getattr(source, "low_precision", None)
    settings: LowPrecision = source.spec.low_precision
    if state is None or settings.qat is None:
        return {}
    out = {}
    for name in state.names:
        if BITS.get(chosen[name]) != settings.bits:
            continue
        step = state.step_of(name).float().expand(weights[name].shape[0]).unsqueeze(1)
        codes = torch.clamp(torch.round(weights[name] / step), settings.qmin, settings.qmax)
        out[name] = (codes.to(torch.int64), step.squeeze(1), settings.qmin)
    return out


def intn_kernels(tables: nn.Module) -> list[nn.Module]:
    """fbgemm's inference kernels (one per table group) inside torchrec's quantized collections."""
    return [kernel for m in tables.modules() for kernel in getattr(m, "_emb_modules", [])]


def _kernel_view(tables: EmbeddingTables, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(row data ``[rows, bytes]``, scale and bias ``[rows, 4]``) of table `name` in its kernel."""
    for kernel in intn_kernels(tables):
        names = [spec[0] for spec in kernel.embedding_specs]
        if name in names:
            return kernel.split_embedding_weights(split_scale_shifts=True)[names.index(name)]
    raise KeyError(f"no fbgemm inference kernel holds table {name!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit codes ``[rows, dim]`` packed into bytes, lowest bits first (fbgemm's
    layout: element j of a byte at bits ``(j % per_byte) * bits``)."""
    per_byte = 8 // bits
    rows, dim = codes.shape
    grouped = codes.to(torch.int32).view(rows, dim // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (grouped << shifts).sum(2).to(torch.uint8)


def write_codes(
    tables: EmbeddingTables, name: str, codes: torch.Tensor, step: torch.Tensor, qmin: int, bits: int
) -> None:
    """Store signed `codes` ``[rows, dim]`` of table `name` with per-row `step` in fbgemm's IntN
    row format: unsigned code ``codes - qmin``, fp16 scale = step, fp16 bias = ``qmin * step``."""
    data, scale_bias = _kernel_view(tables, name)
    scale = step.to(torch.float16)
    bias = (qmin * scale.float()).to(torch.float16)
    packed = pack_codes(codes - qmin, bits)
    data[:, : packed.shape[1]] = packed
    scale_bias.copy_(torch.stack([scale, bias], 1).view(torch.uint8))  # type: ignore[union-attr]


def kernel_bytes(tables: nn.Module) -> int:
    """Bytes fbgemm allocated for the exported tables (every placement's weight buffer)."""
    return sum(
        buffer.numel() * buffer.element_size()
        for kernel in intn_kernels(tables)
        for buffer in (kernel.weights_host, kernel.weights_dev, kernel.weights_uvm)
    )


def row_bytes(tables: nn.Module, name: str) -> int:
    """Bytes of one row of table `name` in its kernel (data, scale and bias, alignment padding)."""
    data, _ = _kernel_view(tables, name)  # type: ignore[arg-type]
    return data.stride(0)


def served_bytes(tables: EmbeddingTables) -> int:
    """What serving the exported tables holds: fbgemm's buffers plus the methods' own parameters
    and buffers (projections, remap arrays)."""
    return kernel_bytes(tables) + sum(m.extra_bytes() for m in tables.methods.values())  # type: ignore[operator]
