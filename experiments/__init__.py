"""Command-line experiments: training, budget sweeps, benchmarks. Each takes --out PATH."""

from embtab._threads import prefer_passive_openmp

prefer_passive_openmp()
