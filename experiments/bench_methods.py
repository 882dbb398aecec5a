"""Training-step throughput of every embtab method against the full table and a naive PyTorch version.

A Criteo-like batch (26 single-id fields, Zipf-distributed ids, batch 4096, width 16) goes through
forward, backward and the optimizer update (fused into the backward for embtab). Every method the
registry holds as compression or export-compressed (`embtab.registry.methods_of_kind`: a newly
registered method is benchmarked too) is sized by `solve_budget` to 1/10 of the full table's bytes
and timed three ways, in alternating rounds on the same pre-generated batches:

- the full table through embtab (the reference: ``ratio_to_full``),
- the method through embtab (`embtab.fuse`, fbgemm's fused kernels and in-backward optimizer),
- a naive pure-PyTorch version of the same method (``ratio_to_naive``): per-feature
  ``nn.EmbeddingBag`` / ``nn.Embedding(sparse=True)`` modules, a Python loop over the features,
  the method's remap written with torch ops inside the loop, ``torch.optim`` with sparse gradients.

The naive versions compute the same outputs as embtab's given the same weights, and one SGD step
updates the same rows the same way (tests/test_experiments_bench_methods.py), so both sides do the
same work: ``nn.EmbeddingBag`` pools in the kernel where the method's combine commutes with pooling,
QR's ``mult`` looks rows up per id (``nn.Embedding``), multiplies, then pools; Unified Embedding
shares one module across features; managed collisions remap with torchrec's
``MCHManagedCollisionModule`` per feature, as embtab does. With ``--optimizer sgd`` (the default)
embtab's fused optimizer is fbgemm's SGD and the naive one ``torch.optim.SGD``.

Each contender runs ``--steps`` steps per round; rounds alternate the order (full, method, naive,
then the reverse) and the figures are medians over ``--rounds`` of the per-round samples/s and of
the per-round ratios, so a ratio is always measured side by side. Goals (the issue): hashing trick and Unified Embedding (multiplex) at
>= 0.85x of the full table, QR at >= 0.6x, every method >= 2x its naive version; of the VLDB
benchmark's methods (no naive versions yet), ROBE >= 0.85x, TT-Rec, DPQ and MGQE >= 0.5x, DHE
reported. DPQ and
MGQE train a full query table (their bytes are the full table's plus the codebook). The foundation's
figure (full table vs a naive ``nn.EmbeddingBag`` loop, under SGD and Adagrad) is kept.

    python -m experiments.bench_methods --out results/bench_methods.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchrec import JaggedTensor, KeyedJaggedTensor
from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule

import embtab
from embtab.budget import BudgetError, BudgetFit, budget_range, full_table_bytes, solve_budget
from embtab.config import EmbeddingSpec, FeatureSpec, LogicalTable, MethodSpec, SparseOptimizer
from embtab.hashing import hash_to_range, salt_of
from embtab.methods.base import SizedSpec
from embtab.methods.full import FullTable
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.managed_collision import ManagedCollision
from embtab.methods.mgqe import MGQE
from embtab.methods.multi_hash import MultiHash
from embtab.methods.multiplex import Multiplexed
from embtab.methods.qr import OPERATIONS, QREmbedding
from embtab.registry import MethodKind, method_class, methods_of_kind
from experiments.common import parser, write_json
from experiments.timing import CLOCKS, time_steps

#: Minimum ratio to the full table's samples/s of the methods the issues set a goal for.
GOALS_VS_FULL: dict[str, float] = {
    "hashing_trick": 0.85,
    "qr": 0.6,
    "multiplex": 0.85,
    "tt_rec": 0.5,
    "robe": 0.85,
    "dpq": 0.5,
    "mgqe": 0.5,
}
#: Benchmarked kinds: every method that compresses a table at a configuration it is given (sized
#: by the budget solver, or trained at its fixed size and compressed at export, as DPQ / MGQE).
BENCH_KINDS = (MethodKind.COMPRESSION, MethodKind.EXPORT_COMPRESSED)
#: The size knob's value in a template (the budget solver replaces it).
PLACEHOLDER_SIZE = 64
#: Every method must run at least this many times as fast as its naive version.
GOAL_VS_NAIVE = 2.0
BUDGET_FRACTION = 10  # budget = full table bytes // BUDGET_FRACTION
MIN_FILL, QR_FALLBACK_MIN_FILL = 0.9, 0.75
NAIVE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}


def criteo_like_batches(
    fields: int, rows: int, batch: int, count: int, seed: int
) -> list[KeyedJaggedTensor]:
    """`count` batches of one Zipf(1.1)-distributed id per field and sample."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    weights = ranks.pow(-1.1)
    keys = [f"C{i + 1}" for i in range(fields)]
    return [
        KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.multinomial(weights, fields * batch, replacement=True, generator=g),
            lengths=torch.ones(fields * batch, dtype=torch.int64),
        )
        for _ in range(count)
    ]


# --------------------------------------------------------------------------------------------------
# The foundation's naive model: one nn.EmbeddingBag per feature.


class NaiveEmbeddings(nn.Module):
    """One `nn.EmbeddingBag` per feature, looked up one after the other (the usual hand-written model)."""

    def __init__(self, keys: list[str], rows: int, dim: int) -> None:
        super().__init__()
        self.keys = keys
        self.bags = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for _ in keys)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        per_key = kjt.to_dict()
        return torch.cat(
            [bag(per_key[k].values(), per_key[k].offsets()[:-1]) for k, bag in zip(self.keys, self.bags)], 1
        )


# --------------------------------------------------------------------------------------------------
# Naive pure-PyTorch versions of every method: per-feature modules, a Python loop over features.


def _pool(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum per-id vectors ``[n, d]`` into bags ``[B, d]`` (no scatter when every bag has one id)."""
    batch = offsets.numel() - 1
    if rows.shape[0] == batch:
        return rows
    bags = torch.repeat_interleave(torch.arange(batch), offsets.diff())
    return rows.new_zeros(batch, rows.shape[1]).index_add_(0, bags, rows)


class NaiveTable(nn.Module):
    """One logical table's remap, lookups and combine, written directly with torch ops.

    `physical` lists the tables it reads as ``(name, rows, dim, per_id)``: the owning
    `NaiveMethodEmbeddings` allocates each name once (an `nn.Embedding` when ``per_id``, else an
    `nn.EmbeddingBag` that pools in the kernel) and passes them to `forward`.
    """

    physical: list[tuple[str, int, int, bool]]

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, tables: nn.ModuleDict) -> torch.Tensor:
        raise NotImplementedError


class NaiveFull(NaiveTable):
    def __init__(self, table: LogicalTable, spec: FullTable) -> None:
        super().__init__()
        self.name = table.name
        self.physical = [(table.name, table.cardinality, table.dim, False)]

    def forward(self, ids, offsets, tables):
        return tables[self.name](ids, offsets[:-1])


class NaiveHashing(NaiveTable):
    def __init__(self, table: LogicalTable, spec: HashingTrick) -> None:
        super().__init__()
        if spec.hot_ids:
            raise ValueError("the naive hashing trick has no hot ids")
        self.name, self.rows, self.salt = table.name, spec.rows, salt_of(table.name, spec.salt)
        self.physical = [(table.name, spec.rows, table.dim, False)]

    def forward(self, ids, offsets, tables):
        return tables[self.name](hash_to_range(ids, self.rows, self.salt), offsets[:-1])


class NaiveMultiHash(NaiveTable):
    """k salted probes, each looked up with its own `nn.EmbeddingBag` call, summed or concatenated."""

    def __init__(self, table: LogicalTable, spec: MultiHash) -> None:
        super().__init__()
        if spec.hot_ids or spec.importance:
            raise ValueError("the naive multi-hash has neither hot ids nor importance weights")
        k = spec.hashes
        width = table.dim // k if spec.combine == "concat" else table.dim
        if spec.shared:
            self.names, self.range = [table.name] * k, spec.rows
            self.physical = [(table.name, spec.rows, width, False)]
        else:
            self.names, self.range = [f"{table.name}@h{j}" for j in range(k)], spec.rows // k
            self.physical = [(n, spec.rows // k, width, False) for n in self.names]
        self.salts = [salt_of(table.name, spec.salt, j) for j in range(k)]
        self.concat = spec.combine == "concat"

    def forward(self, ids, offsets, tables):
        probes = [
            tables[name](hash_to_range(ids, self.range, salt), offsets[:-1])
            for name, salt in zip(self.names, self.salts)
        ]
        if self.concat:
            return torch.cat(probes, 1)
        total = probes[0]
        for probe in probes[1:]:
            total = total + probe
        return total


class NaiveQR(NaiveTable):
    """Quotient and remainder tables: ``r[id mod m] (op) q[id div m]``; mult is combined per id."""

    def __init__(self, table: LogicalTable, spec: QREmbedding) -> None:
        super().__init__()
        if spec.partitions != 2:
            raise ValueError("the naive QR embedding has two partitions (quotient and remainder)")
        self.m = min(spec.collisions, table.cardinality)
        self.operation = spec.operation
        self.per_id = spec.operation == "mult"
        width = table.dim // 2 if spec.operation == "concat" else table.dim
        self.remainder, self.quotient = f"{table.name}@qr0", f"{table.name}@qr1"
        self.physical = [
            (self.remainder, self.m, width, self.per_id),
            (self.quotient, -(-table.cardinality // self.m), width, self.per_id),
        ]

    def forward(self, ids, offsets, tables):
        r_ids = torch.remainder(ids, self.m)
        q_ids = torch.div(ids, self.m, rounding_mode="floor")
        if self.per_id:
            return _pool(tables[self.remainder](r_ids) * tables[self.quotient](q_ids), offsets)
        r = tables[self.remainder](r_ids, offsets[:-1])
        q = tables[self.quotient](q_ids, offsets[:-1])
        return torch.cat([r, q], 1) if self.operation == "concat" else r + q


class NaiveMultiplex(NaiveTable):
    """`chunks` salted probes into the one shared table, concatenated."""

    def __init__(self, table: LogicalTable, spec: Multiplexed) -> None:
        super().__init__()
        self.chunks, chunk_dim = spec.shape(table)
        self.shared, self.rows = spec.table, spec.rows
        self.salts = [salt_of(table.name, probe) for probe in range(self.chunks)]
        self.physical = [(spec.table, spec.rows, chunk_dim, False)]

    def forward(self, ids, offsets, tables):
        shared = tables[self.shared]
        probes = [shared(hash_to_range(ids, self.rows, salt), offsets[:-1]) for salt in self.salts]
        return probes[0] if len(probes) == 1 else torch.cat(probes, 1)


class NaiveManagedCollision(NaiveTable):
    """torchrec's `MCHManagedCollisionModule` (the same remap embtab uses), then an `nn.EmbeddingBag`."""

    def __init__(self, table: LogicalTable, spec: ManagedCollision) -> None:
        super().__init__()
        self.name = table.name
        self.mch = MCHManagedCollisionModule(
            zch_size=spec.rows,
            device=torch.device("cpu"),
            eviction_policy=LFU_EvictionPolicy() if spec.eviction == "lfu" else LRU_EvictionPolicy(),
            eviction_interval=spec.eviction_interval,
            input_hash_size=spec.check(table),
            name=table.name,
        )
        self.physical = [(table.name, spec.rows, table.dim, False)]

    def forward(self, ids, offsets, tables):
        jt = JaggedTensor(values=ids, offsets=torch.tensor([0, ids.numel()]))
        rows = self.mch({self.name: jt})[self.name].values()
        self.mch.evict()
        return tables[self.name](rows, offsets[:-1])


NAIVE_TABLES: dict[type[MethodSpec], type[NaiveTable]] = {
    FullTable: NaiveFull,
    HashingTrick: NaiveHashing,
    MultiHash: NaiveMultiHash,
    QREmbedding: NaiveQR,
    Multiplexed: NaiveMultiplex,
    ManagedCollision: NaiveManagedCollision,
}


class NaiveMethodEmbeddings(nn.Module):
    """A naive pure-PyTorch version of an `EmbeddingSpec`: a Python loop over its features.

    Physical tables (``nn.EmbeddingBag`` / ``nn.Embedding``, ``sparse=True``) carry embtab's
    physical table names, so `load_weights` can copy an `EmbeddingTables`' weights in. Every
    feature is sum-pooled; the output is ``[B, sum of widths]`` in the spec's feature order (as
    embtab's pooled `KeyedTensor`).
    """

    def __init__(self, spec: EmbeddingSpec) -> None:
        super().__init__()
        self.keys = [f.name for f in spec.features]
        self.tables = nn.ModuleDict()
        self.methods = nn.ModuleDict()
        for table in spec.tables():
            if any(f.pooling != "sum" for f in table.features):
                raise ValueError(f"table {table.name!r}: the naive versions sum-pool every feature")
            naive = NAIVE_TABLES[type(table.method)](table, table.method)
            self.methods[table.name] = naive
            for name, rows, dim, per_id in naive.physical:
                if name not in self.tables:
                    self.tables[name] = (
                        nn.Embedding(rows, dim, sparse=True)
                        if per_id
                        else nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
                    )
        self.table_of = [f.table_name for f in spec.features]

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        per_key = kjt.to_dict()
        outputs = []
        for key, table in zip(self.keys, self.table_of):
            jt = per_key[key]
            outputs.append(self.methods[table](jt.values(), jt.offsets(), self.tables))
        return torch.cat(outputs, 1)

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy physical tables in, by embtab's table names (`embtab.shard.physical_weights`)."""
        for name, module in self.tables.items():
            module.weight.copy_(weights[name])


# --------------------------------------------------------------------------------------------------
# Configurations and training steps.


def base_spec(keys: Sequence[str], rows: int, dim: int) -> EmbeddingSpec:
    return EmbeddingSpec(features=tuple(FeatureSpec(k, rows) for k in keys), dim=dim)


def bench_methods() -> dict[str, type[MethodSpec]]:
    """The benchmarked methods, from the one registry (a newly registered method appears here)."""
    return methods_of_kind(*BENCH_KINDS)


def method_template(name: str, qr_operation: str = "mult", rows: int = 0) -> MethodSpec:
    """Registered method `name` with its default parameters and the size knob at a placeholder
    (`solve_budget` sets it); QR uses `qr_operation`, and a method with frequent ids (MGQE's
    ``hot_ids``) gets the 10% smallest of `rows` (the most frequent under
    `criteo_like_batches`' Zipf ranks)."""
    spec_class = method_class(name)
    params: dict[str, Any] = {}
    if issubclass(spec_class, SizedSpec):
        params[spec_class.size_field] = PLACEHOLDER_SIZE
    if issubclass(spec_class, QREmbedding):
        params["operation"] = qr_operation
    if issubclass(spec_class, MGQE):
        params["hot_ids"] = tuple(range(rows // 10))
    try:
        return spec_class(**params)
    except TypeError as error:  # a parameter without a default the benchmark does not know
        raise ValueError(f"method {name!r}: no benchmark configuration from its defaults ({error})") from error


def solve(
    name: str, spec: EmbeddingSpec, optimizer: SparseOptimizer, qr_operation: str, fraction: int = BUDGET_FRACTION
) -> tuple[BudgetFit, float]:
    """The method sized to 1/`fraction` of the full table's bytes, and the `min_fill` it was solved with.

    QR's bytes move in coarse steps near the budget (``m + ceil(n / m)`` rows), and TT-Rec's with
    the square of its rank, so when 90% of it is out of reach they are solved with
    ``min_fill=0.75`` (recorded as ``min_fill``).
    """
    budget = full_table_bytes(spec, optimizer) // fraction
    method = method_template(name, qr_operation, spec.features[0].cardinality)
    if name == "full":  # the reference itself: the full bytes, not the budget
        return solve_budget(spec, full_table_bytes(spec, optimizer), optimizer, method=method), MIN_FILL
    if not isinstance(method, SizedSpec):  # DPQ / MGQE: trained at their fixed size
        fixed, _ = budget_range(spec, optimizer, method)
        return solve_budget(spec, fixed, optimizer, method=method), MIN_FILL
    try:
        return solve_budget(spec, budget, optimizer, method=method, min_fill=MIN_FILL), MIN_FILL
    except BudgetError:
        if name not in ("qr", "tt_rec"):
            raise
        fit = solve_budget(spec, budget, optimizer, method=method, min_fill=QR_FALLBACK_MIN_FILL)
        return fit, QR_FALLBACK_MIN_FILL


Step = Callable[[KeyedJaggedTensor], None]


def embtab_step(spec: EmbeddingSpec, optimizer: SparseOptimizer, seed: int = 0) -> Step:
    torch.manual_seed(seed)
    dmp = embtab.fuse(embtab.EmbeddingTables(spec), optimizer)

    def step(kjt: KeyedJaggedTensor) -> None:
        dmp(kjt).pooled.values().square().mean().backward()

    step.model = dmp  # type: ignore[attr-defined]
    return step


def torch_step(model: nn.Module, kind: str, lr: float) -> Step:
    optimizer = NAIVE_OPTIMIZERS[kind](model.parameters(), lr=lr)

    def step(kjt: KeyedJaggedTensor) -> None:
        optimizer.zero_grad()
        model(kjt).square().mean().backward()
        optimizer.step()

    step.model = model  # type: ignore[attr-defined]
    return step


def naive_step(spec: EmbeddingSpec, kind: str, lr: float, seed: int = 0) -> Step:
    torch.manual_seed(seed)
    return torch_step(NaiveMethodEmbeddings(spec), kind, lr)


# --------------------------------------------------------------------------------------------------
# Timing: contenders alternate within rounds, the same batches for each.


def ab_rounds(
    contenders: dict[str, Step], batches: Sequence[KeyedJaggedTensor], rounds: int, clock: str = "wall"
) -> dict[str, list[float]]:
    """Samples/s of every contender in each round; rounds alternate the order (ABC, CBA, ...)."""
    samples = sum(kjt.stride() for kjt in batches)
    names = list(contenders)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(samples / time_steps(contenders[name], batches, clock=clock))
    return rates


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio (each measured side by side)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def spec_dict(spec: EmbeddingSpec) -> dict[str, Any]:
    """`spec` as plain data (`EmbeddingSpec.from_dict` reads it back)."""
    return {
        "features": [asdict(f) for f in spec.features],
        "dim": spec.dim,
        "method": spec.method.to_dict(),
        "table_methods": {name: m.to_dict() for name, m in spec.table_methods},
    }


def bench_method(
    name: str,
    fit: BudgetFit,
    min_fill: float,
    full: Step,
    optimizer: SparseOptimizer,
    batches: list[KeyedJaggedTensor],
    args: Any,
) -> dict[str, Any]:
    """Side-by-side rounds of the full table, `fit`'s configuration and its naive version."""
    method = full if name == "full" else embtab_step(fit.spec, optimizer)
    has_naive = type(fit.method) in NAIVE_TABLES  # the VLDB benchmark's methods have none yet
    contenders = {"full": full, "method": method}
    if has_naive:
        contenders["naive"] = naive_step(fit.spec, optimizer.kind, optimizer.lr)
    for step in list(contenders.values())[1:]:
        time_steps(step, batches[: args.warmup])
    timed = batches[args.warmup :]
    if name == "full":  # the reference against itself: ratio 1 by definition
        del contenders["method"]
    rates = ab_rounds(contenders, timed, args.rounds, args.clock)
    rates.setdefault("method", rates["full"])
    vs_full = ratio(rates["method"], rates["full"])
    vs_naive = ratio(rates["method"], rates["naive"]) if has_naive else None
    goal_full = GOALS_VS_FULL.get(name)
    met = (vs_naive is None or vs_naive >= GOAL_VS_NAIVE) and (goal_full is None or vs_full >= goal_full)
    return {
        "samples_per_s": statistics.median(rates["method"]),
        "full_samples_per_s": statistics.median(rates["full"]),
        "naive_samples_per_s": statistics.median(rates["naive"]) if has_naive else None,
        "ratio_to_full": vs_full,
        "ratio_to_naive": vs_naive,
        "goals": {"ratio_to_full": goal_full, "ratio_to_naive": GOAL_VS_NAIVE},
        "goal_met": met,
        "bytes": fit.bytes,
        "budget_bytes": fit.budget_bytes,
        "full_bytes": fit.full_bytes,
        "fill": fit.fill,
        "min_fill": min_fill,
        "compression_ratio": fit.compression_ratio,
        "method": fit.method.to_dict(),
        "spec": spec_dict(fit.spec),
        "rounds": rates,
    }


def bench_foundation(
    keys: list[str], args: Any, batches: list[KeyedJaggedTensor], kinds: Sequence[str]
) -> dict[str, dict[str, float]]:
    """The foundation's figure: the full table through embtab vs a naive `nn.EmbeddingBag` loop."""
    results = {}
    for kind in kinds:
        torch.manual_seed(0)
        contenders = {
            "embtab_full": embtab_step(
                base_spec(keys, args.rows, args.dim), SparseOptimizer(kind, lr=args.lr)
            ),
            "naive_embeddingbag_loop": torch_step(NaiveEmbeddings(keys, args.rows, args.dim), kind, args.lr),
        }
        for step in contenders.values():
            time_steps(step, batches[: args.warmup])
        rates = ab_rounds(contenders, batches[args.warmup :], args.rounds, args.clock)
        row = {name: statistics.median(r) for name, r in rates.items()}
        row["speedup"] = ratio(rates["embtab_full"], rates["naive_embeddingbag_loop"])
        results[kind] = row
        print(
            f"{kind:8s} embtab full table {row['embtab_full']:>10,.0f} samples/s | naive EmbeddingBag loop "
            f"{row['naive_embeddingbag_loop']:>10,.0f} samples/s | ratio {row['speedup']:.2f}x",
            flush=True,
        )
        del contenders
        gc.collect()
    return results


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def make_parser() -> argparse.ArgumentParser:
    p = parser(__doc__.splitlines()[0], "results/bench_methods.json")
    p.add_argument("--fields", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000, help="rows per field (the full table)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender and round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall time, or process CPU time (with --threads 1: robust to other load on the machine)",
    )
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--budget-fraction", type=int, default=BUDGET_FRACTION, help="budget = full bytes / this")
    p.add_argument(
        "--methods",
        default=",".join(bench_methods()),
        help="comma-separated registered methods (default: every compression method)",
    )
    p.add_argument("--optimizer", default="sgd", choices=sorted(NAIVE_OPTIMIZERS))
    p.add_argument("--qr-operation", default="mult", choices=OPERATIONS)
    p.add_argument(
        "--foundation-kinds",
        default="sgd,adagrad",
        help="optimizers of the full-vs-naive-EmbeddingBag figure (empty: skip it)",
    )
    return p


def run(args: Any) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(",") if m]
    known = bench_methods()
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected one of {sorted(known)}")
    batches = criteo_like_batches(args.fields, args.rows, args.batch, args.steps + args.warmup, seed=0)
    keys = batches[0].keys()
    spec = base_spec(keys, args.rows, args.dim)
    optimizer = SparseOptimizer(args.optimizer, lr=args.lr)
    full = embtab_step(spec, optimizer)
    time_steps(full, batches[: args.warmup])
    methods = {}
    for name in names:
        try:
            fit, min_fill = solve(name, spec, optimizer, args.qr_operation, args.budget_fraction)
        except BudgetError as error:  # a budget out of the method's reach (e.g. at tiny sizes)
            methods[name] = {"error": str(error), "goal_met": False}
            print(f"{name:18s} not measured: {error}", flush=True)
            continue
        row = methods[name] = bench_method(name, fit, min_fill, full, optimizer, batches, args)
        goal = row["goals"]["ratio_to_full"]
        print(
            f"{name:18s} {row['samples_per_s']:>10,.0f} samples/s | vs full {row['ratio_to_full']:.2f}x"
            f" (goal {'-' if goal is None else f'>= {goal}'}) | vs naive {_times(row['ratio_to_naive'])}"
            f" (goal >= {GOAL_VS_NAIVE}) | {row['bytes'] / 2**20:.1f} MiB fill {row['fill']:.2f}"
            f" | goal met: {'yes' if row['goal_met'] else 'no'}",
            flush=True,
        )
        gc.collect()
    del full
    gc.collect()
    kinds = [k for k in args.foundation_kinds.split(",") if k]
    foundation = bench_foundation(keys, args, batches, kinds)
    full_rates = [x for row in methods.values() for x in row.get("rounds", {}).get("full", [])]
    goals_vs_full = dict(GOALS_VS_FULL)
    payload = {
        "benchmark": "bench_methods",
        "config": vars(args),
        "optimizer": args.optimizer,
        "goals": {"ratio_to_full": goals_vs_full, "ratio_to_naive": GOAL_VS_NAIVE},
        "full_bytes": full_table_bytes(spec, optimizer),
        "budget_bytes": full_table_bytes(spec, optimizer) // args.budget_fraction,
        "full_samples_per_s": statistics.median(full_rates) if full_rates else None,
        "methods": methods,
        "all_goals_met": all(r["goal_met"] for r in methods.values()),
        "results": foundation,  # the foundation's figure: {kind: {embtab_full, naive_..., speedup}}
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(make_parser().parse_args(argv))


if __name__ == "__main__":
    main()
