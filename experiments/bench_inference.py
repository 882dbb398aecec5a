"""Inference throughput and bytes of exported (compressed, quantized) tables against the fp32 full table.

Every contender is a method sized by `solve_budget` to 1/``--fraction`` of the full table's weight
bytes (the full table itself at its own size), exported by `embtab.quant.export` at each
``--precisions`` entry: fbgemm's CPU inference kernels (`IntNBitTableBatchedEmbeddingBagsCodegen`)
at fp32 / fp16 / int8 / int4 / int2, rows aligned to 4 bytes, the method's remap and combine
unchanged. The reference is the full table exported at fp32 (the same kernel family at full
precision). All contenders look up the same pre-generated Criteo-like batches (26 single-id fields,
Zipf-distributed ids) under ``torch.no_grad``; rounds alternate the order and each figure is the
median over rounds of samples/s and of the per-round ratio to the reference (measured side by side).
Bytes are `served_bytes`: fbgemm's weight buffers plus the methods' own tensors.

    python -m experiments.bench_inference --out results/bench_inference.json
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Sequence

import torch
from torchrec import KeyedJaggedTensor

from embtab.budget import full_table_bytes, solve_budget
from embtab.collection import EmbeddingTables
from embtab.config import EmbeddingSpec, SparseOptimizer
from embtab.quant.export import EXPORT_PRECISIONS, export, served_bytes
from experiments.bench_methods import ab_rounds, base_spec, criteo_like_batches, method_template, ratio
from experiments.common import parser, write_json

REFERENCE = "full@fp32"


def sized_spec(name: str, spec: EmbeddingSpec, fraction: int) -> EmbeddingSpec:
    """`spec` with method `name` sized to 1/`fraction` of the full table's weight bytes."""
    optimizer = SparseOptimizer("sgd")
    if name == "full":
        return spec
    budget = full_table_bytes(spec, optimizer, include_optimizer=False) // fraction
    method = method_template(name)
    return solve_budget(spec, budget, optimizer, method=method, include_optimizer=False, min_fill=0.75).spec


def lookup(tables: EmbeddingTables):
    def run(kjt: KeyedJaggedTensor) -> None:
        with torch.no_grad():
            tables(kjt)

    return run


def contenders(
    methods: Sequence[str], precisions: Sequence[str], spec: EmbeddingSpec, fraction: int
) -> dict[str, EmbeddingTables]:
    out = {REFERENCE: export(EmbeddingTables(spec), "fp32")}
    for name in methods:
        tables = EmbeddingTables(sized_spec(name, spec, fraction))
        for precision in precisions:
            key = f"{name}@{precision}"
            if key != REFERENCE:
                out[key] = export(tables, precision)
    return out


def run(args: Any) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    for precision in args.precisions:
        if precision not in EXPORT_PRECISIONS:
            raise ValueError(f"--precisions: {precision!r}; expected some of {EXPORT_PRECISIONS}")
    batches = criteo_like_batches(args.fields, args.rows, args.batch, args.steps, args.seed)
    spec = base_spec(batches[0].keys(), args.rows, args.dim)
    served = contenders(args.methods, args.precisions, spec, args.fraction)
    for tables in served.values():
        lookup(tables)(batches[0])  # warm-up
    rates = ab_rounds({k: lookup(t) for k, t in served.items()}, batches, args.rounds)
    reference_bytes = served_bytes(served[REFERENCE])
    rows = [
        {
            "contender": key,
            "method": key.split("@")[0],
            "precision": key.split("@")[1],
            "samples_per_s": statistics.median(rates[key]),
            "ratio_to_full_fp32": ratio(rates[key], rates[REFERENCE]),
            "bytes": served_bytes(tables),
            "compression": reference_bytes / served_bytes(tables),
        }
        for key, tables in served.items()
    ]
    print(f"{'contender':<22} {'samples/s':>12} {'x full fp32':>11} {'bytes':>12} {'compression':>11}")
    for row in rows:
        print(
            f"{row['contender']:<22} {row['samples_per_s']:>12,.0f} {row['ratio_to_full_fp32']:>11.2f} "
            f"{row['bytes']:>12,} {row['compression']:>10.1f}x"
        )
    result = {"settings": vars(args), "rows": rows}
    write_json(args.out, result)
    return result


def make_parser() -> argparse.ArgumentParser:
    p = parser(__doc__.splitlines()[0], "results/bench_inference.json")
    p.add_argument("--methods", nargs="+", default=["full", "hashing_trick", "qr"])
    p.add_argument("--precisions", nargs="+", default=list(EXPORT_PRECISIONS))
    p.add_argument("--fraction", type=int, default=16, help="compressed methods get full bytes / fraction")
    p.add_argument("--fields", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000, help="ids per field")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="batches per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(make_parser().parse_args(argv))


if __name__ == "__main__":
    main()
