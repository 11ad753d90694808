"""Arrays drawn in bulk (equivcheck.ops.bulk): the domain each spec promises, the special values
still reaching large arrays, and shrinking still heading to a readable counterexample."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings

from equivcheck import Floats, Index, Ints, Lengths, Mask
from equivcheck.engine.dtypes import np_dtype
from equivcheck.ops.bulk import ELEMENTWISE

FAST = settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SHRINK = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  derandomize=True)
LARGE = (4, 5, 3)
TINY = {"float16": 2.0**-14, "float32": 2.0**-126, "float64": 2.0**-1022, "bfloat16": 2.0**-126}


@pytest.mark.parametrize("spec", [Floats(-1e4, 1e4), Floats(-5, 5, min_magnitude=1e-3), Floats(0.1, 1e6),
                                  Floats(-1, 1, exclude=(0.0, 0.5)), Floats(-10, -1e-3)], ids=repr)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
def test_bulk_floats_stay_in_domain_with_no_subnormals(dtype, spec):
    @FAST
    @given(spec.draw(dtype, LARGE, (LARGE,)))
    def check(x):
        assert x.dtype == np_dtype(dtype) and x.shape == LARGE
        wide = x.astype(np.float64)
        assert np.all((wide >= spec.lo) & (wide <= spec.hi)), x
        assert not np.any((wide != 0) & (np.abs(wide) < TINY[dtype])), "a subnormal was drawn"
        if spec.min_magnitude:
            assert np.all((wide == 0) | (np.abs(wide) >= spec.min_magnitude * (1 - 1e-3)))
        assert not np.isin(wide, spec.exclude).any()

    check()


def test_wide_ranges_draw_every_order_of_magnitude():
    seen: list[np.ndarray] = []

    @FAST
    @given(Floats(-1e4, 1e4).draw("float32", LARGE, (LARGE,)))
    def check(x):
        seen.append(np.abs(x[x != 0]))

    check()
    mags = np.concatenate(seen)
    assert (mags < 1).mean() > 0.05 and (mags > 1e3).mean() > 0.2, "uniform alone would almost never draw |x| < 1"


def test_unique_holds_for_a_small_dtype_and_many_elements():
    @FAST
    @given(Floats(-5, 5, unique=True, min_magnitude=1e-15).draw("float16", (8, 10), ((8, 10),)))
    def check(x):
        assert len(np.unique(x)) == x.size

    check()


def test_special_values_reach_large_arrays_and_layouts_vary():
    spec = Floats(-3, 3, special=(1.5,), nonfinite=True)
    stats = {"nan": 0, "special": 0, "constant": 0, "spread": 0}

    @settings(FAST, max_examples=200)
    @given(spec.draw("float32", (10, 10), ((10, 10),)))
    def check(x):
        stats["nan"] += bool(np.isnan(x).any())
        stats["special"] += bool((x == 1.5).any())
        distinct = len(np.unique(x[np.isfinite(x)]))
        stats["constant"] += distinct <= 1
        stats["spread"] += distinct > 50

    check()
    assert all(v >= 5 for v in stats.values()), stats


@pytest.mark.parametrize("spec, top", [(Ints(0, 255, dtype="uint8"), 255), (Index(0, 0), 6), (Mask(), 1)], ids=repr)
def test_bulk_integers_indices_and_masks_stay_in_domain(spec, top):
    @FAST
    @given(spec.draw("float32", (7, 6), ((7, 6),)))
    def check(x):
        assert x.shape == (7, 6) and x.min() >= 0 and x.max() <= top

    check()


def test_bulk_lengths_keep_min_keep():
    spec = Lengths(min_keep=2)

    @FAST
    @given(spec.draw("float32", (12, 5), ((12, 5),)))
    def check(m):
        assert m.shape == (12, 5) and m.sum(-1).min() >= 2 and np.all(np.diff(m.astype(int), axis=-1) <= 0)

    check()


def test_shrinking_leaves_only_the_values_the_failure_needs():
    """A shrunk array of 60 elements reads as a few distinct values, not 60 random ones: zeros, a
    repeated value, and at most a handful of filled positions (the shrinker bisects how many
    positions take the fill, not which: the one that fails may be the eighth)."""
    spec = Floats(special=(0.0, 1.0))
    for fails in (lambda a: bool((a > 5).any()), lambda a: bool((np.diff(a.ravel()) < 0).any())):
        x = find(spec.draw("float32", LARGE, (LARGE,)), fails, settings=SHRINK)
        assert len(np.unique(x)) <= 12, x


def test_nan_shrinks_to_nan_and_at_most_one_other_value():
    x = find(Floats(nonfinite=True).draw("float64", LARGE, (LARGE,)), lambda a: bool(np.isnan(a).any()),
             settings=SHRINK)
    assert len(np.unique(x[~np.isnan(x)])) <= 1, x


def test_small_arrays_are_still_drawn_element_by_element():
    shape = (ELEMENTWISE,)
    x = find(Floats().draw("float32", shape, (shape,)), lambda a: bool((a > 5).any()), settings=SHRINK)
    assert np.count_nonzero(x) == 1 and x.max() > 5, x
