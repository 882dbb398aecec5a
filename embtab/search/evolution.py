"""OptEmbed's evolutionary search over per-table widths (stage 2), deterministic for a seed.

A candidate is one width per table, each drawn from that table's choices. The first generation is
``population`` random candidates; every generation then adds ``mutations`` children (a copy of a
random survivor whose every gene is redrawn with probability ``mutation_prob``) and ``crossovers``
children (one-point crossover of two random survivors over the tables), and the ``survivors``
fittest of parents and children go on. Defaults are the paper's (10 + 10 children, top 15,
mutation 0.1, 30 generations). Unlike the reference code, the crossover point is drawn over the
tables (not the latent width) and mutation copies its parent instead of editing it in place.
Fitness (validation AUC of the supernet) is memoized: a candidate is scored once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

Candidate = tuple[int, ...]


@dataclass(frozen=True)
class EvolutionConfig:
    """Sizes and rates of the search; the paper's defaults."""

    generations: int = 30
    population: int = 20
    mutations: int = 10
    crossovers: int = 10
    survivors: int = 15
    mutation_prob: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("generations", "population", "survivors"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvolutionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError(f"EvolutionConfig.mutation_prob must be in [0, 1], got {self.mutation_prob}")


@dataclass
class EvolutionResult:
    """The best candidate, its fitness, the best fitness after each generation, all scores."""

    best: Candidate
    fitness: float
    history: list[float]
    scores: dict[Candidate, float] = field(repr=False)


def evolve(
    choices: Sequence[Sequence[int]],
    fitness: Callable[[Candidate], float],
    config: EvolutionConfig = EvolutionConfig(),
) -> EvolutionResult:
    """Maximize `fitness` over candidates ``(c_0, ..., c_{T-1})`` with ``c_t in choices[t]``."""
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError(f"every table needs at least one width choice, got {[list(c) for c in choices]}")
    rng = random.Random(config.seed)
    scores: dict[Candidate, float] = {}

    def score(candidate: Candidate) -> float:
        if candidate not in scores:
            scores[candidate] = float(fitness(candidate))
        return scores[candidate]

    first = [tuple(rng.choice(c) for c in choices) for _ in range(config.population)]
    alive = _fittest(first, score, config.survivors)
    history = []
    for _ in range(config.generations):
        children = [_mutate(rng.choice(alive), choices, config.mutation_prob, rng) for _ in range(config.mutations)]
        children += [_crossover(alive, rng) for _ in range(config.crossovers)]
        alive = _fittest(alive + children, score, config.survivors)
        history.append(scores[alive[0]])
    return EvolutionResult(alive[0], scores[alive[0]], history, scores)


def _fittest(candidates: list[Candidate], score: Callable[[Candidate], float], k: int) -> list[Candidate]:
    """The `k` best distinct candidates, best first (ties keep the earlier one)."""
    distinct = list(dict.fromkeys(candidates))
    return sorted(distinct, key=lambda c: -score(c))[:k]


def _mutate(parent: Candidate, choices: Sequence[Sequence[int]], prob: float, rng: random.Random) -> Candidate:
    return tuple(rng.choice(c) if rng.random() < prob else gene for gene, c in zip(parent, choices))


def _crossover(alive: list[Candidate], rng: random.Random) -> Candidate:
    if len(alive) < 2 or len(alive[0]) < 2:
        return rng.choice(alive)
    a, b = rng.sample(alive, 2)
    point = rng.randrange(1, len(a))
    return a[:point] + b[point:]
