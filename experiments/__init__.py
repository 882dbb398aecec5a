"""Command-line experiments: training, budget sweeps, benchmarks. Each takes --out PATH."""

from embtab._threads import keep_freed_memory, prefer_passive_openmp

prefer_passive_openmp()
keep_freed_memory()
