"""Learned sizes: supernet search (OptEmbed), pruning (PEP), and compact export.

The methods themselves live in `embtab.methods` (`OptEmbed`, `PEP`, `MDE`, and `PrunedTable`, the
compact table they export to); this package holds what happens after training: the evolutionary
width search, fitting the pruning to a byte budget, and building the compact (optionally int8)
tables.
"""

from embtab.search.evolution import EvolutionConfig, EvolutionResult, evolve
from embtab.search.export import (
    TablePlan,
    budget_target,
    build_compact,
    bytes_at,
    fit_shift,
    fresh,
    plans,
    quantize,
    rewind,
    set_shift,
    table_scores,
)

__all__ = [
    "EvolutionConfig",
    "EvolutionResult",
    "TablePlan",
    "budget_target",
    "build_compact",
    "bytes_at",
    "evolve",
    "fit_shift",
    "fresh",
    "plans",
    "quantize",
    "rewind",
    "set_shift",
    "table_scores",
]
