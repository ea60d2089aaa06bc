"""The global-budget allocator: lower hulls and greedy allocation against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxopt.passes.compression_budget import Level, allocate, lower_hull


def test_lower_hull_drops_dominated_and_concave_points():
    levels = [Level("a", 0.1, 5, 0.1), Level("a", 0.2, 10, 0.05), Level("a", 0.3, 15, 0.3), Level("a", 0.4, 20, 0.31)]
    hull = lower_hull(levels)
    assert [p.level for p in hull] == [0.2, 0.4]


def brute_force(curves, target):
    """Least summed error over every combination meeting the target (None = layer untouched)."""
    best = None
    options = [[None, *levels] for levels in curves.values()]
    for combo in itertools.product(*options):
        saved = sum(p.saved for p in combo if p)
        if saved >= target:
            error = sum(p.error for p in combo if p)
            best = error if best is None else min(best, error)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_close_to_brute_force_on_convex_curves(seed):
    rng = np.random.default_rng(seed)
    curves = {}
    for name in "abcd":
        scale = rng.uniform(0.01, 1.0)
        saved = rng.uniform(5, 20)
        curves[name] = [Level(name, f, saved * f, scale * f**2) for f in (0.25, 0.5, 0.75)]
    total = sum(levels[-1].saved for levels in curves.values())
    target = 0.5 * total
    result = allocate(curves, target)
    assert result.reached and result.saved >= target
    optimum = brute_force(curves, target)
    greedy = sum(p.error for p in result.chosen.values())
    assert greedy <= optimum * 1.5 + 1e-12


def test_unreachable_target_takes_everything_and_says_so():
    curves = {"a": [Level("a", 0.5, 10, 0.1)], "b": [Level("b", 0.5, 5, 0.2)]}
    result = allocate(curves, 100)
    assert not result.reached
    assert result.saved == 15
    assert set(result.chosen) == {"a", "b"}


def test_least_sensitive_layer_is_compressed_first():
    curves = {"sensitive": [Level("sensitive", 0.5, 10, 1.0)], "robust": [Level("robust", 0.5, 10, 0.01)]}
    result = allocate(curves, 10)
    assert list(result.chosen) == ["robust"]


def test_equal_savings_keep_the_lower_error_and_do_not_divide_by_zero():
    # one layer scored by two methods whose costs coincide (a 3x3 conv with Cin == Cout, either orientation)
    curve = [Level("a", 0, 50.0, 0.3), Level("a", 1, 50.0, 0.1), Level("a", 2, 80.0, 0.5), Level("a", 3, 80.0, 0.4)]
    assert [p.level for p in lower_hull(curve)] == [1, 3]
    allocation = allocate({"a": curve, "b": [Level("b", 0, 40.0, 0.2)]}, 100.0)
    assert allocation.reached and allocation.chosen["a"].level == 3
