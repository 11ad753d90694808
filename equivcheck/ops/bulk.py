"""Arrays drawn in bulk: Hypothesis makes a few choices per array, NumPy fills the rest.

Drawing every element through Hypothesis cost ~35 us an element, 15 of the 25 ms an autodiff
example took (issue 19's profile). Here Hypothesis draws, per array:

    values   4 values from the spec's element strategy (its specials, near points,
             tiny magnitudes, NaN/inf where the spec asks)
    layout   0: the first value everywhere; 1: the values arranged by the seed
    seed     the NumPy generator's seed
    k        how many positions (the first k of a permutation drawn from the seed) take
             values NumPy draws from the spec's range (`fill`): all of them three times in
             four, so values repeat about as rarely as when drawn one by one
    placed   up to 8 (position, value) pairs written last: a special value anywhere in a
             large array, chosen by Hypothesis

Shrinking heads to a readable counterexample, as element-by-element drawing did: k shrinks
to the few random values the failure needs, the values to simple ones, the layout to one
value everywhere, the placed elements away, the seed to 0. Arrays of at most `ELEMENTWISE`
elements are still drawn element by element: nothing to save there.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

ELEMENTWISE = 8
PLACED = 8
VALUES = 4
Fill = Callable[[np.random.Generator, int], np.ndarray]


def bulk_array(dtype: np.dtype, shape: tuple[int, ...], elements: st.SearchStrategy[Any], fill: Fill, *,
               unique: bool = False, repeated: bool = False) -> st.SearchStrategy[np.ndarray]:
    """Arrays of `shape` and `dtype` (see the module docstring).

    elements  Hypothesis strategy for one element (values, placed elements, small arrays)
    fill      `fill(rng, k)`: k values as a 1-d array, what the spec draws in bulk
    unique    no two elements equal: every position takes the fill, repeats are redrawn
              (a small dtype's fill repeats values), and rejected if they persist
    repeated  mostly repeated values (ties, all-zero rows): at most a quarter of the
              positions take the fill
    """
    n = math.prod(shape)
    dtype = np.dtype(dtype)
    if n <= ELEMENTWISE:
        return st.lists(elements, min_size=n, max_size=n, unique=unique).map(
            lambda xs: np.array(xs, dtype=dtype).reshape(shape))
    # k = min(j, n): generation mostly fills every position (j > n three times in four), as
    # element-by-element drawing rarely repeats values, while the shrinker lowering j lowers k.
    # `repeated` specs fill at most a quarter.
    filled = st.just(n) if unique else (st.integers(0, n // 4) if repeated else st.integers(0, 4 * n).map(
        lambda j: min(j, n)))
    placed = st.lists(st.tuples(st.integers(0, n - 1), elements), max_size=min(n, PLACED))
    # Values first and of fixed count, as the element-by-element draw of a small array: when the
    # shrinker moves to a smaller shape, the choices it keeps still mean element values.
    parts = st.tuples(st.lists(elements, min_size=VALUES, max_size=VALUES), st.integers(0, 1),
                      st.integers(0, 2**32 - 1), filled, placed)

    def build(choice: tuple[list[Any], int, int, int, list[tuple[int, Any]]]) -> np.ndarray:
        values, layout, seed, k, where = choice
        # One generator per use, and the fill drawn for every position whatever k is: a
        # shrinker lowering k or dropping a value then changes nothing else, so it can
        # bisect k down to the few filled positions the failure needs.
        arrange, order, values_rng = (np.random.default_rng([seed, i]) for i in range(3))
        if layout == 0:
            flat = np.full(n, values[0], dtype=dtype)
        else:
            flat = np.array(values, dtype=dtype)[arrange.integers(0, 4, n) % len(values)]
        if k:
            drawn = np.asarray(fill(values_rng, n)).astype(dtype, copy=False).reshape(n)
            chosen = order.permutation(n)[:k]
            flat[chosen] = drawn[chosen]
        for pos, value in where:
            flat[pos] = value
        if unique:
            flat = _distinct(flat, fill, values_rng, {pos for pos, _ in where})
        return flat.reshape(shape)

    return parts.map(build)


def _distinct(flat: np.ndarray, fill: Fill, rng: np.random.Generator, placed: set[int]) -> np.ndarray:
    """Repeats of a value redrawn from the fill (a placed element keeps its value): a small
    dtype's fill repeats values often. Rejected when a few redraws leave repeats."""
    for _ in range(16):
        _, first, counts = np.unique(flat, return_index=True, return_counts=True)
        if len(first) == len(flat):
            return flat
        keep = set(first[counts == 1].tolist()) | placed
        # One occurrence of each repeated value stays, preferring a placed one.
        for value in np.unique(flat[np.isin(flat, flat[first[counts > 1]])]):
            where = np.flatnonzero(flat == value)
            keep.add(next((int(i) for i in where if int(i) in placed), int(where[0])))
        redo = np.array([i for i in range(len(flat)) if i not in keep], dtype=np.int64)
        flat[redo] = np.asarray(fill(rng, len(redo))).astype(flat.dtype, copy=False)
    assume(False)
    return flat


def float_fill(lo: float, hi: float, bands: list[tuple[float, float]], dtype: np.dtype, tiny: float,
               exclude: tuple[float, ...] = ()) -> Fill:
    """Floats in [lo, hi] restricted to `bands` (closed intervals), rounded into `dtype`.

    Half the values are uniform in a band; the other half spread over its orders of magnitude
    (log-uniform), so a wide range (+-1e4) still draws values near 1, and small ones. Values
    that round to a subnormal become 0 (or +-tiny where 0 is outside the range): the element
    strategy draws no subnormals either, and XLA on CPU flushes them. An `exclude`d value is
    moved to its neighbour in the dtype."""
    widths = np.array([b - a for a, b in bands], dtype=np.float64)
    weights = widths / widths.sum() if widths.sum() > 0 else np.full(len(bands), 1 / len(bands))
    starts, ends = np.array([a for a, _ in bands]), np.array([b for _, b in bands])

    def fill(rng: np.random.Generator, n: int) -> np.ndarray:
        which = rng.choice(len(bands), size=n, p=weights)
        lo_b, hi_b = starts[which], ends[which]
        x = rng.uniform(lo_b, hi_b)
        spread = rng.random(n) < 0.5
        x = np.where(spread, _log_spread(rng, lo_b, hi_b, x), x)
        out = x.astype(dtype)
        wide = out.astype(np.float64)
        # Rounding is monotone and lo, hi are representable: only a spread value can step out.
        out = np.where((wide < lo) | (wide > hi), np.clip(x, lo, hi).astype(dtype), out)
        sub = (out != 0) & (np.abs(out.astype(np.float64)) < tiny)
        if sub.any():
            zero_ok = lo <= 0 <= hi
            out[sub] = 0 if zero_ok else np.copysign(tiny, out[sub].astype(np.float64)).astype(dtype)
        return step_off(out, exclude, hi, tiny)

    return fill


def step_off(a: np.ndarray, exclude: tuple[float, ...], hi: float, tiny: float) -> np.ndarray:
    """`a` with each `exclude`d value moved to its neighbour in a's dtype (up, or down where up
    passes `hi`; 0 to +-tiny, not to a subnormal). A copy only where something moved."""
    if not exclude:
        return a
    bad = np.isin(a.astype(np.float64), np.array(exclude, dtype=np.float64))
    if not bad.any():
        return a
    a, v = a.copy(), a[bad]
    step = np.array(tiny, dtype=a.dtype)
    up = np.where(v == 0, step, np.nextafter(v, np.array(np.inf, dtype=a.dtype)))
    down = np.where(v == 0, -step, np.nextafter(v, np.array(-np.inf, dtype=a.dtype)))
    a[bad] = np.where(up.astype(np.float64) <= hi, up, down)
    return a


def _log_spread(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x scaled down over the band's decades: within [a, b] because the band holds 0, or
    log-uniform between its ends when it does not."""
    top = np.maximum(np.abs(a), np.abs(b))
    holds_zero = (a <= 0) & (b >= 0)
    decades = np.clip(np.log10(np.maximum(top, 1e-300) / 1e-3), 0, 40)
    scaled = x * 10.0 ** (-rng.random(x.shape) * decades)
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(np.abs(a)), np.log(np.abs(b))
        mag = np.exp(la + rng.random(x.shape) * (lb - la))
    one_sided = np.where(a > 0, mag, -mag)
    return np.where(holds_zero, scaled, np.where(np.isfinite(one_sided), one_sided, x))


__all__ = ["ELEMENTWISE", "PLACED", "bulk_array", "float_fill", "step_off"]
