"""The size-budget allocator against brute force, and the storage count against a naive one."""

from __future__ import annotations

import itertools
import random

import pytest

from quant_core.allocation import Choice, allocate, storage_bits
from quant_core.errors import ConfigError
from quant_core.quantizer import QuantSpec


def _instance(seed: int, units: int, candidates: int) -> list[list[Choice]]:
    rng = random.Random(seed)
    return [[Choice(rng.randrange(1, 40) * 8, rng.uniform(0.0, 10.0)) for _ in range(candidates)] for _ in range(units)]


def _brute_force(units: list[list[Choice]], budget: int) -> float:
    feasible = [
        sum(choice.cost for choice in combo)
        for combo in itertools.product(*units)
        if sum(choice.size_bits for choice in combo) <= budget
    ]
    return min(feasible)


def _summed(units: list[list[Choice]], chosen: list[int]) -> tuple[int, float]:
    picked = [unit[k] for unit, k in zip(units, chosen, strict=True)]
    return sum(c.size_bits for c in picked), sum(c.cost for c in picked)


@pytest.mark.parametrize("seed", range(20))
def test_the_allocation_is_the_least_cost_that_fits_as_brute_force_finds(seed: int) -> None:
    units = _instance(seed, units=5, candidates=4)
    smallest = sum(min(c.size_bits for c in unit) for unit in units)
    largest = sum(max(c.size_bits for c in unit) for unit in units)
    budget = random.Random(seed).randrange(smallest, largest + 1)
    size, cost = _summed(units, allocate(units, budget))
    assert size <= budget
    assert cost == pytest.approx(_brute_force(units, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_a_coarse_granule_never_exceeds_the_budget_and_stays_near_the_optimum(seed: int) -> None:
    """With the table capped at 50 granules, sizes round up: the answer fits and is no better than the exact one."""
    units = _instance(seed, units=6, candidates=3)
    largest = sum(max(c.size_bits for c in unit) for unit in units)
    budget = (sum(min(c.size_bits for c in unit) for unit in units) + largest) // 2
    exact = _brute_force(units, budget)
    size, cost = _summed(units, allocate(units, budget, max_granules=50))
    assert size <= budget
    assert cost >= exact - 1e-12


def test_a_budget_below_the_narrowest_allocation_is_refused_naming_the_budget() -> None:
    units = [[Choice(16, 1.0), Choice(32, 0.5)], [Choice(8, 2.0)]]
    with pytest.raises(ConfigError, match="below the smallest allocation") as err:
        allocate(units, 23)
    assert err.value.field == "budget"
    assert allocate(units, 24) == [0, 0]
    assert allocate(units, 40) == [1, 0]


def test_storage_counts_codes_scales_and_zero_points_as_a_naive_count_does() -> None:
    out_features, in_features = 6, 100
    for scheme in (
        QuantSpec(bits=3, group_size=32),
        QuantSpec(bits=4, group_size=32, symmetric=True),
        QuantSpec(bits=2, group_size=None),
        QuantSpec(bits=8, group_size=128),
    ):
        naive = 0
        for _row in range(out_features):
            for _group_start in range(0, in_features, scheme.group_size or in_features):
                naive += 16 + (0 if scheme.symmetric else scheme.bits)  # the group's scale and zero point
            naive += in_features * scheme.bits
        assert storage_bits(out_features, in_features, scheme) == naive
