"""The comparison engine on NumPy trees: structure, shape, dtype, NaN/Inf, values."""
from __future__ import annotations

import numpy as np
import pytest

from equivcheck.engine import tolerance
from equivcheck.engine.compare import compare, format_args, ulp_distance
from equivcheck.engine.tolerance import Tolerance

F32 = tolerance.lookup("float32")


def arr(*xs, dtype=np.float32):
    return np.asarray(xs, dtype=dtype)


def test_identical_trees_match_with_zero_ratio():
    v = compare({"a": arr(1, 2), "b": [arr(3)]}, {"a": arr(1, 2), "b": [arr(3)]}, F32)
    assert v.ok and v.kind == "match" and v.ratio == 0


@pytest.mark.parametrize("t, j, where", [
    ((arr(1), arr(2)), arr(1), "torch gives tuple of 2, jax gives array"),
    ({"a": arr(1)}, {"b": arr(1)}, "dict with keys ['a']"),
    ([arr(1), arr(2)], [arr(1)], "list of 2"),
])
def test_structure_mismatch_says_what_each_side_gives(t, j, where):
    v = compare(t, j, F32)
    assert not v.ok and v.kind == "structure" and where in v.message


def test_shape_and_dtype_mismatches_are_named_by_leaf():
    v = compare([arr(1, 2), arr(1, 2)], [arr(1, 2), arr(1, 2).reshape(1, 2)], F32)
    assert v.kind == "shape" and v.message.startswith("out[1]: shape differs: torch [2], jax [1, 2]")
    v = compare(arr(1, 2), arr(1, 2, dtype=np.float16), F32)
    assert v.kind == "dtype" and "torch float32, jax float16" in v.message


def test_integer_widths_may_differ_but_are_noted():
    v = compare(np.array([1, 2], np.int64), np.array([1, 2], np.int32), F32)
    assert v.ok and "integer widths differ" in v.notes[0]


def test_nan_on_one_side_names_that_side():
    v = compare(arr(1, np.nan), arr(1, 2), F32)
    assert v.kind == "nonfinite" and v.side == "torch" and "torch gives NaN" in v.message
    assert compare(arr(1, np.nan), arr(1, np.nan), F32).ok  # NaN in the same place agrees


def test_infinities_must_match_in_sign():
    assert not compare(arr(np.inf), arr(-np.inf), F32).ok
    assert compare(arr(np.inf), arr(np.inf), F32).ok


def test_values_use_the_symmetric_bound_and_report_the_worst_element():
    tol = Tolerance(1e-3, 0.0, "test")
    t = arr(1.0, 2.0, 3.0)
    j = arr(1.0005, 2.0, 3.01)
    v = compare(t, j, tol)
    assert not v.ok and v.kind == "values"
    w = v.worst
    assert w.worst_index == (2,) and w.torch_value == 3.0 and w.jax_value == pytest.approx(3.01)
    assert w.frac_bad == pytest.approx(1 / 3)
    assert w.max_abs == pytest.approx(0.01, rel=1e-4)
    assert "worst at index [2]" in w.summary()


def test_leaf_tolerances_bound_errors_by_the_leaf_s_largest_value():
    t, j = arr(100.0, 0.001), arr(100.0, 0.002)  # the small element is 100% off
    assert not compare(t, j, Tolerance(1e-3, 0.0, "t")).ok
    assert compare(t, j, Tolerance(1e-3, 0.0, "t", per="leaf")).ok  # but 1e-5 of the leaf's scale
    assert not compare(arr(100.0, 0.0), arr(100.0, 0.2), Tolerance(1e-3, 0.0, "t", per="leaf")).ok
    with pytest.raises(ValueError, match="'element' or 'leaf'"):
        Tolerance(1, 1, per="row")


def test_ratio_is_the_margin_used_against_the_tolerance():
    tol = Tolerance(0.0, 1.0, "test")
    v = compare(arr(0.0), arr(0.5), tol)
    assert v.ok and v.ratio == pytest.approx(0.5)


def test_masks_remove_elements_from_the_value_comparison():
    t, j = arr(1.0, 5.0), arr(1.0, -5.0)
    assert not compare(t, j, F32).ok
    assert compare(t, j, F32, masks={"out": np.array([False, True])}).ok


def test_ulp_distance_counts_units_of_the_compared_dtype():
    one = np.float64(1.0)
    assert ulp_distance(one, one + 2 * np.finfo(np.float32).eps, np.dtype(np.float32)) == pytest.approx(2)
    assert ulp_distance(one, one + np.finfo(np.float64).eps, np.dtype(np.float64)) == pytest.approx(1)


def test_empty_leaves_compare_as_equal():
    assert compare(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), F32).ok


def test_format_args_prints_small_arrays_in_full_and_summarises_large_ones():
    text = format_args([arr(1.5, -2.0), np.zeros((10, 10), np.float32), 3])
    assert "arg0: float32[2] [ 1.5, -2. ]" in text
    assert "arg1: float32[10, 10] range [0, 0]" in text and "arg2: 3" in text


def test_tolerance_table_follows_dtype_device_precision_and_check():
    assert tolerance.lookup("float32").rtol == 1.3e-6
    assert tolerance.lookup("float64", check="hvp").rtol == pytest.approx(4e-7)
    tf32 = tolerance.lookup("float32", device="gpu", precision="default", tags=frozenset({"matmul"}))
    assert tf32.rtol == tolerance.TF32.rtol
    plain = tolerance.lookup("float32", device="gpu", precision="default", tags=frozenset())
    assert plain.rtol == 1.3e-6
    assert tolerance.lookup("float32", override=Tolerance(0.1, 0.1, "why")).rtol == 0.1
    with pytest.raises(ValueError, match="no tolerance for dtype"):
        tolerance.lookup("int8")
    with pytest.raises(ValueError, match="non-negative"):
        Tolerance(-1, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_relative_only_bound_admits_a_subnormal_against_a_flushed_zero(dtype):
    # XLA flushes subnormals to zero on CPU where torch keeps them: log1p's relative-only bound
    # (atol 0) failed a one-ulp mutant at 0 (torch 1.4e-45, JAX 0).
    relative = Tolerance(1.3e-6, 0.0, "relative only")
    tiny = np.finfo(dtype).smallest_subnormal
    assert compare(arr(tiny, 1.0, dtype=dtype), arr(0.0, 1.0, dtype=dtype), relative).ok
    # Still relative above the subnormals: 2x the smallest normal against 0 is off by all of it.
    normal = 2 * np.finfo(dtype).smallest_normal
    v = compare(arr(normal, dtype=dtype), arr(0.0, dtype=dtype), relative)
    assert not v.ok and v.kind == "values"


def test_the_helpers_bound_is_the_verdicts_bound():
    """`allowed`/`within` serve every helper that explains a verdict (diagnosis, optimizer
    causes): the same subnormal floor and the same leaf-wise scale as `compare_leaf`."""
    from equivcheck.engine.compare import allowed, within

    rel_only = Tolerance(1e-6, 0.0, "relative only")
    t, j = np.array([1.4e-45, 1.0], np.float32), np.array([0.0, 1.0], np.float32)
    assert within(rel_only, t, j).all() and compare(t, j, rel_only).ok
    assert not within(rel_only, np.array([1e-37], np.float32), np.array([0.0], np.float32)).all()
    leafwise = Tolerance(1e-2, 0.0, "norm-wise", per="leaf")
    t, j = np.array([100.0, 0.0, np.inf]), np.array([100.0, 0.5, np.inf])
    assert within(leafwise, t, j).all()  # 0.5 against 1e-2 x 100, the leaf's largest finite magnitude
    assert allowed(leafwise, t, j)[1] == pytest.approx(1.0)
    assert not within(Tolerance(1e-2, 0.0, "element"), t, j)[1]
    assert not within(rel_only, np.array([np.nan]), np.array([np.nan])).any()
    assert within(rel_only, np.array([np.inf]), np.array([np.inf])).all()
    assert allowed(rel_only, np.zeros(1), np.zeros(1), "bfloat16")[0] == np.finfo(np.float32).smallest_normal
