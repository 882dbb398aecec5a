"""OptEmbed's evolutionary width search: deterministic for a seed, and it climbs."""

import pytest

from embtab.search import EvolutionConfig, evolve

CHOICES = [(4, 8, 12, 16)] * 6
TARGET = (8, 16, 4, 12, 8, 4)


def closeness(candidate: tuple[int, ...]) -> float:
    return -sum(abs(a - b) for a, b in zip(candidate, TARGET))


def test_same_seed_same_search_and_another_seed_explores_differently():
    config = EvolutionConfig(generations=8, seed=7)
    first, second = evolve(CHOICES, closeness, config), evolve(CHOICES, closeness, config)
    assert first.best == second.best and first.history == second.history
    assert list(first.scores) == list(second.scores)  # the same candidates, in the same order
    other = evolve(CHOICES, closeness, EvolutionConfig(generations=8, seed=8))
    assert list(other.scores) != list(first.scores)


def test_the_search_improves_monotonically_and_scores_each_candidate_once():
    calls: list[tuple[int, ...]] = []

    def counted(candidate: tuple[int, ...]) -> float:
        calls.append(candidate)
        return closeness(candidate)

    result = evolve(CHOICES, counted, EvolutionConfig(generations=30, seed=0))
    assert result.history == sorted(result.history)
    assert result.fitness == closeness(result.best) >= -4  # from about -24 for a random candidate
    assert len(calls) == len(set(calls)) == len(result.scores)
    initial = evolve(CHOICES, closeness, EvolutionConfig(generations=1, seed=0))
    assert result.fitness > initial.history[0]


def test_bad_configuration_is_an_error():
    with pytest.raises(ValueError, match=r"EvolutionConfig.survivors must be >= 1, got 0"):
        EvolutionConfig(survivors=0)
    with pytest.raises(ValueError, match=r"every table needs at least one width choice"):
        evolve([(4,), ()], closeness)
