"""Training-step throughput of embtab tables against a naive per-feature `nn.EmbeddingBag` loop.

A Criteo-like batch (26 single-id fields, Zipf-distributed ids) goes through forward, backward and
the optimizer update; both sides run in this process, one after the other, on the same batches.

    python -m experiments.bench_methods --out results/bench_methods.json
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

import embtab
from experiments.common import parser, write_json


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


def time_steps(step: Callable[[KeyedJaggedTensor], None], batches: list[KeyedJaggedTensor], warmup: int) -> float:
    for kjt in batches[:warmup]:
        step(kjt)
    start = time.perf_counter()
    for kjt in batches[warmup:]:
        step(kjt)
    return time.perf_counter() - start


def embtab_step(keys: list[str], rows: int, dim: int, kind: str, lr: float) -> Callable:
    spec = embtab.EmbeddingSpec(features=tuple(embtab.FeatureSpec(k, rows) for k in keys), dim=dim)
    dmp = embtab.fuse(embtab.EmbeddingTables(spec), embtab.SparseOptimizer(kind, lr=lr))

    def step(kjt: KeyedJaggedTensor) -> None:
        dmp(kjt).pooled.values().square().mean().backward()

    return step


def naive_step(keys: list[str], rows: int, dim: int, kind: str, lr: float) -> Callable:
    model = NaiveEmbeddings(keys, rows, dim)
    optimizer_class = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[kind]
    optimizer = optimizer_class(model.parameters(), lr=lr)

    def step(kjt: KeyedJaggedTensor) -> None:
        optimizer.zero_grad()
        model(kjt).square().mean().backward()
        optimizer.step()

    return step


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/bench_methods.json")
    p.add_argument("--fields", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000, help="rows per field")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = criteo_like_batches(args.fields, args.rows, args.batch, args.steps + args.warmup, seed=0)
    keys = batches[0].keys()
    results = {}
    for kind in ("sgd", "adagrad"):
        row = {}
        for name, make in (("embtab_full", embtab_step), ("naive_embeddingbag_loop", naive_step)):
            seconds = time_steps(make(keys, args.rows, args.dim, kind, 0.01), batches, args.warmup)
            row[name] = args.batch * args.steps / seconds
        row["speedup"] = row["embtab_full"] / row["naive_embeddingbag_loop"]
        results[kind] = row
        print(
            f"{kind:8s} embtab full table {row['embtab_full']:>10,.0f} samples/s | naive EmbeddingBag loop "
            f"{row['naive_embeddingbag_loop']:>10,.0f} samples/s | ratio {row['speedup']:.2f}x"
        )
    path = write_json(args.out, {"benchmark": "bench_methods", "config": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
